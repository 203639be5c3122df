"""What the allocator does to the real process, observed from outside its own bookkeeping.

Each test runs a small script in a fresh interpreter (see `procfs.run_child`): the program break from
sbrk(0), the system-call counts, and /proc/self/maps before and after. The C library's malloc is given a
large top first, so the interpreter's own allocations do not move the break in between. The child only
reports what it saw; the assertions are made here.
"""

from __future__ import annotations

import itertools
from typing import Any

from procfs import run_child

from malloc.options import DEFAULT_MMAP_THRESHOLD, DEFAULT_TOP_PAD
from malloc.os.libc import PAGE_SIZE as PAGE

MiB = 1 << 20
KiB = 1 << 10


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def fresh_line(facts: dict[str, Any], key: str) -> dict[str, Any]:
    line = facts[key]
    assert line is not None, f"no line of /proc/self/maps covers the block ({key})"
    assert isinstance(line, dict)
    return line


def assert_anonymous(line: dict[str, Any]) -> None:
    assert line["path"] == "", line
    assert line["inode"] == 0, line
    assert line["perms"] == "rw-p", line


# ---------------------------------------------------------------- 1. brk


def test_small_request_moves_the_break_into_heap_line() -> None:
    facts = run_child("""
        c0 = dict(events.counts)
        before = MAPS.snapshot()
        brk0 = libc.current_break()
        p = malloc.malloc(100)
        brk1 = libc.current_break()
        c1 = dict(events.counts)
        after = MAPS.snapshot()
        heap = malloc.allocator.heaps[0]
        # The heap exists now: use up its top, then a small request must grow it again.
        big = malloc.malloc(heap.top_size - 64)
        top_left = heap.top_size
        brk2 = libc.current_break()
        c2 = dict(events.counts)
        q = malloc.malloc(200)
        brk3 = libc.current_break()
        c3 = dict(events.counts)
        maps3 = MAPS.snapshot()
        malloc.view(q)[:200] = bytes(range(200))
        q_ok = bytes(malloc.view(q, 200)) == bytes(range(200))
        report(p=p, q=q, brk0=brk0, brk1=brk1, brk2=brk2, brk3=brk3, c0=c0, c1=c1, c2=c2, c3=c3,
               top_left=top_left, kind=heap.region.kind, base=heap.base, end=heap.end, q_ok=q_ok,
               heap_before=procfs.describe(before, p), heap_after=procfs.describe(after, p, 100),
               heap_line_after=procfs.heap_line(after).__dict__,
               q_line=procfs.describe(maps3, q, 200), heap_line3=procfs.heap_line(maps3).__dict__)
    """)
    p, q = facts["p"], facts["q"]
    # The first request made the heap: one sbrk, no mmap, and the break went up past the block.
    assert facts["c1"]["sbrk"] - facts["c0"]["sbrk"] == 1
    assert facts["c1"]["mmap"] == facts["c0"]["mmap"]
    assert facts["brk1"] > facts["brk0"]
    assert facts["brk0"] <= p and p + 100 <= facts["brk1"]
    assert facts["kind"] == "brk"
    # The block was not mapped before, and now lies in the [heap] line, which ends at the new break.
    assert facts["heap_before"] is None
    line = fresh_line(facts, "heap_after")
    assert line["path"] == "[heap]"
    assert facts["heap_line_after"]["end"] == page_up(facts["brk1"])
    # With the top used up, a 200-byte request moved the break again, by one sbrk.
    assert facts["top_left"] < 200
    assert facts["brk2"] == facts["brk1"]
    assert facts["c3"]["sbrk"] - facts["c2"]["sbrk"] == 1
    assert facts["c3"]["mmap"] == facts["c2"]["mmap"]
    assert facts["brk3"] > facts["brk2"]
    # The old top's last bytes and the new memory above them are one contiguous chunk now.
    assert facts["brk2"] - facts["top_left"] < q < facts["brk2"] < q + 200 <= facts["brk3"]
    assert fresh_line(facts, "q_line")["path"] == "[heap]"
    assert facts["heap_line3"]["end"] == page_up(facts["brk3"])
    assert facts["q_ok"]


# ---------------------------------------------------------------- 2. mmap


