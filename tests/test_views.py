"""Views keep their block: while a memoryview from `view()` (or a slice, cast or numpy array made from one) is
alive, free and a realloc that would free, shrink or move the block raise BufferError and change nothing;
once every one of them is gone, the same calls succeed. A realloc that grows the block in place is allowed,
and trim, which releases only free memory, goes ahead without touching a viewed byte.

Each test has an allocator of its own; a refusal that failed to happen would leave a view of freed memory,
so the one case that touches a view after the free runs in a child process.
"""

from __future__ import annotations

import ctypes
import errno
import re
from collections.abc import Callable, Iterator
from typing import Any

import procfs
import pytest

import malloc
from malloc.os import libc
from malloc.process import CACHE_MAX

PAGE = libc.PAGE_SIZE
# A block of each kind: one the fast cache would take, one freed into the heap's bins, one in a mapping.
SIZES = {"cached": 100, "binned": CACHE_MAX + 1000, "mapped": 1 << 20}


@pytest.fixture
def a() -> Iterator[malloc.ProcessAllocator]:
    """A fresh process allocator (it shares the program break with the module's one)."""
    pa = malloc.ProcessAllocator(malloc.Options())
    yield pa
    pa.check()
    pa.trim(0)


def holder(kind: str, v: memoryview) -> Any:
    """Something made from the view `v` that keeps its buffer: the view, a slice, a cast, a numpy array."""
    if kind == "view":
        return v
    if kind == "slice":
        return v[8:24]
    if kind == "cast":
        return v[:64].cast("Q")
    np = pytest.importorskip("numpy")
    return np.frombuffer(v, dtype=np.uint8)[8:]


HOLDERS = ["view", "slice", "cast", "numpy"]


def state(a: malloc.ProcessAllocator, p: int) -> tuple[Any, ...]:
    """What a refused call must not change: the chunks, the figures, the block's address and bytes."""
    return list(a.walk()), a.mallinfo(), a.mappings(), ctypes.string_at(p, a.usable_size(p))


def refused(a: malloc.ProcessAllocator, p: int, call: Callable[[], object], what: str) -> None:
    before = state(a, p)
    with pytest.raises(BufferError, match=rf"cannot {what} the block at {p:#x}: a view of it is still alive"):
        call()
    assert state(a, p) == before
    a.check()


def filled(a: malloc.ProcessAllocator, n: int) -> int:
    p = a.malloc(n)
    ctypes.memset(p, 0x5A, a.usable_size(p))
    return p


@pytest.mark.parametrize("kind", HOLDERS)
@pytest.mark.parametrize("block", list(SIZES))
def test_free_is_refused_while_anything_made_from_a_view_is_alive(a: malloc.ProcessAllocator, block: str,
                                                                    kind: str) -> None:
    p = filled(a, SIZES[block])
    assert (p in a.mapped_chunks()) == (block == "mapped")
    kept = holder(kind, a.view(p))  # the view itself is gone unless it is what is kept
    refused(a, p, lambda: a.free(p), "free")
    refused(a, p, lambda: a.realloc(p, 0), "free")
    del kept
    a.free(p)
    assert p not in a.mapped_chunks()
    with pytest.raises(malloc.HeapError):
        a.usable_size(p)


def test_every_view_of_a_block_counts(a: malloc.ProcessAllocator) -> None:
    p = filled(a, 200)
    first, second = a.view(p), a.view(p, 10)
    first.release()
    refused(a, p, lambda: a.free(p), "free")
    with second:
        refused(a, p, lambda: a.free(p), "free")
    a.free(p)


def test_a_view_that_is_gone_does_not_hold_its_block(a: malloc.ProcessAllocator) -> None:
    p = a.malloc(100)
    a.view(p)[:5] = b"hello"  # a temporary: gone at the end of the statement
    assert bytes(a.view(p, 5)) == b"hello"
    a.free(p)
    q = a.malloc(100)  # the same block, from the fast cache: a new life, viewed afresh
    assert q == p
    with a.view(q) as v:
        assert len(v) == a.usable_size(q)
    a.free(q)


