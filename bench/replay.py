#!/usr/bin/env python3
"""Replay malloc-lab traces through this project's allocator, glibc's malloc and multiprocessing.heap.

    python bench/replay.py [--verify] [--self-check] [--json PATH] [--repeats N] [TRACE ...]

Every trace runs in fresh processes, one per allocator and measurement: timed replays (best of
--repeats, interleaved across allocators so drift hits them alike), plus one untimed replay each for
glibc's and mpheap's footprint, which need per-op sampling. Throughput is only meaningful as a ratio
between allocators measured in the same run on the same machine, never as an absolute figure; on the
12-op traces it is mostly noise.

Footprint is the peak of bytes held from the OS: ours reports it itself (mallinfo().system_max);
glibc's is the break's growth plus live mmapped chunks, sampled after every op; mpheap's is the sum of
its arenas' sizes. Utilization = peak live requested bytes / peak footprint. glibc shares its heap with
the interpreter, so before replaying through it the worker fills every free chunk glibc holds (tcache
included) and trims its top: glibc then starts as from a fresh heap, and its figures land within a
percent or so of the C reference table in the traces' README.

glibc's system calls are counted by `strace -k` attached to its footprint worker for the replay only,
between two marker syscalls, keeping only calls made from a ctypes foreign call (the trace's requests);
the interpreter's own are reported apart and should be none. --verify also replays ours and glibc
writing a pattern over every block and checking it, and compares our system-call log with strace's.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from malloc.trace.formats import ALLOC, REALLOC, Op, TraceError, parse_rep, peak_live  # noqa: E402

DEFAULT_TRACES = ROOT.parent / "shared" / "traces" / "rep"
ALLOCATORS = ("ours", "glibc", "mpheap")
MEMORY_CALLS = ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise")
BEGIN_MARK = "/.replay-begin"  # paths access()ed around the replay loop, to find it in strace's log
END_MARK = "/.replay-end"
WORKER_TIMEOUT = 300.0

Json = dict[str, Any]


# ------------------------------------------------------------------------------------------- worker


def _glibc() -> ctypes.CDLL:
    """The C library with malloc's prototypes set (our own CDLL instance: prototypes are per instance)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.realloc.restype = ctypes.c_void_p
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallinfo2.restype = MallInfo2
    libc.mallinfo2.argtypes = []
    return libc


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (all size_t)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def plug_glibc(libc: ctypes.CDLL) -> int:
    """Fill glibc's free chunks and trim its top, so that its next request must grow the heap.

    Parsing a trace alone leaves about 1 MB of holes in glibc's heap; without this glibc would replay
    partly in them for free. The tcache lists are emptied first (their chunks count as in use, so
    nothing else reaches them: up to 7 chunks for each of 64 sizes up to 1 KiB), then 32-byte chunks
    are taken until the break moves (every bin is then empty). All are kept for the process's life.
    Last, the top chunk left after trimming (under a page, its size set by where the break happens to
    fall) is taken down to its 32-byte minimum: else those few KiB decide whether a trace's peak needs
    one more 132 KiB extension, and glibc's footprint would depend on the worker's environment.
    Returns the number of chunks taken.
    """
    taken = 0
    for size in range(24, 1033, 16):  # the request size of each tcache chunk size, 32 to 1040 bytes
        for _ in range(8):  # glibc's default tcache_count is 7
            libc.malloc(size)
            taken += 1
    libc.malloc_trim(0)  # consolidates the fastbins into the bins first, so they get filled too
    start = libc.sbrk(0)
    while libc.sbrk(0) == start:
        libc.malloc(16)
        taken += 1
    libc.malloc_trim(0)
    top = libc.mallinfo2().keepcost  # the top chunk's size
    if top >= 64:
        libc.malloc(top - 32 - 8)  # a chunk of top - 32 bytes (8 of them its header), split off the top
        taken += 1
    return taken


