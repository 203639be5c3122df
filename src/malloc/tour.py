"""The tour: how malloc gets memory from the OS, shown live in this process and checked as it goes.

Each section does something real (allocates, frees, trims), prints the system calls it caused with
their reasons and what /proc/self/maps and the program break show, and states claims that are checked
against what was just measured. A claim that does not hold is printed as FAILED and makes the tour's
exit status non-zero; nothing is assumed. `run` also returns a JSON-ready record of every section: its
events, facts and claims.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from . import M_MMAP_THRESHOLD, allocator, free, malloc, mallopt, trim, view
from .inspect import aslr, maps
from .layout import HEADER, MIN_CHUNK, OVERHEAD
from .options import DEFAULT_MMAP_THRESHOLD
from .os import libc
from .os.events import Event, Recorder
from .units import size_approx, size_text

Json = dict[str, Any]

RULE_OF_THUMB = 32 * 1024  # the mmap threshold as often quoted (a 32 KiB figure, fixed)


class Tour:
    """The running tour: prints with `out`, keeps the record, counts failed claims."""

    def __init__(self, out: Callable[[str], None], pause: Callable[[], None] | None, color: bool) -> None:
        self.out = out
        self.pause = pause
        self.color = color
        self.sections: list[Json] = []
        self.failed = 0
        self._section: Json = {}

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    @contextmanager
    def section(self, title: str) -> Iterator[Json]:
        """A numbered section; yields its `facts` dict for the record."""
        if self.sections and self.pause is not None:
            self.pause()
        self._section = {"title": title, "events": [], "claims": [], "facts": {}}
        self.sections.append(self._section)
        self.out("")
        self.out(self._paint(f"{len(self.sections)}. {title}", "1"))
        yield self._section["facts"]

    def say(self, text: str) -> None:
        self.out(f"   {text}")

    def calls(self, events: list[Event]) -> None:
        """Print the system calls and keep them in the section's record."""
        for e in events:
            self._section["events"].append(asdict(e))
            self.out(self._paint(f"     {e.text()}", "36"))
            self.out(self._paint(f"       why: {e.reason}", "2"))
        if not events:
            self.out(self._paint("     (no system call)", "2"))

    def claim(self, ok: bool, text: str) -> None:
        self._section["claims"].append({"ok": ok, "text": text})
        mark = self._paint("[ok]", "32") if ok else self._paint("[FAILED]", "31;1")
        self.out(f"   {mark} {text}")
        self.failed += not ok

    def record(self) -> Json:
        return {"ok": self.failed == 0, "failed": self.failed, "sections": self.sections}


def _area(address: int) -> maps.Area | None:
    """The classified mapping of this process that holds `address`, read now."""
    return maps.address_map().area_of(address)


def _where(address: int) -> str:
    a = _area(address)
    if a is None:
        return "unmapped"
    return f"{a.start:#x}-{a.end:#x} {a.mapping.perms} {a.mapping.pathname or '(anonymous)'} ({size_approx(a.size)})"


def _in_heap_segment(address: int) -> bool:
    a = _area(address)
    return a is not None and a.kind == "heap"


_MMAP_KINDS = {"library", "anonymous", "file", "shm", "other"}
_MMAP_AREA = "mmap area: shared libraries, files and anonymous mappings"


def _layout(amap: maps.AddressMap) -> list[tuple[int, int, str]]:
    """The map in a few lines, highest first: (start, end, what); a run of library or anonymous mappings
    between the heap and the stack is one line (the mmap area)."""
    rows: list[tuple[int, int, str]] = []
    for a in sorted(amap.areas, key=lambda a: a.start, reverse=True):
        what = _MMAP_AREA if a.kind in _MMAP_KINDS else f"{a.kind:<6} {a.name}"
        if rows and rows[-1][2] == what:
            rows[-1] = (a.start, rows[-1][1], what)
        else:
            rows.append((a.start, a.end, what))
    return rows


def _past_the_top(n: int) -> tuple[int, list[int], list[Event]]:
    """malloc(n) with the main heap's top used up first, so that it must come from the OS (a request the top
    can serve never reaches the OS, mapped or not): (block, blocks to free with it, system calls it made)."""
    held = []
    heap = allocator.heaps[0]
    spare = heap.top_size - MIN_CHUNK
    if spare >= MIN_CHUNK:
        held.append(malloc(spare - OVERHEAD))  # one block takes the whole top but its minimum
    with Recorder() as calls:
        p = malloc(n)
    return p, held, calls


