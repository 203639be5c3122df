"""Bins: the heap's free lists, kept in-band as word offsets, and the bitmap that skips empty ones.

Bin heads sit in the heap header (`H_BINS + index`, 0 for an empty bin); each free chunk links to its
neighbours in the list through its `next` (word w+2) and `prev` (w+3) words, 0 ending the list.
Small bins hold one size each, so any member fits. Large bins are kept sorted by size, smallest first,
so the first member that fits is the best fit. Two bitmap words mark non-empty small and large bins.

An engine operation first decides and then commits (see heap.py). `relink` and `move` are the bins' part of a
commit: they check and plan an unlink or two and an insert (reading only), then make all their writes in one
straight run, with no call and no loop, so that nothing can interrupt it half-way. Plans are made on the heap
as it is before the commit, so a later plan steps over the chunks the same commit unlinks first. `move`
is `relink` for the commonest commit, one unlink and one insert (a split, a merge with one neighbour), with
the branches for the others left out: a commit is one call, and these are the engine's hottest lines.

The functions take the heap's word view `W`, its base address (for messages), and chunks as word indices;
sizes are in bytes. A chunk's bin is `layout.bin_index`, written out here as its table lookup.
"""

from __future__ import annotations

from .errors import HeapCorruption
from .layout import BIN, SIZE_MASK, TABLE_LIMIT

# Header words used by the bins (see heap.py for the whole header).
H_SMALLMAP = 9
H_LARGEMAP = 10
H_BINS = 16


def _broken(base: int, c: int, what: str) -> HeapCorruption:
    return HeapCorruption(f"free chunk at {base + (c << 3):#x}{what}", base + (c << 3))


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
    an = ap = ai = bn = bp = bi = ri = rp = rc = last = 0
    try:
        if a:
            an = W[a + 2]
            ap = W[a + 3]
            ai = BIN[asize >> 4] if asize < TABLE_LIMIT else 127
            if an and W[an + 3] != a:
                raise _broken(base, a, ": its next chunk does not link back")
            if W[ap + 2] != a if ap else W[H_BINS + ai] != a:
                raise _broken(base, a, " is not in its bin's list")
        if b:
            bn = W[b + 2]
            bp = W[b + 3]
            bi = BIN[bsize >> 4] if bsize < TABLE_LIMIT else 127
            if bn and W[bn + 3] != b:
                raise _broken(base, b, ": its next chunk does not link back")
            if W[bp + 2] != b if bp else W[H_BINS + bi] != b:
                raise _broken(base, b, " is not in its bin's list")
            if a:  # neighbours in one list: b's links step over a, which goes first
                if bn == a:
                    bn = an
                elif bp == a:
                    bp = ap
        if r:
            # r's place: the head of its small bin, or by size in its large bin (sorted, smallest first), once a
            # and b are out of the list: the walk steps over them. Every link walked is checked.
            ri = BIN[rsize >> 4] if rsize < TABLE_LIMIT else 127
            rc = W[H_BINS + ri]
            while rc and (rc in (a, b) or (W[rc + 1] & SIZE_MASK) < rsize):
                if W[rc + 3] != last:  # also ends a cycle made by an overwritten link
                    raise _broken(base, rc, ": back link broken")
                last = rc
                if rc not in (a, b):
                    rp = rc
                rc = W[rc + 2]
            if rc and W[rc + 3] != last:
                raise _broken(base, rc, ": back link broken")
    except IndexError:
        raise _broken(base, last or a or b, ": its links lead out of the heap") from None
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
            if not rc:  # the bin was empty, or held only a and b: its bit is (set) again
                if ri < 64:
                    W[H_SMALLMAP] |= 1 << ri
                else:
                    W[H_LARGEMAP] |= 1 << (ri - 64)


def move(W: memoryview, base: int, a: int, asize: int, r: int, rsize: int) -> None:
    """`relink(W, base, a, asize, 0, 0, r, rsize)`: unlink the free chunk `a`, then insert the chunk `r` (0 for
    none); the same checks, plan and straight run of stores, with only the branches these two need."""
    ri = rp = rc = last = 0
    try:
        an = W[a + 2]
        ap = W[a + 3]
        ai = BIN[asize >> 4] if asize < TABLE_LIMIT else 127
        if an and W[an + 3] != a:
            raise _broken(base, a, ": its next chunk does not link back")
        if W[ap + 2] != a if ap else W[H_BINS + ai] != a:
            raise _broken(base, a, " is not in its bin's list")
        if r:
            ri = BIN[rsize >> 4] if rsize < TABLE_LIMIT else 127
            rc = W[H_BINS + ri]
            while rc and (rc == a or (W[rc + 1] & SIZE_MASK) < rsize):
                if W[rc + 3] != last:  # also ends a cycle made by an overwritten link
                    raise _broken(base, rc, ": back link broken")
                last = rc
                if rc != a:
                    rp = rc
                rc = W[rc + 2]
            if rc and W[rc + 3] != last:
                raise _broken(base, rc, ": back link broken")
    except IndexError:
        raise _broken(base, last or a, ": its links lead out of the heap") from None
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
    if r:
        W[r + 2] = rc
        W[r + 3] = rp
        if rc:
            W[rc + 3] = r
        if rp:
            W[rp + 2] = r
        else:
            W[H_BINS + ri] = r
            if not rc:
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
