"""The tour: how malloc gets memory from the OS, shown live in this process and checked as it goes.

Each section does something real (allocates, frees, trims), prints the system calls it caused with
their reasons and what /proc/self/maps and the program break show, and states claims that are checked
against what was just measured. A claim that does not hold is printed as FAILED and makes the tour's
exit status non-zero; nothing is assumed. `run` also returns a JSON-ready record of every section: its
events, facts and claims. What it cannot do in this process (a fault, fresh layouts) it does in child
processes it starts and waits for. It shows glibc's default settings and refuses to run under others.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from . import M_MMAP_THRESHOLD, allocator, free, malloc, mallopt, trim, view
from .inspect import aslr, fault, maps
from .layout import HEADER, MIN_CHUNK, OVERHEAD
from .options import DEFAULT_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX, Options
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
        self.settings: Json = {}

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
        return {"ok": self.failed == 0, "failed": self.failed, "settings": self.settings, "sections": self.sections}


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


def _signal_name(returncode: int) -> str | None:
    """The signal that killed a child with this returncode (-N: signal N), if one did."""
    try:
        return signal.Signals(-returncode).name if returncode < 0 else None
    except ValueError:
        return f"signal {-returncode}"


def own_address_space(t: Tour) -> None:
    with t.section("Each process has its own address space; an address no mapping covers is a fault") as facts:
        mine = b"only in this process"
        buffer = ctypes.create_string_buffer(mine)  # the C library's memory: this allocator's heap is not begun yet
        p = ctypes.addressof(buffer)
        t.say(f"This process holds {mine.decode()!r} at {p:#x}. A fresh python process, started now, reads its")
        t.say("own /proc/self/maps; then it looks at the same address, and reads one in its largest unmapped gap:")
        report = fault.touch_unmapped(p, len(mine))
        gap = report.gap
        seen = ("nothing: no mapping of its covers that address" if report.ours_mapping is None
                else f"{report.ours_bytes!r}, in its own {report.ours_mapping.pathname or 'anonymous'} mapping"
                if report.ours_bytes is not None else f"an unreadable mapping ({report.ours_mapping.perms})")
        t.say(f"child {report.pid}: at {p:#x} it finds {seen}")
        t.say(f"child {report.pid}: its map leaves {gap.start:#x}-{gap.end:#x} unmapped "
              f"({size_approx(gap.size)}); it reads {report.address:#x}, in the middle")
        died = _signal_name(report.returncode)
        status = f"killed by {died}" if died else f"exit status {report.returncode}"
        t.say(f"child {report.pid}: {status} (returncode {report.returncode})"
              + (f", after printing {report.stdout!r}" if report.stdout else ""))
        facts["fault"] = {"pid": report.pid, "ours": p, "ours_in_child": None if report.ours_bytes is None
                          else report.ours_bytes.hex(), "gap": {"start": gap.start, "end": gap.end},
                          "address": report.address, "returncode": report.returncode,
                          "signal": died,
                          "stderr": report.stderr}
        t.claim(report.ours_bytes != mine,
                f"the child does not see this process's bytes at {p:#x}: the same address, another address space")
        t.claim(gap.start <= report.address < gap.end and report.returncode == -signal.SIGSEGV
                and not report.stdout,
                "reading an address that no mapping of the child covers killed it with SIGSEGV (a fault: the "
                "kernel found no mapping for the page)")


def _bss(path: str, mappings: list[maps.Mapping]) -> maps.Bss | None:
    """The bss of the file at `path` as mapped in this process (from its last writable file mapping)."""
    writable = [m for m in mappings if m.path == path and m.perms == "rw-p" and m.inode]
    return maps.bss_of(writable[-1], mappings) if writable else None


def _base_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _page_up(address: int) -> int:
    return (address + libc.PAGE_SIZE - 1) & ~(libc.PAGE_SIZE - 1)


def zero_data(t: Tour) -> None:
    with t.section("Zero-initialised data (bss): a place in the layout, no bytes in the file") as facts:
        t.say("C globals that start as zero take no room in a program's file: the ELF program headers give the")
        t.say("last (data) segment a memory size beyond its file size, and the loader supplies the zeros.")
        mappings = maps.read_maps()
        amap = maps.address_map()
        exe = amap.exe
        shown: list[maps.Bss] = []
        exe_bss = _bss(exe, mappings)
        if exe_bss is not None:
            shown.append(exe_bss)
        else:
            t.say(f"The executable's ELF headers ({exe or 'no path'}) cannot be read: a library's bss, then.")
        if exe_bss is None or exe_bss.end <= _page_up(exe_bss.start):
            # The executable's bss fits in the page its data ends in: show a library's, which has a mapping.
            libraries = sorted({m.path for m in mappings if "x" in m.perms and m.inode and m.path != exe},
                               key=lambda path: ("libpython" not in path, "libc.so" not in path, path))
            for path in libraries:
                bss = _bss(path, mappings)
                if bss is not None and bss.end > _page_up(bss.start):
                    shown.append(bss)
                    break
        facts["bss"] = []
        for bss in shown:
            if bss is not exe_bss and exe_bss is not None:
                t.say(f"A bss larger than the rest of that page gets a mapping of its own: "
                      f"{_base_name(bss.path)}'s, here.")
            own = bss.end > _page_up(bss.start)
            area = amap.area_of(bss.end - 1)
            t.say(f"{_base_name(bss.path)}{' (the executable)' if bss.path == exe else ''}: its data segment ends at "
                  f"file offset {bss.offset:#x} ({bss.start:#x} in memory),")
            t.say(f"  but in memory it runs on to {bss.end:#x}:")
            if own and area is not None:
                t.say(f"  a bss of {size_approx(bss.size)}: the rest of its data's last page, then the mapping")
                t.say(f"  {area.start:#x}-{area.end:#x} {area.mapping.perms} that /proc/self/maps shows after the "
                      f"file's data ({area.name})")
            else:
                t.say(f"  a bss of {size_text(bss.size)}, inside the page its data ends in: no mapping of its own")
            record: Json = {"path": bss.path, "start": bss.start, "end": bss.end, "file_offset": bss.offset,
                            "own_mapping": own}
            facts["bss"].append(record)
            if own:
                t.claim(area is not None and area.kind in ("bss", "library") and "(bss)" in area.name
                        and area.mapping.anonymous and area.start == _page_up(bss.start),
                        f"/proc/self/maps shows {_base_name(bss.path)}'s bss where its ELF headers put it: an "
                        "anonymous writable mapping that begins where the file's data mapping ends")
                _bss_reads_zero(t, bss, area, record)
            else:
                _page_past_the_data_reads_zero(t, bss, record)
        _where_the_code_is(t, amap, facts)


def _bss_reads_zero(t: Tour, bss: maps.Bss, area: maps.Area | None, record: Json) -> None:
    """The bss's bytes now, and its pages the process never touched: each reads as zero."""
    lo, hi = _page_up(bss.start), min(bss.end & ~(libc.PAGE_SIZE - 1), area.end if area else 0)
    touched = maps.read_touched(lo, hi) if hi > lo else []  # first: reading a page touches it
    zeros = ctypes.string_at(bss.start, bss.size).count(0)
    untouched = [lo + i * libc.PAGE_SIZE for i, used in enumerate(touched) if not used]
    zero_pages = [a for a in untouched if ctypes.string_at(a, libc.PAGE_SIZE).count(0) == libc.PAGE_SIZE]
    t.say(f"  {zeros:,} of its {bss.size:,} bytes read as zero now (the program has set the others since it started);")
    t.say(f"  {len(untouched)} of its {len(touched)} whole pages were never touched (/proc/self/pagemap): no memory is "
          "behind them yet.")
    record.update(zero_bytes=zeros, pages=len(touched), untouched_pages=len(untouched),
                  untouched_zero_pages=len(zero_pages))
    if untouched:
        t.claim(len(zero_pages) == len(untouched),
                f"each of the {len(untouched)} untouched pages reads as {libc.PAGE_SIZE} zero bytes: the kernel "
                "supplies zero-filled memory on first use")


