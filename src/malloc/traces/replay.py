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


def replay_checked(ops: Sequence[Op], table: list[Any], step: Callable[[Op], None],
                   fill: Callable[[Any, int, int], None], intact: Callable[[Any, int, int], bool],
                   where: Callable[[Any, int], str]) -> None:
    """The verified replay, for any allocator: `step(op)` carries out one operation on `table` (a false entry
    is NULL), `fill(block, i, n)` writes block i's pattern over its first n bytes, `intact(block, i, n)` says
    whether they still hold it, and `where(block, n)` places the block in a report. Every block is filled
    with its pattern and checked before every free and realloc and after every realloc (min(old, new) bytes
    carried over); AssertionError names the first damage."""
    sizes = [0] * len(table)

    def check(k: int, i: int, n: int, what: str) -> None:
        block = table[i]
        if n and not intact(block, i, n):
            raise AssertionError(f"op {k}: block {i} {where(block, n)} was overwritten {what}")

    for k, op in enumerate(ops):
        code, i, n = op
        old = sizes[i] if table[i] else 0
        if code != ALLOC and table[i]:
            check(k, i, old, "before " + ("realloc" if code == REALLOC else "free"))
        step(op)
        block = table[i]
        sizes[i] = n if block else 0
        if not block:
            continue
        if code == REALLOC:
            check(k, i, min(old, n), "in realloc (contents not carried over)")
        if n:
            fill(block, i, n)
    for i, block in enumerate(table):
        if block:
            check(len(ops), i, sizes[i], "by the end of the trace")


def replay_verified(ops: Sequence[Op], table: list[Any], malloc: Malloc, free: Free, realloc: Realloc) -> None:
    """`replay_checked` for a C-style allocator: blocks are addresses, filled with memset and checked with
    memcmp, so that no check copies a block into a Python object, which would allocate from the C library
    mid-replay."""
    memcmp = ctypes.CDLL(None).memcmp
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def step(op: Op) -> None:
        replay((op,), table, malloc, free, realloc)

    def fill(p: int, i: int, n: int) -> None:
        ctypes.memset(p, pattern(i), n)

    def intact(p: int, i: int, n: int) -> bool:
        # every byte equals the first (the block against itself shifted by one), and the first is the pattern
        return ctypes.c_ubyte.from_address(p).value == pattern(i) and not memcmp(p, p + 1, n - 1)

    replay_checked(ops, table, step, fill, intact, lambda p, n: f"at {p:#x} ({n} bytes)")


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
