"""Bins: the heap's free lists, kept in-band as word offsets, and the bitmap that skips empty ones.

Bin heads sit in the heap header (`H_BINS + index`, 0 for an empty bin); each free chunk links to its
neighbours in the list through its `next` (word w+2) and `prev` (w+3) words, 0 ending the list.
Small bins hold one size each, so any member fits. Large bins are kept sorted by size, smallest first,
so the first member that fits is the best fit. Two bitmap words mark non-empty small and large bins.

The functions take the heap's word view `W`, chunks as word indices and sizes in bytes. Broken links raise
`BinDamage` naming the chunk by its word index; the heap, which knows its address, turns that into a
HeapCorruption (so the hot paths do not carry the base address along only for an error).
"""

from __future__ import annotations

from .layout import LARGE_BIN, LARGE_TABLE_LIMIT, SIZE_MASK, SMALL_LIMIT

# Header words used by the bins (see heap.py for the whole header).
H_SMALLMAP = 9
H_LARGEMAP = 10
H_BINS = 16


class BinDamage(Exception):
    """Broken bin links found at the free chunk at word `chunk`; `what` says what is wrong."""

    def __init__(self, what: str, chunk: int) -> None:
        super().__init__(what, chunk)
        self.what = what
        self.chunk = chunk


def insert(W: memoryview, c: int, size: int) -> None:
    """Put the free chunk at word `c` into its bin."""
    try:
        if size < SMALL_LIMIT:
            i = size >> 4
            head = W[H_BINS + i]
            W[c + 2] = head
            W[c + 3] = 0
            if head:
                W[head + 3] = c
            else:
                W[H_SMALLMAP] |= 1 << i
            W[H_BINS + i] = c
            return
        i = LARGE_BIN[size >> 6] if size < LARGE_TABLE_LIMIT else 127
        prev = 0
        cur = W[H_BINS + i]
        while cur and (W[cur + 1] & SIZE_MASK) < size:
            if W[cur + 3] != prev:  # also ends a cycle made by an overwritten link
                raise BinDamage("back link broken", cur)
            prev = cur
            cur = W[cur + 2]
    except IndexError:
        raise BinDamage("its bin's links lead out of the heap", c) from None
    W[c + 2] = cur
    W[c + 3] = prev
    if cur:
        W[cur + 3] = c
    if prev:
        W[prev + 2] = c
    else:
        W[H_BINS + i] = c
        W[H_LARGEMAP] |= 1 << (i - 64)


def check_links(W: memoryview, c: int, size: int) -> None:
    """Raise BinDamage unless the free chunk at word `c` is linked both ways (glibc's unlink check)."""
    unlink(W, c, size, True)


def unlink(W: memoryview, c: int, size: int, check_only: bool = False) -> None:
    """Take the free chunk at word `c` out of its bin. Its links are checked first, as glibc's unlink does:
    BinDamage, and nothing changed, when they are broken; `check_only` stops after the checks."""
    try:
        nxt = W[c + 2]
        prv = W[c + 3]
        if nxt and W[nxt + 3] != c:
            raise BinDamage("its next chunk does not link back", c)
        if prv:
            if W[prv + 2] != c:
                raise BinDamage("its previous chunk does not link to it", c)
            if check_only:
                return
            W[prv + 2] = nxt
        else:
            i = size >> 4 if size < SMALL_LIMIT else LARGE_BIN[size >> 6] if size < LARGE_TABLE_LIMIT else 127
            if W[H_BINS + i] != c:
                raise BinDamage(f"it is not in the bin for size {size}", c)
            if check_only:
                return
            W[H_BINS + i] = nxt
            if not nxt:
                if i < 64:
                    W[H_SMALLMAP] &= ~(1 << i)
                else:
                    W[H_LARGEMAP] &= ~(1 << (i - 64))
    except IndexError:
        raise BinDamage("its links lead out of the heap", c) from None
    if nxt:
        W[nxt + 3] = prv


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