@pytest.mark.parametrize("kind", HOLDERS)
@pytest.mark.parametrize("block", ["binned", "mapped"])
def test_realloc_that_would_shrink_is_refused(a: malloc.ProcessAllocator, block: str, kind: str) -> None:
    p = filled(a, SIZES[block])
    kept = holder(kind, a.view(p))
    refused(a, p, lambda: a.realloc(p, 100 if block == "binned" else SIZES[block] // 4), "shrink")
    # A realloc that leaves the block as large as it is (the same chunk, the same pages) is not a shrink.
    assert a.realloc(p, a.usable_size(p) - 8) == p
    del kept
    q = a.realloc(p, 100)
    assert q == p or block == "mapped"
    a.free(q)


@pytest.mark.parametrize("kind", HOLDERS)
def test_realloc_that_would_move_a_heap_block_is_refused(a: malloc.ProcessAllocator, kind: str) -> None:
    p = filled(a, SIZES["binned"])
    wall = a.malloc(100)  # a live neighbour: p cannot grow in place
    kept = holder(kind, a.view(p))
    refused(a, p, lambda: a.realloc(p, 20_000), "move")
    del kept
    q = a.realloc(p, 20_000)
    assert q != p and ctypes.string_at(q, SIZES["binned"]) == b"\x5a" * SIZES["binned"]
    a.free(q)
    a.free(wall)


def test_realloc_that_would_move_a_mapped_block_is_refused(a: malloc.ProcessAllocator) -> None:
    p = filled(a, SIZES["mapped"])
    m, length = a.mappings()[p]
    # Occupy the page after the mapping (if nothing does already), so that the mapping cannot grow in place.
    guard = 0
    try:
        guard = libc.mmap_anonymous(PAGE, "test: a page after the mapping", flags=libc.MAP_FIXED_NOREPLACE,
                                    address=m + length)
    except OSError as exc:
        assert exc.errno == errno.EEXIST  # something is there already
    try:
        assert guard in (0, m + length)
        kept = a.view(p)
        refused(a, p, lambda: a.realloc(p, 2 * SIZES["mapped"]), "move")
        del kept
        q = a.realloc(p, 2 * SIZES["mapped"])
        assert q != p and ctypes.string_at(q, SIZES["mapped"]) == b"\x5a" * SIZES["mapped"]
        a.free(q)
    finally:
        if guard:
            libc.munmap(guard, PAGE, "test: the guard page")


@pytest.mark.parametrize("kind", HOLDERS)
def test_realloc_that_grows_in_place_keeps_the_view_valid(a: malloc.ProcessAllocator, kind: str) -> None:
    p = filled(a, SIZES["binned"])  # the last block made: it borders the top
    old = a.usable_size(p)
    kept = holder(kind, a.view(p))
    assert a.realloc(p, 50_000) == p
    usable = a.usable_size(p)
    assert usable >= 50_000
    grown = a.view(p)  # a new view spans the grown block
    assert len(grown) == usable
    grown[-1] = 0x77
    assert ctypes.string_at(p, old) == b"\x5a" * old and ctypes.string_at(p + usable - 1, 1) == b"\x77"
    del grown
    refused(a, p, lambda: a.free(p), "free")  # the view from before the growth still holds the block
    refused(a, p, lambda: a.realloc(p, 100), "shrink")
    del kept
    a.free(p)


def test_trim_releases_free_memory_around_viewed_blocks(a: malloc.ProcessAllocator) -> None:
    """A viewed block before a large free chunk and one before the top: trim releases whole pages of both
    free spans and no byte of either block."""
    inner = a.malloc(5000)
    gap = filled(a, 100_000)  # below the mmap threshold: a large free chunk once freed
    wall = a.malloc(100)
    last = a.malloc(5000)
    tail = filled(a, 100_000)  # freed into the top, which it leaves with dirty pages to give back
    a.free(gap)
    a.free(tail)
    views = [a.view(inner), a.view(last)]
    pattern = [bytes(i * 7 & 0xFF for i in range(len(v))) for v in views]
    for v, b in zip(views, pattern, strict=True):
        v[:] = b
    with malloc.trace() as events:
        assert a.trim(0)
    released = [(e.args[0], e.args[0] + e.args[1]) if e.name == "madvise" else (e.result + e.args[0], e.result)
                for e in events if e.name in ("madvise", "sbrk")]
    assert any(gap < end and start < gap + 100_000 for start, end in released)  # inside the free chunk
    assert any(start >= last + 5000 for start, end in released)  # the top
    for p, v, b in zip((inner, last), views, pattern, strict=True):
        assert all(end <= p or start >= p + len(v) for start, end in released)
        assert bytes(v) == b
        v[-1] ^= 0xFF  # still writable, to the last byte
    a.check()
    del v
    del views
    for p in (inner, wall, last):
        a.free(p)


@pytest.mark.parametrize("block", list(SIZES))
def test_view_of_a_block_that_is_not_live_raises(a: malloc.ProcessAllocator, block: str) -> None:
    p = a.malloc(SIZES[block])
    a.view(p).release()
    a.free(p)
    with pytest.raises(malloc.HeapError):
        a.view(p)
    with pytest.raises(malloc.HeapError):
        a.view(p, 8)
    with pytest.raises(malloc.InvalidPointer, match="cannot view address 0"):
        a.view(0)
    q = a.malloc(1000)
    with pytest.raises(malloc.HeapError):
        a.view(q + 16)  # inside a block, not a block
    with pytest.raises(ValueError, match=re.escape(f"the block at {q:#x} has {a.usable_size(q)} usable bytes")):
        a.view(q, a.usable_size(q) + 1)
    a.free(q)


def test_view_spans_the_usable_size_and_view_n_the_size_asked_for(a: malloc.ProcessAllocator) -> None:
    np = pytest.importorskip("numpy")
    p = a.malloc(8000)
    assert len(np.frombuffer(a.view(p))) == a.usable_size(p) // 8 == 1001
    x = np.frombuffer(a.view(p, 8000))
    assert len(x) == 1000
    x[:] = np.arange(1000)
    assert np.frombuffer(ctypes.string_at(p, 8000)).tolist() == list(range(1000))
    refused(a, p, lambda: a.free(p), "free")
    del x
    a.free(p)


def test_the_use_after_free_that_crashed_is_refused() -> None:
    """A view of a mapped block, the block freed, the view read: a segfault before; now the free raises."""
    facts = procfs.run_child("""
        p = malloc.malloc(1 << 20)
        v = malloc.view(p)
        v[0] = 7
        try:
            malloc.free(p)
            refused = ""
        except BufferError as exc:
            refused = str(exc)
        v[-1] = 9
        read = v[0] + v[-1]  # the read that crashed when the free went ahead
        del v
        malloc.free(p)
        report(refused=refused, read=read, p=p, live=p in malloc.allocator.mapped_chunks())
    """, pin=0)
    assert facts["refused"].startswith(f"cannot free the block at {facts['p']:#x}: a view of it is still alive")
    assert facts["read"] == 16 and not facts["live"]
