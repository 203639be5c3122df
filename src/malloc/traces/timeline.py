"""A trace's heap after every operation, for `malloc replay --timeline`: recorded in the lab's fresh workers.

After each operation a worker brings its chunk list up to date and stores only what changed since the step
before: one splice of the list (where it starts, how many chunks it removes, the chunks it puts there), plus
from time to time a keyframe, the whole list. A chunk is four integers: its gap (its address minus where the
chunk before it ended; the first chunk's gap is its address), its size, its state code (`STATES`), and its bin
if free, else the bytes asked for (-1 when not known). A page steps to operation k by copying the keyframe at
or before k and applying the splices after it.

Walking the whole heap after every operation costs as many chunk reads as the heap has chunks, thousands on
a real trace; so each side walks again only from the chunk before the first one the operation may have
changed (the block it freed, the one it made, the top if it moved) until, past the chunk after the last, the
walk meets a chunk where one began before (`chunklist.ChunkList` keeps the list and finds the splice). What
else an operation may change, each side finds or foresees, and then walks the whole heap (see
`OursWalker` and `record_glibc`); the tests compare the list with a whole walk after every operation.

Ours is walked with the engine's own `Heap.walk`, its system calls come from `malloc.trace()` with their
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
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..heap import Chunk, Heap
from .chunklist import ChunkList, words
from .formats import ALLOC, FREE, REALLOC, Trace
from .replay import Json, Window, replay

if TYPE_CHECKING:
    from ..process import ProcessAllocator
    from .baselines import MallInfo2

# State codes in the recorded chunks, in the heap map's order of states.
STATES = ("in use", "cached", "free", "top", "foreign", "mapped")
CODE = {state: i for i, state in enumerate(STATES)}
IN_USE, CACHED, FREE_CHUNK, TOP, FOREIGN, MAPPED = range(len(STATES))
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


# ----------------------------------------------------------------------------- ours


def record_ours(trace: Trace, settings: Sequence[tuple[int, int]], table: list[Any], check: bool = False) -> Json:
    """Replay `trace` through this process's allocator, walking its heap after every operation.

    Returns {"timeline": recording}: the steps ("keys", "splices"), "addr" (the block each operation made,
    or freed), "footprint" (bytes held from the OS after each), "calls" ([step, [[text, reason], ...]] for
    the steps that made system calls) and "heaps" ([base, label] of every heap). With `check`, the chunk list
    is compared with the engine's own `walk()` after every operation (RuntimeError at the first difference).
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
    keys: list[list[object]] = []
    splices: list[list[int]] = []
    calls_by_step: list[list[object]] = []
    walker = OursWalker(allocator, trace.num_ops)
    rows = walker.chunks
    with malloc.trace() as calls:
        for k, op in enumerate(trace.ops):
            code, i, size = op
            old = table[i] if code != ALLOC else 0
            seen = len(calls)
            replay((op,), table, *api)
            new = table[i]
            addr[k] = new or old  # a free's (or a realloc to 0's) is the block it freed
            start, removed, inserted = walker.step(code, old, new, size)  # first: it finishes deferred work
            footprint[k] = allocator.system_current
            if len(calls) > seen:
                calls_by_step.append([k, [[e.text(), e.reason] for e in calls[seen:]]])
            splices.append([start, removed, *rows.rows[4 * start:4 * (start + inserted)].tolist()])
            if rows.key_due(k, inserted):
                keys.append([k, rows.rows[:4 * rows.n].tolist()])
            if check:
                truth = _flat(encode(allocator.walk()))
                if rows.rows[:4 * rows.n].tolist() != truth:
                    raise RuntimeError(f"op {k}: the recorded chunks differ from walk()'s")
    heaps = [[h.base, f"heap {j} ({h.region.kind})"] for j, h in enumerate(allocator.heaps)]
    return {"timeline": {"keys": keys, "splices": splices, "addr": addr, "footprint": footprint,
                         "calls": calls_by_step, "heaps": heaps}}


def _flat(rows: Iterable[Chunk4]) -> list[int]:
    return [x for row in rows for x in row]