def address_space(t: Tour) -> None:
    with t.section("The address space of this process") as facts:
        t.say("This is the python process running the tour, from /proc/self/maps, highest addresses first")
        t.say("(`malloc maps` draws every line of it):")
        amap = maps.address_map()
        brk = libc.current_break()
        for lo, hi, what in _layout(amap):
            t.out(f"     {lo:#014x}-{hi:#014x} {size_approx(hi - lo):>9}  {what}")
            if what.startswith("heap"):
                t.out(f"     {'':31}program break at {brk:#x}")
        kinds = {a.kind: a for a in amap.areas}
        if "heap" in kinds:
            t.say(f"[heap] already holds {size_approx(brk - kinds['heap'].start)}: the interpreter's own objects, "
                  "from the C library's malloc,")
            t.say("which shares the program break with this allocator: our heap will begin where the break is now.")
        facts["break"] = brk
        facts["areas"] = [{"start": a.start, "end": a.end, "kind": a.kind, "name": a.name} for a in amap.areas]
        heap, stack, text = kinds.get("heap"), kinds.get("stack"), kinds.get("text")
        t.claim(heap is not None and heap.start <= brk <= heap.end,
                f"the program break {brk:#x} is the end of the [heap] segment: sbrk moves it")
        if heap is not None and stack is not None and text is not None:
            t.claim(text.start < heap.start < stack.start,
                    "the program's text lies lowest, the heap above it, the stack at the top; "
                    "mappings (libraries, large blocks) go in between, below the stack")


def small_requests(t: Tour) -> None:
    with t.section("Small requests: the heap grows by moving the program break") as facts:
        before = libc.current_break()
        with Recorder() as calls:
            p = malloc(200)
        after = libc.current_break()
        t.say(f"malloc(200) -> {p:#x}")
        t.calls(calls)
        t.say(f"break {before:#x} -> {after:#x}")
        t.say(f"the block lies in {_where(p)}")
        sbrks = [e for e in calls if e.name == "sbrk"]
        facts["first"] = {"address": p, "break_before": before, "break_after": after}
        t.claim(bool(sbrks) == (after != before), "the break moved exactly when an sbrk was made")
        t.claim(_in_heap_segment(p), "the block lies in the [heap] segment")
        if sbrks:
            t.claim(sbrks[0].args[0] > 100_000,
                    f"sbrk asked for {size_text(sbrks[0].args[0])}, not 200 bytes: glibc's rule adds a top pad "
                    f"of {size_text(allocator.options.top_pad)} so that the next requests need no system call")
        view(p)[:12] = b"hello, heap!"
        t.claim(bytes(view(p, 12)) == b"hello, heap!", "the block holds what was written into it")

        t.say("Now 4 KiB blocks, one after another, until the heap has to grow again:")
        blocks = []
        with Recorder() as calls:
            while not any(e.name in ("sbrk", "mmap") for e in calls):
                before = libc.current_break()
                blocks.append(malloc(4096))
        after = libc.current_break()
        served = len(blocks) - 1
        t.say(f"{served} requests were served from the top of the heap; request {served + 1} needed more:")
        t.calls(calls)
        t.say(f"break {before:#x} -> {after:#x} (+{size_approx(after - before)})")
        moved = [e for e in calls if e.name == "sbrk"]
        facts["growth"] = {"served_from_top": served, "break_before": before, "break_after": after,
                           "events": [asdict(e) for e in calls]}
        t.claim(served > 10 and bool(moved) and after - before >= moved[0].args[0],
                f"{served} blocks came without a system call, then one sbrk moved the break up")
        t.claim(_in_heap_segment(blocks[-1]), "the new block lies in the grown [heap] segment")
        for b in blocks:
            free(b)
        free(p)


def reuse(t: Tour) -> None:
    with t.section("Freed memory is reused before anything is asked of the OS") as facts:
        facts["reuse"] = []
        for size, where in ((100, "the fast cache (like glibc's tcache)"), (5000, "the heap's bins")):
            p = malloc(size)
            guard = malloc(16)  # keeps the freed block from merging into the top
            free(p)
            with Recorder() as calls:
                q = malloc(size)
            t.say(f"malloc({size}) -> {p:#x}; free it; malloc({size}) again -> {q:#x}, from {where}")
            t.calls(calls)
            facts["reuse"].append({"size": size, "address": p, "again": q, "events": [asdict(e) for e in calls]})
            t.claim(q == p and not calls, f"the same address came back from {where}, with no system call")
            free(q)
            free(guard)