def test_large_request_gets_its_own_mapping_which_free_removes() -> None:
    facts = run_child("""
        brk0 = libc.current_break()
        c0 = dict(events.counts)
        before = MAPS.snapshot()
        p = malloc.malloc(1 << 20)
        c1 = dict(events.counts)
        after = MAPS.snapshot()
        length = malloc.allocator.mapped_chunks()[p]
        usable = malloc.usable_size(p)
        v = malloc.view(p)
        v[0] = 0x11
        v[usable - 1] = 0x22
        ends_ok = v[0] == 0x11 and v[usable - 1] == 0x22
        v.release()
        malloc.free(p)
        gone = MAPS.snapshot()
        c2 = dict(events.counts)
        report(p=p, length=length, usable=usable, ends_ok=ends_ok, c0=c0, c1=c1, c2=c2,
               brk0=brk0, brk2=libc.current_break(), heaps=len(malloc.allocator.heaps),
               before=procfs.describe(before, p - 16, length), after=procfs.describe(after, p - 16, length),
               gone=procfs.describe(gone, p), heap_line=procfs.heap_line(after).__dict__)
    """)
    p, length = facts["p"], facts["length"]
    assert facts["c1"]["mmap"] - facts["c0"]["mmap"] == 1
    assert facts["c1"]["sbrk"] == facts["c0"]["sbrk"]
    assert facts["heaps"] == 0  # no heap was made for it
    assert facts["brk2"] == facts["brk0"]
    # Its own page-rounded mapping: header, 1 MiB, size word.
    assert length == page_up((1 << 20) + 24 + 8)
    assert facts["usable"] >= 1 << 20
    assert facts["ends_ok"]
    assert facts["before"] is None
    line = fresh_line(facts, "after")
    assert_anonymous(line)
    assert not facts["heap_line"]["start"] <= p < facts["heap_line"]["end"]
    # free unmapped it: nothing covers the block any more.
    assert facts["c2"]["munmap"] - facts["c1"]["munmap"] == 1
    assert facts["gone"] is None


# ---------------------------------------------------------------- 3. trim


def test_free_all_and_trim_lowers_the_break() -> None:
    facts = run_child("""
        import random
        rng = random.Random(7)
        brk0 = libc.current_break()
        sizes = [24, 100, 500, 1000, 2000, 5000, 60000]
        blocks = [malloc.malloc(rng.choice(sizes)) for _ in range(1500)]
        heap = malloc.allocator.heaps[0]
        peak, held_peak, end_peak = libc.current_break(), heap.held, heap.end
        line_peak = procfs.heap_line(MAPS.snapshot()).__dict__
        rng.shuffle(blocks)
        for b in blocks:
            malloc.free(b)
        brk_freed = libc.current_break()
        sink = []
        events.attach(sink)
        released = malloc.trim()
        events.detach(sink)
        brk_trim = libc.current_break()
        line_trim = procfs.heap_line(MAPS.snapshot()).__dict__
        malloc.check()
        report(brk0=brk0, peak=peak, held_peak=held_peak, end_peak=end_peak, brk_freed=brk_freed,
               brk_trim=brk_trim, released=released, held=heap.held, end=heap.end, base=heap.base,
               heaps=len(malloc.allocator.heaps), arena=malloc.mallinfo().arena,
               sbrk_args=[e.args[0] for e in sink if e.name == "sbrk"],
               line_peak=line_peak, line_trim=line_trim, threads=libc.thread_count())
    """)
    assert facts["threads"] == 1
    assert facts["heaps"] == 1
    assert facts["peak"] - facts["brk0"] > 8 * MiB
    assert facts["end_peak"] == facts["peak"]
    assert facts["line_peak"]["end"] == page_up(facts["peak"])
    # Everything freed and trimmed: the break went down, by a negative sbrk, to the end of the heap.
    assert facts["released"]
    assert any(a < 0 for a in facts["sbrk_args"]), facts["sbrk_args"]
    assert facts["brk_trim"] < facts["peak"]
    assert facts["brk_trim"] <= facts["brk_freed"]
    assert facts["brk_trim"] == facts["end"]
    assert facts["held"] < facts["held_peak"]
    # trim(0) keeps nothing but the top's header page(s).
    assert facts["end"] - facts["base"] <= 2 * PAGE + 2 * KiB
    assert facts["arena"] == facts["held"]
    # And the kernel agrees: the [heap] line is shorter.
    assert facts["line_trim"]["end"] == page_up(facts["brk_trim"])
    assert facts["line_trim"]["end"] < facts["line_peak"]["end"]


