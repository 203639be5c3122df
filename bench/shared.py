#!/usr/bin/env python3
"""The shared-heap benchmark: SharedHeap against one SharedMemory per object, pickling, and the process heap.

    python bench/shared.py [--repeats N] [--only SECTIONS] [--array-mb MB] [--ops N]

Four sections (issue 12's targets), each printed as a table; every comparison is a ratio of contenders
measured side by side in this run, alternated round by round, the best round of each counting:

- blocks: allocate, write and free 10^4 blocks of 1 KiB, in a SharedHeap (malloc + view + write + free)
  and as one multiprocessing.shared_memory.SharedMemory each (create + write + close + unlink), one at a
  time and 1,000 live at a time; target at least 15x faster.
- many: 10^6 live blocks of 64 bytes in one heap, each tagged and read back: the footprint (segment size,
  and what /dev/shm holds for it) and utilization (bytes asked / bytes held). One SharedMemory per object
  cannot do this: each is a mapping, and a process may hold vm.max_map_count of them (not tried).
- array: hand a numpy array (100 MB) to a worker process started beforehand, as a pool's is: pickled
  through a multiprocessing.Queue, built in the heap with `ndarray` (the worker receives the pickled heap and
  gets the array by name), or copied into the heap with `put` first. Measured until the worker has the array
  usable (it reads its first and last elements and answers), and also until it has summed it; targets at
  least 100x (ndarray) and 1.5x (put) faster than the Queue.
- procs: throughput of 1, 2 and 4 processes doing mixed operations (malloc, free, realloc of random sizes,
  an 8-byte write into each new block) on one heap, beside as many processes each on its own process heap;
  and one process's cost per operation against the process heap's (`malloc.malloc`, `malloc.free`,
  `malloc.realloc`) on the same sequence; target at most 2x.

The machine's noise only cancels in ratios measured in one run. Every segment the benchmark makes is
unlinked and every process it starts is stopped, on any exit but SIGKILL.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import importlib.util
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("malloc") is None:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

import malloc  # noqa: E402
from malloc import SharedHeap  # noqa: E402
from malloc.traces.table import render  # noqa: E402

SECTIONS = ("blocks", "many", "array", "procs")
BLOCKS, BLOCK_SIZE, BLOCKS_TARGET = 10_000, 1024, 15.0
# A live SharedMemory holds two file descriptors (shm_open's, and the mmap module's duplicate of it), so all
# 10^4 at once would pass many a process's descriptor limit: its blocks live a batch at a time.
BATCH = 1000
MANY, MANY_SIZE = 1_000_000, 64
NDARRAY_TARGET, PUT_TARGET = 100.0, 1.5
PROCESSES = (1, 2, 4)
COST_TARGET = 2.0
SLOTS = 1000  # live blocks a mixed-operation sequence keeps at most
TAG = b"sharedbm"
WAIT = 120.0  # seconds any wait on a worker may last before the benchmark gives up on it

Ctx = Any  # a multiprocessing context (its type is private to multiprocessing)

# ------------------------------------------------------------------------------- cleaning up

_heaps: list[SharedHeap] = []
_workers: list[mp.process.BaseProcess] = []
_segments: list[SharedMemory] = []


def new_heap(label: str, size: int) -> SharedHeap:
    """A new shared heap, closed and unlinked by `cleanup` however the benchmark ends."""
    h = SharedHeap.create(f"bench-shared-{os.getpid()}-{label}", size)
    _heaps.append(h)
    return h


def drop_heap(h: SharedHeap) -> None:
    """Close and unlink a heap made by `new_heap` (its views must be gone)."""
    _heaps.remove(h)
    try:
        h.unlink()
    finally:
        h.close()


def cleanup() -> None:
    """Stop every worker still running and remove every segment still named (atexit, and on SIGTERM)."""
    while _workers:
        p = _workers.pop()
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    while _segments:
        s = _segments.pop()
        with suppress(BufferError):  # a view is alive: the mapping goes with the process, the name now
            s.close()
        with suppress(FileNotFoundError):
            s.unlink()
    while _heaps:
        h = _heaps.pop()
        with suppress(FileNotFoundError):
            h.unlink()
        with suppress(BufferError):
            h.close()


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally clauses and atexit


# ---------------------------------------------------------------------------------- measuring

@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic collector off for a timed stretch (as for every contender)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def rounds(contenders: Sequence[Callable[[], float]], repeats: int) -> list[list[float]]:
    """Each contender's timings (seconds) over `repeats` rounds, their order rotated every round so that none
    always runs first or last."""
    times: list[list[float]] = [[] for _ in contenders]
    k = len(contenders)
    for r in range(repeats):
        for i in range(k):
            j = (i + r) % k
            times[j].append(contenders[j]())
    return times


def spread(xs: Sequence[float], spec: str = ".1f") -> list[str]:
    """Per-round ratios as table cells: their median, and their range as "lo-hi"."""
    return [f"{statistics.median(xs):{spec}}x", f"{min(xs):{spec}}-{max(xs):{spec}}"]


def mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def us(seconds: float, count: int = 1) -> str:
    return f"{seconds / count * 1e6:,.2f}"


# --------------------------------------------------------------- 1. blocks of 1 KiB, live then freed

def blocks_heap(h: SharedHeap, n: int, data: bytes, batch: int) -> float:
    """malloc + view + write + free of `n` blocks, `batch` made before they are freed; seconds."""
    size = len(data)
    malloc_, view, free = h.malloc, h.view, h.free
    with no_gc():
        t = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                o = malloc_(size)
                view(o, size)[:] = data
                free(o)
        else:
            for _ in range(n // batch):
                offs = []
                for _ in range(batch):
                    o = malloc_(size)
                    view(o, size)[:] = data
                    offs.append(o)
                for o in offs:
                    free(o)
        return time.perf_counter() - t


def blocks_shm(n: int, data: bytes, batch: int) -> float:
    """create + write + close + unlink of `n` SharedMemory segments, the same way; seconds."""
    size = len(data)
    live = _segments
    with no_gc():
        t = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                s = SharedMemory(create=True, size=size)
                live.append(s)
                s.buf[:size] = data  # type: ignore[index]
                s.close()
                s.unlink()
                live.pop()
        else:
            for _ in range(n // batch):
                for _ in range(batch):
                    s = SharedMemory(create=True, size=size)
                    live.append(s)
                    s.buf[:size] = data  # type: ignore[index]
                while live:
                    s = live.pop()
                    s.close()
                    s.unlink()
        return time.perf_counter() - t


def section_blocks(repeats: int) -> list[str]:
    data = bytes(range(256)) * (BLOCK_SIZE // 256)
    h = new_heap("blocks", 4 << 20)
    try:
        blocks_shm(10, data, 1)  # starts the resource tracker SharedMemory reports to, once per process
        rows = [["pattern", "SharedHeap µs/block", "SharedMemory µs/block", "ratio of bests", "median round ratio",
                 "round ratios"]]
        best: dict[int, float] = {}
        median: dict[int, float] = {}
        for batch, label in ((1, "one at a time"), (BATCH, f"{BATCH:,} live, then freed, {BLOCKS // BATCH} times")):
            heap_t, shm_t = rounds([partial(blocks_heap, h, BLOCKS, data, batch),
                                    partial(blocks_shm, BLOCKS, data, batch)], repeats)
            best[batch] = min(shm_t) / min(heap_t)
            per_round = [s / a for a, s in zip(heap_t, shm_t, strict=True)]
            median[batch] = statistics.median(per_round)
            rows.append([label, us(min(heap_t), BLOCKS), us(min(shm_t), BLOCKS), f"{best[batch]:.1f}x",
                         *spread(per_round)])
        h.check()
    finally:
        drop_heap(h)
    return [f"1. {BLOCKS:,} blocks of {BLOCK_SIZE} bytes: SharedHeap (malloc + view + write + free) against "
            "one SharedMemory per block (create + write + close + unlink)", "",
            render(rows), "",
            f"target: at least {BLOCKS_TARGET:g}x faster (ratio of bests): {mark(best[1] >= BLOCKS_TARGET)} one at a "
            f"time ({best[1]:.1f}x, median {median[1]:.1f}x), {mark(best[BATCH] >= BLOCKS_TARGET)} {BATCH:,} live at "
            f"a time ({best[BATCH]:.1f}x, median {median[BATCH]:.1f}x)"]


# ------------------------------------------------------------------------- 2. a million live blocks

def shm_bytes(h: SharedHeap) -> int:
    """Memory /dev/shm holds for the heap's file (its allocated blocks)."""
    return os.stat(h.path).st_blocks * 512


