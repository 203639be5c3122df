"""mallinfo's fields mean what glibc's do, and the malloc_stats report adds up."""

from __future__ import annotations

import io
import re

import malloc
from malloc import Options, ProcessAllocator


def test_mallinfo_counts_what_was_allocated() -> None:
    a = ProcessAllocator(Options())
    small = [a.malloc(100) for _ in range(5)]
    mid = a.malloc(5000)
    big = a.malloc(1 << 20)
    info = a.mallinfo()
    assert info.hblks == 1 and info.hblkhd >= (1 << 20) + 16  # the mapped chunk
    assert info.uordblks >= 5 * 112 + 5008  # chunk sizes, headers included
    assert info.system_current == info.arena + info.hblkhd
    assert info.system_max >= info.system_current
    assert info.keepcost == sum(h.top_size for h in a.heaps)
    for p in small[:3]:
        a.free(p)  # into the fast cache
    after = a.mallinfo()
    assert (after.smblks, after.fsmblks) == (3, 3 * 112)
    assert after.uordblks == info.uordblks - 3 * 112
    a.free(big)
    assert a.mallinfo().hblks == 0 and a.mallinfo().hblkhd == 0
    assert a.mallinfo().system_max >= info.system_current  # the peak is remembered
    for p in [*small[3:], mid]:
        a.free(p)
    a.check()


def test_stats_prints_a_report_whose_figures_add_up() -> None:
    p = malloc.malloc(3000)
    q = malloc.malloc(100)
    malloc.free(q)  # into the fast cache
    out = io.StringIO()
    malloc.stats(out)
    text = out.getvalue()
    figures = {k.strip(): int(v) for k, v in re.findall(r"^([a-z ]+?)\s*=\s*(\d+)$", text, re.M)}
    assert text.startswith("Arena 0 (brk):")
    info = malloc.mallinfo()
    assert figures["system bytes"] in (info.arena, info.system_current)  # the first is the arena's
    assert figures["fast cache bytes"] == info.fsmblks >= 112
    assert figures["max system bytes"] == info.system_max
    malloc.free(p)
