"""walk() reports every chunk with its state, and the request that made it once requests are remembered."""

from __future__ import annotations

import itertools

from malloc import Options, ProcessAllocator


def test_walk_reports_requests_only_while_remembered() -> None:
    a = ProcessAllocator(Options())
    before = a.malloc(40)
    a.remember_requests()
    p = a.malloc(100)
    z = a.calloc(3, 10)
    q = a.realloc(a.malloc(50), 700)
    m = a.memalign(4096, 300)
    big = a.malloc(1 << 20)
    a.free(a.malloc(60))  # now in the fast cache
    by_block = {c.address + 16: c for c in a.walk()}
    assert by_block[before].request == -1 and by_block[before].state == "in use"
    assert [by_block[x].request for x in (p, z, q, m, big)] == [100, 30, 700, 300, 1 << 20]
    assert by_block[big].state == "mapped"
    assert any(c.state == "cached" and c.request == -1 for c in by_block.values())
    a.remember_requests(False)
    assert all(c.request == -1 for c in a.walk())
    for x in (before, p, z, q, m, big):
        a.free(x)
    a.check()
    a.trim()


def test_walk_covers_the_heap_without_gaps() -> None:
    a = ProcessAllocator(Options())
    blocks = [a.malloc(n) for n in (10, 200, 3000, 50)]
    a.free(blocks[1])
    chunks = [c for c in a.walk() if c.state != "mapped"]
    for left, right in itertools.pairwise(chunks):
        assert left.address + left.size == right.address
    assert chunks[-1].state == "top"
    assert {"in use", "cached", "top"} == {c.state for c in chunks}  # the freed 200 bytes wait in the cache
    for x in blocks[:1] + blocks[2:]:
        a.free(x)
    a.trim()


def test_cached_blocks_are_the_cached_chunks_of_the_walk() -> None:
    a = ProcessAllocator(Options())
    blocks = [a.malloc(n) for n in (40, 40, 500, 3000)]
    assert a.cached_blocks() == {}
    for x in blocks[:3]:
        a.free(x)
    cached = a.cached_blocks()
    assert cached == {c.address + 16: c.size for c in a.walk() if c.state == "cached"}
    assert set(cached) == set(blocks[:3]) and cached[blocks[2]] == 512
    cached.clear()  # a copy: the cache keeps its blocks
    assert len(a.cached_blocks()) == 3
    assert a.malloc(40) in blocks[:2] and len(a.cached_blocks()) == 2
    a.free(blocks[3])
    a.trim()
