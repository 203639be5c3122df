"""Hostile segments: a shared heap whose file was damaged or crafted raises HeapCorruption at attach or at an
operation that meets the damage; never a crash, never a hang, never a write outside the segment (issue 12).

Each case copies the bytes of a pristine heap (blocks, free chunks, names, bytes and array values; in some images
a process died in the middle of an operation, so the journal is not empty and the lock shows a dead owner),
damages one to three places (a segment header word, the lock's bytes, crafted journal entries, an engine header
word, a word of a chunk, of the names table, of a name or of a value, any word, or the file's length), writes
the result to a new segment in /dev/shm (or, one case in four, a regular file opened with SharedHeap.open) and
attaches it. Then: check, walk, mallinfo, the roots, every known value, frees and reallocs of the known blocks,
mallocs (one that grows the heap), a put and a delete. Allowed outcomes: success, HeapCorruption, InvalidPointer
or DoubleFree (damage that makes a live block look freed or moved), KeyError (a name gone), MemoryError (a
crafted size). Anything else fails, as do a case still running after CASE_SECONDS, a crash of the child, and a
change to the canaries: a mapping of our own and another heap kept attached, compared after every case.

The cases run in a child process (this file run as a script). A run is reproducible from its seed:

    MALLOC_SHARED_FUZZ_SEED=7 MALLOC_SHARED_FUZZ_CASES=100000 pytest -q tests/test_shared_fuzz.py

and one case is replayed with `python tests/test_shared_fuzz.py SEED CASE 1 -v`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from damage import arm, damaged, timed_case
from shared_work import names_blocks

import malloc
from malloc.heap import Heap
from malloc.shared.heap import SharedHeap
from malloc.shared.segment import HEAP_WORD, J_START, S_JOURNAL, S_MUTEX, SEG_HEADER

FIXED_SEED = 20261130
CASES = 700  # per test (two tests) in the suite
CASE_SECONDS = 5.0  # a case still running after this is a hang
SRC = Path(malloc.__file__).resolve().parent.parent
ALLOWED = (malloc.HeapCorruption, malloc.InvalidPointer, malloc.DoubleFree, KeyError, MemoryError)


OUTCOMES: Counter[str] = Counter()


class Image:
    """A pristine heap's bytes and what lives in it: block offsets, value names."""

    def __init__(self, data: bytes, blocks: list[int], names: list[str], values: list[str],
                 chunks: list[tuple[int, int]], tables: list[int]) -> None:
        self.data = data
        self.blocks = blocks
        self.names = names
        self.values = values
        self.chunks = chunks  # (offset, size) of every chunk
        self.tables = tables  # offsets of the names table, the key blocks and the value blocks


def make_image(tag: str, rng: random.Random, dying: bool) -> Image:
    """A small heap with live and free blocks, roots, bytes and array values; with `dying`, a process then died
    inside a put, leaving its journal and the lock to the next holder."""
    import numpy as np

    name = f"fuzz-image-{os.getpid()}-{tag}"
    h = SharedHeap.create(name, 1 << 16, max_size=8 << 20)
    try:
        blocks = [h.malloc(rng.choice((16, 100, 700, 3000, 20_000))) for _ in range(40)]
        for off in blocks:
            with h.view(off) as v:
                v[:] = bytes([off & 0xFF]) * len(v)
        rng.shuffle(blocks)
        for off in blocks[20:]:
            h.free(off)
        blocks = blocks[:20]
        names = [f"root{i}" for i in range(6)]
        for i, key in enumerate(names):
            h.roots[key] = blocks[i]
        values = ["bytes", "array", "records", "empty"]
        h.put("bytes", b"value " * 300)
        h.put("array", np.arange(500, dtype=np.float64).reshape(20, 25))
        h.put("records", np.zeros(40, dtype=[("a", "<i4"), ("b", ">f8")]))
        h.put("empty", b"")
        if dying:
            pid = os.fork()
            if pid == 0:
                Heap.claimed = lambda self, c: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore
                h.put("late", b"x" * 5000)
                os._exit(1)
            os.waitpid(pid, 0)
        with open(h.path, "rb") as f:
            data = f.read()
        chunks = [(c.address, c.size) for c in h.walk()]
        tables = sorted(names_blocks(h) | {h.roots[key] for key in values})
        return Image(data, blocks, names, values, chunks, tables)
    finally:
        h.unlink()
        h.close()