def _page_past_the_data_reads_zero(t: Tour, bss: maps.Bss, record: Json) -> None:
    """The rest of the page the file's data ends in: zeros in memory, whatever the file holds at those offsets."""
    length = _page_up(bss.start) - bss.start
    memory = ctypes.string_at(bss.start, length)
    with open(bss.path, "rb") as f:
        f.seek(bss.offset)
        in_file = f.read(length)
    past = memory[bss.size:]  # past the bss too: no variable lives there, so the program never writes it
    nonzero_in_file = sum(1 for b in in_file if b)
    t.say(f"  The {length} bytes from {bss.start:#x} to the end of that page (its bss, then the page's rest): "
          f"{memory.count(0)} read as zero;")
    t.say(f"  the file holds {nonzero_in_file} non-zero bytes at offsets {bss.offset:#x}-{bss.offset + length:#x} "
          "(what follows the data in the file).")
    record.update(page_tail=length, page_tail_zero_bytes=memory.count(0), page_tail_nonzero_in_file=nonzero_in_file)
    if past:
        t.claim(past.count(0) == len(past),
                f"the {len(past)} bytes past its data and bss in that page read as zero: the loader zero-fills "
                "the page past the file's data; it does not leave the file's bytes there")


def _where_the_code_is(t: Tour, amap: maps.AddressMap, facts: Json) -> None:
    """Which file holds the interpreter's code: the executable, or libpython."""
    function = ctypes.cast(ctypes.pythonapi.PyObject_Malloc, ctypes.c_void_p).value or 0
    holder = amap.area_of(function)
    exe_text = sum(a.size for a in amap.areas if a.kind == "text")
    facts["code"] = {"PyObject_Malloc": function, "in": holder.mapping.path if holder else None,
                     "executable_text": exe_text}
    if holder is None:
        t.claim(False, f"PyObject_Malloc at {function:#x} lies in a mapping")
        return
    text = sum(a.size for a in amap.areas if a.mapping.path == holder.mapping.path and "x" in a.mapping.perms)
    facts["code"]["text"] = text
    t.say(f"The interpreter's code: PyObject_Malloc, one of its functions, is at {function:#x}, in "
          f"{_base_name(holder.mapping.path)} ({size_approx(text)} of code).")
    if holder.mapping.path == amap.exe:
        t.claim(holder.kind == "text", f"the interpreter is linked into the executable: its text is "
                                       f"{size_approx(exe_text)}, and holds the interpreter's functions")
    else:
        t.say(f"The executable's own text is only {size_approx(exe_text)}: its main() calls into "
              f"{_base_name(holder.mapping.path)}, a shared library.")
        t.claim(holder.kind == "library" and exe_text < text,
                f"the executable's text ({size_approx(exe_text)}) is tiny because the interpreter's code lives in "
                f"{_base_name(holder.mapping.path)} ({size_approx(text)})")


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
        # Bisect for the smallest request that gets a mapping: no request of 0 bytes is mapped.
        lo, hi = 0, 1 << 20
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
        t.claim(threshold == DEFAULT_MMAP_THRESHOLD != RULE_OF_THUMB and rows[1][1] != "mmap",
                f"the rule of thumb of a {size_text(RULE_OF_THUMB)} threshold does not hold here: glibc's default "
                f"is {size_text(DEFAULT_MMAP_THRESHOLD)}, and a 32 KiB request came from the heap")
        for p in live:
            free(p)
        raised = allocator.options.mmap_threshold
        t.say(f"All freed: freeing the mapped ones raised the threshold to {size_text(raised)} (see below).")
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
        t.say(f"raised it to that chunk's size (up to {size_text(DEFAULT_MMAP_THRESHOLD_MAX)}): it is {size_text(now)} "
              f"now, and the trim threshold {size_text(allocator.options.trim_threshold)}.")
        t.say("A program that frees large blocks is taken to reuse them, so they now stay in the heap.")
        t.claim(now > 4 << 20 and allocator.options.trim_threshold == 2 * now,
                "freeing the 4 MiB mapped chunk raised the threshold to its size, and the trim threshold to twice that")
        p, held, calls = _past_the_top(2 << 20)
        t.say(f"malloc(2 MiB), which the starting threshold of {size_text(DEFAULT_MMAP_THRESHOLD)} would have mapped "
              "(as it mapped the sweep's 1 MiB), now:")
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
        heap = allocator.heaps[0]
        top_before, break_before = heap.top_size, libc.current_break()
        blocks = [malloc(64 << 10) for _ in range(8)]
        top_taken = heap.top_size
        peak = libc.current_break()
        for b in blocks:
            free(b)
        top_freed = heap.top_size
        t.say(f"The top of the heap holds {size_approx(top_before)} of free memory (blocks freed earlier in the tour "
              "merged into it). 8 blocks of 64 KiB")
        grew = f" (the break moved up {size_approx(peak - break_before)} for them)" if peak != break_before else ""
        t.say(f"taken from it leave {size_approx(top_taken)}{grew}; freed, they merge back: "
              f"{size_approx(top_freed)} of free memory at the top")
        with Recorder() as calls:
            released = trim()
        now = libc.current_break()
        t.say("malloc.trim():")
        t.calls(calls)
        t.say(f"break {peak:#x} -> {now:#x}")
        facts["trim"] = {"break_before": peak, "break_after": now, "released": released}
        facts["top"] = {"before": top_before, "with_blocks": top_taken, "after_free": top_freed}
        if any(e.name == "sbrk" and e.args[0] < 0 for e in calls):
            t.claim(released and now < peak, f"a negative sbrk moved the break down by {size_approx(peak - now)}")
        else:
            t.claim(released and any(e.name == "madvise" for e in calls) and (now != heap.end
                                                                               or libc.thread_count() > 1),
                    "the C library's own memory lies above the heap now (or threads run), so the break cannot go "
                    "down; the free pages went back with madvise(MADV_DONTNEED) instead")
        info = allocator.mallinfo()
        t.say(f"held from the OS now {size_approx(info.system_current)}, at most {size_approx(info.system_max)}")


