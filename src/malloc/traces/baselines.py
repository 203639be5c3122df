"""The allocators this project is measured against, replayed inside a worker process.

glibc's malloc is called through ctypes. It shares its heap with the interpreter, so before a replay
`plug_glibc` fills every free chunk glibc holds and trims its top, and `fresh_start` then puts at the heap's
start what a fresh program's first malloc puts there: glibc replays as a C program of its own would, and its
break growth is what the trace needs (tested against a compiled C replay of the same traces). Its footprint
(break growth plus mapped chunks) is sampled after every operation, in a replay that is not timed; its system
calls are counted by `strace` attached to the worker for the replay only (`SelfTrace`), keeping the calls that
come from a ctypes foreign call.

`multiprocessing.heap.Heap` hands out (arena, start, stop) blocks from mmap'd arenas; its footprint is the
sum of its arenas' sizes, and its system calls are those Python's mmap module makes for the arenas. It has
no realloc: a replay does malloc, copy and free.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..inspect.maps import read_maps, read_start_brk
from .formats import ALLOC, FREE, REALLOC, Op, Trace
from .replay import Json, Window, pattern, replay, replay_checked, replay_verified

IS_MMAPPED = 2  # in glibc's chunk size word, 8 bytes before the block
PREV_INUSE = 1
CHUNK_OVERHEAD = 8  # glibc's in-use chunk header: a request of n bytes fits a chunk of n + 8
STRACE_CALLS = ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise")
# Paths access()ed around a replay, to find it in strace's log.
BEGIN_MARK = "/.malloc-replay-begin"
END_MARK = "/.malloc-replay-end"
# Given one call's stack from strace (innermost frame first): did the allocator being measured make it?
Origin = Callable[[list[str]], bool]


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (all size_t)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def glibc() -> ctypes.CDLL:
    """The C library with the prototypes a replay needs (a CDLL of our own: prototypes are per instance)."""
    libc = ctypes.CDLL(None)
    for name, res, args in (
            ("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
            ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
            ("free", None, [ctypes.c_void_p]),
            ("sbrk", ctypes.c_void_p, [ctypes.c_ssize_t]),
            ("malloc_trim", ctypes.c_int, [ctypes.c_size_t]),
            ("mallopt", ctypes.c_int, [ctypes.c_int, ctypes.c_int]),
            ("mallinfo2", MallInfo2, [])):
        fn = getattr(libc, name)
        fn.restype = res
        fn.argtypes = args
    return libc


def drain_tcache(libc: ctypes.CDLL) -> int:
    """Take every chunk glibc's tcache holds (up to 7 for each of its 64 sizes, 32 to 1040 bytes), and a
    few more from the heap; returns the number of chunks taken (kept for the process's life)."""
    taken = 0
    for size in range(24, 1033, 16):  # the request size of each tcache chunk size
        for _ in range(8):  # glibc's default tcache_count is 7
            libc.malloc(size)
            taken += 1
    return taken


def plug_glibc(libc: ctypes.CDLL) -> int:
    """Fill glibc's free chunks and trim its top, so that its next request must grow the heap; returns the
    number of chunks taken (kept for the process's life).

    The tcache lists are emptied first (their chunks count as in use, so nothing else reaches them: up to 7
    chunks for each of 64 sizes up to 1 KiB), then 32-byte chunks are taken until the break moves, when
    every bin is empty, then the tcache is emptied again of what taking from the bins moved into it. Last,
    the top chunk left after trimming (under a page, its size set by where the break happens to fall) is
    taken down to its minimum: else those few KiB decide whether a trace's peak needs one more top pad, and
    glibc's footprint would depend on the worker's environment.
    """
    taken = drain_tcache(libc)
    libc.malloc_trim(0)  # consolidates the fastbins into the bins first, so they get filled too
    start = libc.sbrk(0)
    while libc.sbrk(0) == start:
        libc.malloc(16)
        taken += 1
    # Taking a chunk from a small bin moves its same-size neighbours into the tcache ("stashing"), so
    # the first drain can leave the tcache fuller than it found it; with the bins empty now, a second
    # drain takes those and stashes nothing.
    taken += drain_tcache(libc)
    libc.malloc_trim(0)
    top = libc.mallinfo2().keepcost
    if top >= 64:
        libc.malloc(top - 32 - 8)  # a chunk of top - 32 bytes (8 of them its header), split off the top
        taken += 1
    return taken


def tcache_chunk() -> int:
    """Bytes of the chunk that this process's first malloc made for its thread's tcache.

    glibc makes the tcache (a count and a list head for each of its 64 sizes) on a thread's first malloc,
    from the heap itself, so in the main thread it is the first chunk of the main heap, at the start of the
    program break: 656 bytes in glibc 2.30 and later (2.36 here), 592 in 2.26 to 2.29, whose counts were
    bytes. It is read there, not assumed; RuntimeError if the break holds no heap, or its first chunk does
    not look like an in-use chunk of that kind.
    """
    start = read_start_brk()
    first = (start + 15) & ~15 if start else 0
    if not any(m.start <= first and first + 16 <= m.end for m in read_maps()):
        raise RuntimeError("glibc's main heap is not on the program break: no tcache chunk to find")
    word = ctypes.c_size_t.from_address(first + 8).value
    size = word & ~7
    if not word & PREV_INUSE or word & IS_MMAPPED or size & 15 or not 32 <= size < 4096:
        raise RuntimeError(f"the first chunk of glibc's heap has a size word of {word:#x}: not its tcache")
    return size


def fresh_start(libc: ctypes.CDLL, ops: Sequence[Op], tcache: int) -> None:
    """After `plug_glibc`, make glibc's heap what a fresh program's is once its first malloc has run, if
    the trace has any allocation: the tcache's chunk (`tcache` bytes, from `tcache_chunk()`, read before the
    plug: reading it allocates), then the top.

    The plug leaves a top chunk of a few bytes just under a page-aligned break, where a fresh heap starts at
    the break with nothing. So the stand-in takes that old top as well as the tcache's bytes: glibc grows
    the break by the same amount as for a fresh program's first malloc (the chunk, the top pad and its
    minimum, in whole pages), and every later chunk lies at the same distance from a page boundary as in a
    fresh program, which is what decides when the break moves.
    """
    if all(code == FREE for code, _, _ in ops):
        return  # a program that never allocates never makes the tcache
    libc.malloc(tcache + libc.mallinfo2().keepcost - CHUNK_OVERHEAD)


def glibc_steps(ops: Sequence[Op], table: list[Any],
                libc: ctypes.CDLL) -> Iterator[tuple[int, int, int, int, int, bool]]:
    """Replay `ops` through glibc one operation at a time, yielding after each (the block it freed or resized,
    or 0; the block it made, or 0; the bytes of each if it is a mapped chunk (IS_MMAPPED in its size word),
    else 0; the break; whether the break moved since the step before, outside a trace's call, which means
    something else used glibc). Makes nothing from the C library: a timeline's walk runs between the steps.
    """
    malloc, free, realloc, sbrk = libc.malloc, libc.free, libc.realloc, libc.sbrk
    word = ctypes.c_size_t.from_address
    last = sbrk(0)
    for code, i, n in ops:
        moved = sbrk(0) != last
        old = table[i] if code != ALLOC else 0
        old_mapped = 0
        if old:
            w = word(old - 8).value
            if w & IS_MMAPPED:
                old_mapped = w & ~7
        if code == ALLOC:
            p = malloc(n)
        elif code == REALLOC:
            p = realloc(old, n)
        else:
            free(old)
            p = 0
        table[i] = p
        new_mapped = 0
        if p:
            w = word(p - 8).value
            if w & IS_MMAPPED:
                new_mapped = w & ~7
        last = sbrk(0)
        yield old or 0, p or 0, old_mapped, new_mapped, last, moved


def glibc_sampled(ops: Sequence[Op], table: list[Any], libc: ctypes.CDLL, samples: list[int] | None,
                  brk0: int) -> tuple[int, int]:
    """Replay through glibc sampling its footprint after every operation: break growth since `brk0` plus
    the sizes of live mapped chunks.

    Returns (peak footprint, times the break moved between two operations); the footprint after operation
    k goes to samples[k] if `samples` is given (made whole by the caller before glibc was plugged).
    """
    peak = libc.sbrk(0) - brk0
    mapped = foreign = 0
    for k, (_, _, old_mapped, new_mapped, brk, moved) in enumerate(glibc_steps(ops, table, libc)):
        foreign += moved
        mapped += new_mapped - old_mapped
        now = brk - brk0 + mapped
        if now > peak:
            peak = now
        if samples is not None:
            samples[k] = now
    return peak, foreign


def measure_glibc(libc: ctypes.CDLL, trace: Trace, mode: str, settings: Sequence[tuple[int, int]],
                  table: list[Any], tcache: int, samples: list[int] | None = None,
                  window: Window = contextlib.nullcontext) -> Json:
    """Replay `trace` through glibc after `mallopt(param, value)` for each setting. mode "time": the lean
    loop, timed; "footprint": sampled (into `samples` if given); "verify": the verified loop.

    The caller makes `libc` (from `glibc()`), the replay table (num_ids + 1 zeros), `samples` and `tcache`
    (from `tcache_chunk()`) first, then plugs glibc: anything glibc allocated after the plug would give the
    replay a top pad for free.
    "free_before" reports the free bytes glibc held when the replay began (32 after a good plug). Inside
    `window()`, `fresh_start` (its break growth and system call counted, as a fresh program's would be, but
    not timed), then the loop.
    """
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise ValueError(f"glibc's mallopt refused parameter {param} = {value}")
    api = (libc.malloc, libc.free, libc.realloc)
    result: Json = {}
    if mode not in ("time", "footprint", "verify"):
        raise ValueError(f"unknown mode {mode!r} for glibc")
    result["free_before"] = libc.mallinfo2().fordblks
    brk0 = libc.sbrk(0)
    with window():
        fresh_start(libc, trace.ops, tcache)
        t0 = time.perf_counter()
        if mode == "time":
            replay(trace.ops, table, *api)
        elif mode == "footprint":
            result["footprint"], result["foreign_brk_moves"] = glibc_sampled(trace.ops, table, libc, samples,
                                                                             brk0)
        else:
            replay_verified(trace.ops, table, *api)
        result["seconds"] = time.perf_counter() - t0
    result["brk_growth"] = libc.sbrk(0) - brk0
    return result


def replay_mpheap(ops: Sequence[Op], table: list[Any], heap: Any) -> None:
    """The timed loop for multiprocessing.heap.Heap; a block is (arena, start, stop), None is NULL.

    malloc(0) is passed through (Heap rounds max(size, 1) up itself); realloc to 0 frees, as in C.
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


def replay_mpheap_verified(ops: Sequence[Op], table: list[Any], heap: Any) -> None:
    """`replay.replay_checked` for `replay_mpheap`: each block's pattern is written over the bytes asked for
    and checked through its arena's buffer."""

    def fill(block: tuple[Any, int, int], i: int, n: int) -> None:
        arena, start, _ = block
        arena.buffer[start:start + n] = bytes((pattern(i),)) * n

    def intact(block: tuple[Any, int, int], i: int, n: int) -> bool:
        arena, start, _ = block
        return bool(arena.buffer[start:start + n] == bytes((pattern(i),)) * n)

    replay_checked(ops, table, lambda op: replay_mpheap((op,), table, heap), fill, intact,
                   lambda block, n: f"(arena offset {block[1]}, {n} bytes)")


def measure_mpheap(trace: Trace, mode: str, table: list[Any], samples: list[int] | None = None,
                   window: Window = contextlib.nullcontext) -> Json:
    """Replay `trace` through a new multiprocessing.heap.Heap. mode "time": timed; "footprint": the sum of
    its arenas' sizes after every operation, into `samples` if given (arenas come and go only inside malloc
    and free, so the peak is exact); "verify": the verified loop. `table` is the replay table, num_ids + 1
    Nones. The loop runs inside `window()`; the heap outlives it, so unmapping its arenas at the end is not
    counted."""
    from multiprocessing.heap import Heap

    heap = Heap()
    result: Json = {}
    if mode not in ("time", "footprint", "verify"):
        raise ValueError(f"unknown mode {mode!r} for mpheap")
    with window():
        t0 = time.perf_counter()
        if mode == "time":
            replay_mpheap(trace.ops, table, heap)
        elif mode == "verify":
            replay_mpheap_verified(trace.ops, table, heap)
        else:
            arenas = heap._arenas  # type: ignore[attr-defined]  # changed in place as arenas come and go
            peak = 0
            for k, op in enumerate(trace.ops):
                replay_mpheap((op,), table, heap)
                held = sum(a.size for a in arenas)
                peak = max(peak, held)
                if samples is not None:
                    samples[k] = held
            result["footprint"] = peak
        result["seconds"] = time.perf_counter() - t0
    return result


class SelfTrace:
    """`strace -k` attached to this process from now until `stop()`: the interpreter's start-up stays out of
    the log, and so does the cost of unwinding its stacks. With `timestamps`, every call's line starts with
    its time (`-ttt`: seconds since the epoch, to the microsecond)."""

    def __init__(self, log: str, timestamps: bool = False) -> None:
        self.log = log  # the parent's to delete: this process may die with the allocator
        calls = ",".join((*STRACE_CALLS, "access", "faccessat", "faccessat2"))
        self.proc = subprocess.Popen(["strace", "-qq", "-k", *(["-ttt"] if timestamps else []), "-o", self.log,
                                      "-e", "trace=" + calls, "-p", str(os.getpid())], stdout=subprocess.DEVNULL)
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

    @staticmethod
    @contextlib.contextmanager
    def window() -> Iterator[None]:
        """Counted calls are those made inside this block (it marks the log at both ends)."""
        os.access(BEGIN_MARK, os.F_OK)
        yield
        os.access(END_MARK, os.F_OK)

    def stop(self, origin: Origin | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """Detach; returns (the calls `origin` claims, all others) between the marks; by default `origin`
        claims the calls made through ctypes."""
        self.proc.terminate()  # strace detaches cleanly on SIGTERM and flushes its log
        self.proc.wait()
        with open(self.log, errors="replace") as f:
            return count_strace(f.read(), origin or from_foreign_call)


def from_foreign_call(stack: list[str]) -> bool:
    """True if the innermost frames lead from a ctypes foreign call (ffi_call) to the system call without
    passing through the interpreter (ctypes.string_at, for one, calls into libpython to make its bytes)."""
    for frame in stack:
        if "ffi_call" in frame:
            return True
        if "libpython" in frame or "_ctypes" in frame or "/bin/python" in frame:
            return False
    return False


def from_mmap_module(stack: list[str]) -> bool:
    """True if the first frame above the C library is a function of Python's mmap module (which maps and
    unmaps multiprocessing.heap's arenas), whether the module is built in or a shared object."""
    for frame in stack:
        if "libc.so" in frame:
            continue
        function = frame.partition("(")[2].partition("+")[0]
        return function == "new_mmap_object" or function.startswith("mmap_")
    return False


def count_strace(log: str, origin: Origin = from_foreign_call) -> tuple[dict[str, int], dict[str, int]]:
    """(calls `origin` claims, calls made otherwise) between the marks of an `strace -k` log."""
    claimed: dict[str, int] = {}
    other: dict[str, int] = {}
    inside = False
    name = ""
    stack: list[str] = []

    def flush() -> None:
        if inside and name in STRACE_CALLS:
            into = claimed if origin(stack) else other
            into[name] = into.get(name, 0) + 1

    for line in log.splitlines():
        if line.startswith(" > "):
            stack.append(line)
            continue
        flush()
        stack = []
        name = line.split("(", 1)[0].rpartition(" ")[2]  # after the timestamp, if there is one
        if BEGIN_MARK in line:
            inside = True
        elif END_MARK in line:
            inside = False
    flush()
    return claimed, other