def damage(data: bytearray, image: Image, rng: random.Random) -> str:
    """Change one place of a segment's bytes (module docstring); returns what was done."""
    if len(data) % 8 or len(data) < SEG_HEADER + 4096:
        return "nothing more (the file was cut)"
    words = memoryview(data).cast("Q")
    nwords = len(words)
    r = rng.random()
    if r < 0.45:  # a chunk's boundary tag, size word or links, or a names table's, key's or value's words
        if r < 0.3:
            at, size = rng.choice(image.chunks)
            i = (at >> 3) + rng.choice((0, 1, 1, 1, 2, 3, size >> 3))
        else:
            i = (rng.choice(image.tables) >> 3) + rng.choice((0, 1, 2, 3, 4, 5, 6, 7, rng.randrange(40)))
        r = 2.0 if i < nwords else 0.95  # past the end (a cut file): any word instead
        i = min(i, nwords - 1)
    else:
        r = (r - 0.45) / 0.55
    if r > 1.0:
        pass
    elif r < 0.15:
        i = rng.randrange(8)
    elif r < 0.22:
        i = S_MUTEX + rng.randrange(5)
    elif r < 0.32:  # crafted journal entries
        n = rng.randrange(1, 6)
        words[S_JOURNAL] = J_START + 2 * n if rng.random() < 0.9 else rng.getrandbits(16)
        for k in range(n):
            target = rng.choice((rng.randrange(nwords + 64), HEAP_WORD + rng.randrange(144), rng.randrange(8),
                                 rng.getrandbits(64)))
            words[J_START + 2 * k] = target
            words[J_START + 2 * k + 1] = rng.choice((0, 1, rng.getrandbits(64), rng.randrange(nwords * 8)))
        words.release()
        return f"journal: {n} crafted entries"
    elif r < 0.45:
        i = HEAP_WORD + rng.randrange(144)
    elif r < 0.92:  # a word at or near a chunk, a name, a value: anywhere in the heap's chunks
        i = HEAP_WORD + 144 + rng.randrange(nwords - HEAP_WORD - 144)
        i -= i % 2 if rng.random() < 0.5 else 0
    elif r < 0.96:
        i = rng.randrange(nwords)
    else:
        words.release()
        cut = rng.choice((SEG_HEADER, SEG_HEADER + 4096, len(data) - 4096, len(data) // 2, 100))
        del data[cut:]
        return f"file cut to {cut} bytes"
    old = words[i]
    new = damaged(old, rng, len(data) + 64 * 8)
    words[i] = new
    words.release()
    return f"word {i}: {old:#x} -> {new:#x}"


def exercise(h: SharedHeap, image: Image, rng: random.Random) -> int:
    """The operations after attach, each allowed to raise what ALLOWED names; the number that raised."""
    import numpy as np

    raised = 0
    ops: list[Any] = [h.check, h.walk, h.mallinfo, lambda: list(h.roots.items()), lambda: len(h.roots)]
    for key in image.values:
        ops.append(lambda key=key: np.asarray(h.get(key)).tobytes())
    blocks = list(image.blocks)
    rng.shuffle(blocks)
    for off in blocks[:6]:
        ops.append(lambda off=off: h.free(off))
    for off in blocks[6:10]:
        ops.append(lambda off=off: h.realloc(off, rng.choice((8, 500, 5000, 40_000))))
    for off in blocks[10:12]:
        ops.append(lambda off=off: h.view(off)[:8].tobytes())
    for n in (24, 600, 9000, 1 << 20):
        ops.append(lambda n=n: h.free(h.malloc(n)) if rng.random() < 0.5 else h.malloc(n))
    ops += [lambda: h.put("fresh", b"y" * rng.randrange(1, 3000)), lambda: h.delete(rng.choice(image.values)),
            lambda: h.roots.__setitem__("r", 16), lambda: h.roots.__delitem__(rng.choice(image.names)), h.check]
    head, tail = ops[:5], ops[5:]
    rng.shuffle(tail)
    for op in head + tail:
        try:
            op()
        except ALLOWED:
            raised += 1
    return raised


def canary_digest(canary: mmap.mmap, neighbour: SharedHeap) -> bytes:
    with open(neighbour.path, "rb") as f:
        return hashlib.sha256(bytes(canary) + f.read()).digest()


def run_case(seed: int, case: int, images: list[Image], where: str) -> str:
    rng = random.Random(seed * 1_000_003 + case)
    image = rng.choice(images)
    data = bytearray(image.data)
    what = "; ".join(damage(data, image, rng) for _ in range(rng.choice((1, 1, 1, 2, 3))))
    as_file = rng.random() < 0.25
    name = f"fuzz-case-{os.getpid()}-{case}"
    path = os.path.join(where, name) if as_file else os.path.join("/dev/shm", name)
    with open(path, "wb") as f:
        f.write(data)
    h = None
    try:
        h = SharedHeap.open(path) if as_file else SharedHeap.attach(name)
    except ALLOWED as exc:
        OUTCOMES["refused at attach: " + type(exc).__name__] += 1
    except BaseException:
        os.unlink(path)
        raise
    try:
        if h is not None:
            raised = exercise(h, image, rng)
            OUTCOMES["attached, some operations raised" if raised else "attached, every operation succeeded"] += 1
    except BaseException:
        os.unlink(path)  # the heap stays mapped: the exception's frames may hold views of it
        raise
    os.unlink(path)
    if h is not None:
        h.close()
    return what


def main(argv: list[str]) -> int:
    """`SEED FIRST COUNT [DIR] [-v]`: run cases FIRST .. FIRST+COUNT-1 (file cases in DIR, a temporary directory by
    default); prints each failure (with -v, each case as it starts), then a summary."""
    seed, first, count = int(argv[0]), int(argv[1]), int(argv[2])
    verbose = "-v" in argv[3:]
    given = [a for a in argv[3:] if a != "-v"]
    rng = random.Random(seed)
    images = [make_image(str(k), rng, dying=k % 2 == 1) for k in range(4)]
    canary = mmap.mmap(-1, 1 << 20)
    canary.write(bytes(range(256)) * 4096)
    neighbour = SharedHeap.create(f"fuzz-neighbour-{os.getpid()}", 1 << 16)
    failures = 0
    started = time.monotonic()
    arm()
    try:
        neighbour.put("n", b"neighbour" * 100)
        digest = canary_digest(canary, neighbour)
        with contextlib.nullcontext(given[0]) if given else tempfile.TemporaryDirectory(prefix="shared-fuzz-") \
                as where:
            for case in range(first, first + count):
                if verbose:
                    print(f"case {case}", flush=True)
                ok, what = timed_case(f"seed {seed} case {case}", CASE_SECONDS,
                                      partial(run_case, seed, case, images, where))
                failures += not ok
                if ok and verbose:
                    print(f"  {what}", flush=True)
                if canary_digest(canary, neighbour) != digest:
                    print(f"FAIL seed {seed} case {case}: a write outside the segment changed a canary", flush=True)
                    return 1
        neighbour.check()
    finally:
        neighbour.unlink()
    print(", ".join(f"{n} {what}" for what, n in sorted(OUTCOMES.items())), flush=True)
    print(f"{count} cases, {failures} failures, {time.monotonic() - started:.1f} s", flush=True)
    return 1 if failures else 0


def fuzz(seed: int, count: int, where: Path) -> tuple[int, str]:
    """Run `count` cases in a child process; (its exit code, its output). Whatever it leaves behind (a crash
    leaves its segments in /dev/shm, named with its pid) is removed, and a child past its time is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    proc = subprocess.Popen([sys.executable, __file__, str(seed), "0", str(count), str(where)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120 + count * 0.5)
    except subprocess.TimeoutExpired:
        out = f"the fuzz child still ran after {120 + count * 0.5} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for entry in os.listdir("/dev/shm"):
            if entry.startswith("fuzz-") and f"-{proc.pid}" in entry:
                os.unlink(os.path.join("/dev/shm", entry))
    return proc.returncode, out


@pytest.mark.parametrize("offset", [0, 1])
def test_damaged_and_crafted_segments_raise_heap_corruption_never_crash_hang_or_write_outside(
        offset: int, tmp_path: Path) -> None:
    seed = int(os.environ.get("MALLOC_SHARED_FUZZ_SEED", FIXED_SEED)) + offset
    count = int(os.environ.get("MALLOC_SHARED_FUZZ_CASES", CASES))
    code, out = fuzz(seed, count, tmp_path)
    assert code == 0, f"exit code {code} (a negative one is a crash)\n{out[-6000:]}"
    assert f"{count} cases, 0 failures" in out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
