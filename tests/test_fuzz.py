"""The corruption fuzzer: one damaged word in a heap, then the engine must either cope or say HeapCorruption.

Each case builds a heap (over a bytearray or over a mapping) with a random mix of live and free blocks, changes
one word (a header word, or a word of some chunk: its boundary tag, size word or bin links) by a bit flip, a
random value, a small offset or bytes an overflow would write, and then runs random malloc, calloc, free,
realloc, memalign, trim and check calls. Allowed outcomes: the calls succeed, MemoryError (the region is full),
or HeapCorruption, which ends the case. Anything else fails: another exception (IndexError, ValueError,
AssertionError, ...), a block handed out outside the region, a case that runs past its time limit, or a crash.

One damage no local check can see, in glibc as here: a live chunk's size enlarged to end exactly on a later
chunk's boundary swallows the chunks between; once freed, their memory may be handed out or trimmed, and
their own later free is then an InvalidPointer (about one case in 10^6 over a mapping, seed 77 case 219783).

The cases run in a child process (this file run as a script), so a crash fails the test instead of pytest.
A run is reproducible from its seed; `MALLOC_FUZZ_SEED` and `MALLOC_FUZZ_CASES` set a longer run's:

    MALLOC_FUZZ_SEED=7 MALLOC_FUZZ_CASES=1000000 pytest -q tests/test_fuzz.py

and one case is replayed with `python tests/test_fuzz.py REGION SEED CASE 1`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from damage import arm, damaged, timed_case

import malloc
from malloc.heap import HEAP_WORDS

FIXED_SEED = 20261129
CASES = 10_000  # per region kind in the test suite
CASE_SECONDS = 2.0  # a case still running after this is a hang
SRC = Path(malloc.__file__).resolve().parent.parent


def new_heap(kind: str, rng: random.Random) -> tuple[malloc.Heap, object]:
    """A small heap over a bytearray or a mapping that grows and trims (a low pad and trim threshold)."""
    pad = rng.choice((0, 4096, 16384))
    if kind == "buffer":
        buf = bytearray(rng.choice((16384, 65536)) + 8)
        return malloc.Heap(malloc.BufferRegion(buf), top_pad=pad, trim_threshold=8192), buf
    region = malloc.MapRegion(rng.choice((4096, 65536)), "fuzz", reserve=1 << 20)
    return malloc.Heap(region, top_pad=pad, trim_threshold=8192), region


def size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randrange(0, 1100)
    if r < 0.9:
        return rng.randrange(1100, 6000)
    return rng.randrange(6000, 40000)


def populate(heap: malloc.Heap, rng: random.Random) -> list[int]:
    """Live blocks of many sizes, each filled, about half of them freed again (most coalesce into the bins)."""
    live: list[int] = []
    for _ in range(rng.randrange(4, 40)):
        try:
            p = heap.memalign(rng.choice((32, 64, 256)), size(rng)) if rng.random() < 0.1 else heap.malloc(size(rng))
        except MemoryError:
            break
        ctypes.memset(p, 0x41 + len(live) % 26, heap.usable_size(p))
        live.append(p)
    rng.shuffle(live)
    for _ in range(len(live) // 2):
        heap.free(live.pop())
    return live


def damage(heap: malloc.Heap, rng: random.Random) -> str:
    """Change one word of the heap's header or of one chunk; returns what was done."""
    W = heap.region.words
    r = rng.random()
    if r < 0.3:
        i = rng.choice((2, 3, 4, 5, 6, 9, 10)) if rng.random() < 0.6 else rng.randrange(HEAP_WORDS)
    else:
        chunks = list(heap.walk())
        c = rng.choice(chunks)
        w = (c.address - heap.base) >> 3
        i = w + rng.choice((0, 1, 1, 1, 2, 3, c.size >> 3)) if r < 0.9 else rng.randrange(HEAP_WORDS, len(W))
        i = min(i, len(W) - 1)
    old = W[i]
    new = damaged(old, rng, len(W) + 64)
    W[i] = new
    return f"word {i}: {old:#x} -> {new:#x}"