class OursWalker:
    """Our allocator's chunks after every operation, walked again only around what the operation changed:
    the chunks of the block it freed and the one it made, of the blocks that entered or left the fast cache,
    and the top if it moved, each with its neighbours (which a free merges with), until the walk meets a chunk
    where one began before; the mapped chunks are listed again when they changed. With more than one heap
    (the break could not grow), every heap is walked whole."""

    def __init__(self, allocator: ProcessAllocator, ops: int) -> None:
        self.allocator = allocator
        self.chunks = ChunkList(ops + 8, grow=True)
        self.heap: Heap | None = None  # the one heap walked in parts, once there is exactly one
        self.cached: dict[int, int] = {}
        self.mapped: dict[int, tuple[int, int]] = {}
        self.live: dict[int, int] = {}  # block -> bytes asked for, as remember_requests keeps them

    def step(self, code: int, old: int, new: int, size: int) -> tuple[int, int, int]:
        """The splice after an operation (`code`) that freed or resized block `old` (or 0) and made `new` (or
        0), of `size` bytes: see `ChunkList.replace`."""
        allocator, rows = self.allocator, self.chunks
        cached = allocator.cached_blocks()  # first: what the operation deferred is done
        mapped = allocator.mappings()
        heaps = allocator.heaps
        if old:
            self.live.pop(old, None)
        if new:
            self.live[new] = size
        was = self.cached
        # A malloc only takes from the cache (its own block, or the blocks it gives back to the heap before
        # going to the OS), a free only adds its own: unless the count says otherwise, only theirs changed.
        if code == ALLOC and len(cached) == len(was) - (new in was):
            changed: Collection[int] = (new,) if new in was else ()
        elif code == FREE and len(cached) == len(was) + (old in cached):
            changed = (old,) if old in cached else ()
        else:
            changed = cached.keys() ^ was.keys()
        self.cached = cached
        before = self.mapped
        # A mapped block resized in place keeps its mapping, not its request: list the mapped chunks again.
        mapped_changed = mapped != before or old in before or new in mapped
        self.mapped = mapped
        if len(heaps) != 1 or heaps[0] is not self.heap:
            self.heap = heaps[0] if len(heaps) == 1 else None
            rows.begin(0)
            for heap in sorted(heaps, key=lambda h: h.base):
                self._add(heap.walk())
            heap_rows = rows.m
            self._add_mapped()
            return rows.replace(0, rows.n, heap_rows)
        heap = self.heap
        h = rows.heap_rows
        top_size = heap.top_size
        top_moved = heap.end - top_size != rows.addr[h - 1] or top_size != rows.rows[4 * (h - 1) + 1]
        if not top_moved and not mapped_changed and len(changed) == 1:
            (p,) = changed
            if (not new and p == old and p in cached) or (not old and p == new and p in was):
                # A free into the fast cache, or a malloc from it: the heap did not change, the chunk's state did.
                i = rows.index(p - HEADER)
                rows.begin(i)
                rows.add(p - HEADER, rows.rows[4 * i + 1], *((CACHED, -1) if p in cached else (IN_USE, size)))
                return rows.replace(i, i + 1, h)
        lo, hi = rows.span([p - HEADER for p in (old, new, *changed) if p and p not in mapped and p not in before],
                           top_moved)  # the heap blocks'
        if hi >= 0:
            rows.begin(lo)
            e = self._rewalk(heap, lo, hi)
            heap_rows = h - (e - lo) + rows.m
        else:
            lo = e = h
            rows.begin(h)
            heap_rows = h
        if mapped_changed:
            for j in range(e, h):  # unchanged heap rows between the walk and the mapped chunks
                x = 4 * j
                rows.add(rows.addr[j], rows.rows[x + 1], rows.rows[x + 2], rows.rows[x + 3])
            self._add_mapped()
            e = rows.n
        return rows.replace(lo, e, heap_rows)

    def _rewalk(self, heap: Heap, lo: int, hi: int) -> int:
        """Walk from row lo's chunk until past row hi's, at a chunk where one began before (or to the top);
        returns the old row the walk stopped at (where the old rows it left as they were begin)."""
        rows = self.chunks
        h = rows.heap_rows
        addr = rows.addr
        stop = rows.end_of(hi)
        j = lo
        for c in heap.walk(addr[lo]):
            self._add_one(c)
            if c.state == "top":
                return h
            end = c.address + c.size
            if end >= stop:
                while j < h and addr[j] < end:
                    j += 1
                if j < h and addr[j] == end:
                    return j
        return h

    def _add(self, chunks: Iterable[Chunk]) -> None:
        for c in chunks:
            self._add_one(c)

    def _add_one(self, c: Chunk) -> None:
        state = c.state
        if state == "in use":
            p = c.address + HEADER
            if p in self.cached:
                self.chunks.add(c.address, c.size, CACHED, -1)
            else:
                self.chunks.add(c.address, c.size, IN_USE, self.live.get(p, -1))
        elif state == "free":
            self.chunks.add(c.address, c.size, FREE_CHUNK, c.bin)
        else:
            self.chunks.add(c.address, c.size, CODE[state], -1)

    def _add_mapped(self) -> None:
        for p, (m, length) in sorted(self.mapped.items()):
            self.chunks.add(p - HEADER, length - (p - HEADER - m), MAPPED, self.live.get(p, -1))


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
    """Everything glibc's recorded replay writes into, made before glibc's heap is prepared: the chunk list,
    the output words (flushed to a file when full), the mapped blocks in address order, per operation its
    block, footprint and time, and a view of the process's memory as words, to read chunk headers by."""

    OUT_WORDS = 1 << 16

    def __init__(self, trace: Trace) -> None:
        makes = sum(1 for code, _, _ in trace.ops if code != FREE)
        # A chunk is made by a split or a mapping: never more chunks than allocations, plus the top.
        self.chunks = ChunkList(makes + 4)
        self.out = words(self.OUT_WORDS)
        self.mapped = words(makes + 1)
        self.addr = words(trace.num_ops)
        self.footprint = words(trace.num_ops)
        self.times = memoryview(bytearray(8 * max(1, trace.num_ops))).cast("d")
        self.memory = memoryview((ctypes.c_char * (1 << 47)).from_address(0)).cast("B").cast("Q")
        # Opened now, read and closed by record_glibc once the replay is over.
        self.file = tempfile.TemporaryFile(prefix="malloc-timeline-")  # noqa: SIM115