def _replay_c(ops: list[Op], table: list[Any], malloc: Callable[[int], Any],
              free: Callable[[Any], None], realloc: Callable[[Any, int], Any]) -> None:
    """The timed loop for a C-style API (ours and glibc share this very function).

    table[-1] is free(NULL)'s slot (see formats); freeing clears the slot, so a stale pointer is never
    passed again.
    """
    for code, i, n in ops:
        if code == ALLOC:
            table[i] = malloc(n)
        elif code == REALLOC:
            table[i] = realloc(table[i], n)
        else:
            free(table[i])
            table[i] = 0


def _replay_mpheap(ops: list[Op], table: list[Any], heap: Any) -> None:
    """The timed loop for multiprocessing.heap.Heap: blocks are (arena, start, stop) tuples, None is NULL.

    malloc(0) is passed through: Heap.malloc rounds max(size, 1) up itself. realloc is malloc + copy +
    free (Heap has none); realloc to 0 frees, as in C.
    """
    malloc = heap.malloc
    free = heap.free
    for code, i, n in ops:
        if code == ALLOC:
            table[i] = malloc(n)
        elif code == REALLOC:
            old = table[i]
            if n == 0:
                if old is not None:
                    free(old)
                table[i] = None
            else:
                new = malloc(n)
                if old is not None:
                    arena, start, stop = old
                    k = min(stop - start, n)
                    dst = new[1]
                    new[0].buffer[dst:dst + k] = arena.buffer[start:start + k]
                    free(old)
                table[i] = new
        else:
            old = table[i]
            if old is not None:
                free(old)
                table[i] = None


def _measure_glibc(ops: list[Op], table: list[Any], libc: ctypes.CDLL) -> tuple[int, int]:
    """Replay through glibc, sampling its footprint after every op: break growth + live mmapped chunks.

    A chunk's size word at p-8 has IS_MMAPPED (2) set when glibc gave it a mapping of its own. Returns
    (peak footprint, times the break moved between two ops, i.e. not in a trace call: should be 0).
    """
    malloc, free, realloc, sbrk = libc.malloc, libc.free, libc.realloc, libc.sbrk
    word = ctypes.c_size_t.from_address
    brk0 = last = sbrk(0)
    mapped = peak = foreign = 0
    for code, i, n in ops:
        if sbrk(0) != last:
            foreign += 1
        p = table[i]
        if code != ALLOC and p:
            w = word(p - 8).value
            if w & 2:
                mapped -= w & ~7
        if code == ALLOC:
            p = malloc(n)
        elif code == REALLOC:
            p = realloc(p, n)
        else:
            free(p)
            p = 0
        table[i] = p
        if p:
            w = word(p - 8).value
            if w & 2:
                mapped += w & ~7
        last = sbrk(0)
        now = last - brk0 + mapped
        if now > peak:
            peak = now
    return peak, foreign


def _measure_mpheap(ops: list[Op], table: list[Any], heap: Any) -> int:
    """Replay through mpheap, sampling the sum of its arenas' sizes after every op (arenas come and go
    only inside malloc and free, so the peak is exact)."""
    arenas = heap._arenas  # mutated in place by _new_arena and _discard_arena
    peak = 0
    for op in ops:
        _replay_mpheap([op], table, heap)
        held = sum(a.size for a in arenas)
        if held > peak:
            peak = held
    return peak


def _pattern(i: int) -> int:
    return i % 251 + 1  # never 0, and neighbouring ids differ, so an overlap shows


