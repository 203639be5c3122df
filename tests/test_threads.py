"""The process allocator under several threads: every block keeps its own bytes, the heap stays sound.

Each thread fills every block it gets with a byte of its own and checks that byte before it frees or
resizes the block; a block handed to two threads at once, or corrupted by another thread's bookkeeping,
shows up as a wrong byte. The C-level work (memset, comparisons) runs with the GIL held, but the
allocator's lock is what keeps its Python-level state consistent between bytecodes, and that is what
is exercised here.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import random
import sys
import threading
import time

from procfs import run_child

import malloc

THREADS = 4
OPS_PER_THREAD = 100_000
MAX_LIVE = 256
SWITCH_INTERVAL = 50e-6


class Failure(Exception):
    pass


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.90:
        return rng.randint(0, 256)
    if r < 0.97:
        return rng.randint(257, 1100)  # up to and across the fast cache's largest size
    if r < 0.995:
        return rng.randint(1101, 64 << 10)
    return rng.randint(128 << 10, 1 << 20)  # at or above the default mmap threshold


def _fill(p: int, n: int, value: int) -> None:
    if n:
        ctypes.memset(p, value, n)


def _holds(p: int, n: int, value: int) -> bool:
    return n == 0 or ctypes.string_at(p, n).count(value) == n


def _worker(tid: int, seed: int, ops: int, start: threading.Barrier, errors: list[BaseException],
            done: list[int]) -> None:
    rng = random.Random(seed)
    live: list[tuple[int, int, int]] = []  # (address, requested size, fill byte)
    counter = 0

    def value() -> int:
        nonlocal counter
        counter += 1
        return (tid * 64 + counter) % 255 + 1

    def take(i: int) -> tuple[int, int, int]:
        live[i], live[-1] = live[-1], live[i]
        return live.pop()

    try:
        start.wait()
        for _ in range(ops):
            r = rng.random()
            if not live or (r < 0.40 and len(live) < MAX_LIVE):
                n = _size(rng)
                p = malloc.malloc(n)
                if p & 15:
                    raise Failure(f"malloc({n}) returned a misaligned {p:#x}")
                v = value()
                _fill(p, n, v)
                live.append((p, n, v))
            elif r < 0.75:
                p, n, v = take(rng.randrange(len(live)))
                if not _holds(p, n, v):
                    raise Failure(f"thread {tid}: block {p:#x} ({n} bytes) lost its fill {v:#x} before free")
                malloc.free(p)
            elif r < 0.90:
                p, n, v = take(rng.randrange(len(live)))
                if not _holds(p, n, v):
                    raise Failure(f"thread {tid}: block {p:#x} ({n} bytes) lost its fill {v:#x} before realloc")
                m = _size(rng)
                q = malloc.realloc(p, m)
                if m == 0:
                    if q != 0:  # realloc(p, 0) frees and returns 0
                        raise Failure(f"realloc({p:#x}, 0) returned {q:#x}")
                    continue
                if not _holds(q, min(n, m), v):
                    raise Failure(f"thread {tid}: realloc {p:#x} -> {q:#x} ({n} -> {m}) lost the contents")
                w = value()
                _fill(q, m, w)
                live.append((q, m, w))
            else:
                count, each = rng.randint(1, 8), rng.randint(0, 128)
                p = malloc.calloc(count, each)
                if not _holds(p, count * each, 0):
                    raise Failure(f"thread {tid}: calloc({count}, {each}) at {p:#x} is not zero")
                v = value()
                _fill(p, count * each, v)
                live.append((p, count * each, v))
        while live:
            p, n, v = live.pop()
            if not _holds(p, n, v):
                raise Failure(f"thread {tid}: block {p:#x} ({n} bytes) lost its fill {v:#x}")
            malloc.free(p)
        done.append(tid)
    except BaseException as exc:
        errors.append(exc)
        start.abort()
        for p, _n, _v in live:  # leave nothing behind
            with contextlib.suppress(Exception):
                malloc.free(p)


def test_four_threads_mixed_operations() -> None:
    before = malloc.mallinfo()
    errors: list[BaseException] = []
    done: list[int] = []
    start = threading.Barrier(THREADS)
    threads = [threading.Thread(target=_worker, args=(t, 1000 + t, OPS_PER_THREAD, start, errors, done),
                                name=f"malloc-worker-{t}") for t in range(THREADS)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)  # switch threads often, inside the allocator too
    try:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        elapsed = time.perf_counter() - t0
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if errors:
        raise errors[0]
    assert sorted(done) == list(range(THREADS))
    malloc.check()
    after = malloc.mallinfo()
    # Everything the threads took they gave back: the same bytes in use, no mapped chunk left over.
    assert after.uordblks == before.uordblks
    assert (after.hblks, after.hblkhd) == (before.hblks, before.hblkhd)
    print(f"{THREADS} threads x {OPS_PER_THREAD} operations: {elapsed:.1f} s")


def _producer(blocks: queue.Queue[tuple[int, int, int] | None], count: int, seed: int,
              errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for i in range(count):
            n = _size(rng)
            p = malloc.malloc(n)
            v = i % 255 + 1
            _fill(p, n, v)
            blocks.put((p, n, v))
    except BaseException as exc:
        errors.append(exc)
    finally:
        blocks.put(None)


def _consumer(blocks: queue.Queue[tuple[int, int, int] | None], errors: list[BaseException]) -> None:
    try:
        while (item := blocks.get()) is not None:
            p, n, v = item
            if not _holds(p, n, v):
                raise Failure(f"block {p:#x} ({n} bytes) lost its fill {v:#x} on its way between threads")
            malloc.free(p)
    except BaseException as exc:
        errors.append(exc)
        while (item := blocks.get()) is not None:
            malloc.free(item[0])


def test_blocks_freed_by_another_thread() -> None:
    """Blocks allocated in one thread and freed in another (producer/consumer pairs)."""
    before = malloc.mallinfo()
    errors: list[BaseException] = []
    threads = []
    for pair in range(2):
        q: queue.Queue[tuple[int, int, int] | None] = queue.Queue(maxsize=512)
        threads.append(threading.Thread(target=_producer, args=(q, 20_000, 77 + pair, errors)))
        threads.append(threading.Thread(target=_consumer, args=(q, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    malloc.check()
    after = malloc.mallinfo()
    assert after.uordblks == before.uordblks
    assert (after.hblks, after.hblkhd) == (before.hblks, before.hblkhd)


def test_break_is_lowered_only_when_single_threaded() -> None:
    """With a second thread alive, giving memory back never lowers the break (that thread's C library
    malloc may have just moved it): pages go back with madvise. Once the thread is gone, trim lowers it.
    Run in a fresh child, where our heap is at the top of the break."""
    facts = run_child("""
        import threading
        blocks = [malloc.malloc(60_000) for _ in range(64)]
        heap = malloc.allocator.heaps[0]
        peak = libc.current_break()
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait)
        helper.start()
        sink = []
        events.attach(sink)
        threads = libc.thread_count()
        for p in blocks:
            malloc.free(p)
        malloc.trim()
        brk_threaded = libc.current_break()
        end_threaded = heap.end
        stop.set()
        helper.join()
        # join() returns before the kernel has finished with the thread: wait until it is gone.
        import time
        deadline = time.monotonic() + 10
        while libc.thread_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        threads_after = libc.thread_count()
        mark = len(sink)
        malloc.trim()
        events.detach(sink)
        malloc.check()
        calls = [[e.name, e.args[0] if e.name == "sbrk" else 0] for e in sink]
        report(peak=peak, brk_threaded=brk_threaded, end_threaded=end_threaded, threads=threads,
               threads_after=threads_after, brk_single=libc.current_break(), end_single=heap.end,
               during=calls[:mark], later=calls[mark:])
    """)
    assert facts["threads"] == 2 and facts["threads_after"] == 1
    # Two threads: the break stays at its peak, memory goes back with madvise only.
    assert facts["brk_threaded"] == facts["peak"] == facts["end_threaded"]
    assert not [c for c in facts["during"] if c[0] == "sbrk"], facts["during"]
    assert ["madvise", 0] in facts["during"]
    # One thread again: trim lowers the break.
    assert [c for c in facts["later"] if c[0] == "sbrk" and c[1] < 0], facts["later"]
    assert facts["brk_single"] < facts["peak"]
    assert facts["brk_single"] == facts["end_single"]
