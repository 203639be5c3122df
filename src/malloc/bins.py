"""Bins: the heap's free lists, kept in-band as word offsets, and the bitmap that skips empty ones.

Bin heads sit in the heap header (`H_BINS + index`, 0 for an empty bin); each free chunk links to its
neighbours in the list through its `next` (word w+2) and `prev` (w+3) words, 0 ending the list.
Small bins hold one size each, so any member fits. Large bins are kept sorted by size, smallest first,
so the first member that fits is the best fit. Two bitmap words mark non-empty small and large bins.

An engine operation first decides and then commits (see heap.py). `relink` is the bins' part of a commit:
it checks and plans an unlink or two and an insert (reading only; `slot` finds an insert's place), then makes
all their writes in one straight run, with no call and no loop, so that nothing can interrupt it half-way.
Plans are made on the heap as it is before the commit, so a later plan steps over the chunks the same commit
unlinks first.

The functions take the heap's word view `W`, its base address (for messages), and chunks as word indices;
sizes are in bytes. A chunk's bin is `layout.bin_index`, written out here with the large sizes by table:
these are the engine's hottest lines, and a call costs more than the lookup.
"""

from __future__ import annotations

from .errors import HeapCorruption
from .layout import LARGE_BIN, LARGE_TABLE_LIMIT, SIZE_MASK, SMALL_LIMIT

# Header words used by the bins (see heap.py for the whole header).
H_SMALLMAP = 9
H_LARGEMAP = 10
H_BINS = 16

Slot = tuple[int, int, int]  # (bin, the chunk to insert after or 0 for the head, the chunk to insert before or 0)


def slot(W: memoryview, base: int, size: int, gone: int = 0, gone2: int = 0) -> Slot:
    """Where a free chunk of `size` bytes goes: the head of its small bin, or its place by size in its large
    bin, once the chunks `gone` and `gone2` (unlinked by the same commit) are out of the list. The links
    walked are checked (HeapCorruption when they are broken or lead out of the heap)."""
    i = size >> 4 if size < SMALL_LIMIT else LARGE_BIN[size >> 6] if size < LARGE_TABLE_LIMIT else 127
    cur = W[H_BINS + i]
    last = prev = 0
    try:
        if size < SMALL_LIMIT:
            while cur and cur in (gone, gone2):
                last = cur
                cur = W[cur + 2]
        elif not (gone or gone2):  # the common case, without the steps over unlinked chunks
            while cur and (W[cur + 1] & SIZE_MASK) < size:
                if W[cur + 3] != last:  # also ends a cycle made by an overwritten link
                    raise HeapCorruption(f"free chunk at {base + (cur << 3):#x}: back link broken",
                                         base + (cur << 3))
                last = prev = cur
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


def relink(W: memoryview, base: int, a: int, asize: int, b: int, bsize: int, r: int, rsize: int,
           dry: bool = False) -> None:
    """Unlink the free chunk `a` (of `asize` bytes; 0 for none), then `b`, then insert the chunk `r` of `rsize`
    bytes (0 for none) where it belongs: an engine operation's commit for the bins.

    First every link is checked, both ways, as glibc's unlink checks them (HeapCorruption, nothing changed,
    when one is broken), and the places are planned: `b`'s links step over `a` where they are neighbours, and
    `r`'s place steps over both. `dry` stops there. Then all the stores, in one straight run with no call and
    no loop between them: an exception from a signal handler can come before the first store, never between
    two.
    """
    an = ap = ai = bn = bp = bi = 0
    try:
        if a:
            an = W[a + 2]
            ap = W[a + 3]
            ai = asize >> 4 if asize < SMALL_LIMIT else LARGE_BIN[asize >> 6] if asize < LARGE_TABLE_LIMIT else 127
            if an and W[an + 3] != a:
                raise HeapCorruption(f"free chunk at {base + (a << 3):#x}: its next chunk does not link back",
                                     base + (a << 3))
            if W[ap + 2] != a if ap else W[H_BINS + ai] != a:
                raise HeapCorruption(f"free chunk at {base + (a << 3):#x} is not in its bin's list",
                                     base + (a << 3))
        if b:
            bn = W[b + 2]
            bp = W[b + 3]
            bi = bsize >> 4 if bsize < SMALL_LIMIT else LARGE_BIN[bsize >> 6] if bsize < LARGE_TABLE_LIMIT else 127
            if bn and W[bn + 3] != b:
                raise HeapCorruption(f"free chunk at {base + (b << 3):#x}: its next chunk does not link back",
                                     base + (b << 3))
            if W[bp + 2] != b if bp else W[H_BINS + bi] != b:
                raise HeapCorruption(f"free chunk at {base + (b << 3):#x} is not in its bin's list",
                                     base + (b << 3))
            if a:  # neighbours in one list: b's links step over a, which goes first
                if bn == a:
                    bn = an
                elif bp == a:
                    bp = ap
    except IndexError:
        c = a or b
        raise HeapCorruption(f"free chunk at {base + (c << 3):#x}: its links lead out of the heap",
                             base + (c << 3)) from None
    if r:
        ri, rp, rc = slot(W, base, rsize, a, b)
    if dry:
        return
    if a:
        if ap:
            W[ap + 2] = an
        else:
            W[H_BINS + ai] = an
            if not an:
                if ai < 64:
                    W[H_SMALLMAP] &= ~(1 << ai)
                else:
                    W[H_LARGEMAP] &= ~(1 << (ai - 64))
        if an:
            W[an + 3] = ap
    if b:  # written out again, not looped: a loop's backward jump is where a handler could run
        if bp:
            W[bp + 2] = bn
        else:
            W[H_BINS + bi] = bn
            if not bn:
                if bi < 64:
                    W[H_SMALLMAP] &= ~(1 << bi)
                else:
                    W[H_LARGEMAP] &= ~(1 << (bi - 64))
        if bn:
            W[bn + 3] = bp
    if r:
        W[r + 2] = rc
        W[r + 3] = rp
        if rc:
            W[rc + 3] = r
        if rp:
            W[rp + 2] = r
        else:
            W[H_BINS + ri] = r
            if ri < 64:
                W[H_SMALLMAP] |= 1 << ri
            else:
                W[H_LARGEMAP] |= 1 << (ri - 64)


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
