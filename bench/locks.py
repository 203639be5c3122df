#!/usr/bin/env python3
"""The shared heap's lock against the alternatives: the cost of one uncontended lock and unlock.

    python bench/locks.py [--rounds N]

Contenders, each timed in the same run, alternating, best of N rounds of 100,000 pairs:
- the robust process-shared pthread mutex the shared heap uses (os/mutex.py's raw calls, as its hot path
  makes them: trylock and unlock through ctypes);
- fcntl.flock and fcntl.lockf on a file in /dev/shm (released by the kernel when a holder dies, as the
  robust mutex is, but two system calls a pair);
- threading.Lock, a process-local lock, for scale.
Prints ns per pair and each one's ratio to the pthread mutex.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import importlib.util
import os
import sys
import tempfile
import threading
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("malloc") is None:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from malloc.os import mutex  # noqa: E402
from malloc.traces.table import render  # noqa: E402

PAIRS = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    memory = ctypes.create_string_buffer(mutex.MUTEX_SIZE)  # private memory times the same as shared
    address = ctypes.addressof(memory)
    mutex.init(address)
    handle = mutex.handle(address)
    try_lock, unlock = mutex.try_lock_fast, mutex.unlock_fast
    local = threading.Lock()
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        fd = f.fileno()
        def pthread_pair() -> None:
            try_lock(handle)
            unlock(handle)

        def flock_pair() -> None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)

        def lockf_pair() -> None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            fcntl.lockf(fd, fcntl.LOCK_UN)

        def local_pair() -> None:
            local.acquire()
            local.release()

        contenders = {
            "pthread mutex (robust, process-shared)": pthread_pair,
            "fcntl.flock": flock_pair,
            "fcntl.lockf": lockf_pair,
            "threading.Lock (one process only)": local_pair,
        }
        best = {name: float("inf") for name in contenders}
        for _ in range(args.rounds):
            for name, pair in contenders.items():
                t = timeit.timeit(pair, number=PAIRS) / PAIRS * 1e9
                best[name] = min(best[name], t)
    base = best["pthread mutex (robust, process-shared)"]
    rows = [[name, f"{t:.0f}", f"{t / base:.2f}x"] for name, t in best.items()]
    print(render([["lock and unlock, uncontended", "ns a pair", "vs pthread"], *rows]))


if __name__ == "__main__":
    main()