def map_count(h: SharedHeap | None = None) -> int:
    """Mappings in this process (/proc/self/maps), or only those inside the heap's reservation."""
    with open("/proc/self/maps") as f:
        starts = [int(line.split("-", 1)[0], 16) for line in f]
    return len(starts) if h is None else sum(h.base <= a < h.base + h.max_size for a in starts)


def section_many() -> list[str]:
    h = new_heap("many", 1 << 20)
    maps_before = map_count()
    offs: list[int] = []
    try:
        malloc_, view = h.malloc, h.view
        with no_gc():
            t0 = time.perf_counter()
            for _ in range(MANY):
                offs.append(malloc_(MANY_SIZE))
            t1 = time.perf_counter()
            for i, o in enumerate(offs):
                view(o, 8)[:] = i.to_bytes(8, "little")
            t2 = time.perf_counter()
            bad = sum(bytes(view(o, 8)) != i.to_bytes(8, "little") for i, o in enumerate(offs))
            t3 = time.perf_counter()
        size, held_shm, info = h.size, shm_bytes(h), h.mallinfo()
        maps_live, maps_heap = map_count(), map_count(h)
        t4 = time.perf_counter()
        h.check()
        t5 = time.perf_counter()
        with no_gc():
            for o in offs:
                h.free(o)
            t6 = time.perf_counter()
        offs.clear()
        h.check()
        after = (h.size, shm_bytes(h))
    finally:
        drop_heap(h)
    asked = MANY * MANY_SIZE
    rows = [["figure", "value"],
            ["blocks live at once", f"{MANY:,} x {MANY_SIZE} bytes = {asked:,} bytes asked"],
            ["segment size (footprint)", f"{size:,} bytes"],
            ["of it held in /dev/shm", f"{held_shm:,} bytes"],
            ["bytes in use by chunks (mallinfo uordblks)", f"{info.uordblks:,} ({info.uordblks / MANY:.0f} a block)"],
            ["utilization (asked / segment size)", f"{asked / size:.3f}"],
            ["utilization (asked / held in /dev/shm)", f"{asked / held_shm:.3f}"],
            ["mappings in /proc/self/maps", f"{maps_before} before, {maps_live} with all blocks live, "
                                            f"{maps_heap} of them the heap's"],
            ["blocks whose tag read back wrong", f"{bad}"],
            ["malloc", f"{us(t1 - t0, MANY)} µs a block"],
            ["view + 8-byte write", f"{us(t2 - t1, MANY)} µs a block"],
            ["view + 8-byte read and compare", f"{us(t3 - t2, MANY)} µs a block"],
            ["check() of the whole heap", f"{t5 - t4:.2f} s"],
            ["free", f"{us(t6 - t5, MANY)} µs a block"],
            ["after freeing all", f"segment {after[0]:,} bytes, {after[1]:,} held in /dev/shm"]]
    limit = Path("/proc/sys/vm/max_map_count")
    cap = limit.read_text().strip() if limit.exists() else "?"
    return [f"2. {MANY:,} live blocks of {MANY_SIZE} bytes in one SharedHeap", "", render(rows), "",
            f"one SharedMemory per object cannot: each is a mapping of its own, and vm.max_map_count here is {cap} "
            "(not tried)"]