def threshold_sweep(t: Tour) -> None:
    with t.section("Where is the line between heap and mapping? A sweep of request sizes") as facts:
        threshold = allocator.options.mmap_threshold
        t.say("Each request below is made with the heap's top used up, so it must come from the OS;")
        t.say("the system call it causes shows which path it took.")
        live: list[int] = []

        def path_of(n: int) -> str:
            p, held, calls = _past_the_top(n)
            live.extend([p, *held])
            if any(e.name == "mmap" for e in calls):
                return "mmap"
            return "heap" if any(e.name == "sbrk" for e in calls) else "top"

        rows = []
        for n in (16 << 10, 32 << 10, 64 << 10, 100 << 10, 127 << 10, 128 << 10, 256 << 10, 1 << 20):
            rows.append((n, path_of(n)))
            t.say(f"  malloc({size_text(n):>8}) -> {'its own mapping' if rows[-1][1] == 'mmap' else 'the heap'}")
        # Bisect for the smallest request that gets a mapping.
        lo, hi = 64 << 10, 1 << 20
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if path_of(mid) == "mmap":
                hi = mid
            else:
                lo = mid
        smallest = hi
        chunk = smallest + OVERHEAD + 15 & ~15
        t.say(f"bisection: the smallest request given a mapping is {smallest} bytes: with the 8-byte size header,")
        t.say(f"rounded to 16, that is a {chunk}-byte chunk, the threshold of {size_text(threshold)} exactly.")
        facts["sweep"] = [{"size": n, "path": p} for n, p in rows]
        facts["smallest_mapped"] = smallest
        facts["threshold"] = threshold
        t.claim(chunk == threshold and (smallest - 1 + OVERHEAD + 15 & ~15) < threshold,
                "requests whose chunk reaches the threshold are mapped; all smaller ones come from the heap")
        t.claim(all((p == "mmap") == (n + OVERHEAD + 15 & ~15 >= threshold) for n, p in rows),
                "every size in the sweep went the way the threshold says")
        t.claim(threshold != RULE_OF_THUMB and rows[1][1] != "mmap",
                f"the rule of thumb of a {size_text(RULE_OF_THUMB)} threshold does not hold here: glibc's default "
                f"is {size_text(threshold)}, and a 32 KiB request came from the heap")
        for p in live:
            free(p)
        raised = allocator.options.mmap_threshold
        t.say(f"All freed: freeing the mapped ones raised the threshold to {size_approx(raised)} (see below).")
        facts["threshold_after_free"] = raised


def large_requests(t: Tour) -> None:
    with t.section("A large request gets a mapping of its own, and free unmaps it") as facts:
        threshold = allocator.options.mmap_threshold
        with Recorder() as calls:
            big = malloc(4 << 20)
        t.say(f"malloc(4 MiB) -> {big:#x}; the mmap threshold is now {size_text(threshold)}")
        t.calls(calls)
        region = _area(big)
        t.say(f"the block lies in {_where(big)}")
        mmaps = [e for e in calls if e.name == "mmap"]
        t.claim(bool(mmaps) and region is not None and region.kind == "anonymous"
                and region.start <= mmaps[0].result < region.end,
                "a new anonymous mapping holds it, outside [heap]")
        if mmaps:
            t.claim(mmaps[0].args[1] % libc.PAGE_SIZE == 0 and mmaps[0].args[1] >= (4 << 20) + HEADER,
                    f"the mapping is {mmaps[0].args[1]} bytes: the request plus a 16-byte header, in whole pages")
        with Recorder() as calls:
            free(big)
        t.say("free it:")
        t.calls(calls)
        still = _area(mmaps[0].result) if mmaps else None
        facts["mapping"] = {"address": big, "mmap": [asdict(e) for e in mmaps],
                            "munmap": [asdict(e) for e in calls if e.name == "munmap"]}
        t.claim(any(e.name == "munmap" for e in calls) and (still is None or region is None
                                                            or (still.start, still.end) != (region.start, region.end)),
                "free unmapped it at once: the mapping is gone from /proc/self/maps")


