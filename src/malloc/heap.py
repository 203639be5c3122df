"""The engine: one heap of boundary-tagged chunks over one contiguous region.

`Heap` does all chunk work (allocate, free, resize, align, coalesce, grow, trim, check) and knows nothing
about where its region came from. All of its state lives in the region itself, in the header below, and
every link is an offset from the region's base, so the same bytes describe the heap wherever they are
mapped. Addresses appear only at the public methods' edges.

Header (64-bit words at offset 0):

    0 magic          3 end (bytes in the heap)     6 foreign bytes (the C library's spans)
    1 version        4 clean (all bytes at or above are zero as the OS gave them, but the top's header)
    2 top chunk      5 bytes in in-use chunks      7 bytes of the chunks covering foreign spans
    8 most bytes ever held   9-10 bin bitmaps (small, large)   16..143 bin heads (bins.py)

Checks come in tiers. Every free and realloc checks the chunk it is given and its neighbours before it
writes anything; `check()` walks the whole heap and states every invariant in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import bins
from .bins import H_BINS, H_LARGEMAP, H_SMALLMAP
from .errors import DoubleFree, HeapCorruption, InvalidPointer
from .layout import (
    FOREIGN,
    HEADER,
    IS_MMAPPED,
    LARGE_BIN,
    LARGE_TABLE_LIMIT,
    MAX_REQUEST,
    MIN_CHUNK,
    N_BINS,
    OVERHEAD,
    PREV_INUSE,
    SIZE_MASK,
    SMALL_LIMIT,
    TAG_MASK,
    bin_index,
    request_to_size,
    tag,
)
from .os import libc
from .region import Region

MAGIC = 0x636F6C6C614D7970  # "pyMalloc" in little-endian bytes
VERSION = 1
H_MAGIC, H_VERSION, H_TOP, H_END, H_CLEAN, H_INUSE, H_FOREIGN, H_FOREIGN_CHUNKS, H_HELD_MAX = range(9)
HEAP_HEADER = (H_BINS + N_BINS) * 8  # the first chunk's offset

# Glibc's defaults for a heap that trims itself (the process allocator passes its own settings).
DEFAULT_TOP_PAD = 128 * 1024
DEFAULT_TRIM_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Chunk:
    """One chunk as `walk()` reports it: address, size in bytes and state."""

    address: int  # of the chunk header; the user's block starts 16 bytes later
    size: int
    state: str  # "in use", "free", "top" or "foreign"
    bin: int  # bin index of a free chunk, else -1


def size_arg(n: object, what: str = "size") -> int:
    """`n` as a byte count: TypeError for a non-integer, ValueError for a negative one."""
    if n.__class__ is not int:
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"{what} must be an integer, not {type(n).__name__}")
        n = n.__index__()
    assert isinstance(n, int)
    if n < 0:
        raise ValueError(f"{what} must not be negative: {n}")
    return n


def address_arg(p: object) -> int:
    """`p` as an address: TypeError for a non-integer, InvalidPointer for a negative one."""
    if p.__class__ is not int:
        if isinstance(p, bool) or not hasattr(p, "__index__"):
            raise TypeError(f"address must be an integer, not {type(p).__name__}")
        p = p.__index__()
    assert isinstance(p, int)
    if p < 0:
        raise InvalidPointer(f"negative address {p}")
    return p


def alignment_arg(alignment: object) -> int:
    """`alignment` checked: an integer power of two (ValueError otherwise)."""
    a = size_arg(alignment, "alignment")
    if a == 0 or a & (a - 1):
        raise ValueError(f"alignment must be a power of two, not {a}")
    return a


class Heap:
    """A heap over one region: `malloc`, `free`, `realloc`, `calloc`, `memalign` on raw addresses.

    `Heap(region)` formats a new heap at the start of the region; `Heap(region, attach=True)` adopts
    the heap already there (its header must be intact). Not thread-safe by itself: the process
    allocator holds a lock around it.
    """

    def __init__(self, region: Region, *, attach: bool = False, top_pad: int = DEFAULT_TOP_PAD,
                 trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> None:
        self.region = region
        self.base = region.base
        self.top_pad = top_pad
        self.trim_threshold = trim_threshold
        self._w = region.words
        if attach:
            self.check(full=False)
            return
        end = region.size
        if end < HEAP_HEADER + MIN_CHUNK:
            raise ValueError(f"a heap needs at least {HEAP_HEADER + MIN_CHUNK} bytes, the region has {end}")
        W = self._w
        for i in range(HEAP_HEADER >> 3):
            W[i] = 0
        W[H_MAGIC] = MAGIC
        W[H_VERSION] = VERSION
        W[H_TOP] = HEAP_HEADER
        W[H_END] = end
        W[H_CLEAN] = HEAP_HEADER + HEADER
        W[H_HELD_MAX] = end
        W[(HEAP_HEADER + 8) >> 3] = (end - HEAP_HEADER) | PREV_INUSE

    # ----------------------------------------------------------------- facts

    @property
    def end(self) -> int:
        """Absolute address one past the heap's last byte."""
        return self.base + self._w[H_END]

    @property
    def held(self) -> int:
        """Bytes this heap holds from the OS (its extent, less the C library's spans inside it)."""
        W = self._w
        return W[H_END] - W[H_FOREIGN]

    @property
    def held_max(self) -> int:
        """The most bytes this heap has ever held."""
        return self._w[H_HELD_MAX]

    @property
    def top_size(self) -> int:
        """Size of the top chunk: free memory at the end, split last."""
        W = self._w
        return W[(W[H_TOP] + 8) >> 3] & SIZE_MASK

    @property
    def in_use(self) -> int:
        """Bytes in in-use chunks (headers included, the C library's spans excluded)."""
        return self._w[H_INUSE]

    @property
    def clean(self) -> int:
        """Offset above which the heap's memory is still zero as the OS gave it."""
        return self._w[H_CLEAN]

    def owns(self, address: int) -> bool:
        """Whether `address` lies in this heap's chunks."""
        return self.base + HEAP_HEADER <= address < self.base + self._w[H_END]

    # ------------------------------------------------------- public interface

    def malloc(self, n: int) -> int:
        """Address of a new block of at least `n` bytes, 16-byte aligned; MemoryError if none."""
        n = size_arg(n)
        if n > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {n} bytes")
        nb = request_to_size(n)
        c = self.allocate(nb)
        if not c:
            self.extend(nb, f"heap top too small for a {n}-byte request")
            c = self.allocate(nb)
        return self.base + c + HEADER

    def calloc(self, count: int, size: int) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product is too large."""
        total = size_arg(count, "count") * size_arg(size)
        if total > MAX_REQUEST:
            raise MemoryError(f"calloc({count}, {size}) overflows")
        nb = request_to_size(total)
        clean = self._w[H_CLEAN]
        c = self.allocate(nb)
        if not c:
            self.extend(nb, f"heap top too small for a {total}-byte calloc")
            clean = self._w[H_CLEAN]
            c = self.allocate(nb)
        self.zero_fresh(c, clean)
        return self.base + c + HEADER

    def free(self, p: int) -> None:
        """Free the block at `p` (0 does nothing); InvalidPointer or DoubleFree if it is not live."""
        p = address_arg(p)
        if not p:
            return
        if self.release(self.chunk_of(p)) >= self.trim_threshold:
            self.trim(self.top_pad, "top chunk exceeds the trim threshold after a free")

    def realloc(self, p: int, n: int) -> int:
        """Resize the block at `p` to `n` bytes, in place when possible; returns its (new) address.

        `realloc(0, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and returns 0.
        """
        p = address_arg(p)
        n = size_arg(n)
        if not p:
            return self.malloc(n)
        c = self.chunk_of(p)
        if n == 0:
            self.release(c)
            return 0
        if n > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {n} bytes")
        nb = request_to_size(n)
        if self.resize_in_place(c, nb, grow_top=True):
            return p
        self.release(c, check_only=True)  # a block that cannot be freed must not be moved
        q = self.malloc(n)
        old_usable = (self._w[(c + 8) >> 3] & SIZE_MASK) - OVERHEAD
        libc.memmove(q, p, min(old_usable, n))
        self.release(c)
        return q

    def memalign(self, alignment: int, n: int) -> int:
        """A block of at least `n` bytes whose address is a multiple of `alignment` (a power of two)."""
        a = alignment_arg(alignment)
        n = size_arg(n)
        if n > MAX_REQUEST or a > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {n} bytes aligned to {a}")
        if a <= 16:
            return self.malloc(n)
        nb = request_to_size(n)
        need = nb + a + MIN_CHUNK
        c = self.allocate(need)
        if not c:
            self.extend(need, f"heap top too small for a {n}-byte block aligned to {a}")
            c = self.allocate(need)
        return self.base + self.align_chunk(c, nb, a) + HEADER

    def usable_size(self, p: int) -> int:
        """Bytes usable in the live block at `p`."""
        c = self.chunk_of(address_arg(p))
        return (self._w[(c + 8) >> 3] & SIZE_MASK) - OVERHEAD

    # --------------------------------------------------- the engine's moves

    def allocate(self, nb: int) -> int:
        """Offset of an in-use chunk of at least `nb` bytes from the bins or the top, or 0 if neither can.

        `nb` is a chunk size (see `layout.request_to_size`). The best fit: the exact small bin, else the
        first fitting chunk of the size-sorted large bin, else the smallest chunk of the next non-empty
        bin (the bitmap finds it), else the top. Never asks the OS for memory.
        """
        W = self._w
        if nb < SMALL_LIMIT:
            i = nb >> 4
            c = W[H_BINS + i]
            if c:
                # Exact fit, the common case: pop the bin's first chunk.
                nxt = W[(c + 16) >> 3]
                if W[(c + 24) >> 3] or (nxt and (nxt >= len(W) << 3 or W[(nxt + 24) >> 3] != c)):
                    raise HeapCorruption(f"free chunk at {self.base + c:#x}: bin links broken", self.base + c)
                W[H_BINS + i] = nxt
                if nxt:
                    W[(nxt + 24) >> 3] = 0
                else:
                    W[H_SMALLMAP] &= ~(1 << i)
                W[(c + nb + 8) >> 3] |= PREV_INUSE
                W[(c + 8) >> 3] = nb | PREV_INUSE | ((((c >> 4) * 40503 & 0xFFFF) | 1) << 48)
                W[H_INUSE] += nb
                return c
            m = W[H_SMALLMAP] >> (i + 1)
            if m:
                c = W[H_BINS + i + (m & -m).bit_length()]
            else:
                m = W[H_LARGEMAP]
                c = W[H_BINS + 63 + (m & -m).bit_length()] if m else 0
        else:
            i = LARGE_BIN[nb >> 6] if nb < LARGE_TABLE_LIMIT else 127
            c = W[H_BINS + i]
            prev = 0
            try:
                while c and (W[(c + 8) >> 3] & SIZE_MASK) < nb:
                    if W[(c + 24) >> 3] != prev:  # also ends a cycle made by an overwritten link
                        raise HeapCorruption(f"free chunk at {self.base + c:#x}: back link broken", self.base + c)
                    prev = c
                    c = W[(c + 16) >> 3]
            except IndexError:
                raise HeapCorruption(f"bin {i} links lead out of the heap", self.base + prev) from None
            if not c:
                m = W[H_LARGEMAP] >> (i - 63)
                c = W[H_BINS + i + (m & -m).bit_length()] if m else 0
        if c:
            if c & 15 or c >= W[H_TOP]:
                raise HeapCorruption(f"a bin links to offset {c:#x}, which is no chunk", self.base)
            sz = W[(c + 8) >> 3] & SIZE_MASK
            if sz < nb or c + sz >= W[H_TOP]:
                raise HeapCorruption(f"free chunk at {self.base + c:#x} has a bad size {sz}", self.base + c)
            bins.unlink(W, c, sz)
            rem = sz - nb
            if rem >= MIN_CHUNK:
                r = c + nb
                W[(r + 8) >> 3] = rem | PREV_INUSE
                W[(r + rem) >> 3] = rem
                bins.insert(W, r, rem)
                sz = nb
            else:
                W[(c + sz + 8) >> 3] |= PREV_INUSE
            # A free chunk's predecessor is always in use (free neighbours are coalesced).
            W[(c + 8) >> 3] = sz | PREV_INUSE | ((((c >> 4) * 40503 & 0xFFFF) | 1) << 48)
            W[H_INUSE] += sz
            return c
        t = W[H_TOP]
        tsz = W[(t + 8) >> 3] & SIZE_MASK
        if tsz < nb + MIN_CHUNK:
            return 0
        if t + tsz != W[H_END]:
            raise HeapCorruption(f"top chunk at {self.base + t:#x} has a bad size {tsz}", self.base + t)
        top = t + nb
        W[(top + 8) >> 3] = (tsz - nb) | PREV_INUSE
        W[H_TOP] = top
        if top + HEADER > W[H_CLEAN]:
            W[H_CLEAN] = top + HEADER
        W[(t + 8) >> 3] = nb | PREV_INUSE | ((((t >> 4) * 40503 & 0xFFFF) | 1) << 48)
        W[H_INUSE] += nb
        return t

    def extend(self, nb: int, reason: str) -> None:
        """Grow the region so the top chunk can serve a chunk of `nb` bytes (plus the top pad)."""
        W = self._w
        t = W[H_TOP]
        tsz = W[(t + 8) >> 3] & SIZE_MASK
        old_end = W[H_END]
        need = nb + MIN_CHUNK - tsz
        if need <= 0:
            return
        try:
            start = self.region.grow(need + self.top_pad, reason)
        except MemoryError:
            if not self.top_pad:
                raise
            start = self.region.grow(need, reason + " (without the top pad)")
        W = self._w = self.region.words
        new_end = self.region.size
        if start == old_end:
            W[(t + 8) >> 3] = (tsz + new_end - old_end) | PREV_INUSE
        else:
            # A foreign span [old_end, start): cover it with an in-use chunk whose header is the last
            # 16 bytes of the old top, and free what is left of the old top.
            f = old_end - HEADER
            if tsz - HEADER >= MIN_CHUNK:
                rest = tsz - HEADER
                W[(t + 8) >> 3] = rest | PREV_INUSE
                W[f >> 3] = rest
                W[(f + 8) >> 3] = (start - f) | FOREIGN
                bins.insert(W, t, rest)
            else:
                f = t
                W[(f + 8) >> 3] = (start - f) | FOREIGN | PREV_INUSE
            W[H_FOREIGN] += start - old_end
            W[H_FOREIGN_CHUNKS] += start - f
            W[(start + 8) >> 3] = (new_end - start) | PREV_INUSE
            W[H_TOP] = start
            W[H_CLEAN] = start + HEADER
        W[H_END] = new_end
        held = new_end - W[H_FOREIGN]
        if held > W[H_HELD_MAX]:
            W[H_HELD_MAX] = held
        if start != old_end and new_end - start < nb + MIN_CHUNK:
            self.extend(nb, reason)

    def find_chunk(self, p: int) -> int:
        """Offset of the live chunk whose block starts at address `p`, or 0; reads only, writes nothing.

        The cheap tier of checks: alignment, range, the in-use tag, the size and the next chunk's
        PREV_INUSE bit.
        """
        W = self._w
        c = p - self.base - HEADER
        t = W[H_TOP]
        if c < HEAP_HEADER or c >= t or c & 15:
            return 0
        h = W[(c + 8) >> 3]
        sz = h & SIZE_MASK
        n = c + sz
        if (h & TAG_MASK) != ((((c >> 4) * 40503 & 0xFFFF) | 1) << 48) or h & (IS_MMAPPED | FOREIGN) \
                or sz < MIN_CHUNK or n > t or not W[(n + 8) >> 3] & PREV_INUSE:
            return 0
        return c

    def chunk_of(self, p: int) -> int:
        """Offset of the live chunk whose block starts at address `p`; writes nothing.

        When the cheap checks fail, a walk tells why: InvalidPointer, DoubleFree or HeapCorruption.
        """
        c = self.find_chunk(p)
        if c:
            return c
        c = p - self.base - HEADER
        if HEAP_HEADER <= c < self._w[H_END] and not c & 15:
            raise self._classify(c)
        raise InvalidPointer(f"{p:#x} is not a block of this heap")

    def release(self, c: int, *, check_only: bool = False) -> int:
        """Free the in-use chunk at `c` (found by `chunk_of`): coalesce it and bin it or merge it into top.

        Its neighbours are checked before anything is written (HeapCorruption, nothing changed);
        `check_only` stops there. Returns the top's new size when the chunk merged into the top (the
        caller may trim), else 0.
        """
        W = self._w
        h = W[(c + 8) >> 3]
        sz = h & SIZE_MASK
        n = c + sz
        t = W[H_TOP]
        nh = W[(n + 8) >> 3]
        nsz = nh & SIZE_MASK
        next_free = False
        if n != t:
            if nsz < HEADER or n + nsz > t:
                raise HeapCorruption(f"chunk after {self.base + c:#x} has a bad size {nsz}", self.base + n)
            next_free = not W[(n + nsz + 8) >> 3] & PREV_INUSE
            if next_free:
                if check_only or not h & PREV_INUSE:
                    bins.check_links(W, n, nsz)  # both neighbours go: check both before changing either
            elif not nh & FOREIGN and nh & TAG_MASK != ((((n >> 4) * 40503 & 0xFFFF) | 1) << 48):
                raise HeapCorruption(f"header of the chunk after {self.base + c:#x} was overwritten", self.base + n)
        pc = psz = 0
        if not h & PREV_INUSE:
            psz = W[c >> 3]
            pc = c - psz
            if psz < MIN_CHUNK or psz & 15 or pc < HEAP_HEADER or (W[(pc + 8) >> 3] & ~PREV_INUSE) != psz:
                raise HeapCorruption(f"chunk before {self.base + c:#x} has a bad boundary tag {psz}",
                                     self.base + c)
            if check_only:
                bins.check_links(W, pc, psz)
        if check_only:
            return 0
        freed = sz
        if psz:
            bins.unlink(W, pc, psz)
            c = pc
            sz += psz
        if n == t:
            W[(c + 8) >> 3] = (sz + nsz) | PREV_INUSE
            W[H_TOP] = c
            W[H_INUSE] -= freed
            return sz + nsz
        if next_free:
            bins.unlink(W, n, nsz)
            sz += nsz
        else:
            W[(n + 8) >> 3] = nh & ~PREV_INUSE
        W[(c + 8) >> 3] = sz | PREV_INUSE
        W[(c + sz) >> 3] = sz
        W[H_INUSE] -= freed
        bins.insert(W, c, sz)
        return 0

    def resize_in_place(self, c: int, nb: int, *, grow_top: bool) -> bool:
        """Make the in-use chunk at `c` exactly or about `nb` bytes without moving it; False if it can't.

        Shrinks by splitting off the tail; grows into a free next chunk or into the top, and, when
        `grow_top` is set and the chunk borders the top, by extending the region first.
        """
        W = self._w
        h = W[(c + 8) >> 3]
        sz = h & SIZE_MASK
        keep = h & (PREV_INUSE | TAG_MASK)
        if nb <= sz:
            if sz - nb >= MIN_CHUNK:
                W[(c + 8) >> 3] = nb | keep
                r = c + nb
                W[(r + 8) >> 3] = (sz - nb) | PREV_INUSE | tag(r)
                self.release(r)  # the tail was counted in use with the chunk; release() uncounts it
            return True
        n = c + sz
        t = W[H_TOP]
        if n == t:
            tsz = W[(t + 8) >> 3] & SIZE_MASK
            if sz + tsz < nb + MIN_CHUNK:
                if not grow_top:
                    return False
                try:
                    self.extend(nb - sz, "heap top too small to grow a block in place")
                except MemoryError:
                    return False  # the caller moves the block instead
                W = self._w
                if W[H_TOP] != t:  # the region continued past a foreign span: cannot grow here
                    return False
                tsz = W[(t + 8) >> 3] & SIZE_MASK
            top = c + nb
            W[(top + 8) >> 3] = (sz + tsz - nb) | PREV_INUSE
            W[H_TOP] = top
            if top + HEADER > W[H_CLEAN]:
                W[H_CLEAN] = top + HEADER
            W[(c + 8) >> 3] = nb | keep
            W[H_INUSE] += nb - sz
            return True
        nh = W[(n + 8) >> 3]
        nsz = nh & SIZE_MASK
        if W[(n + nsz + 8) >> 3] & PREV_INUSE or sz + nsz < nb:
            return False
        bins.unlink(W, n, nsz)
        total = sz + nsz
        if total - nb >= MIN_CHUNK:
            r = c + nb
            W[(r + 8) >> 3] = (total - nb) | PREV_INUSE
            W[(r + total - nb) >> 3] = total - nb
            bins.insert(W, r, total - nb)
            total = nb
        else:
            W[(c + total + 8) >> 3] |= PREV_INUSE
        W[(c + 8) >> 3] = total | keep
        W[H_INUSE] += total - sz
        return True

    def align_chunk(self, c: int, nb: int, alignment: int) -> int:
        """Carve a chunk of `nb` bytes whose block is `alignment`-aligned out of the in-use chunk at `c`.

        The chunk must hold `nb + alignment + MIN_CHUNK` bytes; the pieces before and after go back free.
        """
        W = self._w
        base = self.base
        p = (base + c + HEADER + alignment - 1) & ~(alignment - 1)
        while p - HEADER - base - c and p - HEADER - base - c < MIN_CHUNK:
            p += alignment
        a = p - HEADER - base
        if a != c:
            h = W[(c + 8) >> 3]
            sz = h & SIZE_MASK
            lead = a - c
            W[(c + 8) >> 3] = lead | (h & PREV_INUSE) | tag(c)
            W[(a + 8) >> 3] = (sz - lead) | PREV_INUSE | tag(a)
            self.release(c)
            c = a
        self.resize_in_place(c, nb, grow_top=False)
        return c

    def zero_fresh(self, c: int, clean: int) -> None:
        """Zero the block of the chunk at `c`, except what lies at or above `clean` (still zero from the OS)."""
        start = c + HEADER
        end = c + (self._w[(c + 8) >> 3] & SIZE_MASK) + OVERHEAD
        if start < clean:
            libc.memset(self.base + start, 0, min(end, clean) - start)

    def trim(self, pad: int = 0, reason: str = "malloc_trim", *, inner: bool = False) -> bool:
        """Give free memory back to the OS, keeping `pad` bytes in the top; True if anything went back.

        The top's whole pages beyond the pad leave the region (the break goes down when it can);
        when the region cannot shrink, they are released with madvise instead, once (the clean mark
        remembers). With `inner`, the whole pages inside every large free chunk are released too.
        """
        pad = size_arg(pad, "pad")
        W = self._w
        region = self.region
        page = libc.PAGE_SIZE
        released = False
        t = W[H_TOP]
        end = W[H_END]
        keep = t + MIN_CHUNK + pad
        extra = ((end - keep) // page) * page if end > keep else 0
        if extra > 0 and region.shrink(extra, reason):
            self._w = W = region.words
            W[(t + 8) >> 3] = (end - extra - t) | PREV_INUSE
            W[H_END] = end - extra
            if W[H_CLEAN] > end - extra:
                W[H_CLEAN] = end - extra
            released = True
        else:
            lo = ((region.base + keep + page - 1) & ~(page - 1)) - region.base
            if W[H_CLEAN] > lo and region.release(keep, end - keep, reason):
                W[H_CLEAN] = lo
                released = True
        if inner:
            for i in range(64, N_BINS):
                for f in bins.members(W, i):
                    fsz = W[(f + 8) >> 3] & SIZE_MASK
                    if region.release(f + 32, fsz - 32, reason):
                        released = True
        return released

    # ------------------------------------------------------------ the checks

    def _classify(self, c: int) -> Exception:
        """Why the offset `c` is not a live chunk: walk the heap to find what lies there."""
        p = self.base + c + HEADER
        try:
            for off, size, word in self._walk():
                if off == c:
                    if word & FOREIGN:
                        return InvalidPointer(f"{p:#x} is inside memory of the C library's own malloc")
                    if word & TAG_MASK == tag(off):
                        return HeapCorruption(f"the chunk after the block at {p:#x} was damaged "
                                              "(its size or PREV_INUSE bit overwritten)", self.base + off + size)
                    if self._is_free(off, size):
                        return DoubleFree(f"double free: the block at {p:#x} is already free")
                    return HeapCorruption(f"chunk header at {self.base + c:#x} was overwritten", self.base + c)
                if off < c < off + size:
                    stale = self._w[(c + 8) >> 3]
                    if self._is_free(off, size) and not stale & TAG_MASK and \
                            MIN_CHUNK <= (stale & SIZE_MASK) <= self._w[H_END]:
                        return DoubleFree(f"double free: the block at {p:#x} was freed and merged")
                    return InvalidPointer(f"{p:#x} is not the start of a block (it lies inside one at "
                                          f"{self.base + off + HEADER:#x})")
        except HeapCorruption as exc:
            return exc
        return InvalidPointer(f"{p:#x} is not a block of this heap")

    def _is_free(self, off: int, size: int) -> bool:
        W = self._w
        if off == W[H_TOP]:
            return True
        return not W[(off + size + 8) >> 3] & PREV_INUSE

    def _walk(self) -> Iterator[tuple[int, int, int]]:
        """(offset, size, size word) of every chunk in address order; HeapCorruption on a bad size."""
        W = self._w
        end = W[H_END]
        top = W[H_TOP]
        off = HEAP_HEADER
        while True:
            word = W[(off + 8) >> 3]
            size = word & SIZE_MASK
            if off == top:
                if off + size != end:
                    raise HeapCorruption(f"top chunk at {self.base + off:#x} does not end at the heap's end",
                                         self.base + off)
                yield off, size, word
                return
            if size < (HEADER if word & FOREIGN else MIN_CHUNK) or off + size > top:
                raise HeapCorruption(f"chunk at {self.base + off:#x} has a bad size {size}", self.base + off)
            yield off, size, word
            off += size

    def walk(self) -> Iterator[Chunk]:
        """Every chunk in address order."""
        W = self._w
        for off, size, word in self._walk():
            if off == W[H_TOP]:
                state, b = "top", -1
            elif word & FOREIGN:
                state, b = "foreign", -1
            elif self._is_free(off, size):
                state, b = "free", bin_index(size)
            else:
                state, b = "in use", -1
            yield Chunk(self.base + off, size, state, b)

    def check(self, full: bool = True) -> None:
        """Verify the heap's invariants; raise HeapCorruption naming the address and what is wrong.

        `full=False` checks the header only; the full check walks every chunk and every bin.
        """
        W = self._w
        base = self.base

        def bad(message: str, off: int = 0) -> HeapCorruption:
            return HeapCorruption(message, base + off if off else base)

        if W[H_MAGIC] != MAGIC or W[H_VERSION] != VERSION:
            raise bad("heap header: bad magic number or version")
        end, top = W[H_END], W[H_TOP]
        if end > self.region.size or end & 15 or not HEAP_HEADER <= top <= end - MIN_CHUNK or top & 15:
            raise bad(f"heap header: end {end} or top {top} out of range")
        if not full:
            return
        in_use = foreign_chunks = 0
        free_chunks: dict[int, int] = {}
        prev_free = False
        for off, size, word in self._walk():
            if bool(word & PREV_INUSE) == prev_free:
                raise bad(f"chunk at {base + off:#x}: PREV_INUSE bit disagrees with the chunk before", off)
            if size & 15 or word & IS_MMAPPED:
                raise bad(f"chunk at {base + off:#x}: bad size word {word:#x}", off)
            if off == top:
                if word & TAG_MASK:
                    raise bad("the top chunk carries an in-use tag", off)
                break
            nxt = W[(off + size + 8) >> 3]
            free = not nxt & PREV_INUSE
            if word & FOREIGN:
                if free:
                    raise bad(f"foreign chunk at {base + off:#x} is marked free", off)
                foreign_chunks += size
            elif free:
                if word & TAG_MASK:
                    raise bad(f"free chunk at {base + off:#x} carries an in-use tag", off)
                if prev_free:
                    raise bad(f"free chunks at {base + off:#x} and before it were not coalesced", off)
                if W[(off + size) >> 3] != size:
                    raise bad(f"free chunk at {base + off:#x}: boundary tag differs from its size", off)
                free_chunks[off] = size
            else:
                if word & TAG_MASK != tag(off):
                    raise bad(f"in-use chunk at {base + off:#x}: header tag overwritten", off)
                in_use += size
            prev_free = free and not word & FOREIGN
        if in_use != W[H_INUSE]:
            raise bad(f"heap header: {W[H_INUSE]} bytes counted in use, {in_use} found")
        if foreign_chunks != W[H_FOREIGN_CHUNKS]:
            raise bad(f"heap header: foreign chunks of {W[H_FOREIGN_CHUNKS]} bytes counted, {foreign_chunks} found")
        binned = 0
        for i in range(N_BINS):
            head = W[H_BINS + i]
            mask_word, bit = (H_SMALLMAP, i) if i < 64 else (H_LARGEMAP, i - 64)
            if bool(head) != bool(W[mask_word] >> bit & 1):
                raise bad(f"bin {i}: bitmap bit disagrees with the bin's head")
            prev, c, last_size = 0, head, 0
            while c:
                size = free_chunks.pop(c, -1)
                if size < 0:
                    raise bad(f"bin {i} links to {base + c:#x}, which is not a free chunk", c)
                if bin_index(size) != i:
                    raise bad(f"free chunk at {base + c:#x} of size {size} is in bin {i}", c)
                if W[(c + 24) >> 3] != prev:
                    raise bad(f"free chunk at {base + c:#x}: back link broken", c)
                if size < last_size:
                    raise bad(f"bin {i} is not sorted by size at {base + c:#x}", c)
                binned += 1
                prev, last_size, c = c, size, W[(c + 16) >> 3]
        if free_chunks:
            off = min(free_chunks)
            raise bad(f"free chunk at {base + off:#x} is in no bin", off)
        clean = W[H_CLEAN]
        if clean < top + HEADER and clean < end:
            raise bad(f"heap header: clean mark {clean} is below the top chunk's header")

    def free_stats(self) -> tuple[int, int]:
        """(number, bytes) of free chunks in the bins."""
        W = self._w
        count = size = 0
        for i in range(N_BINS):
            for c in bins.members(W, i):
                count += 1
                size += W[(c + 8) >> 3] & SIZE_MASK
        return count, size

    @property
    def small_limit(self) -> int:
        return SMALL_LIMIT
