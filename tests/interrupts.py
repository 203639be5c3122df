"""The interrupt stress run: mixed allocator calls under a timer whose signal handler raises, or allocates.

Run as a program (`python tests/interrupts.py SEED OPS MODE [INTERVAL_US]`), it prints one JSON line of
counts; tests/test_interrupts.py runs it in child processes, so that a crash fails a test instead of
killing pytest. MODE is "raise" (the handler raises `Tick`, as a Ctrl-C or a timeout would) or "alloc"
(the handler mallocs, writes, checks and frees blocks of its own while this thread is inside the allocator).

Every block the program holds carries a fill byte that is checked before it is freed or resized and at the
end. After an interrupted call the program finds out what the call did, with the timer's signal blocked:
a malloc, calloc or memalign that raised gave nothing (whatever it allocated must have gone back), a free
either happened or did not (the block is live, or it is not), a realloc that raised left the old block
live and intact. At the end the blocks in use in the heap (walk, cached blocks excluded) must be exactly
those the program holds, and check() must pass.
"""

from __future__ import annotations

import ctypes
import json
import random
import signal
import sys

import malloc


class Tick(Exception):
    """Raised by the timer's handler in "raise" mode."""


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.80:
        return rng.randint(0, 512)
    if r < 0.95:
        return rng.randint(513, 8192)
    if r < 0.99:
        return rng.randint(8193, 100_000)
    return rng.randint(100_000, 600_000)  # across the mmap threshold


def _fill(p: int, n: int, byte: int) -> None:
    if n:
        ctypes.memset(p, byte, n)


def _intact(p: int, n: int, byte: int) -> bool:
    return n == 0 or ctypes.string_at(p, n).count(byte) == n


def _live(p: int) -> bool:
    try:
        malloc.usable_size(p)
    except malloc.HeapError:
        return False
    return True


def run(seed: int, ops: int, mode: str, interval: float) -> dict[str, int]:
    rng = random.Random(seed)
    held: dict[int, tuple[int, int]] = {}  # address -> (bytes asked for, fill byte)
    nested: list[tuple[int, int, int]] = []  # the handler's own blocks
    counts = {"ops": 0, "interrupted": 0, "nested_calls": 0, "corrupt_blocks": 0}
    handler_rng = random.Random(seed ^ 0x5EED)

    armed = [True]

    def on_alarm(signum: int, frame: object) -> None:
        if not armed[0]:
            return
        if mode == "raise":
            raise Tick
        counts["nested_calls"] += 1
        n = _size(handler_rng) % 4096
        byte = handler_rng.randrange(1, 256)
        p = malloc.malloc(n)
        _fill(p, n, byte)
        nested.append((p, n, byte))
        if len(nested) > 16:
            q, m, b = nested.pop(handler_rng.randrange(len(nested)))
            if not _intact(q, m, b):
                counts["corrupt_blocks"] += 1
            malloc.free(q)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    done = 0
    r = 0.0
    victim = 0
    calling = False
    filling = 0
    try:
        while done < ops:
            # A Tick can come at any bytecode with a check, the inner loop's backward jump included; this
            # outer loop's own jump runs disarmed.
            try:
                armed[0] = True
                while done < ops:
                    r = 0.0
                    victim = 0
                    calling = False
                    counts["ops"] += 1
                    r = rng.random()
                    byte = rng.randrange(1, 256)
                    victim = rng.choice(list(held)) if held and r >= 0.48 else 0
                    if r < 0.42 or not held:
                        n = _size(rng)
                        p = malloc.malloc(n)
                        held[p] = (n, byte)
                        filling = p
                        _fill(p, n, byte)
                        filling = 0
                    elif r < 0.46:
                        n = _size(rng) % 2048
                        p = malloc.calloc(n, 1)
                        held[p] = (n, 0)
                        if not _intact(p, n, 0):
                            counts["corrupt_blocks"] += 1
                    elif r < 0.48:
                        n = _size(rng) % 4096
                        p = malloc.memalign(1 << rng.randrange(5, 13), n)
                        held[p] = (n, byte)
                        filling = p
                        _fill(p, n, byte)
                        filling = 0
                    elif r < 0.80:
                        n, b = held[victim]
                        if not _intact(victim, n, b):
                            counts["corrupt_blocks"] += 1
                        malloc.free(victim)
                        del held[victim]
                    else:
                        n, b = held[victim]
                        if not _intact(victim, n, b):
                            counts["corrupt_blocks"] += 1
                        m = _size(rng)
                        calling = True
                        q = malloc.realloc(victim, m)
                        calling = False
                        del held[victim]
                        if q:  # realloc to 0 bytes frees
                            held[q] = (m, b)
                            filling = q
                            _fill(q, m, b)
                            filling = 0
                    done += 1
                armed[0] = False
            except Tick:
                armed[0] = False  # no Tick while finding out what the interrupted call did
                done += 1
                counts["interrupted"] += 1
                if victim and victim in held:
                    n, b = held[victim]
                    if not _live(victim):  # a free that happened
                        del held[victim]
                    elif calling and not _intact(victim, n, b):
                        counts["corrupt_blocks"] += 1  # a realloc that raised must leave the block as it was
                if filling in held:  # a fill cut short: finish it
                    _fill(filling, *held[filling])
                filling = 0
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    counts["corrupt_blocks"] += sum(not _intact(p, n, b) for p, (n, b) in held.items())
    counts["corrupt_blocks"] += sum(not _intact(p, n, b) for p, n, b in nested)
    try:
        malloc.check()
        counts["check_failed"] = 0
    except malloc.HeapError:
        counts["check_failed"] = 1
    in_use = {c.address + 16 for c in malloc.walk() if c.state in ("in use", "mapped")}
    owned = set(held) | {p for p, _n, _b in nested}
    counts["leaked"] = len(in_use - owned)
    counts["lost"] = len(owned - in_use)
    return counts


if __name__ == "__main__":
    seed, ops, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    interval = float(sys.argv[4]) * 1e-6 if len(sys.argv) > 4 else 300e-6
    print(json.dumps(run(seed, ops, mode, interval)))