MIN_LARGE = 1024  # glibc's smallest large-bin chunk: a request for one consolidates the fast bins first
CONSOLIDATE_AT = 64 << 10  # a free that leaves a free chunk this large consolidates the fast bins


def record_glibc(libc: ctypes.CDLL, trace: Trace, settings: Sequence[tuple[int, int]], table: list[Any],
                 tcache: int, buffers: Buffers, window: Window = contextlib.nullcontext,
                 check: bool = False) -> Json:
    """Replay `trace` through glibc (prepared as for `baselines.measure_glibc`), walking its heap after every
    operation into `buffers`; the recording as `record_ours` returns it, with "times" (when each operation
    ended, for `add_strace`), "start" (the replay's first chunk), "brk0" (the break before the replay) and
    "whole" (how many steps walked the whole heap) instead of "calls" and "heaps".

    After most operations only the chunks around the blocks it took and made, and the top if it moved, are
    walked again (with their neighbours, until the walk meets a chunk where one began before). glibc also
    changes chunks elsewhere: consolidating its fast bins (which a large request, a request the top cannot
    serve, a realloc, or a free leaving 64 KiB free may do while they hold chunks) and moving free chunks of
    a requested size into its tcache; the first is foreseen, the second shows in mallinfo2's count and bytes
    of free chunks differing from the list's, and either way the heap is walked whole. With `check`, it is
    walked whole after every operation too, and compared (RuntimeError at the first difference).
    """
    from .baselines import fresh_start, glibc_steps

    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise ValueError(f"glibc's mallopt refused parameter {param} = {value}")
    sbrk, mallinfo2 = libc.sbrk, libc.mallinfo2
    brk0 = sbrk(0)
    start = brk0 - mallinfo2().keepcost  # the top chunk ends at the break: the stand-in is made there
    b = buffers
    rows, out, mapped, addr, footprint, times = b.chunks, b.out, b.mapped, b.addr, b.footprint, b.times
    walker = GlibcWalker(rows, b.memory, start)
    fd = b.file.fileno()
    used = 0  # words in `out`
    n_mapped = mapped_bytes = foreign = 0
    fast = 0  # chunks in glibc's fast bins before the operation
    with window():
        begun = time.time()
        fresh_start(libc, trace.ops, tcache)
        for k, (old, p, old_mapped, new_mapped, brk, moved) in enumerate(glibc_steps(trace.ops, table, libc)):
            times[k] = time.time()
            foreign += moved
            addr[k] = p or old  # a free's (or a realloc to 0's) is the block it freed
            if old_mapped:
                mapped_bytes -= old_mapped
                j = 0
                while mapped[j] != old:
                    j += 1
                mapped[j:n_mapped - 1] = mapped[j + 1:n_mapped]
                n_mapped -= 1
            if new_mapped:
                mapped_bytes += new_mapped
                j = n_mapped
                while j and mapped[j - 1] > p:
                    j -= 1
                mapped[j + 1:n_mapped + 1] = mapped[j:n_mapped]
                mapped[j] = p
                n_mapped += 1
            footprint[k] = brk - brk0 + mapped_bytes
            info = mallinfo2()
            code, _, size = trace.ops[k]
            heap_old = old if old and not old_mapped else 0
            heap_new = p if p and not new_mapped else 0
            # Did glibc consolidate its fast bins? Only while they held chunks, and only on these paths.
            had_fast = fast > 0
            whole = k == 0 or (had_fast and (code == REALLOC or (code == ALLOC and (
                (nb := _glibc_chunk(size)) >= MIN_LARGE or nb + 32 > walker.top_size()))))
            fast = info.smblks
            s, removed, inserted = walker.step(code, heap_old, heap_new, brk, info, mapped, n_mapped,
                                               old_mapped or new_mapped, whole, had_fast and code == FREE)
            if check:
                walker.check(k, brk, mapped, n_mapped)
            need = 5 + 4 * inserted + 3 + 4 * rows.n
            if used + need > len(out):
                os.write(fd, out[:used])
                used = 0
                if need > len(out):
                    raise RuntimeError(f"op {k}: {rows.n} chunks do not fit the timeline's buffer")
            out[used:used + 5] = array("q", (0, k, s, removed, inserted))
            out[used + 5:used + 5 + 4 * inserted] = rows.rows[4 * s:4 * (s + inserted)]
            used += 5 + 4 * inserted
            if rows.key_due(k, inserted):
                out[used:used + 3] = array("q", (1, k, rows.n))
                out[used + 3:used + 3 + 4 * rows.n] = rows.rows[:4 * rows.n]
                used += 3 + 4 * rows.n
    os.write(fd, out[:used])
    with b.file:
        steps = _read_steps(b.file, trace.num_ops)
    return {"timeline": {**steps, "addr": addr.tolist(),
                         "footprint": footprint.tolist(), "times": [begun, *times.tolist()], "start": start,
                         "brk0": brk0, "whole": walker.whole},
            "foreign_brk_moves": foreign}


