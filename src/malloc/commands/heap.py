"""`malloc heap`: a heap chunk by chunk, as a terminal strip, an HTML page or malloc_info XML.

Without `--shared` or `--file` it draws this process's heap. A fresh `malloc heap` process has allocated nothing
yet, so when its heap is empty (or with `--demo`) it first makes a small illustrative heap: blocks of several
sizes with their requests remembered, some freed into the fast cache and some into the bins, and one block large
enough for a mapping of its own.

With `--shared NAME` (a heap in /dev/shm) or `--file PATH` (a heap in a file) it attaches to that shared heap and
draws it, with its names, at offsets (the handles every process uses); `--check` verifies it instead. The exit
status of `--check` follows cmp(1): 0 when the heap is whole, 1 when it is damaged (the HeapCorruption message
on standard output), 2 when it cannot be checked (no such heap, no permission, bad arguments).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..errors import HeapCorruption
    from ..inspect.heapmap import Segment
    from ..shared import SharedHeap

# Request sizes for the demonstration: small ones the fast cache takes when freed, larger ones that go to the bins.
DEMO_SIZES = (24, 100, 1500, 40, 200, 3000, 24, 600, 5000, 100, 2200, 64, 900, 12000, 300)
DEMO_FREED = (1, 2, 5, 8, 11, 13)  # positions freed: each has an in-use neighbour on both sides, so none merge
DEMO_MAPPED = 300 * 1024  # above the 128 KiB mmap threshold

DAMAGED = 1  # --check found the heap damaged, or the drawing met damage
TROUBLE = 2  # the heap could not be attached or checked (as cmp(1) and argparse say it)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shared", metavar="NAME",
                        help="a heap shared between processes, in POSIX shared memory (/dev/shm/NAME)")
    source.add_argument("--file", metavar="PATH", help="a heap shared between processes, kept in the file PATH")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--html", metavar="FILE", help="write the heap map as one self-contained HTML page to FILE")
    output.add_argument("--xml", action="store_true", help="print malloc_info's XML report instead of the strip")
    output.add_argument("--check", action="store_true",
                        help="with --shared or --file: verify the heap instead of drawing it; exit status 0 when "
                             "it is whole, 1 when it is damaged, 2 when it cannot be checked")
    parser.add_argument("--no-color", action="store_true",
                        help="letters instead of colours (also when NO_COLOR is set or the output is no terminal)")
    parser.add_argument("--demo", action="store_true",
                        help="first make a small illustrative heap (done anyway when this process's heap is empty)")


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
    if args.shared is not None or args.file is not None:
        return _run_shared(args)
    if args.check:
        return _refuse("--check verifies a shared heap: give --shared NAME or --file PATH")

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
        return _write_html(args.html, heapmap.render_html(segs, title="malloc heap map", note=note), segs)
    print(note + "\n")
    print(heapmap.render_terminal(segs, width=shutil.get_terminal_size().columns, color=_color(args)))
    return 0


def _run_shared(args: argparse.Namespace) -> int:
    if args.xml:
        return _refuse("--xml reports this process's allocator; a shared heap is drawn (or --html, or --check)")
    if args.demo:
        return _refuse("--demo makes blocks in this process's heap; it does not go with --shared or --file")
    from ..errors import HeapCorruption

    try:
        h = _attach(args)
    except HeapCorruption as exc:
        return _damaged(args, str(exc))
    except (OSError, ValueError) as exc:
        print(f"malloc heap: {_source(args)}: {_reason(exc)}", file=sys.stderr)
        return TROUBLE
    try:
        if args.check:
            return _check(args, h)
        return _draw(args, h)
    except HeapCorruption as exc:
        return _damaged(args, _located(exc, h))
    finally:
        h.close()


def _attach(args: argparse.Namespace) -> SharedHeap:
    from ..shared import SharedHeap

    return SharedHeap.attach(args.shared) if args.shared is not None else SharedHeap.open(args.file)


def _check(args: argparse.Namespace, h: SharedHeap) -> int:
    h.check()
    chunks = h.walk()
    info = h.mallinfo()
    names = len(h.roots)
    print(f"{_source(args)} is whole: {len(chunks)} chunks, {names} name{'s' if names != 1 else ''}, "
          f"{info.uordblks} bytes in use in a segment of {h.size} bytes")
    return 0


def _draw(args: argparse.Namespace, h: SharedHeap) -> int:
    from ..inspect import heapmap, shared_heap
    from ..units import size_approx

    chunks = h.walk()
    names = shared_heap.describe_names(h, chunks)
    label = f"{_source(args)} (offsets)"
    segs = [heapmap.Segment(label, tuple(chunks))]
    note = (f"{_source(args)}, drawn by process {os.getpid()}: a segment of {size_approx(h.size)}, limit "
            f"{size_approx(h.max_size)}.\nAddresses are offsets from the segment's start, the handles every process "
            f"uses; the headers (lock, journal, the heap's bins) take the first {chunks[0].address:#x} bytes.")
    if args.html:
        page = heapmap.render_html(segs, title=f"malloc heap map: {_source(args)}", note=note, names=names)
        return _write_html(args.html, page, segs)
    print(note + "\n")
    print(heapmap.render_terminal(segs, width=shutil.get_terminal_size().columns, color=_color(args)))
    print()
    print(heapmap.render_names(names))
    return 0


def _write_html(path: str, page: str, segs: Sequence[Segment]) -> int:
    with open(path, "w", encoding="utf-8") as out:
        out.write(page)
    print(f"wrote {path}: {sum(len(s.chunks) for s in segs)} chunks in {len(segs)} segments")
    return 0


def _color(args: argparse.Namespace) -> bool:
    return not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def _refuse(message: str) -> int:
    print(f"malloc heap: {message}", file=sys.stderr)
    return TROUBLE


def _source(args: argparse.Namespace) -> str:
    return f"shared heap {args.shared!r}" if args.shared is not None else f"heap file {args.file}"


def _reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"there is none ({exc.filename} does not exist)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc)


def _located(exc: HeapCorruption, h: SharedHeap) -> str:
    """The message, with the offset of the damage: its address is one in this process only."""
    if h.base <= exc.address < h.base + h.max_size:
        return f"{exc} (offset {exc.address - h.base:#x} of the segment)"
    return str(exc)


def _damaged(args: argparse.Namespace, message: str) -> int:
    if args.check:
        print(f"{_source(args)} is damaged: {message}")
    else:
        print(f"malloc heap: {_source(args)} is damaged: {message}", file=sys.stderr)
    return DAMAGED