# --------------------------------------------------------------------- 3. an array to a worker

def array_worker(inbox: Any, outbox: Any) -> None:
    """A worker's loop: take (how, payload..., full) messages until None; answer once each has the array usable
    (its first and last elements read) or, with `full`, summed."""
    held: dict[str, SharedHeap] = {}
    while True:
        try:
            msg = inbox.get()  # a heap in it arrives pickled: unpickling attaches it (or finds it open)
            if msg is None:
                break
            if msg[0] == "queue":
                _, arr, full = msg
            else:
                _, h, name, full, keep = msg
                arr = h.get(name)
            answer = float(arr.sum()) if full else (float(arr[0]), float(arr[-1]))
            del arr
            if msg[0] == "heap":
                if keep:
                    held[h.name] = h
                else:
                    h.close()
            outbox.put(("ok", answer))
        except Exception:
            outbox.put(("error", traceback.format_exc()))
    for h in held.values():
        h.close()


class WorkerFailed(RuntimeError):
    """A worker process raised: the message carries its traceback."""


def answer(outbox: Any) -> Any:
    """A worker's next answer; WorkerFailed with its traceback if it raised."""
    status, value = outbox.get(timeout=WAIT)
    if status != "ok":
        raise WorkerFailed(f"a worker process failed:\n{value}")
    return value


