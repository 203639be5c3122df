"""A trace's heap after every operation, for `malloc replay --timeline`: recorded in the lab's fresh workers.

After each operation a worker walks the heap and stores only what changed since the step before: one splice
of the chunk list (where it starts, how many chunks it removes, the chunks it puts there), plus from time to
time a keyframe, the whole list. A chunk is four integers: its gap (its address minus where the chunk before
it ended; the first chunk's gap is its address), its size, its state code (`STATES`), and its bin if free,
else the bytes asked for (-1 when not known). A page steps to operation k by copying the keyframe at or
before k and applying the splices after it.

Ours is walked with the engine's own `walk()`, its system calls come from `malloc.trace()` with their
reasons; the C library is given room first, so that the recording's own lists do not move the break.

glibc is walked the way gdb's heap tools walk it: from the replay's first chunk (the stand-in for a fresh
program's tcache, see `baselines.fresh_start`) to the top, by the chunk headers' sizes, a chunk being free
when the next one's PREV_INUSE bit is clear, so chunks in glibc's tcache and fastbins read as in use; its
mapped chunks are the replay's blocks whose header says IS_MMAPPED. That walk allocates nothing from the C
library (every buffer is made before glibc's heap is prepared), so it cannot disturb the heap it reads.
glibc's system calls per operation come from strace's timestamps against the times the worker noted after
each operation.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import os
import re
import tempfile
import time
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..heap import Chunk
from .formats import ALLOC, FREE, REALLOC, Trace
from .replay import Json, Window, replay

# State codes in the recorded chunks, in the heap map's order of states.
STATES = ("in use", "cached", "free", "top", "foreign", "mapped")
CODE = {state: i for i, state in enumerate(STATES)}
IN_USE, CACHED, FREE_CHUNK, TOP, FOREIGN, MAPPED = range(len(STATES))
KEY_EVERY = 1000  # the most splices a page applies to reach a step from its keyframe
HEADER = 16  # a block starts 16 bytes after its chunk, in glibc and ours alike
IS_MMAPPED = 2
PREV_INUSE = 1
M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2  # glibc's mallopt parameters

Chunk4 = tuple[int, int, int, int]


def encode(chunks: Iterable[Chunk]) -> list[Chunk4]:
    """Chunks from a walk as (gap, size, state code, bin or request) tuples."""
    out: list[Chunk4] = []
    append = out.append
    code = CODE
    end = 0
    for c in chunks:
        address, size, state = c.address, c.size, c.state
        append((address - end, size, code[state], c.bin if state == "free" else c.request))
        end = address + size
    return out


def decode(rows: Sequence[Chunk4]) -> list[Chunk]:
    """`encode`'s chunks back (the request of a free chunk, which `encode` does not keep, as -1)."""
    out: list[Chunk] = []
    end = 0
    for gap, size, code, extra in rows:
        address = end + gap
        free = code == FREE_CHUNK
        out.append(Chunk(address, size, STATES[code], extra if free else -1, -1 if free else extra))
        end = address + size
    return out


def splice(before: Sequence[Chunk4], after: Sequence[Chunk4]) -> tuple[int, int, list[Chunk4]]:
    """(start, count removed, chunks inserted) that turn `before` into `after`: what lies between their
    longest common beginning and end."""
    n, m = len(before), len(after)
    limit = min(n, m)
    i = 0
    while i < limit and before[i] == after[i]:
        i += 1
    j = 0
    while j < limit - i and before[n - 1 - j] == after[m - 1 - j]:
        j += 1
    return i, n - i - j, list(after[i:m - j])