def moving_threshold(t: Tour) -> None:
    with t.section("The threshold moves: glibc's dynamic rule, and mallopt") as facts:
        now = allocator.options.mmap_threshold
        t.say(f"It began at {size_text(DEFAULT_MMAP_THRESHOLD)}. Each free of a mapped chunk larger than the threshold")
        t.say(f"raised it to that chunk's size (up to 32 MiB): it is {size_approx(now)} now, and the trim threshold")
        t.say(f"{size_approx(allocator.options.trim_threshold)}. A program that frees large blocks is taken to reuse "
              "them, so they now stay in the heap.")
        t.claim(now > 4 << 20 and allocator.options.trim_threshold == 2 * now,
                "freeing the 4 MiB mapped chunk raised the threshold to its size, and the trim threshold to twice that")
        p, held, calls = _past_the_top(2 << 20)
        t.say("malloc(2 MiB), mapped at the start of the tour, now:")
        t.calls(calls)
        t.claim(_in_heap_segment(p) and not any(e.name == "mmap" for e in calls),
                "a 2 MiB request grows the heap instead of getting a mapping")
        for b in (p, *held):
            free(b)
        mallopt(M_MMAP_THRESHOLD, 64 << 10)
        q, held, calls = _past_the_top(100 << 10)
        t.say("mallopt(M_MMAP_THRESHOLD, 64 KiB), then malloc(100 KiB):")
        t.calls(calls)
        t.claim(any(e.name == "mmap" for e in calls), "after mallopt sets it, a 100 KiB request gets its own mapping")
        for b in (q, *held):
            free(b)
        facts["thresholds"] = {"start": DEFAULT_MMAP_THRESHOLD, "raised": now, "set": allocator.options.mmap_threshold}
        t.claim(allocator.options.mmap_threshold == 64 << 10 and not allocator.options.dynamic,
                "freeing that mapped chunk did not move it: setting it with mallopt turned the dynamic rule off")


def trimming(t: Tour) -> None:
    with t.section("Giving memory back: trim") as facts:
        blocks = [malloc(64 << 10) for _ in range(8)]
        peak = libc.current_break()
        for b in blocks:
            free(b)
        heap = allocator.heaps[0]
        t.say(f"8 blocks of 64 KiB, freed: the top of the heap is now {size_approx(heap.top_size)} of free memory")
        with Recorder() as calls:
            released = trim()
        now = libc.current_break()
        t.say("malloc.trim():")
        t.calls(calls)
        t.say(f"break {peak:#x} -> {now:#x}")
        facts["trim"] = {"break_before": peak, "break_after": now, "released": released}
        if any(e.name == "sbrk" and e.args[0] < 0 for e in calls):
            t.claim(released and now < peak, f"a negative sbrk moved the break down by {size_approx(peak - now)}")
        else:
            t.claim(released and any(e.name == "madvise" for e in calls) and (now != heap.end
                                                                               or libc.thread_count() > 1),
                    "the C library's own memory lies above the heap now (or threads run), so the break cannot go "
                    "down; the free pages went back with madvise(MADV_DONTNEED) instead")
        info = allocator.mallinfo()
        t.say(f"held from the OS now {size_approx(info.system_current)}, at most {size_approx(info.system_max)}")


def randomisation(t: Tour, runs: int) -> None:
    with t.section("ASLR: every process gets its own layout") as facts:
        setting = aslr.randomize_va_space()
        samples = aslr.sample(runs)
        t.say(f"{runs} fresh processes, each reporting where its parts landed:")
        for line in aslr.render_text(samples, setting).splitlines():
            t.out(f"     {line}")
        moved = aslr.moved(samples)
        facts["aslr"] = aslr.to_json(samples, setting)
        if setting == 2:
            t.claim(all(moved.values()), "with randomize_va_space = 2, every base moved between runs: "
                    + ", ".join(name for name, m in moved.items() if m))
        elif setting == 1:
            t.claim(moved.get("stack", False) and moved.get("mmap", False),
                    "with randomize_va_space = 1, the stack and the mmap area moved (the heap need not)")
        else:
            t.claim(not any(moved.values()), "with randomisation off, nothing moved")


def run(out: Callable[[str], None] = print, *, step: bool = False, color: bool = False, aslr_runs: int = 4) -> Tour:
    """Run the whole tour, printing with `out`; the returned Tour holds the record and the failures."""

    def pause() -> None:
        out("   -- press Enter for the next section --")
        sys.stdin.readline()  # the prompt goes where the narration goes, never into a JSON record on stdout

    t = Tour(out, pause if step else None, color)
    out("How malloc gets memory from the OS: a live tour, in this process, on this machine.")
    for section in (address_space, small_requests, reuse, threshold_sweep, large_requests, moving_threshold,
                    trimming):
        section(t)
    randomisation(t, aslr_runs)
    out("")
    out("Every claim held." if not t.failed else f"{t.failed} claim(s) FAILED.")
    return t