def _verify_c(ops: list[Op], table: list[Any], malloc: Callable[[int], Any],
              free: Callable[[Any], None], realloc: Callable[[Any, int], Any]) -> None:
    """Replay writing each block's id pattern over all of it, checking it before free and realloc and
    checking that realloc carried min(old, new) bytes over."""
    sizes = [0] * len(table)
    memcmp = ctypes.CDLL(None).memcmp
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def check(k: int, i: int, p: int, n: int, what: str) -> None:
        # every byte equals the first (memcmp of the block against itself shifted by one), which is the
        # pattern: no copy of the block into a Python object, which would allocate from glibc
        if n and (ctypes.c_ubyte.from_address(p).value != _pattern(i) or memcmp(p, p + 1, n - 1)):
            raise AssertionError(f"op {k}: block {i} at {p:#x} ({n} bytes) was overwritten {what}")

    for k, (code, i, n) in enumerate(ops):
        p = table[i]
        if code != ALLOC and p:
            check(k, i, p, sizes[i], "before " + ("realloc" if code == REALLOC else "free"))
        if code == ALLOC:
            p = malloc(n)
        elif code == REALLOC:
            old = sizes[i] if p else 0
            p = realloc(p, n)
            if p:
                check(k, i, p, min(old, n), "in realloc (contents not carried over)")
        else:
            free(p)
            p = 0
        table[i] = p
        sizes[i] = n if p else 0
        if p and n:
            ctypes.memset(p, _pattern(i), n)
    for i, p in enumerate(table):
        if p:
            check(len(ops), i, p, sizes[i], "by the end of the trace")


class SelfTrace:
    """strace attached to this process for the replay only (`strace -k -p`): the interpreter's start-up
    calls stay out of the log, and so does the cost of unwinding their stacks."""

    def __init__(self, log: str) -> None:
        self.log = log  # the parent's to delete: this process may die with the allocator
        calls = ",".join((*MEMORY_CALLS, "access", "faccessat", "faccessat2"))
        self.proc = subprocess.Popen(["strace", "-qq", "-k", "-o", self.log, "-e", "trace=" + calls,
                                      "-p", str(os.getpid())], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._attached():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("strace could not attach to the worker")
            time.sleep(0.001)

    @staticmethod
    def _attached() -> bool:
        with open("/proc/self/status") as f:
            return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)

    def stop(self) -> tuple[dict[str, int], dict[str, int]]:
        """Detach; (calls made through ctypes, the interpreter's own) between the markers."""
        self.proc.terminate()  # strace detaches cleanly on SIGTERM and flushes its log
        self.proc.wait()
        with open(self.log, errors="replace") as f:
            return count_strace(f.read())


def _from_foreign_call(stack: list[str]) -> bool:
    """True if the innermost frames lead from a ctypes foreign call (ffi_call) to the system call without
    passing through the interpreter: ctypes.string_at, for one, calls into libpython to make its bytes."""
    for frame in stack:
        if "ffi_call" in frame:
            return True
        if "libpython" in frame or "_ctypes" in frame or "/bin/python" in frame:
            return False
    return False


def count_strace(log: str) -> tuple[dict[str, int], dict[str, int]]:
    """(calls made through ctypes, calls made otherwise) between the markers of an `strace -k` log."""
    through_ctypes: dict[str, int] = {}
    foreign: dict[str, int] = {}
    inside = False
    name = ""
    stack: list[str] = []

    def flush() -> None:
        if inside and name in MEMORY_CALLS:
            into = through_ctypes if _from_foreign_call(stack) else foreign
            into[name] = into.get(name, 0) + 1

    for line in log.splitlines():
        if line.startswith(" > "):
            stack.append(line)
            continue
        flush()
        stack = []
        name = line.split("(", 1)[0].strip()
        if BEGIN_MARK in line:
            inside = True
        elif END_MARK in line:
            inside = False
    flush()
    return through_ctypes, foreign


