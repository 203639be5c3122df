"""An exception at every point of an allocator call where a signal handler could run, one point at a time.

A Python signal handler runs where CPython checks for pending calls: at the start of a Python function, right
after a C function called from Python code returns, and at a loop's backward jump. A profile function sees the
first two as its "call" and "c_return" events, and a trace function that steps through opcodes sees the third
(a JUMP_BACKWARD about to run); an exception raised there propagates as a handler's would (at "c_return", the
C function's result is dropped). So for each kind of call, this raises at its 1st such point, then its 2nd,
and so on until the call completes untouched; and after each of those, a second exception at each point that
follows the first in turn (a handler that raises again while the call repairs what the first cut short).
After each attempt it checks what the call promises: a malloc, calloc or memalign that raised allocated
nothing, a realloc that raised left the old block live and intact, a free either happened or did not, a call
that completed handed its block to the caller's store; `check()` passes, and the blocks in use are exactly
those held. The same runs with the allocator's own calls at each point instead of an exception (a handler
that allocates), and on a shared heap.

Run as a program (`python tests/boundaries.py [run ...]`, runs named in RUNS), it prints one JSON line of
counts; tests/test_interrupts.py runs it in a child process.
"""

from __future__ import annotations

import ctypes
import dis
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


class Broken(Exception):
    """A check itself failed: the heap is too damaged to go on."""


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


_JUMP_BACKWARD = dis.opmap["JUMP_BACKWARD"]  # the loop's jump that checks for pending calls (not _NO_INTERRUPT)


def attempt(k: int, op: Callable[[], int], nested: Nested | None = None, again: int = 0,
            jumps: bool = False) -> tuple[int, list[int]]:
    """Run `op` with, at its k-th point, an exception (`nested` None) or calls of the process allocator's own
    (a block allocated, filled and kept in `nested`; the oldest of them freed once more than 4 are kept).

    The points are a Python function's start and a C function's return, seen by a profile function; with
    `jumps`, a loop's backward jump too, seen by a trace function that steps through opcodes (raising there
    is raising as the jump's check would). With `again`, a second exception comes at the `again`-th point
    after the first: a handler's exception while the call repairs what the first cut short. Returns how many
    points came (at most k + again), and a list that holds the call's result if its return reached the
    caller's store (an exception may come after that store)."""
    seen = [0]
    last = k + again if again else k
    # A profile or trace function that raises is removed by the interpreter: for a second exception, the
    # trace function puts the profile function back at its next event (the first one's unwinding).
    lapsed = [False]

    def point() -> None:
        seen[0] += 1
        if seen[0] == k and nested is not None:
            n = 24 * k % 700
            q = malloc.malloc(n)
            ctypes.memset(q, k & 0xFF | 1, n)
            nested.append((q, n, k & 0xFF | 1))
            if len(nested) > 4:
                malloc.free(nested.pop(0)[0])
        elif seen[0] == k or seen[0] == last:
            lapsed[0] = True
            raise Boom

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if (event == "call" or event == "c_return") and seen[0] < last:
            point()

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if lapsed[0] and again:
            lapsed[0] = False
            sys.setprofile(profile)
        if jumps:
            if event == "call":
                frame.f_trace_opcodes = True
            elif event == "opcode" and frame.f_code.co_code[frame.f_lasti] == _JUMP_BACKWARD and seen[0] < last:
                point()
        return trace

    out: list[int] = []
    if jumps or again:
        sys.settrace(trace)
    sys.setprofile(profile)
    try:
        out.append(op())
    except Boom:
        pass
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return seen[0], out


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


def run(t: Target, allocate: bool = False, twice: bool = False, jumps: bool = False) -> dict[str, Any]:
    """Every kind of call on `t`, with an exception (or, with `allocate`, the process allocator's own calls)
    at each of its points in turn; with `twice`, a second exception at each point that follows the first in
    turn; with `jumps`, each loop's backward jump as a point too (see `attempt`). The number of attempts of each
    kind, and what failed."""
    held: dict[int, tuple[int, int]] = {}
    nested: Nested | None = [] if allocate else None
    counts: dict[str, Any] = {"points": {}, "failures": []}

    def fail(name: str, k: int, again: int, what: str) -> None:
        where = f"point {k}" + (f" and {again} after it" if again else "")
        counts["failures"].append(f"{name}, {where}: {what}")

    def one(name: str, setup: Setup, k: int, again: int) -> int:
        """One attempt, checked: how many points came."""
        op, kind, victim = setup(held)
        before = t.in_use()
        seen, out = attempt(k, op, nested, again, jumps)
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
            fail(name, k, again, "; ".join(problems))
        return seen

    def checked(name: str, setup: Setup, k: int, again: int) -> int:
        """`one`, with an error from the checks themselves a failure that ends the run (the heap is broken)."""
        try:
            return one(name, setup, k, again)
        except Exception as e:
            fail(name, k, again, f"the checks raised {e!r}")
            raise Broken from e

    try:
        for name, setup in scenarios(t).items():
            attempts = 0
            k = 0
            while True:
                k += 1
                attempts += 1
                if checked(name, setup, k, 0) < k or k > 2000:
                    break
                again = 0
                while twice and again < 200:
                    again += 1
                    attempts += 1
                    if checked(name, setup, k, again) < k + again:
                        break
            counts["points"][name] = k - 1
            counts.setdefault("attempts", {})[name] = attempts
    except Broken:
        return counts
    for q, _n, _b in nested or ():
        malloc.free(q)
    return counts


RUNS: dict[str, dict[str, bool]] = {"process": {"twice": True, "jumps": True},
                                    "process, allocating": {"allocate": True, "jumps": True},
                                    "shared": {"twice": True, "jumps": True}}


def main(names: list[str]) -> dict[str, Any]:
    """The runs named (all of RUNS when none is), each on the process's allocator or a new shared heap."""
    counts = {}
    for name in names or list(RUNS):
        if name.startswith("shared"):
            heap = malloc.SharedHeap.create(f"malloc-boundaries-{os.getpid()}", 1 << 16)
            try:
                counts[name] = run(Target(heap), **RUNS[name])
            finally:
                heap.unlink()
                heap.close()
        else:
            counts[name] = run(Target(), **RUNS[name])
    return counts


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