# ------------------------------------------------------ 4. mallopt(M_MMAP_THRESHOLD)


def test_mallopt_mmap_threshold_changes_the_path() -> None:
    facts = run_child("""
        def where(p, n):
            maps = MAPS.snapshot()
            line = procfs.covering(maps, p, n)
            return {"mapped": p in malloc.allocator.mapped_chunks(),
                    "path": None if line is None else line.path,
                    "inode": None if line is None else line.inode}
        out = {}
        malloc.mallopt(malloc.M_MMAP_THRESHOLD, 32 << 10)
        c0 = dict(events.counts)
        a = malloc.malloc(64 << 10)
        out["a"] = where(a, 64 << 10)
        out["a_mmaps"] = events.counts["mmap"] - c0["mmap"]
        malloc.mallopt(malloc.M_MMAP_THRESHOLD, 128 << 10)
        b = malloc.malloc(64 << 10)
        out["b"] = where(b, 64 << 10)
        heap = malloc.allocator.heaps[0]
        out["top_before_c"] = heap.top_size
        c = malloc.malloc(256 << 10)
        out["c"] = where(c, 256 << 10)
        malloc.mallopt(malloc.M_MMAP_THRESHOLD, 1 << 20)
        c1 = dict(events.counts)
        brk1 = libc.current_break()
        d = malloc.malloc(256 << 10)
        out["d"] = where(d, 256 << 10)
        out["d_sbrks"] = events.counts["sbrk"] - c1["sbrk"]
        out["d_mmaps"] = events.counts["mmap"] - c1["mmap"]
        out["d_brk_moved"] = libc.current_break() > brk1
        for x in (a, b, c, d):
            malloc.free(x)
        malloc.check()
        report(**out)
    """)
    # Threshold 32 KiB: a 64 KiB request (no heap yet to serve it) gets a mapping of its own.
    assert facts["a"] == {"mapped": True, "path": "", "inode": 0}
    assert facts["a_mmaps"] == 1
    # Threshold 128 KiB: the same request goes to the break heap...
    assert facts["b"] == {"mapped": False, "path": "[heap]", "inode": 0}
    # ...and a 256 KiB one that its top cannot serve is mapped.
    assert facts["top_before_c"] < 256 << 10
    assert facts["c"] == {"mapped": True, "path": "", "inode": 0}
    # Threshold 1 MiB: the heap grows the break for 256 KiB instead.
    assert facts["d"] == {"mapped": False, "path": "[heap]", "inode": 0}
    assert facts["d_sbrks"] == 1
    assert facts["d_mmaps"] == 0
    assert facts["d_brk_moved"]


# ------------------------------------------------------ 5. the dynamic threshold


