"""Figures about an allocator: glibc's mallinfo2 fields and a malloc_stats-like report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MallInfo:
    """glibc's `struct mallinfo2`, field for field, plus the bytes held from the OS now and at most.

    The fast cache plays the part of glibc's fastbins in `smblks` and `fsmblks`; `usmblks` carries its
    historical meaning, the most memory ever held.
    """

    arena: int  # bytes held in heaps (break or mapping), the C library's spans excluded
    ordblks: int  # free chunks in the bins, plus each heap's top
    smblks: int  # blocks in the fast cache
    hblks: int  # mapped chunks
    hblkhd: int  # bytes in mapped chunks
    usmblks: int  # the most bytes ever held from the OS
    fsmblks: int  # bytes in the fast cache
    uordblks: int  # bytes in in-use chunks (headers included)
    fordblks: int  # bytes in free chunks and tops
    keepcost: int  # bytes in the tops: what trimming could give back
    system_current: int  # bytes held from the OS now: arena + hblkhd
    system_max: int  # the most bytes ever held from the OS at once


def format_stats(info: MallInfo, heaps: list[tuple[str, int, int, int]]) -> str:
    """A report in the shape of glibc's malloc_stats: per heap (kind, system bytes, in use, free), then totals."""
    lines = []
    for i, (kind, system, in_use, free) in enumerate(heaps):
        lines.append(f"Arena {i} ({kind}):")
        lines.append(f"system bytes     = {system:>10}")
        lines.append(f"in use bytes     = {in_use:>10}")
        lines.append(f"free bytes       = {free:>10}")
    lines.append("Total (incl. mmap):")
    lines.append(f"system bytes     = {info.system_current:>10}")
    lines.append(f"in use bytes     = {info.uordblks + info.hblkhd:>10}")
    lines.append(f"fast cache bytes = {info.fsmblks:>10}")
    lines.append(f"max system bytes = {info.system_max:>10}")
    lines.append(f"mmap regions     = {info.hblks:>10}")
    lines.append(f"mmap bytes       = {info.hblkhd:>10}")
    return "\n".join(lines)