def start_worker(ctx: Ctx, target: Callable[..., None], *args: object) -> mp.process.BaseProcess:
    p: mp.process.BaseProcess = ctx.Process(target=target, args=args, daemon=True)
    _workers.append(p)
    p.start()
    return p


def stop_worker(p: mp.process.BaseProcess, inbox: Any) -> None:
    inbox.put(None)
    p.join(WAIT)
    if p.is_alive():
        p.kill()
        p.join(5)
    _workers.remove(p)


def section_array(repeats: int, megabytes: int) -> list[str]:
    import numpy as np

    n = megabytes * 1_000_000 // 8
    src = np.random.default_rng(12).random(n)
    first_last = (float(src[0]), float(src[-1]))
    total = float(src.sum())
    ctx = mp.get_context("spawn")  # a clean worker: nothing inherited, the heap reaches it only by pickling
    inbox, outbox = ctx.Queue(), ctx.Queue()
    worker = start_worker(ctx, array_worker, inbox, outbox)
    h = new_heap("array", 64 << 20)
    try:
        built = h.ndarray("built", (n,), np.float64)
        built[:] = src  # the producer builds it in place: before the clock starts
        del built
        inbox.put(("queue", src[:2], False))  # the worker is up and numpy imported before any round
        answer(outbox)

        def send(msg: tuple[object, ...], full: bool) -> float:
            t = time.perf_counter()
            inbox.put(msg)
            got = answer(outbox)
            elapsed = time.perf_counter() - t
            if got != (total if full else first_last) and not (full and abs(got - total) < 1e-6 * abs(total)):
                raise RuntimeError(f"the worker read {got!r} from the array, not what was sent")
            return elapsed

        def via_queue(full: bool) -> float:
            return send(("queue", src, full), full)

        def via_ndarray(full: bool, keep: bool) -> float:
            return send(("heap", h, "built", full, keep), full)

        def via_put(full: bool) -> float:
            t = time.perf_counter()
            h.put("copy", src)
            return time.perf_counter() - t + send(("heap", h, "copy", full, True), full)

        rows = [["measured until the worker", "Queue ms", "ndarray ms (worker attaches)", "ndarray ms (attached)",
                 "put ms", "Queue/ndarray (attaches)", "Queue/ndarray (attached)", "Queue/put"]]
        ratios: dict[bool, tuple[float, float, float]] = {}
        for full, label in ((False, "has it usable"), (True, "has summed it")):
            with no_gc():
                q, cold, warm, put = rounds([partial(via_queue, full), partial(via_ndarray, full, False),
                                             partial(via_ndarray, full, True), partial(via_put, full)], repeats)
            ratios[full] = (min(q) / min(cold), min(q) / min(warm), min(q) / min(put))
            rows.append([label, *(f"{min(t) * 1e3:,.2f}" for t in (q, cold, warm, put)),
                         *(f"{r:,.1f}x" for r in ratios[full])])
        h.delete("copy")
        h.check()
    finally:
        stop_worker(worker, inbox)
        drop_heap(h)
    cold_r, warm_r, put_r = ratios[False]
    return [f"3. a {megabytes} MB float64 array handed to a worker process: pickled through a multiprocessing.Queue, "
            "built in the heap (ndarray), copied in (put, timed)", "",
            render(rows), "",
            "'attaches': the worker attaches the heap (unpickling it) and closes it every time; 'attached': it keeps "
            "it open across rounds",
            f"target: ndarray at least {NDARRAY_TARGET:g}x faster than the Queue (usable): "
            f"{mark(cold_r >= NDARRAY_TARGET)} attaching ({cold_r:,.1f}x), "
            f"{mark(warm_r >= NDARRAY_TARGET)} attached ({warm_r:,.1f}x)",
            f"target: put at least {PUT_TARGET:g}x faster than the Queue (usable): {mark(put_r >= PUT_TARGET)} "
            f"({put_r:,.1f}x)"]


