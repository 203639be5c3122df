"""An exception at every point of an allocator call where a signal handler could run, one point at a time.

A Python signal handler runs where CPython checks for pending calls: at the start of a Python function and
right after a C function called from Python code returns (and at a loop's backward jump, which the timer
stress in interrupts.py reaches). A profile function sees exactly those points as its "call" and "c_return"
events, and an exception it raises there propagates as a handler's would: at "c_return" the C function's
result is dropped. So for each kind of call, this raises at its 1st such point, then its 2nd, and so on until
the call completes untouched, and after each attempt checks what the call promises: a malloc, calloc or
memalign that raised allocated nothing, a realloc that raised left the old block live and intact, a free
either happened or did not, a call that completed handed its block to the caller's store; `check()` passes,
and the blocks in use are exactly those held.

Run as a program (`python tests/boundaries.py`), it prints one JSON line of counts; tests/test_interrupts.py
runs it in a child process.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import malloc

SMALL, MEDIUM, LARGE = 100, 5000, 1 << 20  # a cached size, a heap size, a mapped size


class Boom(Exception):
    """Raised by the profile function at the chosen point."""


class Target:
    """The calls under test and what a check needs: the process's allocator (addresses are blocks), or a
    shared heap (offsets are blocks; `address` makes them addresses)."""

    def __init__(self, heap: malloc.SharedHeap | None = None) -> None:
        self.heap = heap
        api: Any = heap if heap is not None else malloc
        self.malloc: Callable[[int], int] = api.malloc
        self.calloc: Callable[[int, int], int] = api.calloc
        self.realloc: Callable[[int, int], int] = api.realloc
        self.free: Callable[[int], None] = api.free
        self.memalign: Callable[[int, int], int] | None = None if heap is not None else malloc.memalign
        self.usable_size: Callable[[int], int] = api.usable_size
        self.check: Callable[[], None] = api.check

    def address(self, p: int) -> int:
        return self.heap.address(p) if self.heap is not None else p

    def in_use(self) -> set[int]:
        chunks = self.heap.walk() if self.heap is not None else malloc.walk()
        return {c.address + 16 for c in chunks if c.state in ("in use", "mapped")}

    def fill(self, p: int, n: int, byte: int) -> None:
        ctypes.memset(self.address(p), byte, n)

    def intact(self, p: int, n: int, byte: int) -> bool:
        return ctypes.string_at(self.address(p), n).count(byte) == n


Nested = list[tuple[int, int, int]]  # the blocks a "handler" allocated: (address, size, fill byte)


def attempt(k: int, op: Callable[[], int], nested: Nested | None = None) -> tuple[bool, list[int]]:
    """Run `op` with, at its k-th point, an exception (`nested` None) or calls of the process allocator's own
    (a block allocated, filled and kept in `nested`; the oldest of them freed once more than 4 are kept).
    Returns whether the k-th point came, and a list that holds the call's result if its return reached the
    caller's store (an exception may come after that store)."""
    seen = [0]

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" or event == "c_return":
            seen[0] += 1
            if seen[0] == k:
                if nested is None:
                    raise Boom
                n = 24 * k % 700
                q = malloc.malloc(n)
                ctypes.memset(q, k & 0xFF | 1, n)
                nested.append((q, n, k & 0xFF | 1))
                if len(nested) > 4:
                    malloc.free(nested.pop(0)[0])

    out: list[int] = []
    sys.setprofile(profile)
    try:
        out.append(op())
    except Boom:
        return True, out
    finally:
        sys.setprofile(None)
    return seen[0] >= k, out


Setup = Callable[[dict[int, tuple[int, int]]], tuple[Callable[[], int], str, int]]


