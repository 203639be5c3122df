"""The names table of a shared heap: names (str) to offsets, kept in the heap itself.

The table is an ordinary block that the segment header's roots word points to: an open-addressing hash table
of (hash, key block, value) triples, with a header of four words (magic, capacity, live names, used slots).
Each name's UTF-8 bytes live in a block of their own (a length word, then the bytes). A removed name leaves a
tombstone (key word 1) so that later names in its probe chain stay reachable; the table is rebuilt into a
new block when live names and tombstones fill two thirds of it.

Every function runs inside a shared heap operation (under its lock, with its journal): changes to existing
words go through the heap's journaled words, and new blocks are filled raw once `claimed` (see segment.py).
Nothing read from the table is followed before it is checked against the heap's extent.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from ..errors import HeapCorruption
from ..heap import Heap
from ..layout import HEADER
from .segment import S_ROOTS, SEG_HEADER, SharedRegion, journal_store

TABLE_MAGIC = int.from_bytes(b"pyMnames", "little")
T_MAGIC, T_CAPACITY, T_LIVE, T_USED = range(4)
T_ENTRIES = 4
EMPTY, TOMBSTONE = 0, 1
FIRST_CAPACITY = 8
MAX_NAME = 4096  # bytes of UTF-8


def name_bytes(name: object) -> bytes:
    """`name` as the table keeps it: TypeError unless a str, ValueError if empty or too long."""
    if not isinstance(name, str):
        raise TypeError(f"a name must be a str, not {type(name).__name__}")
    key = name.encode("utf-8", "surrogatepass")
    if not key or len(key) > MAX_NAME:
        raise ValueError(f"a name must be 1 to {MAX_NAME} bytes of UTF-8, not {len(key)}")
    return key


class Names:
    """The table's operations over one shared heap's region and engine (used under its lock)."""

    def __init__(self, region: SharedRegion, heap: Heap) -> None:
        self.region = region
        self.heap = heap

    # The table's words are read through the heap's words (`W`, heap word indices); a segment offset `o`
    # is heap word (o - SEG_HEADER) >> 3.

    def _table(self) -> tuple[int, int]:
        """(heap word of the table, capacity), or (0, 0) when there is none; HeapCorruption if it is damaged."""
        t = self.region.log[S_ROOTS]
        if not t:
            return 0, 0
        usable = self._usable(t, "the names table")
        w = (t - SEG_HEADER) >> 3
        W = self.heap._w
        cap = W[w + T_CAPACITY]
        if W[w + T_MAGIC] != TABLE_MAGIC or cap < FIRST_CAPACITY or cap & (cap - 1) \
                or (T_ENTRIES + 3 * cap) * 8 > usable or W[w + T_USED] > cap or W[w + T_LIVE] > W[w + T_USED]:
            raise HeapCorruption(f"shared heap: the names table at offset {t:#x} is damaged",
                                 self.region.seg_base + t)
        return w, cap

    def block_size(self, offset: int) -> int:
        """The chunk size of the live block at segment offset `offset` (an offset read from the heap: checked
        against the extent before it is followed), or 0 when there is none."""
        if SEG_HEADER < offset < SEG_HEADER + self.region.size:
            return self.heap.block_size(self.region.seg_base + offset)
        return 0

    def _usable(self, offset: int, what: str) -> int:
        """Usable bytes of the live block at segment offset `offset`; HeapCorruption when it is not one."""
        size = self.block_size(offset)
        if not size:
            raise HeapCorruption(f"shared heap: {what} at offset {offset:#x} is not a live block",
                                 self.region.seg_base + offset)
        return size - 8

    def _key(self, k: int) -> bytes:
        """The bytes of the key block at segment offset `k`."""
        usable = self._usable(k, "a name")
        W = self.heap._w
        kw = (k - SEG_HEADER) >> 3
        n = W[kw]
        if not 0 < n <= min(MAX_NAME, usable - 8):
            raise HeapCorruption(f"shared heap: the name at offset {k:#x} has a bad length {n}",
                                 self.region.seg_base + k)
        start = self.region.base + ((kw + 1) << 3) - self.region.seg_base
        return bytes(self.region.seg.cast("B")[start:start + n])

    def _find(self, key: bytes) -> tuple[int, int]:
        """(entry word of `key`, 0) when present, else (0, entry word where it would go); table must exist."""
        w, cap = self._table()
        W = self.heap._w
        h = zlib.crc32(key)
        mask = cap - 1
        i = h & mask
        free = 0
        for _ in range(cap):
            e = w + T_ENTRIES + 3 * i
            k = W[e + 1]
            if k == EMPTY:
                return 0, free or e
            if k == TOMBSTONE:
                if not free:
                    free = e
            elif W[e] == h and self._key(k) == key:
                return e, 0
            i = (i + 1) & mask
        return 0, free

    def get(self, key: bytes) -> int | None:
        """The offset stored under `key`, or None."""
        if not self.region.log[S_ROOTS]:
            return None
        e, _ = self._find(key)
        return self.heap._w[e + 2] if e else None

    def set(self, key: bytes, value: int) -> int | None:
        """Store `value` under `key`; return the offset it replaced, or None."""
        W = self.heap._w
        if self.region.log[S_ROOTS]:
            e, slot = self._find(key)
            if e:
                old: int = W[e + 2]
                W[e + 2] = value
                return old
        w, cap = self._table()
        if not w or (W[w + T_USED] + 1) * 3 > cap * 2:
            self._rebuild(cap)
            w, cap = self._table()
        e, slot = self._find(key)
        kp = self.heap.malloc(8 + len(key))
        W = self.heap._w  # the malloc may have grown the heap
        kc = (kp - self.heap.base - HEADER) >> 3
        self.heap.claimed(kc)
        kw = kc + 2
        seg = self.region.seg
        sw = kw + (SEG_HEADER >> 3)
        seg[sw] = len(key)
        start = (sw + 1) << 3
        seg.cast("B")[start:start + len(key)] = key
        if W[slot + 1] == EMPTY:
            W[w + T_USED] += 1
        W[w + T_LIVE] += 1
        W[slot] = zlib.crc32(key)
        W[slot + 2] = value
        W[slot + 1] = kp - self.region.seg_base
        return None

    def delete(self, key: bytes) -> int | None:
        """Remove `key`; return the offset it held, or None when it was not there."""
        if not self.region.log[S_ROOTS]:
            return None
        e, _ = self._find(key)
        if not e:
            return None
        W = self.heap._w
        w, _cap = self._table()
        old: int = W[e + 2]
        self.heap.free(self.region.seg_base + W[e + 1])
        W[e + 1] = TOMBSTONE
        W[e + 2] = 0
        W[w + T_LIVE] -= 1
        return old

    def items(self) -> Iterator[tuple[str, int]]:
        """Every (name, offset), in table order."""
        w, cap = self._table()
        W = self.heap._w
        for i in range(cap if w else 0):
            e = w + T_ENTRIES + 3 * i
            k = W[e + 1]
            if k > TOMBSTONE:
                try:
                    name = self._key(k).decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    raise HeapCorruption(f"shared heap: the name at offset {k:#x} is not UTF-8",
                                         self.region.seg_base + k) from None
                yield name, W[e + 2]

    def __len__(self) -> int:
        w, _ = self._table()
        return self.heap._w[w + T_LIVE] if w else 0

    def _rebuild(self, cap: int) -> None:
        """Move the live entries to a new table with room to spare, and free the old one."""
        old_w, old_cap = self._table()
        W = self.heap._w
        live = W[old_w + T_LIVE] if old_w else 0
        new_cap = FIRST_CAPACITY
        while (live + 1) * 3 > new_cap:
            new_cap *= 2
        if new_cap <= cap and old_w and W[old_w + T_USED] + 1 <= new_cap * 2 // 3:
            new_cap = cap
        p = self.heap.calloc(T_ENTRIES + 3 * new_cap, 8)  # zeroed, and claimed: filled raw below
        W = self.heap._w
        seg = self.region.seg
        tw = (p - self.region.seg_base) >> 3  # segment word of the new table
        seg[tw + T_CAPACITY] = new_cap
        seg[tw + T_LIVE] = seg[tw + T_USED] = live
        mask = new_cap - 1
        for i in range(old_cap if old_w else 0):
            e = old_w + T_ENTRIES + 3 * i
            k = W[e + 1]
            if k > TOMBSTONE:
                h = W[e]
                j = h & mask
                while seg[tw + T_ENTRIES + 3 * j + 1]:
                    j = (j + 1) & mask
                ne = tw + T_ENTRIES + 3 * j
                seg[ne] = h
                seg[ne + 1] = k
                seg[ne + 2] = W[e + 2]
        seg[tw + T_MAGIC] = TABLE_MAGIC
        old = self.region.log[S_ROOTS]
        journal_store(self.region.log, S_ROOTS, p - self.region.seg_base)
        if old:
            self.heap.free(self.region.seg_base + old)