# ----------------------------------------------------------------------- 4. mixed operations

MALLOC, FREE, REALLOC = 0, 1, 2
Op = tuple[int, int, int]  # (kind, slot, size)


def mixed_ops(seed: int, count: int) -> list[Op]:
    """`count` operations on SLOTS slots, then a free of every block still live: mostly small sizes, a few up
    to 64 KiB; malloc into an empty slot, free and realloc of a live one."""
    rng = random.Random(seed)

    def size() -> int:
        r = rng.random()
        return rng.randint(1, 256) if r < 0.7 else rng.randint(257, 4096) if r < 0.95 else rng.randint(4097, 65536)

    live: list[int] = []
    empty = list(range(SLOTS))
    ops: list[Op] = []
    for _ in range(count):
        r = rng.random()
        if not live or (r < 0.45 and empty):
            s = empty.pop(rng.randrange(len(empty)))
            live.append(s)
            ops.append((MALLOC, s, size()))
        elif r < 0.8:
            s = live.pop(rng.randrange(len(live)))
            empty.append(s)
            ops.append((FREE, s, 0))
        else:
            ops.append((REALLOC, live[rng.randrange(len(live))], size()))
    ops.extend((FREE, s, 0) for s in live)
    return ops


def run_ops(api: tuple[Callable[[int], int], Callable[[int], None], Callable[[int, int], int],
                       Callable[[int, int], memoryview]], ops: Sequence[Op], write: bool) -> float:
    """The sequence through `api` (malloc, free, realloc, view), an 8-byte write into every new or moved block
    with `write`; seconds."""
    slots = [0] * SLOTS
    malloc_, free, realloc, view = api
    with no_gc():
        t = time.perf_counter()
        for kind, s, n in ops:
            if kind == MALLOC:
                p = slots[s] = malloc_(n)
                if write:
                    view(p, 8)[:] = TAG
            elif kind == FREE:
                free(slots[s])
            else:
                p = slots[s] = realloc(slots[s], n)
                if write:
                    view(p, 8)[:] = TAG
        return time.perf_counter() - t


def run_shared(h: SharedHeap, ops: Sequence[Op], write: bool) -> float:
    """The sequence on a shared heap; seconds."""
    return run_ops((h.malloc, h.free, h.realloc, h.view), ops, write)


def run_process(ops: Sequence[Op], write: bool) -> float:
    """The same sequence on this process's heap (malloc.malloc, malloc.free, malloc.realloc, malloc.view)."""
    return run_ops((malloc.malloc, malloc.free, malloc.realloc, malloc.view), ops, write)


def mixed_worker(index: int, barrier: Any, inbox: Any, outbox: Any) -> None:
    """A worker's loop: take (heap or None, seed, count) until None; run the sequence with writes, on the shared
    heap or (None) on its own process heap, all workers starting together; answer (start, end)."""
    held: list[SharedHeap] = []
    while True:
        try:
            msg = inbox.get()
            if msg is None:
                break
            h, seed, count = msg
            ops = mixed_ops(seed + index, count)
            if h is not None and h not in held:
                held.append(h)
            barrier.wait(WAIT)
            start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process
            run_shared(h, ops, True) if h is not None else run_process(ops, True)
            outbox.put(("ok", (start, time.perf_counter())))
        except Exception:
            barrier.abort()  # the others stop waiting for this one
            outbox.put(("error", traceback.format_exc()))
    for h in held:
        h.close()


def mixed_round(inboxes: Sequence[Any], outbox: Any, heap: SharedHeap | None, count: int) -> float:
    """One round of every worker's sequence (on `heap`, or None: each on its own process heap): seconds from
    the first start to the last end."""
    for q in inboxes:
        q.put((heap, 1000, count))
    spans: list[tuple[float, float]] = [answer(outbox) for _ in inboxes]
    return max(e for _, e in spans) - min(s for s, _ in spans)


