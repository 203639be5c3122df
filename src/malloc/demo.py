"""A short, live demonstration: how this allocator gets memory from the OS, on this machine, now.

Every claim it prints is checked against what it just measured; a claim that does not hold is shown
as such and makes the demonstration exit non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import allocator, free, mallinfo, malloc, trim, view
from .os import libc
from .os.events import Event, Recorder


def _maps_line(address: int) -> str:
    """The /proc/self/maps line whose range holds `address`, or ''."""
    with open("/proc/self/maps", "rb") as f:
        for raw in f:
            fields = raw.split()
            lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
            if lo <= address < hi:
                name = fields[5].decode() if len(fields) > 5 else "(anonymous)"
                return f"{lo:#x}-{hi:#x} {fields[1].decode()} {name}"
    return ""


def _show(calls: list[Event], out: Callable[[str], None]) -> None:
    for e in calls:
        args = ", ".join(f"{a:#x}" if a > 4096 else str(a) for a in e.args)
        out(f"    {e.name}({args}) = {e.result:#x}   # {e.reason}")


def run(out: Callable[[str], None] = print) -> int:
    """Run the demonstration, printing with `out`; returns the number of claims that failed."""
    failed = 0

    def claim(ok: bool, text: str) -> None:
        nonlocal failed
        out(f"  [{'ok' if ok else 'FAILED'}] {text}")
        failed += not ok

    out("1. A small request: the heap lives on the program break, which moves with sbrk.")
    before = libc.current_break()
    with Recorder() as calls:
        p = malloc(200)
    after = libc.current_break()
    _show(calls, out)
    out(f"    break {before:#x} -> {after:#x}; block at {p:#x}")
    out(f"    {_maps_line(p)}")
    claim(any(e.name == "sbrk" for e in calls) == (after != before),
          "the break moved exactly when an sbrk was made")
    claim("[heap]" in _maps_line(p), "the block lies in the [heap] segment")
    view(p)[:12] = b"hello, heap!"
    claim(bytes(view(p, 12)) == b"hello, heap!", "the block holds what was written into it")

    out("2. Freed memory is reused: free it and ask again for the same size.")
    free(p)
    with Recorder() as calls:
        q = malloc(200)
    claim(q == p and not calls, f"the same address {q:#x} came back, with no system call")
    free(q)

    threshold = allocator.options.mmap_threshold
    out(f"3. A large request: at or above the mmap threshold ({threshold} bytes) it gets a mapping of its own.")
    with Recorder() as calls:
        big = malloc(1 << 20)
    _show(calls, out)
    line = _maps_line(big)
    out(f"    {line}")
    claim(any(e.name == "mmap" for e in calls) and "[heap]" not in line, "a new anonymous mapping holds it")
    with Recorder() as calls:
        free(big)
    _show(calls, out)
    claim(any(e.name == "munmap" for e in calls) and _maps_line(big) != line, "free unmapped it at once")
    new_threshold = allocator.options.mmap_threshold
    claim(new_threshold > threshold,
          f"the dynamic threshold rose from {threshold} to {new_threshold} bytes (glibc's rule), "
          "though the rule of thumb says 32 KiB, fixed")

    out("4. Now a 512 KiB request comes from the heap, not a mapping.")
    with Recorder() as calls:
        mid = malloc(512 << 10)
    _show(calls, out)
    claim("[heap]" in _maps_line(mid) and not any(e.name == "mmap" for e in calls), "it lies in [heap]")
    peak = libc.current_break()

    out("5. Free it and trim: memory goes back to the OS.")
    free(mid)
    heap = allocator.heaps[0]
    with Recorder() as calls:
        released = trim()
    _show(calls, out)
    now = libc.current_break()
    out(f"    break {peak:#x} -> {now:#x}")
    if any(e.name == "sbrk" and e.args[0] < 0 for e in calls):
        claim(released and now < peak, f"the break went down by {peak - now} bytes")
    else:
        # The break can only go down while our heap is its topmost user and the process has one thread.
        claim(released and any(e.name == "madvise" for e in calls) and (now != heap.end or libc.thread_count() > 1),
              f"the C library's memory now lies above the heap (break {now:#x}, heap end {heap.end:#x}), "
              "so the pages went back with madvise instead")
    info = mallinfo()
    out(f"    held from the OS now {info.system_current} bytes, at most {info.system_max}")
    return failed


def main() -> int:
    return 1 if run() else 0


if __name__ == "__main__":
    sys.exit(main())
