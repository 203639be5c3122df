"""fork(): the child gets a copy of the heap that works on its own, and the parent's is untouched.

The child reports through its exit status only (each check has its own code) and always leaves with
os._exit, so nothing of pytest runs twice. The parent reaps it by pid.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import malloc

OK = 0
CHILD_TIMEOUT = 30.0
FORKS = 60


def _fill(p: int, n: int, value: int) -> None:
    ctypes.memset(p, value, n)


def _holds(p: int, n: int, value: int) -> bool:
    return ctypes.string_at(p, n).count(value) == n


def _run_in_child(body: Callable[[], int]) -> int:
    """Fork; the child runs `body` and exits with its result (99 on an exception). Returns the child's
    exit code, after reaping it by pid (killing it if it outlives CHILD_TIMEOUT)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} hung")
        time.sleep(0.002)


def test_child_inherits_blocks_and_cache_parent_intact() -> None:
    sizes = [24, 24, 100, 500, 1000, 3000, 20000, 200 << 10, 40 << 20]
    blocks = [(malloc.malloc(n), n, i + 1) for i, n in enumerate(sizes)]
    for p, n, v in blocks:
        _fill(p, n, v)
    big = blocks[-1][0]
    mapped = malloc.allocator.mapped_chunks()
    assert big in mapped  # above any threshold: a mapping of its own
    n_mapped = sum(p in mapped for p, _n, _v in blocks)
    # Blocks in the fast cache at the time of the fork.
    cached = [malloc.malloc(48) for _ in range(5)]
    for p in cached:
        malloc.free(p)
    before = malloc.mallinfo()
    assert before.smblks >= len(cached)

    def child() -> int:
        if not all(_holds(p, n, v) for p, n, v in blocks):
            return 10
        if malloc.mallinfo().smblks != 0:  # the child empties the inherited cache into the heap
            return 11
        malloc.check()
        # Copy-on-write: what the child writes, the parent never sees.
        for p, n, _v in blocks:
            _fill(p, n, 0xEE)
        rng = random.Random(5)
        live: list[tuple[int, int, int]] = []
        for i in range(5000):
            if live and rng.random() < 0.45:
                p, n, v = live.pop(rng.randrange(len(live)))
                if not _holds(p, n, v):
                    return 12
                malloc.free(p)
            else:
                n = rng.choice([16, 48, 100, 700, 2000, 9000, 150 << 10])
                p = malloc.malloc(n)
                _fill(p, n, i % 250 + 1)
                live.append((p, n, i % 250 + 1))
        for p, n, v in live:
            if not _holds(p, n, v):
                return 13
            malloc.free(p)
        for p, _n, _v in blocks:  # the inherited blocks, mapped one included, free in the child
            malloc.free(p)
        malloc.check()
        if malloc.mallinfo().hblks != before.hblks - n_mapped:
            return 14
        return OK

    assert _run_in_child(child) == OK
    # The parent: its blocks hold their own bytes, its cache and mapping are as they were.
    for p, n, v in blocks:
        assert _holds(p, n, v), f"parent block {p:#x} changed"
    after = malloc.mallinfo()
    assert after.smblks == before.smblks
    assert (after.hblks, after.hblkhd) == (before.hblks, before.hblkhd)
    malloc.check()
    for p, _n, _v in blocks:
        malloc.free(p)
    malloc.check()


def test_fork_while_other_threads_allocate() -> None:
    """The fork handlers hold the allocator's lock across fork(), so a child never inherits a heap in
    the middle of another thread's update."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        live: list[int] = []
        try:
            while not stop.is_set():
                if live and rng.random() < 0.5:
                    malloc.free(live.pop(rng.randrange(len(live))))
                else:
                    live.append(malloc.malloc(rng.choice([16, 64, 300, 1200, 5000, 70000])))
                if len(live) > 200:
                    malloc.free(live.pop(0))
        except BaseException as exc:
            errors.append(exc)
        finally:
            for p in live:
                malloc.free(p)

    def child() -> int:
        malloc.check()
        ps = [malloc.malloc(n) for n in (16, 100, 1000, 10000, 100000)]
        for p in ps:
            malloc.free(p)
        malloc.check()
        return OK

    interval = sys.getswitchinterval()
    sys.setswitchinterval(50e-6)
    workers = [threading.Thread(target=churn, args=(s,)) for s in range(2)]
    for w in workers:
        w.start()
    try:
        codes = []
        for _ in range(FORKS):
            time.sleep(0.005)
            codes.append(_run_in_child(child))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert codes == [OK] * len(codes)
    malloc.check()
