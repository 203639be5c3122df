"""Bins: the heap's free lists, kept in-band as word offsets, and the bitmap that skips empty ones.

Bin heads sit in the heap header (`H_BINS + index`, 0 for an empty bin); each free chunk links to its
neighbours in the list through its `next` (word w+2) and `prev` (w+3) words, 0 ending the list.
Small bins hold one size each, so any member fits. Large bins are kept sorted by size, smallest first,
so the first member that fits is the best fit. Two bitmap words mark non-empty small and large bins.

An engine operation first decides and then commits (see heap.py): `take` and `slot` only read (they check
a chunk's links and work out where an unlink's and an insert's writes go), and `relink` makes all those
writes in one straight run, with no call and no loop, so that nothing can interrupt it half-way. Plans are
made on the heap as it is before the commit, so a plan names the chunks the same commit unlinks first
(`gone`), and the later plan steps over them.

The functions take the heap's word view `W`, its base address (for messages), and chunks as word indices;
sizes are in bytes.
"""

from __future__ import annotations

from .errors import HeapCorruption
from .layout import LARGE_BIN, LARGE_TABLE_LIMIT, SIZE_MASK, SMALL_LIMIT

# Header words used by the bins (see heap.py for the whole header).
H_SMALLMAP = 9
H_LARGEMAP = 10
H_BINS = 16

Unlink = tuple[int, int, int, int]  # (chunk, its next, its previous, its bin)
Slot = tuple[int, int, int]  # (bin, the chunk to insert after or 0 for the head, the chunk to insert before or 0)


def index(size: int) -> int:
    """The bin of a free chunk of `size` bytes (layout.bin_index, with the large sizes by table)."""
    if size < SMALL_LIMIT:
        return size >> 4
    return LARGE_BIN[size >> 6] if size < LARGE_TABLE_LIMIT else 127


def take(W: memoryview, base: int, c: int, size: int, gone: int = 0) -> Unlink:
    """The plan to unlink the free chunk at word `c` of `size` bytes, after checking its links both ways as
    glibc's unlink does (HeapCorruption when they are broken). `gone` is a chunk the same commit unlinks
    first: where it is c's neighbour in the list, c's links step over it."""
    try:
        nxt = W[c + 2]
        prv = W[c + 3]
        if nxt and W[nxt + 3] != c:
            raise HeapCorruption(f"free chunk at {base + (c << 3):#x}: its next chunk does not link back",
                                 base + (c << 3))
        i = index(size)
        if prv:
            if W[prv + 2] != c:
                raise HeapCorruption(f"free chunk at {base + (c << 3):#x}: its previous chunk does not link to it",
                                     base + (c << 3))
        elif W[H_BINS + i] != c:
            raise HeapCorruption(f"free chunk at {base + (c << 3):#x} is not in the bin for size {size}",
                                 base + (c << 3))
        if gone:
            if nxt == gone:
                nxt = W[gone + 2]
            elif prv == gone:
                prv = W[gone + 3]
    except IndexError:
        raise HeapCorruption(f"free chunk at {base + (c << 3):#x}: its links lead out of the heap",
                             base + (c << 3)) from None
    return c, nxt, prv, i


def slot(W: memoryview, base: int, size: int, gone: int = 0, gone2: int = 0) -> Slot:
    """Where a free chunk of `size` bytes goes: the head of its small bin, or its place by size in its large
    bin, once the chunks `gone` and `gone2` (unlinked by the same commit) are out of the list. The links
    walked are checked (HeapCorruption when they are broken or lead out of the heap)."""
    i = index(size)
    cur = W[H_BINS + i]
    last = prev = 0
    try:
        if size < SMALL_LIMIT:
            while cur and cur in (gone, gone2):
                last = cur
                cur = W[cur + 2]
        else:
            while cur and (cur in (gone, gone2) or (W[cur + 1] & SIZE_MASK) < size):
                if W[cur + 3] != last:  # also ends a cycle made by an overwritten link
                    raise HeapCorruption(f"free chunk at {base + (cur << 3):#x}: back link broken",
                                         base + (cur << 3))
                last = cur
                if cur != gone and cur != gone2:
                    prev = cur
                cur = W[cur + 2]
        if cur and W[cur + 3] != last:
            raise HeapCorruption(f"free chunk at {base + (cur << 3):#x}: back link broken", base + (cur << 3))
    except IndexError:
        raise HeapCorruption(f"bin {i}'s links lead out of the heap", base + (last << 3)) from None
    return i, prev, cur


def relink(W: memoryview, a: Unlink | None, b: Unlink | None, r: int, s: Slot | None) -> None:
    """Commit: unlink `a`, then `b` (plans from `take`, None for none), then insert the chunk at word `r`
    where `s` (a plan from `slot`) says, when `r` is not 0. Straight-line stores only: an exception from a
    signal handler can come before this function's first store, never between two of them."""
    if a is not None:
        _c, nxt, prv, i = a
        if prv:
            W[prv + 2] = nxt
        else:
            W[H_BINS + i] = nxt
            if not nxt:
                if i < 64:
                    W[H_SMALLMAP] &= ~(1 << i)
                else:
                    W[H_LARGEMAP] &= ~(1 << (i - 64))
        if nxt:
            W[nxt + 3] = prv
    if b is not None:
        _c, nxt, prv, i = b
        if prv:
            W[prv + 2] = nxt
        else:
            W[H_BINS + i] = nxt
            if not nxt:
                if i < 64:
                    W[H_SMALLMAP] &= ~(1 << i)
                else:
                    W[H_LARGEMAP] &= ~(1 << (i - 64))
        if nxt:
            W[nxt + 3] = prv
    if r:
        i, prev, cur = s  # type: ignore[misc]
        W[r + 2] = cur
        W[r + 3] = prev
        if cur:
            W[cur + 3] = r
        if prev:
            W[prev + 2] = r
        else:
            W[H_BINS + i] = r
            if i < 64:
                W[H_SMALLMAP] |= 1 << i
            else:
                W[H_LARGEMAP] |= 1 << (i - 64)


def members(W: memoryview, i: int) -> list[int]:
    """Word indices of the chunks in bin `i`, in list order (stops on a cycle or a link out of range)."""
    out: list[int] = []
    seen: set[int] = set()
    c = W[H_BINS + i]
    limit = len(W) - 4
    while c and c not in seen and c <= limit:
        seen.add(c)
        out.append(c)
        c = W[c + 2]
    return out