def section_procs(repeats: int, count: int) -> list[str]:
    ctx = mp.get_context("spawn")
    h = new_heap("procs", 16 << 20)
    rows = [["processes", "shared heap ops/s", "own process heaps ops/s", "shared/own", "shared vs 1 process"]]
    try:
        one = 0.0
        for nproc in PROCESSES:
            barrier = ctx.Barrier(nproc)
            outbox = ctx.Queue()
            inboxes = [ctx.Queue() for _ in range(nproc)]
            workers = [start_worker(ctx, mixed_worker, i, barrier, inboxes[i], outbox) for i in range(nproc)]
            try:
                mixed_round(inboxes, outbox, None, count)  # every worker up, its imports done
                shared_t, own_t = rounds([partial(mixed_round, inboxes, outbox, h, count),
                                          partial(mixed_round, inboxes, outbox, None, count)], repeats)
            finally:
                for p, q in zip(workers, inboxes, strict=True):
                    stop_worker(p, q)
            total = sum(len(mixed_ops(1000 + i, count)) for i in range(nproc))
            shared_rate, own_rate = total / min(shared_t), total / min(own_t)
            one = one or shared_rate
            rows.append([str(nproc), f"{shared_rate:,.0f}", f"{own_rate:,.0f}", f"{shared_rate / own_rate:.2f}",
                         f"{shared_rate / one:.2f}x"])
        h.check()
        if h.mallinfo().uordblks:
            raise RuntimeError("blocks were left in use after every sequence freed its own")

        ops = mixed_ops(7, count)
        cost_rows = [["sequence", "SharedHeap µs/op", "process heap µs/op", "ratio of bests", "median round ratio",
                      "round ratios"]]
        ratios: dict[bool, float] = {}
        medians: dict[bool, float] = {}
        for write, label in ((False, "malloc/free/realloc"), (True, "the same, 8-byte write into each new block")):
            run_process(ops, write)  # both warmed: the process heap's first pages, the shared heap's growth
            run_shared(h, ops, write)
            shared_t, proc_t = rounds([partial(run_shared, h, ops, write), partial(run_process, ops, write)],
                                      repeats)
            ratios[write] = min(shared_t) / min(proc_t)
            per_round = [a / b for a, b in zip(shared_t, proc_t, strict=True)]
            medians[write] = statistics.median(per_round)
            cost_rows.append([label, us(min(shared_t), len(ops)), us(min(proc_t), len(ops)),
                              f"{ratios[write]:.2f}x", *spread(per_round, ".2f")])
        h.check()
    finally:
        drop_heap(h)
    return [f"4a. mixed operations ({count:,} a process, then its remaining frees; sizes 1 B-64 KiB, mostly small; "
            "an 8-byte write into each new block): throughput", "",
            render(rows), "",
            "'own process heaps': the same processes, each on its own process heap (malloc.malloc), sharing nothing",
            "", f"4b. one process, the same {len(ops):,} operations: SharedHeap against the process heap", "",
            render(cost_rows), "",
            f"target: at most {COST_TARGET:g}x the process heap's cost per operation (ratio of bests): "
            f"{mark(ratios[False] <= COST_TARGET)} ({ratios[False]:.2f}x, median {medians[False]:.2f}x; with the "
            f"writes {ratios[True]:.2f}x, median {medians[True]:.2f}x)"]


# -------------------------------------------------------------------------------------- main

def engine_build() -> str:
    import malloc.heap

    where = Path(malloc.heap.__file__ or "?")
    return "interpreted" if where.suffix == ".py" else "compiled (mypyc)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=7, help="rounds per contender, alternated; the best counts")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"the sections to run, comma-separated (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--array-mb", type=int, default=100, help="the array's size in section 'array' (MB)")
    ap.add_argument("--ops", type=int, default=20_000, help="operations a process runs in section 'procs'")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        ap.error(f"unknown section {', '.join(unknown) or '(none)'}: choose from {', '.join(SECTIONS)}")
    if args.repeats < 1 or args.array_mb < 1 or args.ops < 1:
        ap.error("--repeats, --array-mb and --ops must be positive")

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_sigterm)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench/shared.py, {now}: engine {engine_build()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; best of {args.repeats} alternated rounds")
    start = time.perf_counter()
    try:
        for section in chosen:
            print()
            if section == "blocks":
                lines = section_blocks(args.repeats)
            elif section == "many":
                lines = section_many()
            elif section == "array":
                lines = section_array(args.repeats, args.array_mb)
            else:
                lines = section_procs(args.repeats, args.ops)
            print("\n".join(lines), flush=True)
    finally:
        cleanup()
    print(f"\n({time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