class Steps:
    """The chunk lists of consecutive steps, kept as keyframes and splices.

    A keyframe is taken at step 0, and later whenever the splices since the last keyframe hold as many chunks
    as the list itself (so keyframes at most double the size) or KEY_EVERY steps have passed (so a page never
    applies more than that many splices to reach a step).
    """

    def __init__(self) -> None:
        self.keys: list[tuple[int, list[Chunk4]]] = []
        self.splices: list[tuple[int, int, list[Chunk4]]] = []
        self.last: list[Chunk4] = []
        self.since = 0  # chunks inserted since the last keyframe

    def add(self, chunks: list[Chunk4]) -> None:
        step = len(self.splices)
        start, removed, inserted = splice(self.last, chunks)
        self.splices.append((start, removed, inserted))
        self.since += len(inserted) + 1
        if not self.keys or self.since >= len(chunks) or step - self.keys[-1][0] >= KEY_EVERY:
            self.keys.append((step, chunks))
            self.since = 0
        self.last = chunks

    def to_json(self) -> Json:
        return {"keys": [[k, _flat(rows)] for k, rows in self.keys],
                "splices": [[start, removed, *_flat(rows)] for start, removed, rows in self.splices]}


def _flat(rows: Iterable[Chunk4]) -> list[int]:
    return [x for row in rows for x in row]


# ----------------------------------------------------------------------------- ours


def record_ours(trace: Trace, settings: Sequence[tuple[int, int]], table: list[Any]) -> Json:
    """Replay `trace` through this process's allocator, walking its heap after every operation.

    Returns {"timeline": recording}: the steps ("keys", "splices"), "addr" (the block each operation made,
    or freed), "footprint" (bytes held from the OS after each), "calls" ([step, [[text, reason], ...]] for
    the steps that made system calls) and "heaps" ([base, label] of every heap).
    """
    import malloc

    from .baselines import glibc

    for param, value in settings:
        malloc.mallopt(param, value)
    malloc.remember_requests()
    _pin_glibc(glibc())
    allocator = malloc.allocator
    api = (malloc.malloc, malloc.free, malloc.realloc)
    n = trace.num_ops
    addr = [0] * n
    footprint = [0] * n
    steps = Steps()
    calls_by_step: list[list[object]] = []
    with malloc.trace() as calls:
        for k, op in enumerate(trace.ops):
            i = op[1]
            old = table[i]
            seen = len(calls)
            replay((op,), table, *api)
            addr[k] = table[i] or old  # a free's (or a realloc to 0's) is the block it freed
            steps.add(encode(allocator.walk()))  # first: a walk finishes the work an operation deferred
            footprint[k] = allocator.system_current
            if len(calls) > seen:
                calls_by_step.append([k, [[e.text(), e.reason] for e in calls[seen:]]])
    heaps = [[h.base, f"heap {j} ({h.region.kind})"] for j, h in enumerate(allocator.heaps)]
    return {"timeline": {**steps.to_json(), "addr": addr, "footprint": footprint, "calls": calls_by_step,
                         "heaps": heaps}}


def _pin_glibc(libc: ctypes.CDLL, pad: int = 64 << 20) -> None:
    """Make the C library take `pad` bytes of break now and keep them (no trimming): the lists this recording
    grows then come from that room, and do not move the break between our heap's growths, where they would
    show as foreign chunks that a replay without a recording does not have."""
    if libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) != 1 or libc.mallopt(M_TOP_PAD, pad) != 1:
        raise RuntimeError("the C library refused mallopt")
    start = libc.sbrk(0)
    blocks: list[int] = []
    # Blocks under glibc's mmap threshold come from its heap; the first its top cannot serve grows the break
    # by the block and the pad.
    while libc.sbrk(0) == start and len(blocks) < 4096:
        blocks.append(libc.malloc(64 << 10))
    for block in blocks:
        libc.free(block)


# ----------------------------------------------------------------------------- glibc


def glibc_bin(size: int) -> int:
    """The bin glibc files a free chunk of `size` bytes under once sorted (small bins, then 64-bit large)."""
    if size < 1024:
        return size >> 4
    for shift, base, limit in ((6, 48, 48), (9, 91, 20), (12, 110, 10), (15, 119, 4), (18, 124, 2)):
        if size >> shift <= limit:
            return base + (size >> shift)
    return 126


