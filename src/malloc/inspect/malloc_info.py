"""malloc_info: the allocator's free memory as an XML document in the shape of glibc's `malloc_info`.

One `<heap nr=...>` per heap (the main heap first): its free chunks per bin in `<sizes>`, then
`<total type="fast">` (blocks in the fast cache, which plays the part of glibc's fastbins),
`<total type="rest">` (free chunks in the bins plus the top, which glibc counts as one block), the bytes the
heap holds from the OS now and at most, and its address space. Then the same totals over all heaps, the
mapped chunks (`<total type="mmap">`) and the process's figures.

Where it differs from glibc, on purpose:
- This allocator has no unsorted bin (a freed chunk goes straight to its bin), so there is no `<unsorted>`.
- The overall `<system>` figures include the mapped chunks, so they equal `mallinfo()`'s `system_current`
  and `system_max` (glibc's leave mmap out).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from ..heap import Chunk, Heap
from ..layout import ALIGNMENT
from ..process import ProcessAllocator


def _attrs(**values: int | str) -> dict[str, str]:
    return {k.rstrip("_"): str(v) for k, v in values.items()}


def _heap_chunks(heap: Heap, chunks: list[Chunk]) -> list[Chunk]:
    """The chunks lying in `heap`'s range (the walk gives each heap's chunks in address order)."""
    return [c for c in chunks if heap.base <= c.address < heap.end]


def _sizes(parent: ET.Element, chunks: Iterable[Chunk]) -> tuple[int, int, int, int]:
    """Add the `<sizes>` element; returns (fast count, fast bytes, rest count, rest bytes)."""
    sizes = ET.SubElement(parent, "sizes")
    cached: dict[int, int] = {}  # chunk size -> count
    bins: dict[int, list[int]] = {}  # bin index -> sizes of its free chunks
    top = 0
    for c in chunks:
        if c.state == "cached":
            cached[c.size] = cached.get(c.size, 0) + 1
        elif c.state == "free":
            bins.setdefault(c.bin, []).append(c.size)
        elif c.state == "top":
            top += c.size
    # As glibc's fastbins: one entry per cached size, from the smallest request that lands in it.
    for size, count in sorted(cached.items()):
        ET.SubElement(sizes, "size", _attrs(from_=size - ALIGNMENT + 1, to=size, total=size * count, count=count))
    # As glibc's bins: from and to are the smallest and largest chunk present.
    for _, members in sorted(bins.items()):
        ET.SubElement(sizes, "size", _attrs(from_=min(members), to=max(members), total=sum(members),
                                            count=len(members)))
    fast_count = sum(cached.values())
    fast_bytes = sum(size * count for size, count in cached.items())
    rest_count = sum(len(m) for m in bins.values()) + 1  # the top always exists, as glibc counts it
    rest_bytes = sum(sum(m) for m in bins.values()) + top
    return fast_count, fast_bytes, rest_count, rest_bytes


def _totals(parent: ET.Element, fast: tuple[int, int], rest: tuple[int, int]) -> None:
    ET.SubElement(parent, "total", _attrs(type="fast", count=fast[0], size=fast[1]))
    ET.SubElement(parent, "total", _attrs(type="rest", count=rest[0], size=rest[1]))


def malloc_info(allocator: ProcessAllocator | None = None) -> str:
    """The XML report for `allocator` (by default this process's), as a string that starts with
    `<malloc version="1">`. Sizes are bytes of whole chunks, headers included."""
    if allocator is None:
        from .. import allocator as process_allocator

        allocator = process_allocator
    elif not isinstance(allocator, ProcessAllocator):
        raise TypeError(f"malloc_info() takes a ProcessAllocator, not {type(allocator).__name__}")
    # Each of these takes the allocator's lock in turn: figures agree unless another thread allocates meanwhile.
    chunks = list(allocator.walk())
    heaps = allocator.heaps
    mapped = allocator.mapped_chunks()
    info = allocator.mallinfo()

    root = ET.Element("malloc", _attrs(version=1))
    fast_count = fast_bytes = rest_count = rest_bytes = 0
    for nr, heap in enumerate(heaps):
        element = ET.SubElement(root, "heap", _attrs(nr=nr))
        fc, fb, rc, rb = _sizes(element, _heap_chunks(heap, chunks))
        _totals(element, (fc, fb), (rc, rb))
        ET.SubElement(element, "system", _attrs(type="current", size=heap.held))
        ET.SubElement(element, "system", _attrs(type="max", size=heap.held_max))
        # Address space: the heap's whole extent (the C library's spans included), and what is readable
        # and writable now (for a heap over a mapping, less than the reservation).
        ET.SubElement(element, "aspace", _attrs(type="total", size=heap.end - heap.base))
        ET.SubElement(element, "aspace", _attrs(type="mprotect", size=heap.region.size))
        fast_count, fast_bytes = fast_count + fc, fast_bytes + fb
        rest_count, rest_bytes = rest_count + rc, rest_bytes + rb
    _totals(root, (fast_count, fast_bytes), (rest_count, rest_bytes))
    ET.SubElement(root, "total", _attrs(type="mmap", count=len(mapped), size=sum(mapped.values())))
    ET.SubElement(root, "system", _attrs(type="current", size=info.system_current))
    ET.SubElement(root, "system", _attrs(type="max", size=info.system_max))
    ET.SubElement(root, "aspace", _attrs(type="total", size=sum(h.end - h.base for h in heaps) + info.hblkhd))
    ET.SubElement(root, "aspace", _attrs(type="mprotect", size=sum(h.region.size for h in heaps) + info.hblkhd))
    ET.indent(root, space="")
    # glibc writes empty elements as <size .../>; the values are numbers and fixed words, so this is safe.
    return ET.tostring(root, encoding="unicode").replace(" />", "/>") + "\n"