def pinned_block(t: Tour) -> None:
    with t.section("Why large blocks get mappings: a free block under a live one cannot go back through brk") as facts:
        large, small = 1 << 20, 1000
        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX)
        t.say(f"mallopt(M_MMAP_THRESHOLD, {size_text(DEFAULT_MMAP_THRESHOLD_MAX)}): the heap serves even large "
              "requests now.")
        big = malloc(large)
        view(big, large)[:] = b"\xff" * large
        held = []
        above = malloc(small)
        while above < big:  # a free chunk below served it: take the next from the top
            held.append(above)
            above = malloc(small)
        before = libc.current_break()
        t.say(f"malloc({size_text(large)}) -> {big:#x}, then malloc({small}) -> {above:#x}, above it; "
              f"the break is {before:#x}")
        with Recorder() as calls:
            free(big)
        t.say(f"free the {size_text(large)} block:")
        t.calls(calls)
        after_free = libc.current_break()
        t.claim(_in_heap_segment(big) and _in_heap_segment(above) and not calls and after_free == before,
                f"both blocks lie in [heap]; freeing the {size_text(large)} one made no system call: the break "
                f"stays at {after_free:#x}, above the block still in use")
        with Recorder() as calls:
            trim()
        after_trim = libc.current_break()
        t.say("malloc.trim():")
        t.calls(calls)
        t.say(f"break {after_free:#x} -> {after_trim:#x}")
        chunk = big - HEADER
        inside = [e for e in calls if e.name == "madvise" and e.args[0] < big + large and e.args[0] + e.args[1] > big
                  and e.args[0] + e.args[1] <= above - HEADER]
        gone = [maps.read_touched(e.args[0], e.args[0] + e.args[1]) for e in inside]  # before reading them
        zero = [ctypes.string_at(e.args[0], e.args[1]).count(0) == e.args[1] for e in inside]
        facts["heap_block"] = {"address": big, "size": large, "above": above, "above_size": small,
                               "break_before": before, "break_after_free": after_free, "break_after_trim": after_trim,
                               "events": [asdict(e) for e in calls],
                               "madvise_inside": [asdict(e) for e in inside],
                               "madvised_pages_in_memory": sum(sum(g) for g in gone), "madvised_read_zero": all(zero)}
        t.claim(bool(inside) and after_trim >= above + small and _in_heap_segment(big),
                f"the break stayed above the live block; trim could only madvise the whole pages inside the free "
                f"chunk at {chunk:#x}, whose address space stays in [heap]")
        t.claim(bool(inside) and not any(any(g) for g in gone) and all(zero),
                "those pages went back: /proc/self/pagemap shows none of them in memory, and they read as zero "
                "(the block held 0xff bytes)")
        for b in (above, *held):
            free(b)
        trim()  # the free chunk goes back into the top, so that the next request cannot reuse it

        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
        t.say("Both freed (and trimmed). The same with mallopt(M_MMAP_THRESHOLD, "
              f"{size_text(DEFAULT_MMAP_THRESHOLD)}), glibc's starting value:")
        mapped, held, calls = _past_the_top(large)
        above = malloc(small)
        t.say(f"malloc({size_text(large)}) -> {mapped:#x}, with the heap's top used up first:")
        t.calls(calls)
        t.say(f"malloc({small}) -> {above:#x}")
        mmaps = [e for e in calls if e.name == "mmap"]
        region = _area(mapped)
        with Recorder() as calls:
            free(mapped)
        t.say(f"free the {size_text(large)} block:")
        t.calls(calls)
        munmaps = [e for e in calls if e.name == "munmap"]
        still = _area(mapped)
        facts["mapped_block"] = {"address": mapped, "size": large, "above": above,
                                 "mmap": [asdict(e) for e in mmaps], "munmap": [asdict(e) for e in munmaps]}
        t.claim(bool(mmaps) and bool(munmaps) and munmaps[0].args == (mmaps[0].result, mmaps[0].args[1])
                and region is not None and (still is None or (still.start, still.end) != (region.start, region.end)),
                "free gave its mapping back at once (munmap of the range mmap returned), though a block "
                "allocated after it is still in use")
        for b in (above, *held):
            free(b)
        t.say("So glibc maps large blocks: a mapped block goes back to the OS whole the moment it is freed, while")
        t.say("a block in the heap goes back through brk only when everything above it is free too.")


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

    if allocator.options != Options():
        raise RuntimeError(f"the tour shows glibc's default settings, and this process's allocator has others "
                           f"({allocator.options}): run `malloc tour`, which starts without MALLOC_*_ variables")
    t = Tour(out, pause if step else None, color)
    out("How malloc gets memory from the OS: a live tour, in this process, on this machine.")
    o = allocator.options
    t.settings = asdict(o)
    out(f"Settings: glibc's defaults: mmap threshold {size_text(o.mmap_threshold)} (it moves: see below), "
        f"trim threshold {size_text(o.trim_threshold)}, top pad {size_text(o.top_pad)}.")
    for section in (address_space, own_address_space, zero_data, small_requests, reuse, threshold_sweep,
                    large_requests, moving_threshold, trimming, pinned_block):
        section(t)
    randomisation(t, aslr_runs)
    out("")
    out("Every claim held." if not t.failed else f"{t.failed} claim(s) FAILED.")
    return t