def test_dynamic_threshold_rises_like_glibc_until_mallopt() -> None:
    facts = run_child("""
        opts = malloc.allocator.options
        out = {"start": opts.mmap_threshold}
        a = malloc.malloc(1 << 20)
        out["a_length"] = malloc.allocator.mapped_chunks()[a]
        malloc.free(a)
        out["after_1m"] = opts.mmap_threshold
        out["trim_after_1m"] = opts.trim_threshold
        # Chunks above 32 MiB do not move it.
        e = malloc.malloc(40 << 20)
        out["e_mapped"] = e in malloc.allocator.mapped_chunks()
        malloc.free(e)
        out["after_40m"] = opts.mmap_threshold
        c0 = dict(events.counts)
        brk0 = libc.current_break()
        b = malloc.malloc(512 << 10)
        maps = MAPS.snapshot()
        line = procfs.covering(maps, b, 512 << 10)
        out["b_mapped"] = b in malloc.allocator.mapped_chunks()
        out["b_path"] = None if line is None else line.path
        out["b_mmaps"] = events.counts["mmap"] - c0["mmap"]
        out["b_in_main"] = malloc.allocator.heaps[0].owns(b)
        out["brk_moved"] = libc.current_break() > brk0
        # Any mallopt freezes the threshold.
        malloc.mallopt(malloc.M_MMAP_THRESHOLD, 256 << 10)
        c = malloc.malloc(1 << 20)
        out["c_mapped"] = c in malloc.allocator.mapped_chunks()
        malloc.free(c)
        out["after_mallopt"] = opts.mmap_threshold
        out["top"] = malloc.allocator.heaps[0].top_size
        d = malloc.malloc(600 << 10)
        out["d_mapped"] = d in malloc.allocator.mapped_chunks()
        malloc.free(d)
        malloc.free(b)
        malloc.check()
        report(**out)
    """)
    assert facts["start"] == DEFAULT_MMAP_THRESHOLD
    length = facts["a_length"]
    assert length == page_up((1 << 20) + 24 + 8)
    # The freed chunk's size becomes the threshold (its header at the mapping's start: the whole mapping),
    # and the trim threshold twice that.
    assert facts["after_1m"] == length
    assert facts["trim_after_1m"] == 2 * length
    assert facts["e_mapped"]
    assert facts["after_40m"] == length
    # 512 KiB is now below the threshold: served from the break heap, no new mapping.
    assert not facts["b_mapped"]
    assert facts["b_mmaps"] == 0
    assert facts["b_in_main"]
    assert facts["b_path"] == "[heap]"
    assert facts["brk_moved"]
    # After mallopt the threshold stays where the user put it, and 600 KiB is mapped again.
    assert facts["c_mapped"]
    assert facts["after_mallopt"] == 256 << 10
    assert facts["top"] < 600 << 10
    assert facts["d_mapped"]


# ------------------------------------------------------ 6. mallinfo and M_TOP_PAD


def test_mallinfo_follows_mappings_and_break_and_top_pad_sets_growth() -> None:
    facts = run_child("""
        import dataclasses
        def info():
            return dataclasses.asdict(malloc.mallinfo())
        out = {"i0": info()}
        a = malloc.malloc(1 << 20)
        b = malloc.malloc(3 << 20)
        chunks = malloc.allocator.mapped_chunks()
        out["la"], out["lb"] = chunks[a], chunks[b]
        out["i1"] = info()
        brk0 = libc.current_break()
        s = malloc.malloc(100)
        heap = malloc.allocator.heaps[0]
        out["heap_base"] = heap.base
        out["brk0"] = brk0
        out["brk1"] = libc.current_break()
        out["i2"] = info()
        malloc.free(a)
        out["i3"] = info()
        def grow_with_pad(pad):
            malloc.mallopt(malloc.M_TOP_PAD, pad)
            filler = malloc.malloc(heap.top_size - 64)
            arena0 = malloc.mallinfo().arena
            brk = libc.current_break()
            g = malloc.malloc(1000)
            return {"delta": libc.current_break() - brk, "arena_delta": malloc.mallinfo().arena - arena0,
                    "in_heap": heap.owns(g), "top": heap.top_size}
        out["pad0"] = grow_with_pad(0)
        out["pad1m"] = grow_with_pad(1 << 20)
        out["i4"] = info()
        out["brk4"] = libc.current_break()
        out["heap_end"] = heap.end
        report(**out)
    """)
    i0, i1, i2, i3, i4 = (facts[k] for k in ("i0", "i1", "i2", "i3", "i4"))
    la, lb = facts["la"], facts["lb"]
    assert i0["hblks"] == i0["hblkhd"] == i0["arena"] == i0["system_current"] == 0
    # Two mapped chunks: counted with their whole mappings.
    assert (i1["hblks"], i1["hblkhd"]) == (2, la + lb)
    assert i1["arena"] == 0
    assert i1["system_current"] == la + lb
    # The heap on the break: arena is exactly how far the break moved (the heap starts at the old break).
    assert facts["heap_base"] == facts["brk0"]
    assert i2["arena"] == facts["brk1"] - facts["brk0"]
    assert i2["system_current"] == i2["arena"] + la + lb
    assert i2["system_max"] == i2["system_current"]
    # Freeing a mapped chunk: one fewer, its bytes gone from system_current but not from system_max.
    assert (i3["hblks"], i3["hblkhd"]) == (1, lb)
    assert i3["system_current"] == i3["arena"] + lb
    assert i3["system_max"] == i2["system_max"]
    # M_TOP_PAD 0: the break moves by the request alone (page-rounded); 1 MiB: by that much more.
    pad0, pad1m = facts["pad0"], facts["pad1m"]
    assert pad0["in_heap"] and pad1m["in_heap"]
    assert 0 < pad0["delta"] <= PAGE
    assert pad0["arena_delta"] == pad0["delta"]
    assert 1 << 20 <= pad1m["delta"] <= (1 << 20) + 2 * PAGE
    assert pad1m["arena_delta"] == pad1m["delta"]
    assert pad1m["top"] >= 1 << 20
    assert facts["heap_end"] == facts["brk4"]
    assert i4["arena"] == facts["brk4"] - facts["brk0"]
    assert i4["system_current"] == i4["arena"] + lb
    assert i4["system_max"] >= i4["system_current"]


