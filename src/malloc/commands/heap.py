"""`malloc heap`: this process's heap, chunk by chunk, as a terminal strip, an HTML page or malloc_info XML.

A fresh `malloc heap` process has allocated nothing yet, so when its heap is empty (or with `--demo`) it
first makes a small illustrative heap: blocks of several sizes with their requests remembered, some freed
into the fast cache and some into the bins, and one block large enough for a mapping of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

# Request sizes for the demonstration: small ones the fast cache takes when freed, larger ones that go to the bins.
DEMO_SIZES = (24, 100, 1500, 40, 200, 3000, 24, 600, 5000, 100, 2200, 64, 900, 12000, 300)
DEMO_FREED = (1, 2, 5, 8, 11, 13)  # positions freed: each has an in-use neighbour on both sides, so none merge
DEMO_MAPPED = 300 * 1024  # above the 128 KiB mmap threshold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--html", metavar="FILE", help="write the heap map as one self-contained HTML page to FILE")
    output.add_argument("--xml", action="store_true", help="print malloc_info's XML report instead of the strip")
    parser.add_argument("--no-color", action="store_true",
                        help="letters instead of colours (also when NO_COLOR is set or the output is no terminal)")
    parser.add_argument("--demo", action="store_true",
                        help="first make a small illustrative heap (done anyway when the heap is empty)")


def make_demo_heap() -> list[int]:
    """Allocate the demonstration's blocks with their requests remembered and free some of them; returns the
    blocks still in use (the caller keeps them, or frees them to undo the demonstration)."""
    import malloc

    malloc.remember_requests()
    blocks = [malloc.malloc(n) for n in DEMO_SIZES]
    blocks.append(malloc.malloc(DEMO_MAPPED))
    for i in DEMO_FREED:
        malloc.free(blocks[i])
    return [p for i, p in enumerate(blocks) if i not in DEMO_FREED]


def run(args: argparse.Namespace) -> int:
    import malloc

    from ..inspect import heapmap
    from ..inspect.malloc_info import malloc_info

    made = make_demo_heap() if args.demo or not any(True for _ in malloc.walk()) else []
    if args.xml:
        sys.stdout.write(malloc_info())
        return 0
    segs = heapmap.segments(malloc.walk(), malloc.allocator.heaps)
    note = (f"process {os.getpid()}: the demonstration heap ({len(made)} blocks in use, some freed, one mapped)"
            if made else f"process {os.getpid()}")
    if args.html:
        with open(args.html, "w", encoding="utf-8") as out:
            out.write(heapmap.render_html(segs, title="malloc heap map", note=note))
        print(f"wrote {args.html}: {sum(len(s.chunks) for s in segs)} chunks in {len(segs)} segments")
        return 0
    color = not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
    print(note + "\n")
    print(heapmap.render_terminal(segs, width=shutil.get_terminal_size().columns, color=color))
    return 0
