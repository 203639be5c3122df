"""malloc.trace(): each recorded system call matches what /proc/self/maps and the break show around it."""

from __future__ import annotations

from procfs import run_child

import malloc
from malloc.os import events, libc
from malloc.os.libc import PAGE_SIZE as PAGE


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def test_events_match_the_changes_in_the_address_space() -> None:
    facts = run_child("""
        def spans(maps):
            return [(m.start, m.end, m.path) for m in maps]
        steps = []
        for action in ("small", "more", "big", "free big", "free all", "trim"):
            brk0, maps0 = libc.current_break(), MAPS.snapshot()
            with malloc.trace() as calls:
                if action == "small":
                    p = malloc.malloc(200)
                elif action == "more":
                    q = [malloc.malloc(100 << 10) for _ in range(2)]  # below the threshold, more than the top
                elif action == "big":
                    big = malloc.malloc(1 << 20)
                elif action == "free big":
                    malloc.free(big)
                elif action == "free all":
                    malloc.free(q[0]); malloc.free(q[1]); malloc.free(p)
                else:
                    malloc.trim()
            brk1, maps1 = libc.current_break(), MAPS.snapshot()
            steps.append(dict(action=action, brk0=brk0, brk1=brk1, before=spans(maps0), after=spans(maps1),
                              events=[dict(name=e.name, args=list(e.args), result=e.result, reason=e.reason)
                                      for e in calls]))
        report(steps=steps)
    """)
    steps = {s["action"]: s for s in facts["steps"]}
    seen = set()
    for s in steps.values():
        names = [e["name"] for e in s["events"]]
        seen.update(names)
        assert all(e["reason"] for e in s["events"]), s
        moved = sum(e["args"][0] for e in s["events"] if e["name"] == "sbrk")
        # The break moved by exactly what the sbrk events asked for, and nothing else moved it.
        assert s["brk1"] - s["brk0"] == moved, s
        for e in s["events"]:
            if e["name"] == "sbrk":
                assert e["result"] in (s["brk0"], s["brk0"] + sum(
                    x["args"][0] for x in s["events"][:s["events"].index(e)] if x["name"] == "sbrk"))
        heap_after = [span for span in s["after"] if span[2] == "[heap]"]
        if moved:
            assert heap_after and heap_after[0][1] == page_up(s["brk1"]), "the [heap] line ends at the new break"
    assert [e["name"] for e in steps["small"]["events"]] == ["sbrk"]
    assert [e["name"] for e in steps["more"]["events"]] == ["sbrk"]
    (mmap,) = steps["big"]["events"]
    assert mmap["name"] == "mmap"
    start, length = mmap["result"], mmap["args"][1]
    assert not any(lo < start + length and start < hi for lo, hi, _ in steps["big"]["before"])
    assert any(lo <= start and start + length <= hi and path == "" for lo, hi, path in steps["big"]["after"])
    (munmap,) = steps["free big"]["events"]
    assert munmap["name"] == "munmap" and munmap["args"] == [start, length]
    assert not any(lo < start + length and start < hi for lo, hi, _ in steps["free big"]["after"])
    assert steps["free all"]["events"] == [] or all(e["name"] in ("sbrk", "madvise")
                                                    for e in steps["free all"]["events"])
    trimmed = steps["trim"]["events"] + steps["free all"]["events"]
    assert any(e["name"] == "sbrk" and e["args"][0] < 0 for e in trimmed), "the break went back down"
    assert {"sbrk", "mmap", "munmap"} <= seen


def test_no_events_are_kept_outside_a_trace() -> None:
    with malloc.trace() as calls:
        pass
    big = 33 << 20  # mapped whatever threshold earlier tests left (the dynamic one stops at 32 MiB)
    p = malloc.malloc(big)
    malloc.free(p)
    assert calls == []
    with malloc.trace() as outer, malloc.trace() as inner:
        p = malloc.malloc(big)
        malloc.free(p)
    assert [e.name for e in outer] == [e.name for e in inner] == ["mmap", "munmap"]
    assert outer[0].name in ("brk", "sbrk", "mmap", "munmap", "mremap", "madvise")


def test_a_call_owed_to_the_log_is_recorded_once_it_ran_and_dropped_if_it_never_did() -> None:
    # A call made inside a chain of C calls (a shared heap's give-back) is owed: recorded at the next safe
    # point, with the time it was owed at, ahead of later calls.
    ran: list[object] = []
    never: list[object] = []
    with malloc.trace() as calls:
        events.owe("madvise", (0x1000, 4096, libc.MADV_REMOVE), ran, 1, "owed, then run")
        ran[:] = [None, 0]  # what the chain leaves: the call's result at index 1
        events.owe("madvise", (0x2000, 4096, libc.MADV_REMOVE), never, 1, "owed, never run")
        big = malloc.malloc(33 << 20)  # mapped: a call recorded at once
        malloc.free(big)
    assert [(e.name, e.args[0], e.reason) for e in calls[:2]] == [("madvise", 0x1000, "owed, then run"),
                                                                   ("mmap", 0, calls[1].reason)]
    assert calls[0].result == 0 and calls[0].time < calls[1].time
    assert not any(e.reason == "owed, never run" for e in calls) and events.owed == []
    ran2: list[object] = []
    with malloc.trace() as calls:
        events.owe("madvise", (0x3000, 4096, libc.MADV_REMOVE), ran2, 1, "owed, run at the end")
        ran2[:] = [None, -1]
    assert [(e.args[0], e.result) for e in calls] == [(0x3000, -1)]  # settled when the trace ends


def test_owed_calls_do_not_pile_up_where_nothing_else_is_recorded() -> None:
    for i in range(1000):
        events.owe("madvise", (0x1000 * (i + 1), 4096, libc.MADV_REMOVE), [None, 0], 1, "owed")
    assert len(events.owed) == 1
    events.settle_owed()
    assert events.owed == []