# ------------------------------------------------------ 7. the break cannot grow


def test_blocked_break_continues_in_a_heap_over_a_mapping() -> None:
    facts = run_child("""
        p0 = malloc.malloc(100)
        heap = malloc.allocator.heaps[0]
        brk = libc.current_break()
        guard_at = (brk + PAGE - 1) & ~(PAGE - 1)
        guard = libc.mmap_anonymous(PAGE, "test: sit on the break", flags=libc.MAP_FIXED_NOREPLACE,
                                    address=guard_at)
        try:
            big = malloc.malloc(heap.top_size - 64)
            sink = []
            events.attach(sink)
            q = malloc.malloc(200)
            events.detach(sink)
            maps = MAPS.snapshot()
            v = malloc.view(q)
            v[:] = bytes(i & 0xFF for i in range(len(v)))
            q_ok = bytes(malloc.view(q)) == bytes(i & 0xFF for i in range(len(v)))
            v.release()
            heaps = malloc.allocator.heaps
            more = [malloc.malloc(1000) for _ in range(500)]
            for m in more:
                malloc.view(m)[:8] = b"12345678"
            more_ok = all(bytes(malloc.view(m, 8)) == b"12345678" for m in more)
            malloc.check()
            for m in (*more, q, big, p0):
                malloc.free(m)
            malloc.check()
            out = dict(
                guard=guard, guard_at=guard_at, brk=brk, brk_after=libc.current_break(), q=q, q_ok=q_ok,
                more_ok=more_ok, kinds=[h.region.kind for h in heaps],
                second=[heaps[-1].base, heaps[-1].end] if len(heaps) > 1 else None,
                q_in_main=heap.owns(q), q_line=procfs.describe(maps, q, 200),
                calls=[[e.name, e.result == -1] for e in sink])
        finally:
            libc.munmap(guard, PAGE, "test cleanup")
        report(**out)
    """)
    assert facts["guard"] == facts["guard_at"], "MAP_FIXED_NOREPLACE was not honoured"
    # The break could not move: sbrk failed, so the heap went on in a mapping.
    assert ["sbrk", True] in facts["calls"], facts["calls"]
    assert ["mmap", False] in facts["calls"], facts["calls"]
    assert facts["brk_after"] == facts["brk"]
    assert facts["kinds"] == ["brk", "mmap"]
    assert not facts["q_in_main"]
    base, end = facts["second"]
    assert base <= facts["q"] < end
    line = fresh_line(facts, "q_line")
    assert_anonymous(line)
    assert facts["q_ok"]
    assert facts["more_ok"]


