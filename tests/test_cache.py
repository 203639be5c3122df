"""The fast cache and the OS: before a request goes to the OS, the cached blocks that could serve it go back
into the heap, and only those. Each test builds a known layout in a fresh interpreter (see
`procfs.run_child`) and reports where the request landed, whether the break moved, and what stayed cached.

Layouts are built from the top of a fresh heap: `fill()` uses up the top so that only `room` bytes are
left, and blocks of 1,000 bytes (1,008-byte chunks, the fast cache's largest size but one) are freed into
the cache.
"""

from __future__ import annotations

import textwrap
from typing import Any

from procfs import run_child

from malloc.heap import HEAP_HEADER
from malloc.options import DEFAULT_TOP_PAD
from malloc.os.libc import PAGE_SIZE as PAGE

LAYOUT = """
    heap_first = malloc.malloc(100)
    heap = malloc.allocator.heaps[0]

    def fill(room):
        # take the top down to `room` bytes (the chunk of `room` is what a request can still get)
        return malloc.malloc(heap.top_size - room - 8 - 32)

    def state(p):
        return next(ch.state for ch in malloc.walk() if ch.address + 16 == p)

    def request(n):
        sbrks = events.counts["sbrk"]
        p = malloc.malloc(n)
        return p, events.counts["sbrk"] - sbrks
"""


def run(body: str) -> dict[str, Any]:
    return run_child(textwrap.dedent(LAYOUT) + textwrap.dedent(body))


def test_an_isolated_cached_block_stays_cached_when_the_heap_grows() -> None:
    facts = run("""
        b = malloc.malloc(1000)
        guard = malloc.malloc(100)           # b sits between two blocks in use
        malloc.free(b)
        before = state(b)
        fill(0)
        p, grew = request(5000)              # the top cannot serve it; b could not either, freed
        report(before=before, after=state(b), grew=grew, reused=malloc.malloc(1000) == b)
    """)
    assert facts["before"] == facts["after"] == "cached"
    assert facts["grew"] == 1
    assert facts["reused"]  # still there for the next request of its size


def test_a_cached_block_next_to_the_top_serves_a_request_the_top_could_not() -> None:
    facts = run("""
        fill(1500)
        b = malloc.malloc(1000)              # the last block before the top, which keeps about 500 bytes
        malloc.free(b)
        cached = state(b)
        p, grew = request(1200)              # more than the top; b and the top together hold it
        report(cached=cached, b=b, p=p, grew=grew)
    """)
    assert facts["cached"] == "cached"
    assert facts["grew"] == 0
    assert facts["p"] == facts["b"]


def test_a_cached_block_next_to_a_free_chunk_serves_a_request_neither_could() -> None:
    facts = run("""
        f = malloc.malloc(1500)
        b = malloc.malloc(1000)
        guard = malloc.malloc(100)
        malloc.free(f)                       # too big for the cache: a free chunk in a bin
        malloc.free(b)                       # cached, right above it
        fill(0)
        p, grew = request(2200)              # f alone is too small, and so is b
        report(f=f, p=p, grew=grew, b_state=next(ch.state for ch in malloc.walk() if ch.address + 16 == p))
    """)
    assert facts["grew"] == 0
    assert facts["p"] == facts["f"]
    assert facts["b_state"] == "in use"


def test_cached_neighbours_coalesce_together() -> None:
    facts = run("""
        guard1 = malloc.malloc(100)
        b1 = malloc.malloc(1000)
        b2 = malloc.malloc(1000)
        guard2 = malloc.malloc(100)
        other = malloc.malloc(1000)
        guard3 = malloc.malloc(100)
        for x in (b1, b2, other):
            malloc.free(x)                   # three cached blocks: two side by side, one alone
        fill(0)
        p, grew = request(1800)              # only b1 and b2 together hold it
        report(b1=b1, p=p, grew=grew, other=state(other), b2=[ch.state for ch in malloc.walk()
                                                             if ch.address + 16 == b2])
    """)
    assert facts["grew"] == 0
    assert facts["p"] == facts["b1"]
    assert facts["b2"] == []  # no longer a chunk of its own: part of the block just handed out
    assert facts["other"] == "cached"


def test_the_first_heap_is_the_header_and_the_top_pad_whatever_the_first_request() -> None:
    """As glibc's first heap, whose first chunk is the thread's tcache, is that chunk and the top pad: the
    program's first request then comes from the top, so it does not set the heap's size."""
    for first in (100, 100 << 10):
        facts = run_child(f"""
            brk0 = libc.current_break()
            p = malloc.malloc({first})
            report(brk0=brk0, brk1=libc.current_break(), sbrks=events.counts["sbrk"])
        """)
        assert facts["sbrks"] == 1
        assert facts["brk1"] - facts["brk0"] == -(-(HEAP_HEADER + 32 + DEFAULT_TOP_PAD) // PAGE) * PAGE


def test_a_damaged_cached_block_is_reported_and_nothing_is_released() -> None:
    """An overflow from the block below rewrote a cached block's size word: the request that would release it
    raises HeapCorruption before any cached block goes back (the intact one, above a free chunk, stays)."""
    facts = run("""
        import ctypes
        f = malloc.malloc(1500)
        b = malloc.malloc(1000)
        guard1 = malloc.malloc(100)
        a = malloc.malloc(1000)
        d = malloc.malloc(1000)
        guard2 = malloc.malloc(100)
        malloc.free(f)                       # a free chunk in a bin
        malloc.free(b)                       # cached: with f it could serve the request below
        malloc.free(d)                       # cached, and then damaged
        size_word = ctypes.c_uint64.from_address(d - 8)
        saved = size_word.value
        ctypes.memset(d - 8, 0x41, 8)        # as a write past a's end would: d's size word
        fill(0)
        try:
            malloc.malloc(2200)              # f and b could serve it; d's size now says d could too
            error = None
        except malloc.HeapCorruption as e:
            error = str(e)
        size_word.value = saved              # repaired, the heap must be as it was
        malloc.check()
        report(error=error, d=d - 16, states=[state(b), state(d)])
    """)
    assert facts["error"] is not None and f"{facts['d']:#x}" in facts["error"]
    assert facts["states"] == ["cached", "cached"]


def test_the_cache_keeps_seven_blocks_of_a_size_and_the_eighth_goes_back_to_the_heap() -> None:
    facts = run_child(textwrap.dedent("""
        blocks = [malloc.malloc(100) for _ in range(9)]
        for p in blocks[:8:2] + blocks[1:8:2]:  # eight frees of one size, none next to another freed
            malloc.free(p)
        states = {c.address + 16: c.state for c in malloc.walk()}
        report(states=[states[p] for p in blocks[:8]])
    """))
    assert sorted(facts["states"]).count("cached") == 7, facts
