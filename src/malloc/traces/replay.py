"""Replaying a trace through a C-style allocator, and this project's allocator measured doing it.

The loops here run inside a worker process (see `malloc.traces.worker`), one replay per process. A replay
table holds one pointer per block id plus a spare last slot, which stays NULL and serves `free(NULL)`
(id -1). `live_bytes` is the one figure that depends on the trace alone, so the parent computes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from .formats import ALLOC, REALLOC, Op, Trace

Json = dict[str, Any]
# The system calls the lab reports, by kind; our log's sbrk is the brk system call, and mprotect (which
# only a heap over a mapping makes) is kept in the JSON figures but not in these.
SYSCALL_KINDS = ("brk", "mmap", "munmap", "mremap", "madvise")

Malloc = Callable[[int], Any]
Free = Callable[[Any], None]
Realloc = Callable[[Any, int], Any]
# Made around the replay loop alone: a system-call tracer marks its log there.
Window = Callable[[], AbstractContextManager[object]]


def live_bytes(trace: Trace) -> list[int]:
    """Requested payload bytes live after each operation (a block re-allocated under a live id leaks,
    so it stays counted, as in `formats.peak_live`; realloc to 0 frees)."""
    sizes = [0] * (trace.num_ids + 1)
    live = 0
    out: list[int] = []
    append = out.append
    for code, ident, size in trace.ops:
        if code == ALLOC:
            live += size
        else:
            live += size - sizes[ident]  # a free's size is 0
        sizes[ident] = size
        append(live)
    return out


def replay(ops: Sequence[Op], table: list[Any], malloc: Malloc, free: Free, realloc: Realloc) -> None:
    """The timed loop: every operation, nothing else. Freeing clears the slot, so a stale pointer is never
    passed again."""
    for code, i, n in ops:
        if code == ALLOC:
            table[i] = malloc(n)
        elif code == REALLOC:
            table[i] = realloc(table[i], n)
        else:
            free(table[i])
            table[i] = 0


def replay_sampled(ops: Sequence[Op], table: list[Any], malloc: Malloc, free: Free, realloc: Realloc,
                   held: Callable[[], int], samples: list[int]) -> None:
    """Replay storing `held()` after operation k in samples[k] (a footprint per operation).

    `samples` is made whole by the caller before the C library's heap is prepared: a list growing
    mid-replay would move the break.
    """
    for k, op in enumerate(ops):
        replay((op,), table, malloc, free, realloc)
        samples[k] = held()


def pattern(ident: int) -> int:
    """The byte a verified replay writes over block `ident`: never 0, and different for neighbouring ids,
    so an overlap shows."""
    return ident % 251 + 1


def replay_verified(ops: Sequence[Op], table: list[Any], malloc: Malloc, free: Free, realloc: Realloc) -> None:
    """Replay writing each block's pattern over all of it, and check it before every free and realloc and
    after every realloc (min(old, new) bytes carried over); AssertionError names the first damage."""
    sizes = [0] * len(table)
    memcmp = ctypes.CDLL(None).memcmp
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def check(k: int, i: int, p: int, n: int, what: str) -> None:
        # Every byte equals the first (the block against itself shifted by one) and the first is the
        # pattern; no copy into a Python object, which would allocate from the C library mid-replay.
        if n and (ctypes.c_ubyte.from_address(p).value != pattern(i) or memcmp(p, p + 1, n - 1)):
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
            ctypes.memset(p, pattern(i), n)
    for i, p in enumerate(table):
        if p:
            check(len(ops), i, p, sizes[i], "by the end of the trace")


def syscall_kinds(counts: dict[str, int]) -> dict[str, int]:
    """Counts by system call under the kernel's names (sbrk is brk), zeros left out."""
    out: dict[str, int] = {}
    for name, n in counts.items():
        kind = "brk" if name == "sbrk" else name
        if n:
            out[kind] = out.get(kind, 0) + n
    return out


def measure_ours(trace: Trace, mode: str, settings: Sequence[tuple[int, int]], table: list[Any],
                 samples: list[int] | None = None, window: Window = contextlib.nullcontext) -> Json:
    """Replay `trace` through this process's allocator after `mallopt(param, value)` for each setting.

    mode "time": the lean loop, timed; "footprint": the bytes held from the OS stored in `samples` after
    every operation; "verify": the verified loop, then a full heap check. Every mode reports the peak footprint
    (`mallinfo().system_max`) and the system calls made during the replay, from the allocator's own log.
    `table` is the replay table, num_ids + 1 zeros; the loop runs inside `window()`.
    """
    import malloc

    from ..os import events

    for param, value in settings:
        malloc.mallopt(param, value)
    allocator = malloc.allocator
    api = (malloc.malloc, malloc.free, malloc.realloc)
    result: Json = {}
    if mode not in ("time", "footprint", "verify"):
        raise ValueError(f"unknown mode {mode!r} for ours")
    before = dict(events.counts)
    with window():
        t0 = time.perf_counter()
        if mode == "time":
            replay(trace.ops, table, *api)
        elif mode == "footprint":
            if samples is None:
                raise ValueError("mode 'footprint' needs a list for the samples")
            replay_sampled(trace.ops, table, *api, lambda: allocator.system_current, samples)
        else:
            replay_verified(trace.ops, table, *api)
        result["seconds"] = time.perf_counter() - t0
    if mode == "verify":
        malloc.check()
    result["footprint"] = malloc.mallinfo().system_max
    result["syscalls"] = syscall_kinds({k: v - before[k] for k, v in events.counts.items()})
    return result