def test_break_blocked_from_the_start_one_mapped_heap_grows() -> None:
    """With no break heap at all, the heap over a mapping is grown in place, not replaced by a new
    mapping every time its top runs out (glibc's HEAP_MAX_SIZE reservation allows 64 MiB)."""
    facts = run_child("""
        brk = libc.current_break()
        guard_at = (brk + PAGE - 1) & ~(PAGE - 1)
        guard = libc.mmap_anonymous(PAGE, "test: sit on the break", flags=libc.MAP_FIXED_NOREPLACE,
                                    address=guard_at)
        try:
            blocks = [malloc.malloc(1000) for _ in range(4000)]  # ~4 MiB: several times the first 1 MiB
            for i, b in enumerate(blocks):
                malloc.view(b)[:4] = i.to_bytes(4, "little")
            ok = all(bytes(malloc.view(b, 4)) == i.to_bytes(4, "little") for i, b in enumerate(blocks))
            malloc.check()
            kinds = [h.region.kind for h in malloc.allocator.heaps]
            from malloc.inspect import maps as inspect_maps
            h = malloc.allocator.heaps[0]
            owned = [[o.start, o.end, o.label] for o in inspect_maps.owned_ranges()]
            amap = inspect_maps.address_map(owned=inspect_maps.owned_ranges())
            committed, reserve = amap.area_of(h.end - 1), amap.area_of(h.end)
            heap_facts = dict(base=h.base, end=h.end, reserved=h.region.reserved, owned=owned,
                              committed=[committed.start, committed.end, committed.mapping.perms,
                                         [o.label for o in committed.owned]],
                              reserve=[reserve.start, reserve.end, reserve.mapping.perms,
                                       [o.label for o in reserve.owned]])
            for b in blocks:
                malloc.free(b)
            malloc.check()
        finally:
            libc.munmap(guard, PAGE, "test cleanup")
        report(ok=ok, kinds=kinds, brk_after=libc.current_break(), brk=brk, guard=guard, guard_at=guard_at,
               heap=heap_facts)
    """)
    assert facts["guard"] == facts["guard_at"]
    assert facts["ok"]
    assert facts["brk_after"] == facts["brk"]
    assert facts["kinds"][0] == "mmap"
    assert facts["kinds"] == ["mmap"], f"{len(facts['kinds'])} heaps for 4 MiB: the first is never grown"
    # The maps view: the heap's committed pages are a read-write mapping, the rest of its reservation a
    # PROT_NONE one right after it; each is marked as the allocator's, under its own label.
    h = facts["heap"]
    base, end, limit = h["base"], h["end"], h["base"] + h["reserved"]
    assert [base, end, "malloc heap (mmap)"] in h["owned"]
    assert [end, limit, "malloc heap reserve (not yet committed)"] in h["owned"]
    start, stop, perms, labels = h["committed"]
    assert start <= base and stop == end and perms == "rw-p" and labels == ["malloc heap (mmap)"]
    start, stop, perms, labels = h["reserve"]
    assert start == end and stop == limit and perms == "---p"
    assert labels == ["malloc heap reserve (not yet committed)"]


# ------------------------------------------------------ 8. a foreign sbrk


def test_foreign_sbrk_by_libc_malloc_is_covered_and_skipped() -> None:
    facts = run_child("""
        import ctypes
        c = ctypes.CDLL(None)
        c.malloc.restype = ctypes.c_void_p
        c.malloc.argtypes = [ctypes.c_size_t]
        c.free.argtypes = [ctypes.c_void_p]
        p0 = malloc.malloc(100)
        heap = malloc.allocator.heaps[0]
        our_end = heap.end
        brk_ours = libc.current_break()
        # The C library's malloc uses up its top, then moves the break itself: above our heap.
        theirs = []
        while libc.current_break() == brk_ours and len(theirs) < 10000:
            theirs.append(c.malloc(64 << 10))
        gbrk = libc.current_break()
        ctypes.memset(theirs[-1], 0x77, 64 << 10)
        big = malloc.malloc(heap.top_size - 64)
        sbrk0 = events.counts["sbrk"]
        q = malloc.malloc(1000)
        sbrks = events.counts["sbrk"] - sbrk0
        malloc.view(q)[:1000] = b"q" * 1000
        q_ok = bytes(malloc.view(q, 1000)) == b"q" * 1000
        theirs_ok = ctypes.string_at(theirs[-1], 64 << 10) == b"\\x77" * (64 << 10)
        malloc.check()
        chunks = [[ch.address, ch.size, ch.state] for ch in malloc.walk()]
        info = malloc.mallinfo()
        out = dict(our_end=our_end, brk_ours=brk_ours, gbrk=gbrk, last_theirs=theirs[-1], q=q,
                   q_ok=q_ok, theirs_ok=theirs_ok, sbrks=sbrks, chunks=chunks, arena=info.arena,
                   system_current=info.system_current, hblkhd=info.hblkhd,
                   base=heap.base, end=heap.end, held=heap.held, brk_now=libc.current_break())
        for x in (q, big, p0):
            malloc.free(x)
        malloc.trim()
        malloc.check()
        out["brk_trimmed"] = libc.current_break()
        out["theirs_ok_after"] = ctypes.string_at(theirs[-1], 64 << 10) == b"\\x77" * (64 << 10)
        for t in theirs:
            c.free(t)
        report(**out)
    """, pin=4 << 20)
    our_end, gbrk, q = facts["our_end"], facts["gbrk"], facts["q"]
    assert facts["brk_ours"] == our_end
    # The C library really took the break above our heap, and its block lies there.
    assert gbrk > our_end
    assert our_end <= facts["last_theirs"] < gbrk
    # Our new memory continues above the foreign span.
    assert facts["sbrks"] >= 1
    assert q >= gbrk
    assert facts["end"] == facts["brk_now"]
    assert facts["q_ok"] and facts["theirs_ok"] and facts["theirs_ok_after"]
    # The walk covers the span with one foreign chunk.
    foreign = [ch for ch in facts["chunks"] if ch[2] == "foreign"]
    assert len(foreign) == 1, foreign
    f_addr, f_size, _ = foreign[0]
    assert f_addr <= our_end and f_addr + f_size >= gbrk
    # Every chunk is accounted for, in order, with no gaps.
    heap_chunks = [ch for ch in facts["chunks"] if ch[2] != "mapped"]
    for (a1, s1, _), (a2, _s2, _) in itertools.pairwise(heap_chunks):
        assert a1 + s1 == a2
    # mallinfo: the foreign bytes are not ours.
    span = ((gbrk + 15) & ~15) - our_end
    assert facts["held"] == facts["end"] - facts["base"] - span
    assert facts["arena"] == facts["held"]
    assert facts["system_current"] == facts["arena"] + facts["hblkhd"]
    # Trimming lowers the break only down to our part above the span, never into the C library's.
    assert gbrk <= facts["brk_trimmed"] <= facts["brk_now"]