def scenarios(t: Target) -> dict[str, Setup]:
    """Name -> setup. A setup adds the blocks it needs to `held` (address -> (size, fill byte)) and returns
    the call to interrupt, its kind ("alloc", "realloc" or "free") and the block it acts on (0 for none)."""

    def alloc(n: int) -> Setup:
        def setup(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
            return (lambda: t.malloc(n)), "alloc", 0
        return setup

    def keep(held: dict[int, tuple[int, int]], n: int, byte: int) -> int:
        p = t.malloc(n)
        t.fill(p, n, byte)
        held[p] = (n, byte)
        return p

    def cached_malloc(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
        t.free(t.malloc(SMALL))  # its block waits in the fast cache
        return (lambda: t.malloc(SMALL)), "alloc", 0

    def calloc(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
        return (lambda: t.calloc(MEDIUM, 3)), "alloc", 0

    def memalign(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
        align = t.memalign
        assert align is not None
        return (lambda: align(4096, MEDIUM)), "alloc", 0

    def realloc(n: int, to: int, pin: bool) -> Setup:
        def setup(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
            p = keep(held, n, 0x5A)
            if pin:
                keep(held, SMALL, 0x33)  # a neighbour: the block cannot grow in place
            return (lambda: t.realloc(p, to)), "realloc", p
        return setup

    def free(n: int, crowd: int) -> Setup:
        def setup(held: dict[int, tuple[int, int]]) -> tuple[Callable[[], int], str, int]:
            for q in [t.malloc(n) for _ in range(crowd)]:
                t.free(q)  # with crowd >= 7 the block's cache list is full: it goes to the heap
            p = keep(held, n, 0x77)

            def op() -> int:
                t.free(p)
                return 0
            return op, "free", p
        return setup

    kinds = {"malloc to the fast cache's size": alloc(SMALL), "malloc from the fast cache": cached_malloc,
             "malloc from the heap": alloc(MEDIUM), "malloc of a mapped block": alloc(LARGE), "calloc": calloc,
             "memalign": memalign, "realloc that grows in place": realloc(MEDIUM, 3 * MEDIUM, False),
             "realloc that moves": realloc(MEDIUM, 3 * MEDIUM, True),
             "realloc that shrinks": realloc(3 * MEDIUM, MEDIUM, False),
             "realloc of a mapped block": realloc(LARGE, 2 * LARGE, True), "realloc to 0": realloc(MEDIUM, 0, False),
             "free into the fast cache": free(SMALL, 0), "free into the heap": free(SMALL, 8),
             "free of a large block, with a trim": free(400_000, 0), "free of a mapped block": free(LARGE, 0)}
    if t.heap is not None:  # no memalign; a "mapped" size grows the segment, and its free gives pages back
        del kinds["memalign"]
        for name in ("malloc of a mapped block", "realloc of a mapped block", "free of a mapped block"):
            kinds[name.replace("a mapped block", "a block that grows the segment")] = kinds.pop(name)
    return kinds


def run(t: Target, allocate: bool = False) -> dict[str, Any]:
    """Every kind of call on `t`, with an exception (or, with `allocate`, the process allocator's own calls)
    at each of its points in turn: the number of points of each kind, and what failed."""
    held: dict[int, tuple[int, int]] = {}
    nested: Nested | None = [] if allocate else None
    counts: dict[str, Any] = {"points": {}, "failures": []}
    for name, setup in scenarios(t).items():
        k = 0
        while True:
            k += 1
            op, kind, victim = setup(held)
            before = t.in_use()
            reached, out = attempt(k, op, nested)
            theirs = {q for q, _n, _b in nested} if nested is not None else set()
            problems = []
            if kind == "alloc":
                if out:
                    if out[0] not in t.in_use():
                        problems.append("a completed allocation's block is not in use")
                    held[out[0]] = (0, 0)
                elif t.in_use() - theirs != before - theirs:
                    problems.append("a raised allocation left blocks in use")
            elif kind == "realloc":
                n, byte = held[victim]
                if out:
                    del held[victim]
                    if out[0]:
                        if not t.intact(out[0], min(n, t.usable_size(out[0])), byte):
                            problems.append("a completed realloc lost the block's bytes")
                        held[out[0]] = (0, 0)
                else:
                    if t.in_use() != before:
                        problems.append("a raised realloc changed the blocks in use")
                    if not t.intact(victim, n, byte):
                        problems.append("a raised realloc changed the old block's bytes")
            elif out or victim not in t.in_use():  # a free that happened
                del held[victim]
            try:
                t.check()
            except malloc.HeapError as e:
                problems.append(f"check() failed: {e}")
            if t.in_use() != set(held) | theirs:
                problems.append(f"in use {len(t.in_use())} blocks, held {len(held)} and {len(theirs)} nested")
            if any(not t.intact(p, n, b) for p, (n, b) in held.items()):
                problems.append("a held block's bytes changed")
            if nested is not None and any(not t.intact(q, n, b) for q, n, b in nested):
                problems.append("a nested call's block's bytes changed")
            for p in list(held):
                try:
                    t.free(p)
                except malloc.HeapError as e:
                    problems.append(f"freeing a held block: {e}")
                del held[p]
            if problems:
                counts["failures"].append(f"{name}, point {k}: {'; '.join(problems)}")
            if not reached or k > 500:
                break
        counts["points"][name] = k - 1
    for q, _n, _b in nested or ():
        malloc.free(q)
    return counts


def main() -> dict[str, Any]:
    counts = {"process": run(Target()), "process, allocating": run(Target(), allocate=True)}
    heap = malloc.SharedHeap.create(f"malloc-boundaries-{os.getpid()}", 1 << 16)
    try:
        counts["shared"] = run(Target(heap))
    finally:
        heap.unlink()
        heap.close()
    return counts


if __name__ == "__main__":
    print(json.dumps(main()))