class Buffers:
    """Everything glibc's recorded replay writes into, made before glibc's heap is prepared: two chunk lists
    (4 words a chunk) swapped at every step, the output words (flushed to a file when full), the mapped
    blocks in address order, and per operation its block, footprint and time."""

    OUT_WORDS = 1 << 16

    def __init__(self, trace: Trace) -> None:
        makes = sum(1 for code, _, _ in trace.ops if code != FREE)
        self.capacity = makes + 4  # a chunk is made by a split: never more chunks than allocations, plus top
        self.lists = [_words(4 * self.capacity), _words(4 * self.capacity)]
        self.out = _words(self.OUT_WORDS)
        self.mapped = _words(makes + 1)
        self.addr = _words(trace.num_ops)
        self.footprint = _words(trace.num_ops)
        self.times = memoryview(bytearray(8 * max(1, trace.num_ops))).cast("d")
        # Opened now, read and closed by record_glibc once the replay is over.
        self.file = tempfile.TemporaryFile(prefix="malloc-timeline-")  # noqa: SIM115


def _words(n: int) -> memoryview:
    return memoryview(bytearray(8 * max(1, n))).cast("q")


def record_glibc(libc: ctypes.CDLL, trace: Trace, settings: Sequence[tuple[int, int]], table: list[Any],
                 tcache: int, buffers: Buffers, window: Window = contextlib.nullcontext) -> Json:
    """Replay `trace` through glibc (prepared as for `baselines.measure_glibc`), walking its heap after every
    operation into `buffers`; the recording as `record_ours` returns it, with "times" (when each operation
    ended, for `add_strace`), "start" (the replay's first chunk) and "brk0" (the break before the replay)
    instead of "calls" and "heaps"."""
    from .baselines import fresh_start

    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise ValueError(f"glibc's mallopt refused parameter {param} = {value}")
    malloc, free, realloc, sbrk = libc.malloc, libc.free, libc.realloc, libc.sbrk
    word = ctypes.c_size_t.from_address
    brk0 = sbrk(0)
    start = brk0 - libc.mallinfo2().keepcost  # the top chunk ends at the break: the stand-in is made there
    b = buffers
    lists, out, mapped, addr, footprint, times = b.lists, b.out, b.mapped, b.addr, b.footprint, b.times
    fd = b.file.fileno()
    previous = 0  # chunks in lists[0], the last step's
    used = 0  # words in `out`
    n_mapped = mapped_bytes = foreign = 0
    since = 0
    last_key = 0
    with window():
        begun = time.time()
        fresh_start(libc, trace.ops, tcache)
        last = sbrk(0)
        for k, (code, i, n) in enumerate(trace.ops):
            if sbrk(0) != last:
                foreign += 1
            p = table[i]
            if code != ALLOC and p:
                w = word(p - 8).value
                if w & IS_MMAPPED:
                    mapped_bytes -= w & ~7
                    j = 0
                    while mapped[j] != p:
                        j += 1
                    mapped[j:n_mapped - 1] = mapped[j + 1:n_mapped]
                    n_mapped -= 1
            if code == ALLOC:
                p = malloc(n)
            elif code == REALLOC:
                p = realloc(p, n)
            else:
                free(p)
                p = 0
            addr[k] = p or table[i]  # a free's (or a realloc to 0's) is the block it freed
            table[i] = p
            times[k] = time.time()
            if p:
                w = word(p - 8).value
                if w & IS_MMAPPED:
                    mapped_bytes += w & ~7
                    j = n_mapped
                    while j and mapped[j - 1] > p:
                        j -= 1
                    mapped[j + 1:n_mapped + 1] = mapped[j:n_mapped]
                    mapped[j] = p
                    n_mapped += 1
            last = sbrk(0)
            footprint[k] = last - brk0 + mapped_bytes
            # Walk: the heap from the replay's first chunk to the top, then the mapped chunks.
            cur = lists[1]
            count = 0
            a = start
            end = 0
            while True:
                size = word(a + 8).value & ~7
                if size < 16 or a + size > last:
                    raise RuntimeError(f"op {k}: glibc's chunk at {a:#x} ({size} bytes) does not end by the "
                                       f"break {last:#x}")
                if a + size == last:
                    state, extra = TOP, -1
                elif word(a + size + 8).value & PREV_INUSE:
                    state, extra = IN_USE, -1
                else:
                    state, extra = FREE_CHUNK, glibc_bin(size)
                x = 4 * count
                cur[x] = a - end
                cur[x + 1] = size
                cur[x + 2] = state
                cur[x + 3] = extra
                count += 1
                end = a + size
                a = end
                if state == TOP:
                    break
            for j in range(n_mapped):
                a = mapped[j] - HEADER
                x = 4 * count
                cur[x] = a - end
                cur[x + 1] = size = word(a + 8).value & ~7
                cur[x + 2] = MAPPED
                cur[x + 3] = -1
                count += 1
                end = a + size
            # The splice from the step before, into `out`: [k, start, removed, inserted, chunk words...].
            before = lists[0]
            limit = min(previous, count)
            s = 0
            while s < limit and _same(before, 4 * s, cur, 4 * s):
                s += 1
            t = 0
            while t < limit - s and _same(before, 4 * (previous - 1 - t), cur, 4 * (count - 1 - t)):
                t += 1
            inserted = count - s - t
            need = 5 + 4 * inserted + 3 + 4 * count
            if used + need > len(out):
                os.write(fd, out[:used])
                used = 0
                if need > len(out):
                    raise RuntimeError(f"op {k}: {count} chunks do not fit the timeline's buffer")
            out[used:used + 5] = array("q", (0, k, s, previous - s - t, inserted))
            out[used + 5:used + 5 + 4 * inserted] = cur[4 * s:4 * (s + inserted)]
            used += 5 + 4 * inserted
            since += inserted + 1
            if k == 0 or since >= count or k - last_key >= KEY_EVERY:
                out[used:used + 3] = array("q", (1, k, count))
                out[used + 3:used + 3 + 4 * count] = cur[:4 * count]
                used += 3 + 4 * count
                since = 0
                last_key = k
            lists[0], lists[1] = cur, before
            previous = count
    os.write(fd, out[:used])
    with b.file:
        steps = _read_steps(b.file, trace.num_ops)
    return {"timeline": {**steps, "addr": addr.tolist(),
                         "footprint": footprint.tolist(), "times": [begun, *times.tolist()], "start": start,
                         "brk0": brk0},
            "foreign_brk_moves": foreign}