# ------------------------------------------------------ 9. calloc and M_PERTURB


def test_calloc_is_zero_on_fresh_and_on_dirty_memory() -> None:
    facts = run_child("""
        def nonzero(p, n):
            return n - bytes(libc.memory_view(p, n)).count(0)
        def dirty(p):
            libc.memset(p, 0xAB, malloc.usable_size(p))
        out = {}
        a = malloc.calloc(100, 10)                        # fresh heap top
        out["fresh_heap"] = nonzero(a, malloc.usable_size(a))
        m = malloc.calloc(1, 1 << 20)                     # fresh mapping
        out["fresh_map"] = nonzero(m, malloc.usable_size(m))
        guard = malloc.malloc(16)
        # a cached block, reused
        p = malloc.malloc(100); dirty(p); malloc.free(p)
        q = malloc.calloc(4, 25)
        out["cache_same"] = q == p
        out["cache"] = nonzero(q, malloc.usable_size(q))
        # a binned block, reused
        p = malloc.malloc(5000); g2 = malloc.malloc(16); dirty(p); malloc.free(p)
        q2 = malloc.calloc(1, 5000)
        out["bin_same"] = q2 == p
        out["bin"] = nonzero(q2, malloc.usable_size(q2))
        # a split remainder after a realloc shrink
        p = malloc.malloc(3000); g3 = malloc.malloc(16); dirty(p)
        p = malloc.realloc(p, 100)
        r = malloc.calloc(1, 2000)
        out["split_reused"] = p < r < p + 3000
        out["split"] = nonzero(r, malloc.usable_size(r))
        # a block merged back into the top, then handed out from the top again
        top_start = malloc.allocator.heaps[0].end - malloc.allocator.heaps[0].top_size
        t = malloc.malloc(20000); dirty(t); malloc.free(t)
        t2 = malloc.calloc(2, 10000)
        out["top_same"] = t2 == t == top_start + 16
        out["top"] = nonzero(t2, malloc.usable_size(t2))
        # pages given back with madvise inside a large free chunk, then reused
        big = malloc.malloc(100000); g4 = malloc.malloc(16); dirty(big); malloc.free(big)
        malloc.trim()
        b2 = malloc.calloc(1, 100000)
        out["madvised_same"] = b2 == big
        out["madvised"] = nonzero(b2, malloc.usable_size(b2))
        # the fresh mapping again, after dirtying and freeing
        dirty(m); malloc.free(m)
        m2 = malloc.calloc(1 << 10, 1 << 10)
        out["map_again"] = nonzero(m2, malloc.usable_size(m2))
        malloc.check()
        report(**out)
    """)
    assert facts["fresh_heap"] == 0
    assert facts["fresh_map"] == 0
    assert facts["cache_same"] and facts["cache"] == 0
    assert facts["bin_same"] and facts["bin"] == 0
    assert facts["split_reused"] and facts["split"] == 0
    assert facts["top_same"] and facts["top"] == 0
    assert facts["madvised_same"] and facts["madvised"] == 0
    assert facts["map_again"] == 0


