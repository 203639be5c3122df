"""Misuse: every wrong call raises its error and leaves the heap as it was.

"As it was" is checked, not assumed: before each rejected call the test takes a snapshot of the live blocks'
bytes, the chunk map (`walk()`), the figures (`mallinfo()` or the heap's counters) and, for a standalone
heap, the raw bytes of its whole region; after the call all of them must be equal and `check()` must pass.

Damage to the heap itself (overflows, writes after free) is done only to standalone heaps over a mapping or
a buffer, never to the process heap. The calls that could take the interpreter down run in a child process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import malloc
from malloc.cache import CACHE_COUNT
from malloc.heap import H_END, H_TOP, HEAP_HEADER
from malloc.layout import HEADER, MAX_REQUEST, SIZE_MASK, TAG_MASK
from malloc.os import libc
from malloc.process import CACHE_MAX

# A block too large for the process allocator's fast cache but below the mmap threshold: freeing it goes
# straight to the heap's bins.
BINNED = CACHE_MAX + 1000

PAGE = libc.PAGE_SIZE
# The child imports the same package as this process (not necessarily the one in this checkout).
SRC = Path(malloc.__file__).resolve().parent.parent

Alloc = malloc.ProcessAllocator | malloc.Heap

# ----------------------------------------------------------------------------- fixtures and helpers


@dataclass
class Setup:
    """An allocator with live blocks (each filled with its own byte) and some free chunks around them."""

    kind: str
    alloc: Alloc
    heap: malloc.Heap  # the allocator's heap (the main heap of a process allocator)
    live: list[int] = field(default_factory=list)
    small: int = 0  # a live 100-byte block
    large: int = 0  # a live 2000-byte block (past the fast cache)
    mapped: int = 0  # a live mapped block (process allocator only)

    @property
    def process(self) -> bool:
        return isinstance(self.alloc, malloc.ProcessAllocator)

    def add(self, n: int) -> int:
        p = self.alloc.malloc(n)
        ctypes.memset(p, 0x20 + len(self.live) % 200, self.alloc.usable_size(p))
        self.live.append(p)
        return p

    def drop(self, p: int) -> None:
        self.live.remove(p)
        self.alloc.free(p)


def populate(s: Setup) -> None:
    """Blocks of many sizes, some of them freed again so the bins (and the fast cache) are not empty."""
    spare = [s.add(n) for n in (24, 16)]
    s.small = s.add(100)
    s.add(16)
    s.large = s.add(2000)
    spare += [s.add(3000), s.add(16), s.add(40)]
    s.add(16)
    if s.process:
        s.mapped = s.add(300_000)
    s.add(500)
    for p in spare[::2] + spare[1::2][:1]:
        s.drop(p)


def make_setup(kind: str) -> tuple[Setup, Callable[[], None]]:
    if kind == "process":
        pa = malloc.ProcessAllocator(malloc.Options())
        pa.free(pa.malloc(8))  # the main heap exists from here on
        s = Setup(kind, pa, pa.heaps[0])

        def done() -> None:
            for p in list(s.live):
                s.drop(p)
            pa.check()
            pa.trim(0)

        return s, done
    if kind == "mmap":
        region: malloc.Region = malloc.MapRegion(1 << 20, "misuse test")
        h = malloc.Heap(region)
        return Setup(kind, h, h), region.close
    buf = bytearray(1 << 20)
    h = malloc.Heap(malloc.BufferRegion(buf))

    def release_buffer() -> None:
        h.check()
        assert len(buf) == 1 << 20  # (keeps the buffer alive as long as the heap in it)

    return Setup(kind, h, h), release_buffer


@pytest.fixture(params=["process", "mmap", "buffer"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    s, done = make_setup(request.param)
    populate(s)
    s.alloc.check()
    yield s
    done()


@pytest.fixture
def pa() -> Iterator[malloc.ProcessAllocator]:
    """A fresh process allocator (it shares the program break with the module's one)."""
    s, done = make_setup("process")
    populate(s)
    assert isinstance(s.alloc, malloc.ProcessAllocator)
    yield s.alloc
    done()


def state(s: Setup) -> tuple[Any, ...]:
    """Everything a rejected call must not change."""
    contents = tuple(ctypes.string_at(p, s.alloc.usable_size(p)) for p in s.live)
    chunks = tuple(s.alloc.walk())
    if isinstance(s.alloc, malloc.ProcessAllocator):
        pa = s.alloc
        figures: tuple[Any, ...] = (pa.mallinfo(), pa.mapped_chunks(), dataclasses.astuple(pa.options),
                                    [ctypes.string_at(h.base, HEAP_HEADER) for h in pa.heaps])
    else:
        h = s.alloc
        figures = (h.in_use, h.free_stats(), h.top_size, h.held, h.region.size,
                   ctypes.string_at(h.base, h.region.size))
    return contents, chunks, figures


def rejected(s: Setup, exc: type[BaseException] | tuple[type[BaseException], ...], call: Callable[[], object],
             what: str) -> str | None:
    """Run `call`; None if it raised `exc` and changed nothing, else what went wrong."""
    before = state(s)
    try:
        result = call()
    except exc:
        pass
    except Exception as e:
        return f"{what}: raised {type(e).__name__}({e}), expected {exc}"
    else:
        return f"{what}: returned {result!r}, expected {exc}"
    try:
        s.alloc.check()
    except malloc.HeapError as e:
        return f"{what}: check() failed after the rejected call: {e}"
    after = state(s)
    if after != before:
        parts = ["contents", "walk", "figures"]
        changed = [parts[i] for i in range(3) if after[i] != before[i]]
        return f"{what}: changed {', '.join(changed)}"
    return None


def assert_all_rejected(failures: list[str | None]) -> None:
    problems = [f for f in failures if f]
    assert not problems, "\n".join(problems)


def bound(f: Callable[..., object], *args: object) -> Callable[[], object]:
    """`f` with its arguments fixed, to call later."""
    return functools.partial(f, *args)


def region_bytes(h: malloc.Heap) -> bytes:
    return ctypes.string_at(h.base, h.region.size)


class Hang(Exception):
    """An allocator call ran for longer than it may."""


class time_limit:
    """Raise `Hang` in the main thread when the block runs longer than `seconds` (pure-Python loops stop)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {self.seconds} s (an endless loop?)")

    def __enter__(self) -> None:
        self._old = signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


def run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with the package importable; a crash shows as a negative code."""
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- addresses never handed out


def bad_addresses(s: Setup) -> dict[str, int]:
    """Non-negative addresses that are not the start of a live block of `s`."""
    h = s.heap
    p = s.small
    rng = random.Random(20240611)
    keep_alive = ctypes.create_string_buffer(256)
    obj = object()
    array = bytearray(4096)
    top = next(c for c in h.walk() if c.state == "top")
    cases = {
        "1": 1, "8": 8, "16": 16, "page": PAGE, "0xdeadbeef0": 0xDEADBEEF0, "2**47": 1 << 47,
        "2**63": 1 << 63, "2**64-16": (1 << 64) - 16, "2**64+16": (1 << 64) + 16, "2**200": 1 << 200,
        "p+16": p + 16, "p+8": p + 8, "p+1": p + 1, "p-8": p - 8, "p+32": p + 32,
        "end of block": p + s.alloc.usable_size(p),
        "large+16": s.large + 16, "large+1024": s.large + 1024,
        "heap base": h.base, "heap base+16": h.base + 16, "heap header+64": h.base + 64,
        "heap header end": h.base + HEAP_HEADER, "heap header end-16": h.base + HEAP_HEADER - 16,
        "inside top": top.address + HEADER + 64, "heap end": h.end, "heap end+16": h.end + 16,
        "heap end+page": h.end + PAGE, "past the region": h.base + h.region.size + 4 * PAGE,
        "id(object)": id(obj), "id(int)": id(10**30), "ctypes buffer": ctypes.addressof(keep_alive),
        "bytearray": ctypes.addressof(ctypes.c_char.from_buffer(array)),
        "id(malloc module)": id(malloc),
    }
    for i in range(6):
        cases[f"random {i}"] = rng.randrange(1 << 64)
        cases[f"random aligned {i}"] = rng.randrange(1 << 60) & ~15
        cases[f"random odd in heap {i}"] = (h.base + HEAP_HEADER + rng.randrange(h.end - h.base - HEAP_HEADER)) | 1
        block = rng.choice([p for p in s.live if s.alloc.usable_size(p) >= 64])
        cases[f"random inside a live block {i}"] = block + 16 * rng.randrange(1, s.alloc.usable_size(block) // 16)
    if s.mapped:
        cases.update({"mapped+16": s.mapped + 16, "mapped-16": s.mapped - 16, "mapped+page": s.mapped + PAGE,
                      "mapped mapping start": s.mapped - HEADER})
    live = set(s.live)
    return {name: a for name, a in cases.items() if a not in live}


def address_calls(s: Setup) -> dict[str, Callable[[int], object]]:
    calls: dict[str, Callable[[int], object]] = {
        "free": s.alloc.free,
        "realloc": lambda a: s.alloc.realloc(a, 64),
        "realloc to 0": lambda a: s.alloc.realloc(a, 0),
        "usable_size": s.alloc.usable_size,
    }
    if isinstance(s.alloc, malloc.ProcessAllocator):
        pa = s.alloc
        calls["view"] = pa.view
    return calls


def test_addresses_never_handed_out_are_invalid_pointers(setup: Setup) -> None:
    failures = []
    for name, address in bad_addresses(setup).items():
        for op, call in address_calls(setup).items():
            what = f"{op}({name} = {address:#x})"
            failures.append(rejected(setup, malloc.InvalidPointer, bound(call, address), what))
    assert_all_rejected(failures)


@pytest.mark.parametrize("address", [-1, -16, -(1 << 64), -(1 << 200)])
def test_negative_addresses_are_value_errors(setup: Setup, address: int) -> None:
    failures = [rejected(setup, ValueError, bound(call, address), f"{op}({address})")
                for op, call in address_calls(setup).items()]
    assert_all_rejected(failures)


def test_free_of_zero_changes_nothing(setup: Setup) -> None:
    before = state(setup)
    setup.alloc.free(0)
    assert state(setup) == before
    if isinstance(setup.alloc, malloc.ProcessAllocator):
        assert setup.alloc.usable_size(0) == 0


def test_a_block_of_another_heap_is_an_invalid_pointer(setup: Setup) -> None:
    other = malloc.Heap(malloc.BufferRegion(bytearray(64 * 1024)))
    q = other.malloc(100)
    assert_all_rejected([rejected(setup, malloc.InvalidPointer, bound(call, q), f"{op}(other heap's block)")
                         for op, call in address_calls(setup).items()])
    other.free(q)
    other.check()


# ----------------------------------------------------------------------------- double free


def adjacent_pair(s: Setup, n: int) -> tuple[int, int]:
    """Two live blocks of `n` bytes, the second right after the first, with a live block after them."""
    blocks = [s.add(n), s.add(n)]
    for _ in range(10):
        blocks.append(s.add(n))
        a, b, guard = blocks[-3:]
        if b == a + s.alloc.usable_size(a) + 8 and guard == b + s.alloc.usable_size(b) + 8:
            return a, b
    raise AssertionError("no three adjacent blocks")


def double_free_case(s: Setup, which: str) -> tuple[int, tuple[type[BaseException], ...]]:
    """Free a block the way `which` says; return its address and the errors a second free may raise."""
    alloc = s.alloc
    if which == "small":  # in the fast cache for the process allocator, in a small bin for a heap
        p = s.add(24)
        s.add(16)
        s.drop(p)
        return p, (malloc.DoubleFree,)
    if which == "small, cache full":  # once a size's cache list is full, frees go on into a bin
        blocks = [s.add(56) for _ in range(2 * CACHE_COUNT + 3)]
        s.add(16)
        for q in blocks[::2]:
            s.drop(q)
        return blocks[-1], (malloc.DoubleFree,)
    if which == "large":
        p = s.add(BINNED)
        s.add(16)
        s.drop(p)
        return p, (malloc.DoubleFree,)
    if which == "merged, second":
        a, b = adjacent_pair(s, BINNED)
        s.drop(a)
        s.drop(b)  # merges into a's chunk
        assert next(c for c in alloc.walk() if c.address == a - HEADER).size >= 2 * BINNED
        return b, (malloc.DoubleFree, malloc.InvalidPointer)
    if which == "merged, first":
        a, b = adjacent_pair(s, BINNED)
        s.drop(b)
        s.drop(a)  # merges with b's chunk after it
        return a, (malloc.DoubleFree,)
    if which == "into top":
        big = s.add(BINNED + 5000)
        s.drop(big)
        return big, (malloc.DoubleFree, malloc.InvalidPointer)
    assert which == "mapped"
    assert isinstance(alloc, malloc.ProcessAllocator)
    p = s.add(1 << 20)
    assert p in alloc.mapped_chunks()
    s.drop(p)
    assert p not in alloc.mapped_chunks()
    return p, (malloc.InvalidPointer,)  # unmapped: the address is simply unknown now


@pytest.mark.parametrize("which", ["small", "small, cache full", "large", "merged, second", "merged, first",
                                   "into top", "mapped"])
def test_double_free(setup: Setup, which: str) -> None:
    if which == "mapped" and not setup.process:
        pytest.skip("only the process allocator maps large blocks")
    p, errors = double_free_case(setup, which)
    failures = [rejected(setup, errors, lambda: setup.alloc.free(p), "second free")]
    # A freed block cannot be used through any other call either.
    failures.append(rejected(setup, errors, lambda: setup.alloc.realloc(p, 100), "realloc after free"))
    failures.append(rejected(setup, errors, lambda: setup.alloc.realloc(p, 0), "realloc(p, 0) after free"))
    failures.append(rejected(setup, errors, lambda: setup.alloc.usable_size(p), "usable_size after free"))
    if isinstance(setup.alloc, malloc.ProcessAllocator):
        pa = setup.alloc
        failures.append(rejected(setup, errors, lambda: pa.view(p), "view after free"))
    assert_all_rejected(failures)


def test_double_free_is_reported_as_double_free_not_corruption(setup: Setup) -> None:
    p = setup.add(100)
    setup.add(16)
    setup.drop(p)
    with pytest.raises(malloc.DoubleFree, match=f"{p:#x}"):
        setup.alloc.free(p)


# ----------------------------------------------------------------------------- argument types and values

WRONG_TYPES: list[object] = [None, 1.5, "10", b"", True, False, [], object(), 2 + 0j, 10.0]


class Index:
    """An integer-like object (as numpy's integers are): accepted wherever an int is."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def size_calls(s: Setup) -> dict[str, Callable[[Any], object]]:
    a = s.alloc
    p = s.small
    calls: dict[str, Callable[[Any], object]] = {
        "malloc(x)": a.malloc,
        "calloc(x, 1)": lambda x: a.calloc(x, 1),
        "calloc(1, x)": lambda x: a.calloc(1, x),
        "realloc(p, x)": lambda x: a.realloc(p, x),
        "realloc(0, x)": lambda x: a.realloc(0, x),
        "memalign(64, x)": lambda x: a.memalign(64, x),
        "memalign(16, x)": lambda x: a.memalign(16, x),
        "memalign(x, 16)": lambda x: a.memalign(x, 16),
        "trim(x)": a.trim,
    }
    if isinstance(a, malloc.ProcessAllocator):
        pa = a
        calls["view(p, x)"] = lambda x: pa.view(p, x)
        calls["mallopt(M_TOP_PAD, x)"] = lambda x: pa.mallopt(malloc.M_TOP_PAD, x)
        calls["mallopt(x, 0)"] = lambda x: pa.mallopt(x, 0)
    return calls


def test_wrong_types_for_sizes_are_type_errors(setup: Setup) -> None:
    failures = []
    for op, call in size_calls(setup).items():
        for value in WRONG_TYPES:
            if op == "view(p, x)" and value is None:
                continue  # view(p, None) is view(p): the whole block
            failures.append(rejected(setup, TypeError, bound(call, value), f"{op} with x={value!r}"))
    assert_all_rejected(failures)


def test_wrong_types_for_addresses_are_type_errors(setup: Setup) -> None:
    failures = []
    for op, call in address_calls(setup).items():
        for value in WRONG_TYPES:
            failures.append(rejected(setup, TypeError, bound(call, value), f"{op}({value!r})"))
    assert_all_rejected(failures)


def test_integer_like_objects_are_accepted(setup: Setup) -> None:
    a = setup.alloc
    p = a.malloc(Index(100))  # type: ignore[arg-type]
    assert a.usable_size(Index(p)) >= 100  # type: ignore[arg-type]
    q = a.memalign(Index(64), Index(10))  # type: ignore[arg-type]
    assert q % 64 == 0
    a.free(Index(p))  # type: ignore[arg-type]
    a.free(q)
    a.check()


@pytest.mark.parametrize("n", [-1, -16, -(1 << 70)])
def test_negative_sizes_are_value_errors(setup: Setup, n: int) -> None:
    failures = []
    for op, call in size_calls(setup).items():
        if op == "mallopt(x, 0)":
            continue  # a negative parameter number is a (possibly unknown) parameter, tested below
        if op == "trim(x)" and not setup.process:
            continue  # Heap.trim with a negative pad can unmap live pages: see test_heap_trim_with_a_negative_pad
        failures.append(rejected(setup, ValueError, bound(call, n), f"{op} with x={n}"))
    failures.append(rejected(setup, ValueError, lambda: setup.alloc.calloc(n, n), f"calloc({n}, {n})"))
    assert_all_rejected(failures)


def test_huge_sizes_are_memory_errors_that_change_nothing(setup: Setup) -> None:
    a = setup.alloc
    small, large = setup.small, setup.large
    calls: dict[str, Callable[[], object]] = {
        "malloc(2**62)": lambda: a.malloc(1 << 62),
        "malloc(2**64+5)": lambda: a.malloc((1 << 64) + 5),
        "malloc(MAX_REQUEST+1)": lambda: a.malloc(MAX_REQUEST + 1),
        "malloc(2**200)": lambda: a.malloc(1 << 200),
        "calloc(2**40, 2**40)": lambda: a.calloc(1 << 40, 1 << 40),
        "calloc(2**64, 2**64)": lambda: a.calloc(1 << 64, 1 << 64),
        "calloc(2**32+1, 2**32)": lambda: a.calloc((1 << 32) + 1, 1 << 32),
        "realloc(small, 2**62)": lambda: a.realloc(small, 1 << 62),
        "realloc(small, 2**64+5)": lambda: a.realloc(small, (1 << 64) + 5),
        "realloc(large, 2**63)": lambda: a.realloc(large, 1 << 63),
        "realloc(0, 2**62)": lambda: a.realloc(0, 1 << 62),
        "memalign(64, 2**62)": lambda: a.memalign(64, 1 << 62),
        "memalign(16, 2**64+5)": lambda: a.memalign(16, (1 << 64) + 5),
        "memalign(2**62, 16)": lambda: a.memalign(1 << 62, 16),
        "memalign(2**64, 16)": lambda: a.memalign(1 << 64, 16),
    }
    if setup.kind == "buffer":  # a 1 MiB buffer cannot hold these either
        calls["malloc(4 MiB)"] = lambda: a.malloc(4 << 20)
        calls["realloc(small, 4 MiB)"] = lambda: a.realloc(small, 4 << 20)
        calls["calloc(1024, 4096)"] = lambda: a.calloc(1024, 4096)
        calls["memalign(4096, 4 MiB)"] = lambda: a.memalign(4096, 4 << 20)
    assert_all_rejected([rejected(setup, MemoryError, call, op) for op, call in calls.items()])
    assert a.usable_size(small) >= 100 and a.usable_size(large) >= 2000


@pytest.mark.parametrize("alignment", [0, 3, 24, 48, 100, -16, -1, (1 << 62) + 1])
def test_memalign_with_a_bad_alignment_is_a_value_error(setup: Setup, alignment: int) -> None:
    failures = [rejected(setup, ValueError, bound(setup.alloc.memalign, alignment, n), f"memalign({alignment}, {n})")
                for n in (0, 10, 5000, 300_000)]
    assert_all_rejected(failures)


def test_mallopt_refuses_unknown_parameters_and_bad_values(pa: malloc.ProcessAllocator) -> None:
    s = Setup("process", pa, pa.heaps[0])
    calls: dict[str, Callable[[], object]] = {}
    for param in (0, 1, 2, -5, -7, -8, 99, -(1 << 70), 1 << 70):
        calls[f"mallopt({param}, 1)"] = bound(pa.mallopt, param, 1)
    for param in (malloc.M_TRIM_THRESHOLD, malloc.M_TOP_PAD, malloc.M_MMAP_THRESHOLD, malloc.M_MMAP_MAX):
        calls[f"mallopt({param}, -1)"] = bound(pa.mallopt, param, -1)
        calls[f"mallopt({param}, -2**70)"] = bound(pa.mallopt, param, -(1 << 70))
    calls["mallopt(M_MMAP_THRESHOLD, 64 MiB)"] = lambda: pa.mallopt(malloc.M_MMAP_THRESHOLD, 64 << 20)
    assert_all_rejected([rejected(s, ValueError, call, op) for op, call in calls.items()])
    # A good call does change the setting (so the comparison above could have seen a change).
    assert pa.mallopt(malloc.M_TOP_PAD, 4096) == 1
    assert pa.options.top_pad == 4096


# ----------------------------------------------------------------------------- the module-level wrappers


def test_module_wrappers_check_their_arguments() -> None:
    block = [malloc.malloc(64)]
    try:
        failures: list[str] = []
        p = block[0]

        def expect(exc: type[BaseException], call: Callable[[], object], what: str) -> None:
            info = malloc.mallinfo()
            try:
                result = call()
            except exc:
                if malloc.mallinfo() != info:
                    failures.append(f"{what}: raised but changed mallinfo()")
                return
            except Exception as e:
                failures.append(f"{what}: raised {type(e).__name__}({e}), expected {exc.__name__}")
                return
            failures.append(f"{what}: returned {result!r}, expected {exc.__name__}")
            if what.startswith("reallocarray") and isinstance(result, int):
                block[0] = result  # the call went through: this is the block now
            elif isinstance(result, int) and result:
                malloc.free(result)

        for v in (None, 1.5, "16", True):
            expect(TypeError, bound(malloc.aligned_alloc, v, 10), f"aligned_alloc({v!r}, 10)")
            expect(TypeError, bound(malloc.posix_memalign, v, 10), f"posix_memalign({v!r}, 10)")
            expect(TypeError, bound(malloc.valloc, v), f"valloc({v!r})")
            expect(TypeError, bound(malloc.pvalloc, v), f"pvalloc({v!r})")
            expect(TypeError, bound(malloc.reallocarray, p, v, 8), f"reallocarray(p, {v!r}, 8)")
            expect(TypeError, bound(malloc.reallocarray, p, 8, v), f"reallocarray(p, 8, {v!r})")
            expect(TypeError, bound(malloc.malloc_trim, v), f"malloc_trim({v!r})")
            expect(TypeError, bound(malloc.malloc_usable_size, v), f"malloc_usable_size({v!r})")
        for a in (0, 3, 24, -16):
            expect(ValueError, bound(malloc.aligned_alloc, a, 10), f"aligned_alloc({a}, 10)")
        for a in (0, 3, 4, 24, -16):
            expect(ValueError, bound(malloc.posix_memalign, a, 10), f"posix_memalign({a}, 10)")
        expect(ValueError, lambda: malloc.valloc(-1), "valloc(-1)")
        expect(ValueError, lambda: malloc.pvalloc(-1), "pvalloc(-1)")
        expect(ValueError, lambda: malloc.reallocarray(p, -1, 8), "reallocarray(p, -1, 8)")
        expect(ValueError, lambda: malloc.reallocarray(p, -1, -1), "reallocarray(p, -1, -1)")
        expect(ValueError, lambda: malloc.reallocarray(p, -(1 << 40), -(1 << 40)), "reallocarray(p, -2**40, -2**40)")
        expect(ValueError, lambda: malloc.malloc_trim(-1), "malloc_trim(-1)")
        expect(MemoryError, lambda: malloc.reallocarray(p, 1 << 32, 1 << 32), "reallocarray(p, 2**32, 2**32)")
        expect(MemoryError, lambda: malloc.pvalloc(1 << 62), "pvalloc(2**62)")
        expect(malloc.InvalidPointer, lambda: malloc.free(block[0] + 16), "free(p + 16)")
        assert not failures, "\n".join(failures)
    finally:
        malloc.free(block[0])
    malloc.check()


# ----------------------------------------------------------------------------- damage to a standalone heap


@pytest.fixture(params=["mmap", "buffer"])
def heap(request: pytest.FixtureRequest) -> Iterator[malloc.Heap]:
    """A standalone heap to damage; it is thrown away afterwards."""
    if request.param == "mmap":
        region = malloc.MapRegion(1 << 20, "corruption test")
        yield malloc.Heap(region)
        region.close()
    else:
        buf = bytearray(1 << 20)
        yield malloc.Heap(malloc.BufferRegion(buf))
        del buf


def word(address: int) -> ctypes.c_uint64:
    return ctypes.c_uint64.from_address(address)


OVERFLOWS: dict[str, Callable[[int], int]] = {
    "garbage": lambda w: 0x4141414141414141,
    "zeros": lambda w: 0,
    "size without tag": lambda w: w & ~TAG_MASK,
    "bigger size": lambda w: w + 0x100,
    "smaller size": lambda w: w - 0x20,
    "max size": lambda w: w | SIZE_MASK,
}


def check_names_damage(h: malloc.Heap, addresses: set[int]) -> None:
    with pytest.raises(malloc.HeapCorruption) as info:
        h.check()
    assert info.value.address in addresses, f"check() named {info.value.address:#x}: {info.value}"
    assert f"{info.value.address:#x}" in str(info.value)


@pytest.mark.parametrize("value", list(OVERFLOWS))
def test_overflow_into_the_next_header_is_heap_corruption(heap: malloc.Heap, value: str) -> None:
    a, b, c = heap.malloc(100), heap.malloc(100), heap.malloc(100)
    heap.malloc(16)
    for p, byte in ((a, 0x61), (b, 0x62), (c, 0x63)):
        ctypes.memset(p, byte, heap.usable_size(p))
    # One word past a's usable bytes is b's size word.
    w = word(a + heap.usable_size(a))
    assert w.value & SIZE_MASK == b - a
    w.value = OVERFLOWS[value](w.value)
    damaged = {a - HEADER, b - HEADER}
    check_names_damage(heap, damaged)
    calls: dict[str, Callable[[], object]] = {
        "free(b)": lambda: heap.free(b),
        "realloc(b, 150)": lambda: heap.realloc(b, 150),
        "realloc(b, 50)": lambda: heap.realloc(b, 50),
        "usable_size(b)": lambda: heap.usable_size(b),
        "free(a)": lambda: heap.free(a),
    }
    failures = []
    for op, call in calls.items():
        before = region_bytes(heap)
        try:
            call()
        except malloc.HeapCorruption:
            if region_bytes(heap) != before:
                failures.append(f"{op}: raised HeapCorruption but changed the heap")
        except Exception as e:
            failures.append(f"{op}: raised {type(e).__name__}({e}), expected HeapCorruption")
        else:
            failures.append(f"{op}: succeeded on a damaged chunk")
        check_names_damage(heap, damaged)
    assert not failures, "\n".join(failures)


def test_failed_realloc_of_a_damaged_block_leaves_no_new_block(heap: malloc.Heap) -> None:
    """A realloc that must move a damaged block may not leave a new block behind when it fails."""
    a, b = heap.malloc(100), heap.malloc(100)
    heap.malloc(100)
    heap.malloc(16)
    w = word(a + heap.usable_size(a))
    w.value &= ~1  # b's PREV_INUSE bit: a now looks free to b, but a is not in any bin
    before = region_bytes(heap)
    in_use = heap.in_use
    with pytest.raises(malloc.HeapCorruption):
        heap.realloc(b, 150)
    assert heap.in_use == in_use
    assert region_bytes(heap) == before


LINKS = {"next": 0, "prev": 8}


@pytest.mark.parametrize("size", [100, 2000])
@pytest.mark.parametrize("link", list(LINKS))
@pytest.mark.parametrize("value", ["garbage", "itself", "misaligned", "inside another chunk", "the other"])
@pytest.mark.parametrize("op", ["malloc same size", "malloc a bit more", "free a neighbour"])
def test_write_after_free_into_the_links(heap: malloc.Heap, size: int, link: str, value: str, op: str) -> None:
    x = heap.malloc(size)
    g1 = heap.malloc(16)
    y = heap.malloc(size)
    g2 = heap.malloc(16)
    heap.free(x)
    heap.free(y)  # y's chunk heads the bin, x's chunk follows it
    base = heap.base
    values = {"garbage": 0x4141414141414141, "itself": y - HEADER - base, "misaligned": 8,
              "inside another chunk": g1 - base, "the other": x - HEADER - base}
    w = word(y + LINKS[link])
    original = w.value
    w.value = values[value]
    if w.value == original:
        pytest.skip("the write did not change the link")
    with pytest.raises(malloc.HeapCorruption):
        heap.check()
    before = region_bytes(heap)
    calls: dict[str, Callable[[], object]] = {
        "malloc same size": lambda: (heap.malloc(size), heap.malloc(size)),
        "malloc a bit more": lambda: heap.malloc(size + 10),
        "free a neighbour": lambda: heap.free(g1),
    }
    try:
        with time_limit(3):
            calls[op]()
    except malloc.HeapCorruption:
        assert region_bytes(heap) == before, f"{op} raised HeapCorruption but changed the heap"
    else:
        # The damaged chunk was not used after all: check() must still see the damage.
        with pytest.raises(malloc.HeapCorruption):
            heap.check()
    del g2


def test_heap_header_damage_is_reported_at_the_heap_base(heap: malloc.Heap) -> None:
    p = heap.malloc(100)
    magic = word(heap.base)
    saved = magic.value
    magic.value = 0
    with pytest.raises(malloc.HeapCorruption) as info:
        heap.check()
    assert info.value.address == heap.base
    with pytest.raises(malloc.HeapCorruption):
        malloc.Heap(heap.region, attach=True)
    magic.value = saved
    heap.check()
    malloc.Heap(heap.region, attach=True).check()
    heap.free(p)


def test_overflow_into_the_top_header(heap: malloc.Heap) -> None:
    """A forged top size must not let the heap hand out memory it does not have (glibc: corrupted top size)."""
    p = heap.malloc(100)
    top = list(heap.walk())[-1]
    assert top.state == "top" and top.address == p + heap.usable_size(p) - 8
    w = word(top.address + 8)
    w.value = 0x0000_FFFF_FFFF_FFF1
    check_names_damage(heap, {top.address})
    before = region_bytes(heap)
    try:
        q = heap.malloc(4 * heap.region.size)  # more than the region has; the forged top says it fits
    except malloc.HeapCorruption:
        assert region_bytes(heap) == before
    except Exception as e:
        pytest.fail(f"malloc with a forged top size raised {type(e).__name__}({e}), expected HeapCorruption")
    else:
        assert q + 4 * heap.region.size <= heap.base + heap.region.size, \
            f"handed out {q:#x}, past the region's end {heap.base + heap.region.size:#x}"


def test_a_heap_end_past_the_region_is_heap_corruption_in_every_walk(heap: malloc.Heap) -> None:
    """A heap whose end word (and top) say it is larger than its region, as a shared heap's header said when
    an undone growth left the process's size behind: walk(), check() and a malloc that would use the part
    past the region raise HeapCorruption (never IndexError, nor a walk that lists the top past the region),
    changing nothing."""
    heap.malloc(100)
    t = word(heap.base + H_TOP * 8).value
    top_size = word(heap.base + (t + 1) * 8)
    grown = (heap.region.size >> 3) + 512  # words: the end and the top 4 KiB past the region
    word(heap.base + H_END * 8).value = grown
    top_size.value = ((grown - t) << 3) | (top_size.value & ~SIZE_MASK)
    before = region_bytes(heap)
    calls: dict[str, Callable[[], object]] = {"walk": lambda: list(heap.walk()), "check": heap.check,
                                              "malloc past the region": lambda: heap.malloc(heap.region.size)}
    for name, call in calls.items():
        with pytest.raises(malloc.HeapCorruption):
            call()
        assert region_bytes(heap) == before, name


def test_overwritten_mapped_chunk_header(pa: malloc.ProcessAllocator) -> None:
    p = pa.malloc(1 << 20)
    assert p in pa.mapped_chunks()
    ctypes.memset(p, 0x5D, 1 << 20)
    size_word = word(p - 8)
    saved = size_word.value
    size_word.value = saved + PAGE
    calls: dict[str, Callable[[], object]] = {"free": bound(pa.free, p), "realloc": bound(pa.realloc, p, 2 << 20),
                                              "realloc to 0": bound(pa.realloc, p, 0)}
    for op, call in calls.items():
        info, mapped = pa.mallinfo(), pa.mapped_chunks()
        with pytest.raises(malloc.HeapCorruption):
            call()
        assert (pa.mallinfo(), pa.mapped_chunks()) == (info, mapped), op
    with pytest.raises(malloc.HeapCorruption) as err:
        pa.check()
    assert err.value.address == p - HEADER
    size_word.value = saved
    pa.check()
    assert ctypes.string_at(p, 1 << 20) == b"\x5d" * (1 << 20)
    pa.free(p)


# ----------------------------------------------------------------------------- nothing may crash the interpreter


def child_report(code: str) -> dict[str, Any]:
    proc = run_child(code)
    assert proc.returncode == 0, (f"the child process died with code {proc.returncode} "
                                  f"(a negative code is a signal: -11 is a segfault)\n"
                                  f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_realloc_of_a_mapped_block_to_a_huge_size() -> None:
    """MemoryError and nothing changed; in particular the mapping must keep its size."""
    report = child_report("""
        import ctypes, json, malloc
        p = malloc.malloc(300_000)
        n = malloc.usable_size(p)
        ctypes.memset(p, 0x3C, n)
        mapped = malloc.allocator.mapped_chunks()
        results = {}
        for size in (1 << 62, (1 << 64) + 5, 1 << 47, 1 << 200):
            try:
                malloc.realloc(p, size)
                results[str(size)] = "returned"
            except Exception as e:
                results[str(size)] = type(e).__name__
            ok = malloc.allocator.mapped_chunks() == mapped and malloc.usable_size(p) == n
            # Touch every page of the block: a mapping shrunk behind our back faults here.
            intact = ctypes.string_at(p, n) == b"\\x3c" * n
            results[str(size)] += f" unchanged={ok} intact={intact}"
            print(results[str(size)], flush=True)
        malloc.check()
        malloc.free(p)
        print(json.dumps(results))
    """)
    for size, outcome in report.items():
        assert outcome == "MemoryError unchanged=True intact=True", f"realloc(p, {size}): {outcome}"


def test_heap_trim_with_a_negative_pad() -> None:
    """A negative pad must be refused, not make the heap give back pages of live blocks."""
    report = child_report("""
        import ctypes, json, malloc
        region = malloc.MapRegion(1 << 20, "t")
        h = malloc.Heap(region, trim_threshold=1 << 30)
        p = h.malloc(400_000)
        ctypes.memset(p, 0x77, 400_000)
        size = region.size
        results = {}
        for pad in (-1, -300_000, -(1 << 30)):
            try:
                h.trim(pad)
                outcome = "returned"
            except Exception as e:
                outcome = type(e).__name__
            outcome += f" region_kept={region.size == size}"
            print(outcome, flush=True)
            try:
                h.check()
            except malloc.HeapError as e:
                results[str(pad)] = outcome + f" check: {e}"
                break  # the heap is broken; reading the block now could fault
            outcome += f" intact={ctypes.string_at(p, 400_000) == b'w' * 400_000}"
            results[str(pad)] = outcome
        print(json.dumps(results))
    """)
    for pad, outcome in report.items():
        assert outcome == "ValueError region_kept=True intact=True", f"Heap.trim({pad}): {outcome}"


def test_no_bad_argument_crashes_the_interpreter() -> None:
    """A battery of wrong calls on the module API, in a child: it must finish and find its heap intact."""
    report = child_report("""
        import ctypes, json, random, malloc
        live = [malloc.malloc(n) for n in (8, 100, 2000, 300_000)]
        for i, p in enumerate(live):
            ctypes.memset(p, 0x30 + i, malloc.usable_size(p))
        freed = [malloc.malloc(n) for n in (24, 3000, 1 << 20)]
        for p in freed:
            malloc.free(p)
        rng = random.Random(7)
        h = malloc.allocator.heaps[0]
        addresses = [1, 8, 4096, -1, 1 << 63, (1 << 64) - 8, 1 << 64, id(object()), id(malloc), h.base,
                     h.base + 64, h.end, h.end + 4096, *freed, *(p + d for p in live for d in (1, 8, 16, -16)),
                     *(rng.randrange(1 << 64) for _ in range(200)),
                     *(rng.randrange(h.base, h.end) & ~15 for _ in range(200))]
        sizes = [-1, 1 << 62, (1 << 64) + 5, 1 << 200, None, 1.5, "1", True]
        calls = 0
        for a in addresses:
            if a in live:
                continue
            for f in (malloc.free, malloc.usable_size, malloc.view, lambda a: malloc.realloc(a, 10)):
                calls += 1
                try:
                    f(a)
                except (malloc.HeapError, ValueError, TypeError):
                    pass
        for n in sizes:
            for f in (malloc.malloc, lambda n: malloc.calloc(n, n), lambda n: malloc.memalign(64, n),
                      lambda n: malloc.realloc(live[1], n), lambda n: malloc.realloc(live[2], n),
                      lambda n: malloc.view(live[1], n), malloc.valloc, malloc.pvalloc):
                calls += 1
                try:
                    q = f(n)
                except (MemoryError, ValueError, TypeError, malloc.HeapError):
                    continue
                print("accepted", n, flush=True)
                del q  # a view accepted here would keep its block from being freed below
        malloc.check()
        intact = all(ctypes.string_at(p, malloc.usable_size(p)) == bytes([0x30 + i]) * malloc.usable_size(p)
                     for i, p in enumerate(live))
        for p in live:
            malloc.free(p)
        malloc.check()
        print(json.dumps({"calls": calls, "intact": intact}))
    """)
    assert report["intact"] is True
    assert report["calls"] > 1000


# ----------------------------------------------------------------------------- what the errors say


class BadIndex:
    """An `__index__` that breaks its contract (returns a str)."""

    def __index__(self) -> str:
        return "10"


def test_an_index_that_returns_a_non_int_is_a_type_error_naming_the_argument(setup: Setup) -> None:
    failures = []
    calls = {**size_calls(setup), **address_calls(setup)}
    for op, call in calls.items():
        if op.startswith("mallopt"):
            continue  # mallopt takes plain ints only
        failures.append(rejected(setup, TypeError, bound(call, BadIndex()), f"{op} with x=BadIndex()"))
        with pytest.raises(TypeError, match=r"must be an integer, not BadIndex \(__index__ returned non-int"):
            call(BadIndex())
    assert_all_rejected(failures)


def test_argument_checks_do_not_depend_on_asserts() -> None:
    """Under `python -O` the same TypeErrors, with the same messages."""
    proc = subprocess.run([sys.executable, "-O", "-c", textwrap.dedent("""
        import malloc
        class BadIndex:
            def __index__(self):
                return 10.0
        for f in (malloc.malloc, malloc.free, malloc.usable_size, lambda x: malloc.calloc(x, 1),
                  lambda x: malloc.memalign(64, x), lambda x: malloc.realloc(0, x)):
            try:
                f(BadIndex())
                print("accepted")
            except TypeError as e:
                print("TypeError", "must be an integer" in str(e))
        """)], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == ["TypeError True"] * 6


def test_a_heap_over_a_closed_region_says_so() -> None:
    region = malloc.MapRegion(1 << 20, "misuse test")
    h = malloc.Heap(region)
    p = h.malloc(100)
    region.close()
    calls: dict[str, Callable[[], object]] = {
        "malloc": lambda: h.malloc(10), "calloc": lambda: h.calloc(1, 10), "free": lambda: h.free(p),
        "realloc": lambda: h.realloc(p, 200), "memalign": lambda: h.memalign(64, 10),
        "usable_size": lambda: h.usable_size(p), "trim": h.trim, "check": h.check, "walk": lambda: list(h.walk()),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=f"the heap at {h.base:#x} is over a region that was closed"):
            call()


def test_a_second_free_of_a_mapped_block_says_it_is_not_live(pa: malloc.ProcessAllocator) -> None:
    p = pa.malloc(1 << 20)
    assert p in pa.mapped_chunks()
    pa.free(p)
    with pytest.raises(malloc.InvalidPointer, match=f"{p:#x} is not a live block of this allocator "
                                                    r"\(freed, or never allocated here\)"):
        pa.free(p)


def test_heap_corruption_found_in_the_bins_names_the_absolute_address(heap: malloc.Heap) -> None:
    x, y, guard = heap.malloc(2000), heap.malloc(2000), heap.malloc(100)
    heap.free(x)  # x's chunk goes to a large bin
    word(x).value = (guard - HEADER - heap.base) >> 3  # its next link now names a chunk that does not link back
    before = region_bytes(heap)
    with pytest.raises(malloc.HeapCorruption) as info:
        heap.free(y)  # y coalesces with x: unlinking x finds the damage
    assert info.value.address == x - HEADER
    assert f"{x - HEADER:#x}" in str(info.value)
    assert region_bytes(heap) == before