def exercise(heap: malloc.Heap, live: list[int], rng: random.Random) -> None:
    """Random calls after the damage; returns at the first HeapCorruption."""
    base = heap.base
    for _ in range(rng.randrange(4, 16)):
        op = rng.randrange(8)
        try:
            if op <= 1 or (not live and op <= 4):
                p = heap.calloc(1, size(rng)) if op == 1 else heap.malloc(size(rng))
            elif op == 2:
                p = heap.memalign(rng.choice((64, 4096)), size(rng))
            elif op <= 4:
                heap.free(live.pop(rng.randrange(len(live))))
                continue
            elif op == 5 and live:
                i = rng.randrange(len(live))
                p = heap.realloc(live[i], size(rng))
                live.pop(i)
            elif op == 6:
                heap.trim(rng.choice((0, 4096)), inner=True)
                continue
            else:
                heap.check()
                continue
            if not p:
                continue  # realloc to 0 bytes freed the block
            end = base + heap.region.size
            if not base < p < end or p + heap.usable_size(p) > end + 8:
                raise AssertionError(f"block {p:#x} outside the region [{base:#x}, {end:#x})")
        except MemoryError:
            continue
        except malloc.HeapCorruption:
            return
        live.append(p)
    with contextlib.suppress(malloc.HeapCorruption):
        heap.check()


def run_case(kind: str, seed: int, case: int) -> str:
    """One case; returns the damage done (for the report)."""
    rng = random.Random(seed * 1_000_003 + case)
    heap, owner = new_heap(kind, rng)
    try:
        live = populate(heap, rng)
        what = damage(heap, rng)
        exercise(heap, live, rng)
        return what
    finally:
        if isinstance(owner, malloc.MapRegion):
            owner.close()


def main(argv: list[str]) -> int:
    """`REGION SEED FIRST COUNT [-v]`: run cases FIRST .. FIRST+COUNT-1; prints each failure (with -v, each
    case as it starts), then a summary."""
    kind, seed, first, count = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    arm()
    failures = 0
    started = time.monotonic()
    verbose = len(argv) > 4
    for case in range(first, first + count):
        if verbose:
            print(f"case {case}", flush=True)
        ok, _ = timed_case(f"{kind} seed {seed} case {case}", CASE_SECONDS, partial(run_case, kind, seed, case))
        failures += not ok
    print(f"{kind}: {count} cases, {failures} failures, {time.monotonic() - started:.1f} s", flush=True)
    return 1 if failures else 0


def fuzz(kind: str, seed: int, count: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, __file__, kind, str(seed), "0", str(count)], capture_output=True,
                          text=True, timeout=CASE_SECONDS * 4 + count * 0.05, env=env)


def child(code: str) -> list[str]:
    """Run `code` in a fresh interpreter (a crash or a hang fails the test); its output lines."""
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, f"exit code {proc.returncode} (-11 is a segfault)\n{proc.stderr[-3000:]}"
    return proc.stdout.split()


def test_an_overflow_into_a_free_chunks_size_then_trim_is_heap_corruption() -> None:
    """Eight bytes past a block land in the next chunk's size word; trim must not madvise what it claims."""
    out = child("""if True:
        import ctypes, malloc
        region = malloc.MapRegion(1 << 20, "fuzz")
        h = malloc.Heap(region)
        a, b, c = h.malloc(2000), h.malloc(50_000), h.malloc(2000)
        h.free(b)  # a large free chunk
        ctypes.c_uint64.from_address(a + h.usable_size(a)).value = 0x400000000000 | 1
        try:
            h.trim(0, inner=True)
            print("returned")
        except malloc.HeapCorruption:
            print("HeapCorruption")
        """)
    assert out == ["HeapCorruption"]


@pytest.mark.parametrize("word, change", [("H_END", 1 << 17), ("H_END", 1 << 40), ("H_TOP", 1 << 40)])
def test_a_damaged_end_or_top_then_a_free_over_a_mapping_is_heap_corruption(word: str, change: int) -> None:
    """The free merges into the top and trims: the shrink must not reach outside the mapping."""
    out = child(f"""if True:
        import malloc
        from malloc.heap import {word}
        region = malloc.MapRegion(1 << 20, "fuzz")
        h = malloc.Heap(region)
        p = h.malloc(300_000)
        region.words[{word}] += {change}
        try:
            h.free(p)
            print("returned")
        except malloc.HeapCorruption:
            print("HeapCorruption")
        """)
    assert out == ["HeapCorruption"]


@pytest.mark.parametrize("kind", ["buffer", "mmap"])
def test_every_damaged_word_is_survived_or_reported_as_heap_corruption(kind: str) -> None:
    seed = int(os.environ.get("MALLOC_FUZZ_SEED", FIXED_SEED))
    count = int(os.environ.get("MALLOC_FUZZ_CASES", CASES))
    result = fuzz(kind, seed, count)
    assert result.returncode == 0, (f"exit code {result.returncode} (a negative one is a crash)\n"
                                    f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    assert f"{count} cases, 0 failures" in result.stdout


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