def test_perturb_fills_new_and_freed_blocks() -> None:
    facts = run_child("""
        def pattern(p, lo, hi):
            return sorted(set(bytes(libc.memory_view(p + lo, hi - lo))))
        out = {}
        malloc.mallopt(malloc.M_PERTURB, 0x5A)
        p = malloc.malloc(100)                    # fresh from the top
        out["new"] = pattern(p, 0, 100)
        libc.memset(p, 0x11, malloc.usable_size(p))
        usable = malloc.usable_size(p)
        malloc.free(p)                            # into the fast cache
        out["freed_cached"] = pattern(p, 0, usable)
        p2 = malloc.malloc(100)                   # back from the cache
        out["cache_same"] = p2 == p
        out["new_cached"] = pattern(p2, 0, 100)     # the bytes asked for, as glibc's alloc_perturb
        big = malloc.malloc(5000)
        guard = malloc.malloc(16)
        libc.memset(big, 0x11, 5000)
        malloc.free(big)                          # into a bin: links in its first 16 bytes
        out["freed_binned"] = pattern(big, 16, 4990)
        big2 = malloc.malloc(5000)
        out["binned_same"] = big2 == big
        out["new_binned"] = pattern(big2, 0, 5000)
        m = malloc.malloc(200000)                 # mapped
        out["new_mapped"] = pattern(m, 0, 200000)
        c = malloc.calloc(1, 300)
        out["calloc"] = pattern(c, 0, 300)
        malloc.free(c)
        c2 = malloc.calloc(1, 300)                # from the cache, perturbed when freed
        out["calloc_cached"] = pattern(c2, 0, 300)
        for x in (p2, big2, guard, m, c2):
            malloc.free(x)
        malloc.check()
        report(**out)
    """)
    new, freed = 0x5A ^ 0xFF, 0x5A
    assert facts["new"] == [new]
    assert facts["freed_cached"] == [freed]
    assert facts["cache_same"] and facts["new_cached"] == [new]
    assert facts["freed_binned"] == [freed]
    assert facts["binned_same"] and facts["new_binned"] == [new]
    assert facts["new_mapped"] == [new]
    assert facts["calloc"] == [0]
    assert facts["calloc_cached"] == [0]


def test_defaults_seen_by_a_child() -> None:
    """The children run with glibc's defaults (no MALLOC_* leaks in from the test environment)."""
    facts = run_child("""
        o = malloc.allocator.options
        report(t=o.mmap_threshold, pad=o.top_pad, perturb=o.perturb, threads=libc.thread_count())
    """)
    assert facts == {"t": DEFAULT_MMAP_THRESHOLD, "pad": DEFAULT_TOP_PAD, "perturb": 0, "threads": 1}


def test_a_block_at_the_top_grows_in_place_past_the_mmap_threshold() -> None:
    facts = run_child("""
        p = malloc.malloc(100 << 10)              # the first heap: the block borders the top
        brk0 = libc.current_break()
        with malloc.trace() as calls:
            q = malloc.realloc(p, 600 << 10)      # above the 128 KiB threshold
        report(p=p, q=q, brk0=brk0, brk1=libc.current_break(), names=[e.name for e in calls],
               mapped=len(malloc.allocator.mapped_chunks()))
    """)
    # Moving it to a mapping would copy it and then cost an mremap per page of further growth: it grows in place.
    assert facts["q"] == facts["p"]
    assert facts["names"] == ["sbrk"] and facts["mapped"] == 0
    assert facts["brk1"] - facts["brk0"] >= 500 << 10