def _same(a: memoryview, x: int, b: memoryview, y: int) -> bool:
    """Whether the chunk at word x of `a` equals the one at word y of `b` (no slice objects: no copies)."""
    return a[x] == b[y] and a[x + 1] == b[y + 1] and a[x + 2] == b[y + 2] and a[x + 3] == b[y + 3]


def _read_steps(file: Any, n: int) -> Json:
    """The keyframes and splices `record_glibc` wrote to `file`."""
    file.seek(0)
    words = array("q")
    words.frombytes(file.read())
    keys: list[list[object]] = []
    splices: list[list[int]] = []
    x = 0
    while x < len(words):
        if words[x] == 0:
            inserted = words[x + 4]
            splices.append(words[x + 2:x + 4].tolist() + words[x + 5:x + 5 + 4 * inserted].tolist())
            x += 5 + 4 * inserted
        else:
            count = words[x + 2]
            keys.append([words[x + 1], words[x + 3:x + 3 + 4 * count].tolist()])
            x += 3 + 4 * count
    if len(splices) != n:
        raise RuntimeError(f"the timeline holds {len(splices)} steps for {n} operations")
    return {"keys": keys, "splices": splices}


def add_strace(result: Json, log: str) -> None:
    """Give each of glibc's recorded operations the system calls strace logged during it (`SelfTrace` with
    timestamps; the calls made through ctypes only), with a reason inferred from the call; the calls of the
    stand-in for a fresh program's first malloc (made just before the first operation) go to step 0."""
    from .baselines import from_foreign_call

    timeline = result["timeline"]
    begun, *times = timeline.pop("times")
    found: dict[int, list[list[str]]] = {}
    timeline["calls"] = []
    if not times:
        return
    brk = 0
    for when, text, stack in _strace_calls(Path(log).read_text(errors="replace")):
        if not from_foreign_call(stack) or not begun <= when <= times[-1]:
            continue
        name = text.split("(", 1)[0]
        k = bisect.bisect_left(times, when)
        reason = ""
        if name == "brk":
            now = int(text.rsplit("=", 1)[1], 16)
            reason = ("glibc's first malloc: the tcache and the top, as in a fresh program" if not brk
                      else "the heap grew: its top was too small" if now > brk
                      else "the heap shrank: its top was above the trim threshold")
            brk = now
        elif name == "mmap":
            reason = "a mapped chunk: the request was at or above the mmap threshold (or the heap could not grow)"
        elif name == "munmap":
            reason = "a mapped chunk given back"
        elif name == "mremap":
            reason = "a mapped chunk resized"
        found.setdefault(k, []).append([text, (reason + " (inferred)") if reason else "(inferred: none)"])
    timeline["calls"] = [[k, found[k]] for k in sorted(found)]