def worker(alloc: str, mode: str, path: str, plug: bool = False, strace_log: str | None = None) -> Json:
    """One replay in this (fresh) process; the result becomes JSON on stdout."""
    trace = parse_rep(path)
    ops = list(trace.ops)
    libc = _glibc()
    table: list[Any] = [0] * (trace.num_ids + 1)
    result: Json = {"alloc": alloc, "mode": mode}
    ours: Any = None  # the malloc module, when replaying through it
    counts: dict[str, int] = {}  # its system-call counters, live
    heap: Any = None
    api: tuple[Any, Any, Any] = (None, None, None)
    if alloc == "ours":
        import malloc as ours
        from malloc.os import events

        counts = events.counts
        api = (ours.malloc, ours.free, ours.realloc)
    elif alloc == "glibc":
        api = (libc.malloc, libc.free, libc.realloc)
    elif alloc == "mpheap":
        from multiprocessing.heap import Heap

        heap = Heap()
        table = [None] * (trace.num_ids + 1)
    else:
        raise ValueError(f"unknown allocator {alloc!r}")
    if mode not in ("time", "footprint", "verify"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "footprint" and alloc == "ours":
        raise ValueError("ours reports its footprint itself: use mode 'time'")
    if mode == "verify" and alloc == "mpheap":
        raise ValueError("verify covers ours and glibc only")
    tracer = SelfTrace(strace_log) if strace_log else None  # before the plug: starting strace allocates

    # glibc replays on a heap without free space, so its break growth counts what the trace needs, not
    # the holes and slack the interpreter left. Not for the others by default: they don't need it, and
    # ours crashes on a plugged glibc heap (BreakRegion.shrink lowers the break through memory glibc
    # took while it checked the thread count; see the report), which --plug-all reproduces.
    gc.collect()  # first: garbage freed after the plug would leave glibc holes again
    gc.disable()  # no collector pauses inside the loop, for every allocator
    if alloc == "glibc" or plug:
        result["plugged"] = plug_glibc(libc)
    else:
        libc.malloc_trim(0)
    brk0 = libc.sbrk(0)
    before = dict(counts)
    os.access(BEGIN_MARK, os.F_OK)
    t0 = time.perf_counter()
    if mode == "time":
        if heap is not None:
            _replay_mpheap(ops, table, heap)
        else:
            _replay_c(ops, table, *api)
    elif mode == "footprint":
        if heap is not None:
            result["footprint"] = _measure_mpheap(ops, table, heap)
        else:
            result["footprint"], result["foreign_brk_moves"] = _measure_glibc(ops, table, libc)
    else:
        _verify_c(ops, table, *api)
        if ours is not None:
            ours.check()  # every heap invariant, after the whole trace
    t1 = time.perf_counter()
    os.access(END_MARK, os.F_OK)
    gc.enable()
    result["seconds"] = t1 - t0
    result["brk_growth"] = libc.sbrk(0) - brk0
    if ours is not None:
        result["footprint"] = ours.mallinfo().system_max
        result["syscalls"] = {k: v - before[k] for k, v in counts.items() if v != before[k]}
    if tracer is not None:
        result["strace"], result["strace_foreign"] = tracer.stop()
    return result


def worker_main(alloc: str, mode: str, path: str, plug: bool, strace_log: str | None) -> int:
    faulthandler.enable()  # a crash in the allocator then leaves a Python traceback on stderr
    try:
        result = worker(alloc, mode, path, plug, strace_log)
    except BaseException as e:  # report anything (allocator bugs included) to the parent, as data
        result = {"alloc": alloc, "mode": mode, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    print(json.dumps(result))
    return 1 if "error" in result else 0


# ------------------------------------------------------------------------------------------- parent


@dataclass
class Row:
    """Everything measured for one trace."""

    trace: str
    ops: int
    peak_live: int
    footprint: dict[str, int | None] = field(default_factory=dict)
    seconds: dict[str, float | None] = field(default_factory=dict)  # best of the repeats
    all_seconds: dict[str, list[float]] = field(default_factory=dict)
    syscalls: dict[str, dict[str, int] | None] = field(default_factory=dict)
    # the interpreter's own system calls inside a replay (not through ctypes), by run
    foreign_syscalls: dict[str, dict[str, int]] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def utilization(self, alloc: str) -> float | None:
        fp = self.footprint.get(alloc)
        return self.peak_live / fp if fp else None

    def ops_per_s(self, alloc: str) -> float | None:
        s = self.seconds.get(alloc)
        return self.ops / s if s else None


def run_worker(alloc: str, mode: str, path: Path, strace: bool = False, plug_all: bool = False) -> Json:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", alloc, mode, str(path)]
    if plug_all:
        cmd.append("--plug-all")
    env = dict(os.environ, PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        if strace:
            cmd += ["--strace", str(Path(tmp) / "strace.log")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {WORKER_TIMEOUT:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result: Json = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        return {"error": f"worker died ({how})\n" + proc.stderr.strip()}
    if "error" in result:
        result["error"] += "\n" + result.get("traceback", "")
    return result


def _as_strace(counts: dict[str, int]) -> dict[str, int]:
    """Our event counts under strace's names (sbrk is the brk system call)."""
    return {("brk" if k == "sbrk" else k): v for k, v in counts.items() if v}


def measure(path: Path, repeats: int, verify: bool, use_strace: bool, plug_all: bool) -> Row:
    trace = parse_rep(path)
    row = Row(trace.name, trace.num_ops, peak_live(trace))
    times: dict[str, list[float]] = {a: [] for a in ALLOCATORS}
    for _ in range(repeats):
        for alloc in ALLOCATORS:  # interleaved, so that drift in machine speed hits all three alike
            r = run_worker(alloc, "time", path, plug_all=plug_all)
            if "error" in r:
                row.errors.append(f"{alloc} time: {r['error']}")
                continue
            times[alloc].append(r["seconds"])
            if alloc == "ours":
                fp, calls = r["footprint"], r["syscalls"]
                if row.footprint.get("ours") not in (None, fp) or row.syscalls.get("ours") not in (None, calls):
                    row.errors.append(f"ours: footprint or system calls differ between repeats: {fp} {calls}")
                row.footprint["ours"], row.syscalls["ours"] = fp, calls
    for alloc in ALLOCATORS:
        row.all_seconds[alloc] = times[alloc]
        row.seconds[alloc] = min(times[alloc]) if times[alloc] else None
    for alloc in ("glibc", "mpheap"):
        r = run_worker(alloc, "footprint", path, use_strace and alloc == "glibc", plug_all)
        if "error" in r:
            row.errors.append(f"{alloc} footprint: {r['error']}")
            row.footprint[alloc] = None
            continue
        row.footprint[alloc] = r["footprint"]
        if r.get("foreign_brk_moves"):
            row.errors.append(f"glibc footprint: the break moved {r['foreign_brk_moves']} times outside glibc calls")
        if "strace" in r:
            row.syscalls[alloc] = r["strace"]
            if r["strace_foreign"]:
                row.foreign_syscalls[alloc] = r["strace_foreign"]
    if verify:
        for alloc in ("ours", "glibc"):
            r = run_worker(alloc, "verify", path, use_strace and alloc == "ours", plug_all)
            row.verified[alloc] = "error" not in r
            if "error" in r:
                row.errors.append(f"{alloc} verify: {r['error']}")
            elif alloc == "ours" and "strace" in r and r["strace"] != _as_strace(r["syscalls"]):
                # our own log against the kernel's view: a mismatch means an unrecorded (or phantom) call
                row.errors.append(f"ours: system calls logged {r['syscalls']} but strace saw {r['strace']}")
    return row


def self_check() -> list[str]:
    """The glibc footprint harness must see no growth without allocations: an empty trace and 10,000
    free(NULL)s (the whole loop, ctypes call included) must leave the break where it was."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in (("empty", []), ("free-null", ["f -1"] * 10_000)):
            path = Path(tmp) / f"{name}.rep"
            path.write_text("\n".join(["0", "0", str(len(body)), "0", *body]) + "\n")
            for mode in ("footprint", "time"):
                r = run_worker("glibc", mode, path)
                if "error" in r:
                    problems.append(f"{name} {mode}: {r['error']}")
                elif r.get("footprint", 0) or r["brk_growth"]:
                    problems.append(f"{name} {mode}: footprint {r.get('footprint')}, break moved {r['brk_growth']}")
    return problems


# ------------------------------------------------------------------------------------------ report


def _fmt(x: float | int | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _geomean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in vals) / len(vals)) if vals else None


def table(rows: list[Row], use_strace: bool) -> str:
    head = ["trace", "ops", "peak live"]
    for a in ALLOCATORS:
        head += [f"{a} foot", f"{a} util", f"{a} ops/s"]
        if a == "ours" or (a == "glibc" and use_strace):
            head.append(f"{a} sys")
    head += ["thr ours/mp", "util ours/glibc"]
    body: list[list[str]] = []
    for r in rows:
        cells = [r.trace, str(r.ops), str(r.peak_live)]
        for a in ALLOCATORS:
            cells += [_fmt(r.footprint.get(a), "d"), _fmt(r.utilization(a), ".3f"), _fmt(r.ops_per_s(a), ".0f")]
            if a == "ours" or (a == "glibc" and use_strace):
                calls = r.syscalls.get(a)
                cells.append("-" if calls is None else str(sum(calls.values())))
        cells += [_fmt(_ratio(r.ops_per_s("ours"), r.ops_per_s("mpheap")), ".2f"),
                  _fmt(_ratio(r.utilization("ours"), r.utilization("glibc")), ".2f")]
        body.append(cells)
    geo = ["geomean", "", ""] + [""] * (len(head) - 5)
    geo += [_fmt(_geomean([_ratio(r.ops_per_s("ours"), r.ops_per_s("mpheap")) for r in rows]), ".2f"),
            _fmt(_geomean([_ratio(r.utilization("ours"), r.utilization("glibc")) for r in rows]), ".2f")]
    body.append(geo)
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "-" * len(render(head))
    return "\n".join([render(head), rule, *map(render, body[:-1]), rule, render(body[-1])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("traces", nargs="*", type=Path, help=f"trace files (default: {DEFAULT_TRACES}/*.rep)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per allocator; the best counts")
    ap.add_argument("--verify", action="store_true", help="also replay ours and glibc checking block contents")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-': stdout)")
    ap.add_argument("--no-strace", action="store_true", help="do not count glibc's system calls")
    ap.add_argument("--self-check", action="store_true", help="first check the glibc footprint harness")
    ap.add_argument("--plug-all", action="store_true",
                    help="fill glibc's free space before every replay, not only glibc's (a stress test: "
                         "our heap then shares the break with a glibc that must grow)")
    ap.add_argument("--strace", metavar="LOG", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, metavar=("ALLOC", "MODE", "TRACE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        alloc, mode, trace = args.worker
        return worker_main(alloc, mode, trace, args.plug_all, args.strace)

    out = sys.stderr if args.json == "-" else sys.stdout
    if args.self_check:
        problems = self_check()
        print("self-check: " + ("ok" if not problems else "FAILED\n  " + "\n  ".join(problems)), file=out)
        if problems:
            return 1
    paths: list[Path] = args.traces or sorted(DEFAULT_TRACES.glob("*.rep"))
    if not paths:
        ap.error(f"no traces given and none in {DEFAULT_TRACES}")
    try:
        for p in paths:
            parse_rep(p)  # fail on a bad file before spending minutes on the others
    except (OSError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_strace = not args.no_strace and shutil.which("strace") is not None
    start = time.perf_counter()
    rows = []
    for p in paths:
        rows.append(measure(p, args.repeats, args.verify, use_strace, args.plug_all))
        print(f"  {rows[-1].trace}: done", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    print(table(rows, use_strace), file=out)
    print(f"({len(paths)} traces in {elapsed:.0f} s; ops/s best of {args.repeats} fresh processes each; "
          f"thr = ours/mpheap throughput; footprint in bytes)", file=out)
    if args.verify:
        bad = [f"{r.trace}/{a}" for r in rows for a, ok in r.verified.items() if not ok]
        print("verify: " + ("all blocks intact" if not bad else "FAILED: " + ", ".join(bad)), file=out)
    foreign = {r.trace: r.foreign_syscalls for r in rows if r.foreign_syscalls}
    if foreign:
        print(f"note: the interpreter's own system calls inside replays (not counted): {foreign}", file=out)
    errors = [f"{r.trace}: {e}" for r in rows for e in r.errors]
    for message in errors:
        print("ERROR " + message, file=out)
    if args.json:
        data = {"elapsed_s": elapsed, "repeats": args.repeats, "rows": [asdict(r) for r in rows]}
        text = json.dumps(data, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
