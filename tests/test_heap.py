"""The engine alone: a `Heap` over a plain buffer and over a mapping, with no cache and no routing.

Every test looks at real effects: the addresses handed out, the chunk map from `walk()`, the bytes in the
blocks, the region's size and the system calls recorded in `malloc.os.events`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest

import malloc
from malloc.heap import HEAP_HEADER
from malloc.layout import HEADER, MIN_CHUNK, request_to_size
from malloc.os import events, libc

PAGE = libc.PAGE_SIZE
PROT_RW = libc.PROT_READ | libc.PROT_WRITE


# ----------------------------------------------------------------------------- helpers


def fill(p: int, n: int, byte: int) -> None:
    ctypes.memset(p, byte, n)


def read(p: int, n: int) -> bytes:
    return ctypes.string_at(p, n)


def chunks(heap: malloc.Heap) -> list[tuple[int, int, str]]:
    """(address, size, state) of every chunk, in address order."""
    return [(c.address, c.size, c.state) for c in heap.walk()]


def chunk_at(heap: malloc.Heap, block: int) -> malloc.Chunk:
    """The chunk whose block starts at `block`."""
    for c in heap.walk():
        if c.address == block - HEADER:
            return c
    raise AssertionError(f"no chunk starts at {block - HEADER:#x}")


def free_chunks(heap: malloc.Heap) -> list[tuple[int, int]]:
    """(address, size) of every free chunk (the top excluded)."""
    return [(c.address, c.size) for c in heap.walk() if c.state == "free"]


class Recorder:
    """Collects the system calls made inside a `with` block."""

    def __init__(self) -> None:
        self.calls: list[events.Event] = []

    def __enter__(self) -> list[events.Event]:
        events.attach(self.calls)
        return self.calls

    def __exit__(self, *exc: object) -> None:
        events.detach(self.calls)


@pytest.fixture(params=["buffer", "mmap"])
def heap(request: pytest.FixtureRequest) -> Iterator[malloc.Heap]:
    """A fresh heap over a 1 MiB bytearray or over a mapping (1 MiB committed, 64 MiB reserved)."""
    if request.param == "buffer":
        buf = bytearray(1 << 20)
        h = malloc.Heap(malloc.BufferRegion(buf))
        yield h
        h.check()
        del buf
    else:
        region = malloc.MapRegion(1 << 20, "test heap")
        h = malloc.Heap(region)
        yield h
        h.check()
        region.close()


# ----------------------------------------------------------------------------- basics


def test_fresh_heap_is_one_top_chunk(heap: malloc.Heap) -> None:
    assert chunks(heap) == [(heap.base + HEAP_HEADER, heap.region.size - HEAP_HEADER, "top")]
    assert heap.in_use == 0
    assert heap.base == heap.region.base
    assert heap.base % 16 == 0


def test_malloc_returns_aligned_disjoint_writable_blocks(heap: malloc.Heap) -> None:
    sizes = [0, 1, 8, 24, 25, 100, 1000, 1008, 1024, 1040, 4096, 20000]
    blocks = [(heap.malloc(n), n) for n in sizes]
    for i, (p, n) in enumerate(blocks):
        assert p % 16 == 0
        assert heap.usable_size(p) >= n
        fill(p, heap.usable_size(p), i + 1)
    spans = sorted((p, p + heap.usable_size(p)) for p, _ in blocks)
    for (_, end), (start, _) in pairwise(spans):
        assert end <= start
    for i, (p, _) in enumerate(blocks):
        assert read(p, heap.usable_size(p)) == bytes([i + 1]) * heap.usable_size(p)
    assert heap.in_use == sum(heap.usable_size(p) + 8 for p, _ in blocks)
    heap.check()


def test_free_then_malloc_reuses_the_same_address(heap: malloc.Heap) -> None:
    # Merged back into the top and split off again.
    p = heap.malloc(100)
    heap.free(p)
    assert heap.malloc(100) == p
    # Kept in a bin between two live blocks and handed out again.
    a = heap.malloc(200)
    guard = heap.malloc(16)
    heap.free(a)
    assert free_chunks(heap) == [(a - HEADER, request_to_size(200))]
    assert heap.malloc(200) == a
    assert free_chunks(heap) == []
    heap.free(guard)


def test_free_of_zero_does_nothing(heap: malloc.Heap) -> None:
    before = chunks(heap)
    heap.free(0)
    assert chunks(heap) == before


def test_coalescing_three_adjacent_blocks(heap: malloc.Heap) -> None:
    a, b, c = heap.malloc(200), heap.malloc(300), heap.malloc(400)
    guard = heap.malloc(50)
    assert b == a + request_to_size(200) and c == b + request_to_size(300)
    total = request_to_size(200) + request_to_size(300) + request_to_size(400)
    heap.free(a)
    heap.free(c)
    assert free_chunks(heap) == [(a - HEADER, request_to_size(200)), (c - HEADER, request_to_size(400))]
    heap.free(b)  # merges with both neighbours
    assert free_chunks(heap) == [(a - HEADER, total)]
    assert heap.free_stats() == (1, total)
    heap.check()
    # The merged chunk serves a request of its whole size, at a's address.
    big = heap.malloc(total - 8)
    assert big == a
    heap.free(big)
    heap.free(guard)
    # Everything free: one top chunk again.
    assert [state for _, _, state in chunks(heap)] == ["top"]


def test_free_next_to_top_merges_into_top(heap: malloc.Heap) -> None:
    a = heap.malloc(500)
    b = heap.malloc(500)
    heap.free(b)
    # (A heap over a mapping may trim its top right away; it still ends at the heap's end.)
    assert chunks(heap)[-1] == (b - HEADER, heap.end - (b - HEADER), "top")
    heap.free(a)
    assert chunks(heap) == [(a - HEADER, heap.end - (a - HEADER), "top")]


def test_best_fit_among_small_chunks(heap: malloc.Heap) -> None:
    x100 = heap.malloc(100)
    g1 = heap.malloc(16)
    x300 = heap.malloc(300)
    g2 = heap.malloc(16)
    x200 = heap.malloc(200)
    g3 = heap.malloc(16)
    for p in (x100, x300, x200):
        heap.free(p)
    q = heap.malloc(150)
    assert q == x200, "a 150-byte request must take the 200-byte chunk, the smallest that fits"
    # 208 - 160 = 48 bytes are left: enough for a chunk, so they were split off and stay free.
    rest = request_to_size(200) - request_to_size(150)
    assert (x200 - HEADER + request_to_size(150), rest) in free_chunks(heap)
    for p in (q, g1, g2, g3):
        heap.free(p)


def test_best_fit_among_large_chunks(heap: malloc.Heap) -> None:
    big = [heap.malloc(n) for n in (3000, 16, 5000, 16, 4000, 16)]
    a, _g1, b, _g2, c, _g3 = (heap.malloc(n) for n in (1060, 16, 1020, 16, 1040, 16))
    for i in (0, 2, 4):
        heap.free(big[i])
    q = heap.malloc(3500)
    assert q == big[4], "a 3500-byte request must take the 4000-byte chunk"
    heap.free(q)
    # Within one large bin the members are sorted, so the best one wins over the first one freed.
    assert {request_to_size(1060), request_to_size(1020), request_to_size(1040)} == {1072, 1040, 1056}
    for p in (a, b, c):
        heap.free(p)
    assert heap.malloc(1045) == c  # needs 1056: not 1072 (freed first), not 1040 (too small)
    heap.check()


def test_splitting_a_free_chunk(heap: malloc.Heap) -> None:
    a = heap.malloc(1000)
    guard = heap.malloc(16)
    heap.free(a)
    p = heap.malloc(100)
    assert p == a
    assert chunk_at(heap, p).size == request_to_size(100)
    assert chunk_at(heap, p).state == "in use"
    rest = request_to_size(1000) - request_to_size(100)
    assert free_chunks(heap) == [(a - HEADER + request_to_size(100), rest)]
    # A remainder smaller than a chunk is not split off: the block takes it all.
    q = heap.malloc(rest - 8 - 16)
    assert q == a + request_to_size(100)
    assert heap.usable_size(q) == rest - 8
    assert free_chunks(heap) == []
    heap.free(guard)


def test_realloc_grows_in_place_into_a_free_neighbour(heap: malloc.Heap) -> None:
    a = heap.malloc(100)
    b = heap.malloc(400)
    guard = heap.malloc(16)
    fill(a, 100, 0x5A)
    heap.free(b)
    q = heap.realloc(a, 300)
    assert q == a
    assert heap.usable_size(a) >= 300
    assert read(a, 100) == b"\x5a" * 100
    # The rest of b's chunk stays free, right after the grown block.
    assert free_chunks(heap) == [(a - HEADER + request_to_size(300),
                                  request_to_size(100) + request_to_size(400) - request_to_size(300))]
    heap.free(guard)
    heap.free(a)


def test_realloc_grows_in_place_into_the_top(heap: malloc.Heap) -> None:
    a = heap.malloc(100)
    fill(a, 100, 0x33)
    top = heap.top_size
    q = heap.realloc(a, 50000)
    assert q == a
    assert heap.usable_size(a) >= 50000
    assert heap.top_size == top - (request_to_size(50000) - request_to_size(100))
    assert read(a, 100) == b"\x33" * 100
    fill(a, 50000, 0x34)
    heap.check()


def test_realloc_shrinks_in_place_and_frees_the_tail(heap: malloc.Heap) -> None:
    a = heap.malloc(2000)
    guard = heap.malloc(16)
    fill(a, 2000, 0x77)
    q = heap.realloc(a, 100)
    assert q == a
    assert heap.usable_size(a) == request_to_size(100) - 8
    assert read(a, 100) == b"\x77" * 100
    assert free_chunks(heap) == [(a - HEADER + request_to_size(100), request_to_size(2000) - request_to_size(100))]
    # Shrinking by less than a chunk keeps the block as it is.
    usable = heap.usable_size(a)
    assert heap.realloc(a, usable - 8) == a
    assert heap.usable_size(a) == usable
    heap.free(guard)
    heap.free(a)


def test_realloc_moves_when_it_cannot_grow_and_keeps_the_contents(heap: malloc.Heap) -> None:
    a = heap.malloc(100)
    guard = heap.malloc(16)
    fill(a, heap.usable_size(a), 0x42)
    q = heap.realloc(a, 5000)
    assert q != a
    old_usable = request_to_size(100) - 8
    assert read(q, old_usable) == b"\x42" * old_usable
    assert (a - HEADER, request_to_size(100)) in free_chunks(heap)
    heap.free(q)
    heap.free(guard)


def test_realloc_of_zero_and_to_zero(heap: malloc.Heap) -> None:
    p = heap.realloc(0, 64)
    assert p and heap.usable_size(p) >= 64
    assert heap.realloc(p, 0) == 0
    assert heap.in_use == 0
    assert [state for _, _, state in chunks(heap)] == ["top"]


@pytest.mark.parametrize("alignment", [32, 64, 128, 256, 4096, 65536])
def test_memalign_offsets(heap: malloc.Heap, alignment: int) -> None:
    pre = heap.malloc(40)  # so the top does not start aligned by chance
    p = heap.memalign(alignment, 100)
    assert p % alignment == 0
    assert heap.usable_size(p) >= 100
    assert heap.usable_size(p) < 100 + 8 + MIN_CHUNK + 16  # the tail went back
    fill(p, heap.usable_size(p), 0xA1)
    # The lead, if any, became a free chunk right before the aligned block.
    lead = [(addr, size) for addr, size in free_chunks(heap) if addr + size == p - HEADER]
    if p - HEADER != pre - HEADER + request_to_size(40):
        assert lead, "the bytes before the aligned chunk must have gone back as a free chunk"
        assert lead[0][1] >= MIN_CHUNK
    heap.check()
    q = heap.memalign(alignment, 3000)
    assert q % alignment == 0 and heap.usable_size(q) >= 3000
    assert read(p, heap.usable_size(p)) == b"\xa1" * heap.usable_size(p)
    for x in (p, q, pre):
        heap.free(x)
    assert heap.in_use == 0


@pytest.mark.parametrize("alignment", [1, 2, 4, 8, 16])
def test_memalign_small_alignment_is_malloc(heap: malloc.Heap, alignment: int) -> None:
    p = heap.memalign(alignment, 10)
    assert p % 16 == 0
    assert heap.usable_size(p) == request_to_size(10) - 8


def test_calloc_zeroes_reused_memory(heap: malloc.Heap) -> None:
    a = heap.malloc(3000)
    guard = heap.malloc(16)
    fill(a, heap.usable_size(a), 0xAB)
    heap.free(a)
    z = heap.calloc(3, 1000)
    assert z == a
    assert read(z, heap.usable_size(z)) == bytes(heap.usable_size(z))
    # Also from a dirty top: free a block next to the top, calloc over it again.
    heap.free(guard)
    heap.free(z)
    b = heap.malloc(8000)
    fill(b, heap.usable_size(b), 0xCD)
    heap.free(b)
    z2 = heap.calloc(1, 8000)
    assert z2 == b
    assert read(z2, heap.usable_size(z2)) == bytes(heap.usable_size(z2))
    assert heap.calloc(0, 100) != 0


def test_calloc_of_fresh_memory_is_zero(heap: malloc.Heap) -> None:
    z = heap.calloc(100, 100)
    assert read(z, heap.usable_size(z)) == bytes(heap.usable_size(z))


def test_walk_covers_the_heap_exactly(heap: malloc.Heap) -> None:
    blocks = [heap.malloc(n) for n in (10, 2000, 300, 70000, 5)]
    heap.free(blocks[1])
    heap.free(blocks[3])
    walked = list(heap.walk())
    assert walked[0].address == heap.base + HEAP_HEADER
    for c, d in pairwise(walked):
        assert c.address + c.size == d.address
    assert walked[-1].state == "top"
    assert walked[-1].address + walked[-1].size == heap.end
    in_use = {c.address + HEADER for c in walked if c.state == "in use"}
    assert in_use == {blocks[0], blocks[2], blocks[4]}


def test_walk_from_a_chunk_is_the_rest_of_the_walk(heap: malloc.Heap) -> None:
    blocks = [heap.malloc(n) for n in (10, 2000, 300, 5)]
    heap.free(blocks[1])
    walked = list(heap.walk())
    for i, c in enumerate(walked):
        assert list(heap.walk(c.address)) == walked[i:]
    first, top = walked[0].address, walked[-1].address
    for bad in (first - 16, first + 8, top + 16, heap.base):
        with pytest.raises(ValueError, match=f"{bad:#x} is not a chunk of the heap at {heap.base:#x}"):
            heap.walk(bad).__next__()
    assert list(heap.walk()) == walked  # a refused start changed nothing


def test_buffer_heap_runs_out_with_memory_error_and_changes_nothing() -> None:
    buf = bytearray(64 * 1024)
    h = malloc.Heap(malloc.BufferRegion(buf))
    a = h.malloc(10000)
    fill(a, 10000, 1)
    before = bytes(buf)
    calls: list[Callable[[], object]] = [lambda: h.malloc(100000), lambda: h.calloc(1000, 100),
                                         lambda: h.memalign(4096, 60000), lambda: h.realloc(a, 200000)]
    for call in calls:
        with pytest.raises(MemoryError):
            call()
        assert bytes(buf) == before
    h.check()


def test_realloc_moves_to_a_free_chunk_when_the_region_cannot_grow() -> None:
    """A block next to the top of a full region must move into a free chunk that fits, like malloc would."""
    buf = bytearray(64 * 1024)
    h = malloc.Heap(malloc.BufferRegion(buf))
    x = h.malloc(20000)
    guard = h.malloc(100)
    filler = h.malloc(h.top_size - MIN_CHUNK - 8 - 300)
    y = h.malloc(100)  # borders the top, which has only a few hundred bytes left
    fill(y, 100, 0x6E)
    h.free(x)
    q = h.realloc(y, 1000)  # the top cannot take it, the region cannot grow, but x's chunk can
    assert q == x
    assert read(q, 100) == b"\x6e" * 100
    h.check()
    for p in (q, guard, filler):
        h.free(p)


# ----------------------------------------------------------------- the region growing and shrinking


def test_top_grows_the_map_region_with_mprotect() -> None:
    region = malloc.MapRegion(64 * 1024, "test", reserve=16 << 20)
    try:
        h = malloc.Heap(region, top_pad=0)
        old_size = region.size
        with Recorder() as calls:
            p = h.malloc(300000)
        grows = [e for e in calls if e.name == "mprotect"]
        assert len(grows) == 1
        address, length, prot = grows[0].args
        assert address == region.base + old_size
        assert prot == PROT_RW
        assert region.size == old_size + length >= HEAP_HEADER + 300000
        assert h.end == region.base + region.size
        fill(p, h.usable_size(p), 0xEE)  # the new pages are really writable
        # No system call when the top already has room.
        with Recorder() as calls:
            q = h.malloc(100)
        assert calls == []
        h.free(q)
        h.free(p)
        h.check()
    finally:
        region.close()


def test_trim_shrinks_the_map_region() -> None:
    region = malloc.MapRegion(64 * 1024, "test", reserve=16 << 20)
    try:
        h = malloc.Heap(region, top_pad=0, trim_threshold=1 << 30)  # no automatic trim
        p = h.malloc(1 << 20)
        fill(p, 1 << 20, 0x11)
        grown = region.size
        h.free(p)
        assert region.size == grown
        with Recorder() as calls:
            assert h.trim(0)
        assert region.size < grown
        assert region.size <= HEAP_HEADER + MIN_CHUNK + PAGE
        names = [e.name for e in calls]
        assert "mprotect" in names and "madvise" in names
        protects = [e for e in calls if e.name == "mprotect"]
        assert protects[0].args == (region.base + region.size, grown - region.size, libc.PROT_NONE)
        assert h.end == region.base + region.size
        assert chunks(h)[-1][2] == "top"
        h.check()
        # Nothing more to give back.
        with Recorder() as calls:
            assert not h.trim(0)
        assert calls == []
        # And it grows again, zero-filled.
        z = h.calloc(1, 1 << 20)
        assert read(z, 1 << 20) == bytes(1 << 20)
    finally:
        region.close()


def test_free_past_the_trim_threshold_trims_automatically() -> None:
    region = malloc.MapRegion(64 * 1024, "test", reserve=16 << 20)
    try:
        h = malloc.Heap(region, top_pad=0, trim_threshold=256 * 1024)
        p = h.malloc(1 << 20)
        grown = region.size
        with Recorder() as calls:
            h.free(p)
        assert region.size < grown
        assert any(e.name == "mprotect" and e.args[2] == libc.PROT_NONE for e in calls)
    finally:
        region.close()


def test_map_region_full_raises_memory_error() -> None:
    region = malloc.MapRegion(64 * 1024, "test", reserve=1 << 20)
    try:
        h = malloc.Heap(region, top_pad=0)
        before = chunks(h)
        with pytest.raises(MemoryError):
            h.malloc(2 << 20)
        assert chunks(h) == before
        assert region.size == 64 * 1024
        h.check()
    finally:
        region.close()


# ----------------------------------------------------------------------------- in-band state


def test_attach_a_second_heap_over_the_same_region_sees_the_same_blocks(heap: malloc.Heap) -> None:
    blocks = [heap.malloc(n) for n in (100, 2000, 30, 5000, 64)]
    heap.free(blocks[1])
    other = malloc.Heap(heap.region, attach=True)
    assert list(other.walk()) == list(heap.walk())
    assert other.in_use == heap.in_use
    assert other.usable_size(blocks[3]) == heap.usable_size(blocks[3])
    # A free through one is seen by the other, which hands the same memory out again.
    other.free(blocks[0])
    assert list(heap.walk()) == list(other.walk())
    assert heap.malloc(100) == blocks[0]
    with pytest.raises(malloc.DoubleFree):
        other.free(blocks[1])
    heap.check()
    other.check()


def test_heap_copied_to_another_address_works_there() -> None:
    """All links are offsets: the same bytes at a different address form the same heap, shifted."""
    buf1 = bytearray(256 * 1024)
    r1 = malloc.BufferRegion(buf1)
    h1 = malloc.Heap(r1)
    blocks = [h1.malloc(n) for n in (100, 3000, 40, 1200, 20000, 64, 7000, 16)]
    for i, p in enumerate(blocks):
        fill(p, h1.usable_size(p), 0x10 + i)
    for i in (1, 3, 6):
        h1.free(blocks[i])  # some free chunks in small and large bins
    live = [p for i, p in enumerate(blocks) if i not in (1, 3, 6)]

    buf2 = bytearray(256 * 1024 + 64)
    r2 = malloc.BufferRegion(buf2)
    assert r2.size >= r1.size
    ctypes.memmove(r2.base, r1.base, r1.size)
    h2 = malloc.Heap(r2, attach=True)
    delta = h2.base - h1.base
    assert delta != 0

    w1, w2 = list(h1.walk()), list(h2.walk())
    assert len(w1) == len(w2)
    for c1, c2 in zip(w1, w2, strict=True):
        assert c2.address - c1.address == delta
        assert (c2.size, c2.state, c2.bin) == (c1.size, c1.state, c1.bin)
    h2.check()
    for p in live:
        assert h2.usable_size(p + delta) == h1.usable_size(p)
        assert read(p + delta, h1.usable_size(p)) == read(p, h1.usable_size(p))

    # The copy allocates from its own (copied) bins, at the shifted addresses, and never touches buf1.
    snapshot1 = bytes(buf1)
    assert h2.malloc(3000) == blocks[1] + delta
    assert h2.malloc(1200) == blocks[3] + delta
    for p in live:
        h2.free(p + delta)
    h2.check()
    assert bytes(buf1) == snapshot1
    h1.check()
    # The original is still good on its own.
    assert h1.malloc(3000) == blocks[1]


def test_heap_in_a_mapping_copied_into_a_buffer() -> None:
    region = malloc.MapRegion(1 << 20, "test")
    try:
        h1 = malloc.Heap(region)
        blocks = [h1.malloc(n) for n in (500, 600, 700)]
        h1.free(blocks[1])
        buf = bytearray(region.size + 32)
        r2 = malloc.BufferRegion(buf)
        ctypes.memmove(r2.base, region.base, region.size)
        h2 = malloc.Heap(r2, attach=True)
        delta = h2.base - h1.base
        assert [(c.address - delta, c.size, c.state) for c in h2.walk()] == chunks(h1)
        assert h2.malloc(600) == blocks[1] + delta
        h2.check()
    finally:
        region.close()


def test_attach_refuses_a_region_without_a_heap() -> None:
    with pytest.raises(malloc.HeapCorruption):
        malloc.Heap(malloc.BufferRegion(bytearray(64 * 1024)), attach=True)


def test_heap_needs_room_for_its_header() -> None:
    with pytest.raises(ValueError):
        malloc.Heap(malloc.BufferRegion(bytearray(HEAP_HEADER)))
    with pytest.raises(ValueError):
        malloc.BufferRegion(b"read-only bytes")


def test_a_shrink_that_leaves_exactly_a_minimal_chunk_splits_it_off(heap: malloc.Heap) -> None:
    p = heap.malloc(200)  # a 208-byte chunk
    guard = heap.malloc(100)  # keeps the tail from merging into the top
    size = heap.usable_size(p) + 8
    assert heap.realloc(p, size - MIN_CHUNK - 8) == p  # leaves exactly MIN_CHUNK bytes
    states = [(c.address, c.size, c.state) for c in heap.walk()]
    tail = p - HEADER + size - MIN_CHUNK
    assert (tail, MIN_CHUNK, "free") in states
    assert heap.usable_size(p) + 8 == size - MIN_CHUNK
    heap.free(guard)
    heap.free(p)
    heap.check()


def test_a_double_free_of_a_block_merged_with_the_chunk_before_is_caught(heap: malloc.Heap) -> None:
    a = heap.malloc(100)
    b = heap.malloc(100)
    guard = heap.malloc(100)
    heap.free(a)
    heap.free(b)  # b merges into a's free chunk; its old header must no longer pass for a live block
    with pytest.raises(malloc.DoubleFree):
        heap.free(b)
    heap.free(guard)
    heap.check()