def _strace_calls(log: str) -> list[tuple[float, str, list[str]]]:
    """(timestamp, call as strace shows it, stack) of every call in an `strace -ttt -k` log."""
    calls: list[tuple[float, str, list[str]]] = []
    for line in log.splitlines():
        if line.startswith(" > "):
            if calls:
                calls[-1][2].append(line)
            continue
        stamp, _, text = line.partition(" ")
        with contextlib.suppress(ValueError):
            calls.append((float(stamp), re.sub(r"\)\s+= ", ") = ", text.strip()), []))
    return calls


# ----------------------------------------------------------------------------- the page


def write_timeline(trace: Trace, out: str | os.PathLike[str], plan: Any,
                   progress: Any = None) -> dict[str, Any]:
    """Record `trace` through ours (and glibc, if `plan.against` names it), each in a fresh worker, and write
    the page to `out`; returns {"ops", "bytes", "seconds", "errors"}. `plan` is the lab's `Plan` (its
    settings and whether strace is used); `progress(label)` is told what runs."""
    from ..inspect.timeline_page import Side, glibc_note, ours_note, render_page
    from .lab import Job, run_workers
    from .opsfile import write_ops
    from .replay import live_bytes

    if not trace.num_ops:
        raise ValueError(f"trace {trace.name!r} has no operations: no timeline to draw")
    t0 = time.perf_counter()
    errors: list[str] = []
    sides: list[Side] = []
    allocs = ["ours", *(["glibc"] if "glibc" in plan.against else [])]
    with tempfile.TemporaryDirectory(prefix="malloc-timeline-") as tmp:
        ops = Path(tmp) / "trace.ops"
        write_ops(trace, ops)
        if progress is not None:
            progress(f"{trace.name}: {' and '.join(allocs)} timeline")
        # At once: nothing is timed, and each recording walks a heap of its own process.
        results = run_workers([Job(alloc, "timeline", ops, tuple(plan.settings),
                                   plan.use_strace and alloc == "glibc") for alloc in allocs])
    for alloc, r in zip(allocs, results, strict=True):
        if "error" in r:
            errors.append(f"{alloc} timeline: {r['error']}")
            continue
        if r.get("foreign_brk_moves"):
            errors.append(f"glibc timeline: the break moved {r['foreign_brk_moves']} times outside its calls")
        recording = r["timeline"]
        recording.setdefault("calls", [])
        sides.append(Side(alloc, ours_note() if alloc == "ours" else glibc_note(), recording))
    if not sides:
        raise RuntimeError("no timeline recorded: " + "; ".join(errors))
    page = render_page(trace, live_bytes(trace), sides)
    Path(out).write_text(page, encoding="utf-8")
    return {"ops": trace.num_ops, "bytes": len(page.encode()), "seconds": time.perf_counter() - t0,
            "errors": errors}