def _glibc_chunk(n: int) -> int:
    """glibc's chunk size for a request of n bytes (request2size on 64-bit)."""
    return max(32, (n + 8 + 15) & ~15)


class GlibcWalker:
    """glibc's chunks after every operation (see `record_glibc`), read from the process's memory by the chunk
    headers, from the replay's first chunk to the top, then its mapped chunks."""

    def __init__(self, chunks: ChunkList, memory: memoryview, start: int) -> None:
        self.chunks = chunks
        self.memory = memory
        self.start = start
        self.whole = 0  # steps that walked the whole heap
        # mallinfo2's count and bytes of free chunks less the list's, as of the last whole walk: glibc's bins
        # also hold chunks below the replay's first one, which the interpreter freed before it.
        self.count_off = self.bytes_off = 0
        self.free_count = self.free_bytes = 0  # the list's free chunks

    def top_size(self) -> int:
        rows = self.chunks
        return rows.rows[4 * (rows.heap_rows - 1) + 1] if rows.heap_rows else 0

    def step(self, code: int, old: int, new: int, brk: int, info: MallInfo2, mapped: memoryview, n_mapped: int,
             mapped_changed: int, whole: bool, fast_before: bool) -> tuple[int, int, int]:
        """The splice after an operation (`code`) that freed or resized the heap block `old` (or 0) and made
        the heap block `new` (or 0): see `ChunkList.replace`. `whole` walks the whole heap; `fast_before` says
        that the fast bins held chunks before this free, which consolidates them if it leaves a large free
        chunk."""
        rows = self.chunks
        h = rows.heap_rows
        count = info.ordblks - 1
        free_bytes = info.fordblks - info.fsmblks - info.keepcost
        if not whole and h:
            top_size = info.keepcost
            top_moved = brk - top_size != rows.addr[h - 1] or top_size != rows.rows[4 * (h - 1) + 1]
            if not top_moved and not mapped_changed and code != REALLOC \
                    and self.free_count + self.count_off == count and self.free_bytes + self.bytes_off == free_bytes:
                # The free chunks and the top are as they were: a free into the tcache or a fast bin, or a
                # malloc from them, which a walk does not see (their chunks read as in use).
                rows.begin(h)
                return rows.replace(h, h, h)
            lo, hi = rows.span([p - HEADER for p in (old, new) if p], top_moved)
            if hi >= 0:
                e, n_free, bytes_free = self._rewalk(lo, hi, brk)
                for j in range(lo, e):
                    x = 4 * j
                    if rows.rows[x + 2] == FREE_CHUNK:
                        n_free -= 1
                        bytes_free -= rows.rows[x + 1]
            else:
                lo = e = h
                rows.begin(h)
                n_free = bytes_free = 0
            heap_rows = h - (e - lo) + rows.m
            whole = (self.free_count + n_free + self.count_off != count
                     or self.free_bytes + bytes_free + self.bytes_off != free_bytes
                     or (fast_before and old != 0 and self._large_free(old - HEADER)))
        if whole:
            self.whole += 1
            lo, e = 0, rows.n
            rows.begin(0)
            _, n_free, bytes_free = self._walk(self.start, 0, 0, -1, brk)
            heap_rows = rows.m
            self.free_count = self.free_bytes = 0
            self.count_off, self.bytes_off = count - n_free, free_bytes - bytes_free
            self._add_mapped(mapped, n_mapped)
        elif mapped_changed:
            for j in range(e, h):  # unchanged heap rows between the walk and the mapped chunks
                x = 4 * j
                rows.add(rows.addr[j], rows.rows[x + 1], rows.rows[x + 2], rows.rows[x + 3])
            self._add_mapped(mapped, n_mapped)
            e = rows.n
        self.free_count += n_free
        self.free_bytes += bytes_free
        return rows.replace(lo, e, heap_rows)

    def _large_free(self, a: int) -> bool:
        """Whether the chunk the re-walk found holding address `a` is free (or the top) and large enough for
        glibc's free to have consolidated the fast bins."""
        rows = self.chunks
        for x in range(0, 4 * rows.m, 4):
            address = rows.new_addr[x >> 2]
            size = rows.new_rows[x + 1]
            if address <= a < address + size:
                return rows.new_rows[x + 2] in (FREE_CHUNK, TOP) and size >= CONSOLIDATE_AT
        return True

    def _rewalk(self, lo: int, hi: int, brk: int) -> tuple[int, int, int]:
        rows = self.chunks
        rows.begin(lo)
        return self._walk(rows.addr[lo], lo, rows.end_of(hi), lo, brk)

    def _walk(self, a: int, lo: int, stop: int, j: int, brk: int) -> tuple[int, int, int]:
        """Add the chunks from address `a` until one ends at or past `stop` where an old row (from row j on)
        begins, or to the top (j = -1: to the top); returns (the old row it stopped at, free chunks and their
        bytes added)."""
        rows = self.chunks
        mem = self.memory
        h = rows.heap_rows
        addr = rows.addr
        n_free = bytes_free = 0
        while True:
            size = mem[(a >> 3) + 1] & ~7
            if size < 16 or a + size > brk:
                raise RuntimeError(f"glibc's chunk at {a:#x} ({size} bytes) does not end by the break {brk:#x}")
            end = a + size
            if end == brk:
                rows.add(a, size, TOP, -1)
                return h, n_free, bytes_free
            if mem[(end >> 3) + 1] & PREV_INUSE:
                rows.add(a, size, IN_USE, -1)
            else:
                rows.add(a, size, FREE_CHUNK, glibc_bin(size))
                n_free += 1
                bytes_free += size
            if j >= 0 and end >= stop:
                while j < h and addr[j] < end:
                    j += 1
                if j < h and addr[j] == end:
                    return j, n_free, bytes_free
            a = end

    def _add_mapped(self, mapped: memoryview, n_mapped: int) -> None:
        mem = self.memory
        for j in range(n_mapped):
            a = mapped[j] - HEADER
            self.chunks.add(a, mem[(a >> 3) + 1] & ~7, MAPPED, -1)

    def check(self, k: int, brk: int, mapped: memoryview, n_mapped: int) -> None:
        """RuntimeError unless the list is what a whole walk finds now."""
        rows = self.chunks
        rows.begin(0)
        self._walk(self.start, 0, 0, -1, brk)
        self._add_mapped(mapped, n_mapped)
        if rows.m != rows.n or rows.new_rows[:4 * rows.m] != rows.rows[:4 * rows.n]:
            raise RuntimeError(f"op {k}: glibc's recorded chunks differ from a whole walk")


def _read_steps(file: Any, n: int) -> Json:
    """The keyframes and splices `record_glibc` wrote to `file`."""
    file.seek(0)
    raw = array("q")
    raw.frombytes(file.read())
    words = raw.tolist()  # one conversion: slicing a list is cheaper than a tolist() per record
    keys: list[list[object]] = []
    splices: list[list[int]] = []
    x = 0
    total = len(words)
    while x < total:
        if words[x] == 0:
            end = x + 5 + 4 * words[x + 4]
            splices.append([words[x + 2], words[x + 3], *words[x + 5:end]])
        else:
            end = x + 3 + 4 * words[x + 2]
            keys.append([words[x + 1], words[x + 3:end]])
        x = end
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
