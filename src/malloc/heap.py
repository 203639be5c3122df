"""The engine: one heap of boundary-tagged chunks over one contiguous region.

`Heap` does all chunk work (allocate, free, resize, align, coalesce, grow, trim, check) and knows nothing
about where its region came from. All of its state lives in the region itself, in the header below, and
every link is an offset from the region's base, counted in 8-byte words, so the same bytes describe the
heap wherever they are mapped. Inside the engine a chunk is its word index (see layout.py); addresses
appear only at the public methods' edges.

Header (64-bit words at offset 0; positions are word indices, amounts are bytes):

    0 magic          3 end (one past the last word)    6 bytes of the chunks covering foreign spans
    1 version        4 clean (every word from here on is zero as the OS gave it, but the top's header)
    2 top chunk      5 foreign bytes (the C library's spans)    7 most bytes ever held
    9-10 bin bitmaps (small, large)    11 journal (a chunk owed back: see below)    16..143 bin heads (bins.py)

Bytes in use are not counted as each block comes and goes: that counter cost a read-modify-write on
every malloc and free. They are derived when asked, from the extent, the top and the bins.

Every operation is all or nothing. A Python signal handler runs only where the interpreter checks for
pending calls: at the start of a Python function, at a loop's backward jump, and right after a call to a C
function returns; never between two subscript stores, and not on the return from a Python function. So an
engine operation first decides (it reads, checks, plans, calls), then commits: one straight run of word
stores with no call and no loop, at most preceded by one call to `bins.relink` or `bins.move` (whose own
stores are such a run) and followed only by its return. An exception from a handler finds the operation
not started or done.
An operation that needs two commits (shrinking a block in place, aligning one, growing past a foreign span)
makes its first commit leave an in-use chunk that nobody holds and name it in the journal word; `settle`
frees that chunk and clears the word in one commit, and runs again at the next operation if an exception
came between the two.

Checks come in tiers. Every free and realloc checks the chunk it is given and its neighbours before it
writes anything; `check()` walks the whole heap and states every invariant in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import SupportsIndex

from . import bins
from .bins import H_BINS, H_LARGEMAP, H_SMALLMAP, move, relink
from .errors import DoubleFree, HeapCorruption, InvalidPointer
from .layout import (
    BIN,
    FOREIGN,
    HEADER,
    IS_MMAPPED,
    MAX_REQUEST,
    MIN_CHUNK,
    N_BINS,
    OVERHEAD,
    PREV_INUSE,
    SIZE_MASK,
    SMALL_LIMIT,
    TABLE_LIMIT,
    TAG_BITS,
    TAG_MASK,
    TAG_SHIFT,
    bin_index,
    check_request,
    request_to_size,
    tag,
)
from .os import libc
from .region import Region
from .units import size_approx, size_text

MAGIC = 0x636F6C6C614D7970  # "pyMalloc" in little-endian bytes
VERSION = 3
H_MAGIC, H_VERSION, H_TOP, H_END, H_CLEAN, H_FOREIGN, H_FOREIGN_CHUNKS, H_HELD_MAX = range(8)
H_JOURNAL = 11  # word index of an in-use chunk that an interrupted two-commit operation owes back, or 0
HEAP_WORDS = H_BINS + N_BINS  # the first chunk's word index
HEAP_HEADER = HEAP_WORDS * 8  # ... and its offset
UNTAGGED = ~TAG_MASK  # a header word's bits but the in-use tag

# Glibc's defaults for a heap that trims itself (the process allocator passes its own settings).
DEFAULT_TOP_PAD = 128 * 1024
DEFAULT_TRIM_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Chunk:
    """One chunk as `walk()` reports it: address, size in bytes and state."""

    address: int  # of the chunk header; the user's block starts 16 bytes later
    size: int
    state: str  # "in use", "free", "top" or "foreign" (the process allocator adds "cached" and "mapped")
    bin: int  # bin index of a free chunk, else -1
    request: int = -1  # bytes asked for by the allocation that made an in-use chunk, when known


def _index(n: object, what: str) -> int:
    """`n` through `__index__`, as Python's own sequences take it: TypeError naming `what` for a bool, an
    object without `__index__`, or one whose `__index__` does not return an int."""
    if isinstance(n, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(n)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"{what} must be an integer, not {type(n).__name__} ({exc})") from None


def size_arg(n: object, what: str = "size") -> int:
    """`n` as a byte count: TypeError for a non-integer, ValueError for a negative one."""
    v = n if type(n) is int else _index(n, what)
    if v < 0:
        raise ValueError(f"{what} must not be negative: {v}")
    return v


def address_arg(p: object) -> int:
    """`p` as an address: TypeError for a non-integer, InvalidPointer for a negative one."""
    v = p if type(p) is int else _index(p, "address")
    if v < 0:
        raise InvalidPointer(f"negative address {v:#x}")
    return v


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
    allocator holds a lock around it. The engine's own methods (`allocate`, `release`, ...) take and
    return chunks as word indices.
    """

    def __init__(self, region: Region, *, attach: bool = False, top_pad: int = DEFAULT_TOP_PAD,
                 trim_threshold: int = DEFAULT_TRIM_THRESHOLD, undoable: bool = False) -> None:
        self.region = region
        self.base = region.base
        self.undoable = undoable  # the region journals every store for an undo (see `claimed`)
        self.top_pad = size_arg(top_pad, "top_pad")
        self.trim_threshold = size_arg(trim_threshold, "trim_threshold")
        self._w = region.words
        if attach:
            self.check(full=False)
            return
        size = region.size
        if size < HEAP_HEADER + MIN_CHUNK:
            raise ValueError(f"a heap needs at least {HEAP_HEADER + MIN_CHUNK} bytes, the region has {size}")
        W = self._w
        libc.memset(self.base, 0, HEAP_HEADER)  # one call, not 144 word stores: it is the first malloc's cost
        W[H_MAGIC] = MAGIC
        W[H_VERSION] = VERSION
        W[H_TOP] = HEAP_WORDS
        W[H_END] = size >> 3
        W[H_CLEAN] = HEAP_WORDS + 2
        W[H_HELD_MAX] = size
        W[HEAP_WORDS + 1] = (size - HEAP_HEADER) | PREV_INUSE

    # ----------------------------------------------------------------- facts

    @property
    def end(self) -> int:
        """Absolute address one past the heap's last byte."""
        return self.base + (self._w[H_END] << 3)

    @property
    def held(self) -> int:
        """Bytes this heap holds from the OS (its extent, less the C library's spans inside it)."""
        W = self._w
        return (W[H_END] << 3) - W[H_FOREIGN]

    @property
    def held_max(self) -> int:
        """The most bytes this heap has ever held."""
        return self._w[H_HELD_MAX]

    @property
    def top_size(self) -> int:
        """Size of the top chunk: free memory at the end, split last."""
        W = self._w
        return W[W[H_TOP] + 1] & SIZE_MASK

    @property
    def in_use(self) -> int:
        """Bytes in in-use chunks (headers included, the C library's spans excluded); walks the bins."""
        W = self._w
        return (W[H_END] << 3) - HEAP_HEADER - W[H_FOREIGN_CHUNKS] - self.top_size - self.free_stats()[1]

    @property
    def clean(self) -> int:
        """The clean mark: the word index from which the heap's memory is zero as the OS gave it (see
        `zero_fresh`)."""
        return self._w[H_CLEAN]

    def block_address(self, c: int) -> int:
        """The address handed out for the chunk at word `c`: its block, past the 16-byte header. (An operation
        that allocates writes this out after its last step: a call there is where a signal handler could run
        between the allocation and its result.)"""
        return self.base + (c << 3) + HEADER

    def chunk_size(self, c: int) -> int:
        """Size in bytes of the chunk at word `c` (found by `chunk_of` or `find_chunk`)."""
        return self._w[c + 1] & SIZE_MASK

    def block_size(self, p: int) -> int:
        """The chunk size of the live block at address `p`, or 0 when the cheap checks of `find_chunk` fail
        (the same checks, written out: free's hot path asks this once)."""
        W = self._w
        off = p - self.base - HEADER
        if off & 15:
            return 0
        c = off >> 3
        t = W[H_TOP]
        if c < HEAP_WORDS or c >= t:
            return 0
        h = W[c + 1]
        size = h & SIZE_MASK
        n = c + (size >> 3)
        if h >> TAG_SHIFT != (c | 1) & TAG_BITS or h & (IS_MMAPPED | FOREIGN) \
                or n - c < 4 or n > t or not W[n + 1] & PREV_INUSE:
            return 0
        return size

    @property
    def empty(self) -> bool:
        """Whether every chunk is free: the top starts at the first chunk."""
        return self._w[H_TOP] == HEAP_WORDS

    def owns(self, address: int) -> bool:
        """Whether `address` lies in this heap's chunks."""
        return self.base + HEAP_HEADER <= address < self.base + (self._w[H_END] << 3)

    # ------------------------------------------------------- public interface

    def malloc(self, n: SupportsIndex) -> int:
        """Address of a new block of at least `n` bytes, 16-byte aligned; MemoryError if none."""
        if not self.region.base:
            raise self._closed()
        n = size_arg(n)
        check_request(n)
        nb = request_to_size(n)
        c = self.allocate(nb)
        if not c:
            self.extend(nb, f"heap top too small for a {n}-byte request")
            c = self.allocate(nb)
        return self.base + (c << 3) + HEADER

    def calloc(self, count: SupportsIndex, size: SupportsIndex) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product is too large."""
        if not self.region.base:
            raise self._closed()
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
        self.claimed(c)
        self.zero_fresh(c, clean)
        return self.base + (c << 3) + HEADER

    def free(self, p: SupportsIndex) -> None:
        """Free the block at `p` (0 does nothing); InvalidPointer or DoubleFree if it is not live."""
        if not self.region.base:
            raise self._closed()
        p = address_arg(p)
        if not p:
            return
        if self.release(self.chunk_of(p)) >= self.trim_threshold:
            self.trim(self.top_pad, "top chunk exceeds the trim threshold after a free")

    def realloc(self, p: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `p` to `n` bytes, in place when possible; returns its (new) address.

        `realloc(0, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and returns 0.
        """
        if not self.region.base:
            raise self._closed()
        p = address_arg(p)
        n = size_arg(n)
        if not p:
            return self.malloc(n)
        c = self.chunk_of(p)
        if n == 0:
            self.release(c)
            return 0
        check_request(n)
        nb = request_to_size(n)
        if self.resize_in_place(c, nb, grow_top=True):
            return p
        self.release(c, check_only=True)  # a block that cannot be freed must not be moved
        q = self.malloc(n)
        self.claimed((q - self.base - HEADER) >> 3)
        old_usable = (self._w[c + 1] & SIZE_MASK) - OVERHEAD
        libc.memmove(q, p, min(old_usable, n))
        self.release(c)
        return q

    def memalign(self, alignment: SupportsIndex, n: SupportsIndex) -> int:
        """A block of at least `n` bytes whose address is a multiple of `alignment` (a power of two)."""
        if not self.region.base:
            raise self._closed()
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
        return self.base + (self.align_chunk(c, nb, a) << 3) + HEADER

    def usable_size(self, p: SupportsIndex) -> int:
        """Bytes usable in the live block at `p`."""
        if not self.region.base:
            raise self._closed()
        c = self.chunk_of(address_arg(p))
        return (self._w[c + 1] & SIZE_MASK) - OVERHEAD

    # --------------------------------------------------- the engine's moves

    def allocate(self, nb: int) -> int:
        """Word index of an in-use chunk of at least `nb` bytes from the bins or the top, or 0.

        `nb` is a chunk size (see `layout.request_to_size`). The best fit: the exact small bin, else the
        first fitting chunk of the size-sorted large bin, else the smallest chunk of the next non-empty
        bin (the bitmap finds it), else the top. Never asks the OS for memory.
        """
        try:
            W = self._w
            if nb < SMALL_LIMIT:
                # The exact bin's first chunk, else the smallest chunk of the next non-empty bin.
                i = nb >> 4
                c = W[H_BINS + i]
                if not c:
                    m = W[H_SMALLMAP] >> (i + 1)
                    if m:
                        c = W[H_BINS + i + (m & -m).bit_length()]
                    else:
                        m = W[H_LARGEMAP]
                        c = W[H_BINS + 63 + (m & -m).bit_length()] if m else 0
            else:
                # The first chunk that fits is the best, as the bin is sorted (the walk of bins.relink's insert, written
                # out: this is the engine's hottest loop, and a call costs more than most walks).
                i = BIN[nb >> 4] if nb < TABLE_LIMIT else 127
                c = W[H_BINS + i]
                prev = 0
                try:
                    while c and (W[c + 1] & SIZE_MASK) < nb:
                        if W[c + 3] != prev:  # also ends a cycle made by an overwritten link
                            raise HeapCorruption(f"free chunk at {self.base + (c << 3):#x}: back link broken",
                                                 self.base + (c << 3))
                        prev = c
                        c = W[c + 2]
                except IndexError:
                    raise HeapCorruption(f"bin {i}'s links lead out of the heap", self.base + (prev << 3)) from None
                if not c:
                    m = W[H_LARGEMAP] >> (i - 63)
                    c = W[H_BINS + i + (m & -m).bit_length()] if m else 0
            if c:
                t = W[H_TOP]
                if c & 1 or c >= t or c < HEAP_WORDS:
                    raise HeapCorruption(f"a bin links to {self.base + (c << 3):#x}, which is no chunk",
                                         self.base + (c << 3))
                sz = W[c + 1] & SIZE_MASK
                e = c + (sz >> 3)
                if sz < nb or e >= t or W[e] != sz:  # glibc's "corrupted size vs. prev_size"
                    raise HeapCorruption(f"free chunk at {self.base + (c << 3):#x} has a bad size {sz}",
                                         self.base + (c << 3))
                rem = sz - nb
                if rem >= MIN_CHUNK:
                    r = c + (nb >> 3)
                    move(W, self.base, c, sz, r, rem)
                    W[r + 1] = rem | PREV_INUSE
                    W[e] = rem
                    sz = nb
                else:
                    move(W, self.base, c, sz, 0, 0)
                    W[e + 1] |= PREV_INUSE
                # A free chunk's predecessor is always in use (free neighbours are coalesced).
                W[c + 1] = sz | PREV_INUSE | ((c | 1) & TAG_BITS) << TAG_SHIFT
                return c
            t = W[H_TOP]
            tsz = W[t + 1] & SIZE_MASK
            if tsz < nb + MIN_CHUNK:
                return 0
            top = t + (nb >> 3)
            if top + ((tsz - nb) >> 3) != W[H_END]:
                raise HeapCorruption(f"top chunk at {self.base + (t << 3):#x} has a bad size {tsz}",
                                     self.base + (t << 3))
            W[top + 1] = (tsz - nb) | PREV_INUSE
            W[H_TOP] = top
            if top + 2 > W[H_CLEAN]:
                W[H_CLEAN] = top + 2
            W[t + 1] = nb | PREV_INUSE | ((t | 1) & TAG_BITS) << TAG_SHIFT
            return t
        except IndexError:
            raise HeapCorruption(f"heap at {self.base:#x}: a bin or the top chunk leads out of the heap",
                                 self.base) from None

    def extend(self, nb: int, reason: str) -> None:
        """Grow the region so the top chunk can serve a chunk of `nb` bytes (plus the top pad)."""
        self.settle()
        t, old_end = self._checked_top()
        W = self._w
        tsz = W[t + 1] & SIZE_MASK
        if self.region.size >> 3 > old_end:
            # The region holds memory past the heap's end: a trim was cut short between its two steps.
            self._absorb()
            W = self._w
            tsz = W[t + 1] & SIZE_MASK
            old_end = W[H_END]
        need = nb + MIN_CHUNK - tsz
        if need <= 0:
            return
        try:
            start = self.region.grow(need + self.top_pad, reason) >> 3
        except MemoryError:
            if not self.top_pad:
                raise
            start = self.region.grow(need, reason + " (without the top pad)") >> 3
        # From here to the end of the commit: no call, so that the header cannot lag the region.
        W = self._w = self.region.words
        new_end = self.region.size >> 3
        if start == old_end:
            W[t + 1] = (tsz + ((new_end - old_end) << 3)) | PREV_INUSE
        else:
            # A foreign span [old_end, start): cover it with an in-use chunk whose header is the last
            # 16 bytes of the old top. What is left of the old top becomes an in-use chunk that the
            # journal owes back, and `settle` frees it (a second commit).
            f = old_end - 2
            if tsz - HEADER >= MIN_CHUNK:
                W[t + 1] = (tsz - HEADER) | PREV_INUSE | ((t | 1) & TAG_BITS) << TAG_SHIFT
                W[f + 1] = ((start - f) << 3) | FOREIGN | PREV_INUSE
                W[H_JOURNAL] = t
            else:
                f = t
                W[f + 1] = ((start - f) << 3) | FOREIGN | PREV_INUSE
            W[H_FOREIGN] += (start - old_end) << 3
            W[H_FOREIGN_CHUNKS] += (start - f) << 3
            W[start + 1] = ((new_end - start) << 3) | PREV_INUSE
            W[H_TOP] = start
            W[H_CLEAN] = start + 2
        W[H_END] = new_end
        held = (new_end << 3) - W[H_FOREIGN]
        if held > W[H_HELD_MAX]:
            W[H_HELD_MAX] = held
        if start != old_end:
            self.settle()
            if (new_end - start) << 3 < nb + MIN_CHUNK:
                self.extend(nb, reason)

    def _absorb(self) -> None:
        """Commit: the region's memory past the heap's end (ours: a trim cut short left it) joins the top."""
        W = self._w = self.region.words
        t = W[H_TOP]
        new_end = self.region.size >> 3
        W[t + 1] = (W[t + 1] & SIZE_MASK) + ((new_end - W[H_END]) << 3) | PREV_INUSE
        W[H_END] = new_end

    def recover(self) -> None:
        """Bring the heap back to a whole state after an exception cut an operation short: the region
        finishes a system call's bookkeeping, then `settle`."""
        self.region.settle()
        self._w = self.region.words
        self.settle()

    def settle(self) -> None:
        """Finish an operation that an exception cut short between its two commits: free the chunk the
        journal names. Each step is a commit of its own, so it can be cut short and run again."""
        W = self._w
        c = W[H_JOURNAL]
        if c:
            if not HEAP_WORDS <= c < W[H_TOP]:
                raise HeapCorruption(f"heap journal names word {c}, which is no chunk", self.base)
            self.release(c)
            W[H_JOURNAL] = 0

    def find_chunk(self, p: int) -> int:
        """Word index of the live chunk whose block starts at address `p`, or 0; reads only.

        The cheap tier of checks: alignment, range, the in-use tag, the size and the next chunk's
        PREV_INUSE bit.
        """
        return (p - self.base - HEADER) >> 3 if self.block_size(p) else 0

    def would_serve(self, blocks: set[int], nb: int) -> list[int]:
        """Of `blocks`, live blocks of this heap the caller may free, those that freed would make room for a
        chunk of `nb` bytes: alone, or coalesced with the free chunks, the top and the other `blocks` around
        them, in address order. Reads only; a block with a damaged header is returned, for `chunk_of` to
        report."""
        W = self._w
        t = W[H_TOP]
        first = self.base + HEADER
        out: set[int] = set()
        for p in blocks:
            c = (p - first) >> 3
            try:
                h = W[c + 1]
                size = h & SIZE_MASK
                if size >= nb or size < MIN_CHUNK:
                    out.add(p)
                    continue
                total = 0 if h & PREV_INUSE else W[c]
                run = [p]
                n = c + (size >> 3)
                while first + (n << 3) in blocks:  # cached neighbours above coalesce too
                    run.append(first + (n << 3))
                    total += size
                    size = W[n + 1] & SIZE_MASK
                    if size < MIN_CHUNK:
                        raise IndexError
                    n += size >> 3
                total += size
                if n == t:
                    total -= MIN_CHUNK  # the top must keep a minimal chunk after the split
                    total += W[t + 1] & SIZE_MASK
                else:
                    nsz = W[n + 1] & SIZE_MASK
                    if not W[n + (nsz >> 3) + 1] & PREV_INUSE:
                        total += nsz
                if total >= nb:
                    out.update(run)
            except IndexError:
                out.add(p)
        return sorted(out)

    def chunk_of(self, p: int) -> int:
        """Word index of the live chunk whose block starts at address `p`; writes nothing.

        When the cheap checks fail, a walk tells why: InvalidPointer, DoubleFree or HeapCorruption.
        """
        c = self.find_chunk(p)
        if c:
            return c
        off = p - self.base - HEADER
        if HEAP_HEADER <= off < self._w[H_END] << 3 and not off & 15:
            raise self._classify(off >> 3)
        raise InvalidPointer(f"{p:#x} is not a block of this heap")

    def release(self, c: int, *, check_only: bool = False) -> int:
        """Free the in-use chunk at `c` (found by `chunk_of`): coalesce it and bin it or merge it into top.

        Its neighbours are checked before anything is written (HeapCorruption, nothing changed);
        `check_only` stops there. Returns the top's new size when the chunk merged into the top (the
        caller may trim), else 0.
        """
        try:
            W = self._w
            base = self.base
            h = W[c + 1]
            sz = h & SIZE_MASK
            n = c + (sz >> 3)
            t = W[H_TOP]
            nh = W[n + 1]
            nsz = nh & SIZE_MASK
            b = 0  # the next chunk when it is free (it merges)
            if n != t:
                e = n + (nsz >> 3)
                if nsz < HEADER or e > t:
                    raise HeapCorruption(f"chunk after {base + (c << 3):#x} has a bad size {nsz}", base + (n << 3))
                if W[e + 1] & PREV_INUSE:
                    if not nh & FOREIGN and nh >> TAG_SHIFT != (n | 1) & TAG_BITS:
                        raise HeapCorruption(f"header of the chunk after {base + (c << 3):#x} was overwritten",
                                             base + (n << 3))
                elif W[e] != nsz:  # glibc's "corrupted size vs. prev_size"
                    raise HeapCorruption(f"free chunk after {base + (c << 3):#x}: its size {nsz} disagrees with its "
                                         "boundary tag", base + (n << 3))
                else:
                    b = n
                    sz += nsz
            old = c
            pc = psz = 0
            if not h & PREV_INUSE:
                psz = W[c]
                pc = c - (psz >> 3)
                if psz < MIN_CHUNK or psz & 15 or pc < HEAP_WORDS or (W[pc + 1] & ~PREV_INUSE) != psz:
                    raise HeapCorruption(f"chunk before {base + (c << 3):#x} has a bad boundary tag {psz}",
                                         base + (c << 3))
                c = pc
                sz += psz
            if check_only:
                relink(W, base, pc, psz, b, nsz, 0, 0, dry=True)  # both neighbours' links, before either goes
                return 0
            if n == t:
                if pc:
                    move(W, base, pc, psz, 0, 0)
                    # The chunk merged into the one before keeps its old header inside the merged chunk: its
                    # in-use tag goes, so that the freed block no longer passes `find_chunk` (a second free is
                    # caught).
                    W[old + 1] = h & UNTAGGED
                W[c + 1] = (sz + nsz) | PREV_INUSE
                W[H_TOP] = c
                return sz + nsz
            if pc:
                if b:
                    relink(W, base, pc, psz, b, nsz, c, sz)
                else:
                    move(W, base, pc, psz, c, sz)
                W[old + 1] = h & UNTAGGED  # as above
            elif b:
                move(W, base, b, nsz, c, sz)
            elif sz < SMALL_LIMIT:
                # The common case, a small chunk between chunks in use, written out: it goes to the head of its
                # bin (bins.relink's insert, with no call before the stores).
                i = sz >> 4
                head = W[H_BINS + i]
                if head and W[head + 3]:
                    raise HeapCorruption(f"free chunk at {base + (head << 3):#x}: back link broken", base + (head << 3))
                W[c + 2] = head
                W[c + 3] = 0
                if head:
                    W[head + 3] = c
                else:
                    W[H_SMALLMAP] |= 1 << i
                W[H_BINS + i] = c
            else:
                relink(W, base, 0, 0, 0, 0, c, sz)
            if not b:
                W[n + 1] = nh & ~PREV_INUSE
            W[c + 1] = sz | PREV_INUSE
            W[c + (sz >> 3)] = sz
            return 0
        except IndexError:
            raise self._leads_out(c) from None

    def resize_in_place(self, c: int, nb: int, *, grow_top: bool) -> bool:
        """Make the in-use chunk at `c` exactly or about `nb` bytes without moving it; False if it can't.

        Shrinks by splitting off the tail; grows into a free next chunk or into the top, and, when
        `grow_top` is set and the chunk borders the top, by extending the region first.
        """
        try:
            W = self._w
            h = W[c + 1]
            sz = h & SIZE_MASK
            keep = h & (PREV_INUSE | TAG_MASK)
            if nb <= sz:
                if sz - nb >= MIN_CHUNK:
                    r = c + (nb >> 3)
                    tr = tag(r)
                    # First commit: the tail becomes an in-use chunk that the journal owes back; settle frees it.
                    W[r + 1] = (sz - nb) | PREV_INUSE | tr
                    W[c + 1] = nb | keep
                    W[H_JOURNAL] = r
                    self.settle()
                return True
            n = c + (sz >> 3)
            t = W[H_TOP]
            if n == t:
                tsz = W[t + 1] & SIZE_MASK
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
                    tsz = W[t + 1] & SIZE_MASK
                top = c + (nb >> 3)
                W[top + 1] = (sz + tsz - nb) | PREV_INUSE
                W[H_TOP] = top
                if top + 2 > W[H_CLEAN]:
                    W[H_CLEAN] = top + 2
                W[c + 1] = nb | keep
                return True
            nh = W[n + 1]
            nsz = nh & SIZE_MASK
            if W[n + (nsz >> 3) + 1] & PREV_INUSE or sz + nsz < nb:
                return False
            if W[n + (nsz >> 3)] != nsz:  # glibc's "corrupted size vs. prev_size"
                raise HeapCorruption(f"free chunk after {self.base + (c << 3):#x}: its size {nsz} "
                                     "disagrees with its boundary tag", self.base + (n << 3))
            total = sz + nsz
            if total - nb >= MIN_CHUNK:
                r = c + (nb >> 3)
                move(W, self.base, n, nsz, r, total - nb)
                W[r + 1] = (total - nb) | PREV_INUSE
                W[c + (total >> 3)] = total - nb
                total = nb
            else:
                move(W, self.base, n, nsz, 0, 0)
                W[c + (total >> 3) + 1] |= PREV_INUSE
            W[c + 1] = total | keep
            return True
        except IndexError:
            raise self._leads_out(c) from None

    def align_chunk(self, c: int, nb: int, alignment: int) -> int:
        """Carve a chunk of `nb` bytes whose block is `alignment`-aligned out of the in-use chunk at `c`.

        The chunk must hold `nb + alignment + MIN_CHUNK` bytes; the pieces before and after go back free.
        """
        W = self._w
        a = self.aligned_chunk(c, alignment)
        if a != c:
            h = W[c + 1]
            sz = h & SIZE_MASK
            lead = (a - c) << 3
            tc = tag(c)
            ta = tag(a)
            # First commit: the lead becomes an in-use chunk that the journal owes back; settle frees it.
            W[a + 1] = (sz - lead) | PREV_INUSE | ta
            W[c + 1] = lead | (h & PREV_INUSE) | tc
            W[H_JOURNAL] = c
            self.settle()
        self.resize_in_place(a, nb, grow_top=False)
        return a

    def aligned_chunk(self, c: int, alignment: int) -> int:
        """The chunk `align_chunk(c, nb, alignment)` returns: the first whose block is `alignment`-aligned
        and that leaves a lead of at least a minimal chunk (or none). Reads nothing."""
        first = self.block_address(c)
        p = (first + alignment - 1) & ~(alignment - 1)
        while p != first and p - first < MIN_CHUNK:
            p += alignment
        return c + ((p - first) >> 3)

    def claimed(self, c: int) -> None:
        """Called with a chunk just allocated that the same operation is about to fill (calloc's zeroes, a moving
        realloc's copy) before it ends. In an `undoable` heap (a shared heap's, whose region journals each
        store's old value so that an operation can be undone after it wrote), the words an undo needs that
        the fill overwrites, a free chunk's links and boundary tag, are stored again as they are: journaled."""
        if self.undoable:
            W = self._w
            W[c + 2] = W[c + 2]
            W[c + 3] = W[c + 3]
            e = c + ((W[c + 1] & SIZE_MASK) >> 3)
            W[e] = W[e]

    def zero_fresh(self, c: int, clean: int) -> None:
        """Zero the block of the chunk at `c`, except what lies at or above word `clean` (still zero)."""
        start = c + 2
        end = c + 1 + ((self._w[c + 1] & SIZE_MASK) >> 3)  # the block ends one word into the next chunk
        if start < clean:
            libc.memset(self.base + (start << 3), 0, (min(end, clean) - start) << 3)

    def trim(self, pad: SupportsIndex = 0, reason: str = "malloc_trim", *, inner: bool = False) -> bool:
        """Give free memory back to the OS, keeping `pad` bytes in the top; True if anything went back.

        The top's whole pages beyond the pad leave the region (the break goes down when it can);
        when the region cannot shrink, they are released with madvise instead, once (the clean mark
        remembers). With `inner`, the whole pages inside every large free chunk are released too.
        """
        if not self.region.base:
            raise self._closed()
        pad = size_arg(pad, "pad")
        W = self._w
        region = self.region
        page = libc.PAGE_SIZE
        released = False
        t, end = self._checked_top()
        end <<= 3
        keep = (t << 3) + MIN_CHUNK + pad
        extra = ((end - keep) // page) * page if end > keep else 0
        shrinks = extra > 0 and region.can_shrink(extra)
        lo = ((region.base + keep + page - 1) & ~(page - 1)) - region.base
        if not shrinks and not inner and W[H_CLEAN] << 3 <= lo:
            return False  # nothing to give back: the top's pages above the pad went already
        edge = "the break" if region.kind == "brk" else "the heap's end"
        if shrinks:
            # The header first, then the region: an exception between the two leaves the region holding
            # memory past the heap's end, which the next `extend` takes back into the top.
            why = (f"{reason}: the free top's last {size_approx(extra)}, {region.base + end - extra:#x}-"
                   f"{region.base + end:#x}, beyond a pad of {size_text(pad)}: {edge} comes down")
            new_end = (end - extra) >> 3
            W[t + 1] = (end - extra - (t << 3)) | PREV_INUSE
            W[H_END] = new_end
            if W[H_CLEAN] > new_end:
                W[H_CLEAN] = new_end
            released = region.shrink(region.size - (new_end << 3), why)
            self._w = W = region.words
        else:
            if W[H_CLEAN] << 3 > lo and end > keep and region.release(
                    keep, end - keep, f"{reason}: whole pages of the free top, {region.base + keep:#x}-"
                                      f"{region.base + end:#x}: {edge} cannot come down (other memory lies "
                                      "above it, or another thread runs)"):
                W[H_CLEAN] = lo >> 3
                released = True
        if inner:
            for i in range(64, N_BINS):
                prev = 0
                for f in bins.members(W, i):
                    fsz = W[f + 1] & SIZE_MASK
                    # madvise zeroes what it is given: only a chunk that is free by every mark goes to it.
                    if f & 1 or f < HEAP_WORDS or fsz < MIN_CHUNK or f + (fsz >> 3) >= t or W[f + 3] != prev \
                            or W[f + 1] != fsz | PREV_INUSE or W[f + (fsz >> 3)] != fsz \
                            or W[f + (fsz >> 3) + 1] & PREV_INUSE:
                        raise HeapCorruption(f"free chunk at {self.base + (f << 3):#x} in bin {i} is damaged",
                                             self.base + (f << 3))
                    prev = f
                    why = (f"{reason}: whole pages inside a free {size_approx(fsz)} chunk at "
                           f"{region.base + (f << 3):#x}: {edge} cannot come down past the block in use above it")
                    if region.release((f << 3) + 32, fsz - 32, why):
                        released = True
        return released

    # ------------------------------------------------------------ the checks

    def _checked_top(self) -> tuple[int, int]:
        """(top chunk, end) as word indices, checked against each other and the region before a grow or a
        trim hands anything derived from them to the OS."""
        W = self._w
        t, end = W[H_TOP], W[H_END]
        if end << 3 > self.region.size or t & 1 or not HEAP_WORDS <= t <= end - 4:
            raise HeapCorruption(f"heap at {self.base:#x}: top chunk (word {t}) or end (word {end}) damaged",
                                 self.base)
        if t + ((W[t + 1] & SIZE_MASK) >> 3) != end:
            at = self.base + (t << 3)
            raise HeapCorruption(f"top chunk at {at:#x} does not end at the heap's end", at)
        return t, end

    def _closed(self) -> ValueError:
        """The error for a call on a heap whose region was closed (as Python's I/O on a closed file)."""
        return ValueError(f"the heap at {self.base:#x} is over a region that was closed")

    def _leads_out(self, c: int) -> HeapCorruption:
        """The error for a size or link around the chunk at word `c` that points outside the region."""
        at = self.base + (c << 3)
        return HeapCorruption(f"chunk at {at:#x} or a neighbour has a size or link that leads out of the heap", at)

    def _classify(self, c: int) -> Exception:
        """Why word `c` is not the start of a live chunk: walk the heap to find what lies there."""
        base = self.base
        p = self.block_address(c)
        W = self._w
        try:
            for w, size, word in self._walk():
                if w == c:
                    if word & TAG_MASK == tag(w):
                        return HeapCorruption(f"the chunk after the block at {p:#x} was damaged "
                                              "(its size or PREV_INUSE bit overwritten)",
                                              base + (w << 3) + size)
                    if word & (TAG_MASK | IS_MMAPPED | FOREIGN) == FOREIGN and W[H_FOREIGN_CHUNKS]:
                        return InvalidPointer(f"{p:#x} is inside memory of the C library's own malloc")
                    if self._looks_free(w, size):
                        return DoubleFree(f"double free: the block at {p:#x} is already free")
                    return HeapCorruption(f"chunk header at {base + (c << 3):#x} was overwritten", base + (c << 3))
                if w < c < w + (size >> 3):
                    stale = W[c + 1]
                    # A live header inside another chunk: the size at w was damaged (release untags the
                    # header of a block it merges into the free chunk below it).
                    if stale & TAG_MASK == tag(c):
                        return HeapCorruption(f"the chunk at {base + (w << 3):#x} has a size that covers the "
                                              f"live block at {p:#x}", base + (w << 3))
                    if self._looks_free(w, size) and not stale & TAG_MASK and \
                            MIN_CHUNK <= (stale & SIZE_MASK) <= W[H_END] << 3:
                        return DoubleFree(f"double free: the block at {p:#x} was freed and merged")
                    return InvalidPointer(f"{p:#x} is not the start of a block (it lies inside one at "
                                          f"{base + (w << 3) + HEADER:#x})")
        except HeapCorruption as exc:
            return exc
        return InvalidPointer(f"{p:#x} is not a block of this heap")

    def _looks_free(self, w: int, size: int) -> bool:
        """Whether the chunk at `w` is free by every mark: the top, or a header without a tag, a matching
        boundary tag and the next chunk's PREV_INUSE clear (a damaged live chunk fails one of them)."""
        W = self._w
        if w == W[H_TOP]:
            return True
        n = w + (size >> 3)
        return W[w + 1] == size | PREV_INUSE and W[n] == size and not W[n + 1] & PREV_INUSE

    def _is_free(self, w: int, size: int) -> bool:
        W = self._w
        if w == W[H_TOP]:
            return True
        return not W[w + (size >> 3) + 1] & PREV_INUSE

    def _walk(self, w: int = HEAP_WORDS) -> Iterator[tuple[int, int, int]]:
        """(word index, size, size word) of every chunk in address order, from the chunk at word `w`;
        HeapCorruption on a bad size, or a top or end outside the region."""
        top, end = self._checked_top()
        W = self._w
        while True:
            word = W[w + 1]
            size = word & SIZE_MASK
            if w == top:
                if w + (size >> 3) != end:
                    raise HeapCorruption(f"top chunk at {self.base + (w << 3):#x} does not end at the heap's end",
                                         self.base + (w << 3))
                yield w, size, word
                return
            if size < (HEADER if word & FOREIGN else MIN_CHUNK) or w + (size >> 3) > top:
                raise HeapCorruption(f"chunk at {self.base + (w << 3):#x} has a bad size {size}",
                                     self.base + (w << 3))
            yield w, size, word
            w += size >> 3

    def walk(self, start: int | None = None) -> Iterator[Chunk]:
        """Every chunk in address order; with `start`, from the chunk at that address on (an inspector that
        follows changes walks again only from a chunk before the change). ValueError if `start` is not a
        chunk-aligned address among this heap's chunks; a `start` inside a chunk reads a size word from the
        middle of its block, and the walk raises HeapCorruption or reports chunks that are not there."""
        if not self.region.base:
            raise self._closed()
        W = self._w
        first = HEAP_WORDS
        if start is not None:
            off = start - self.base
            if off & 15 or not HEAP_WORDS <= off >> 3 <= W[H_TOP]:
                raise ValueError(f"{start:#x} is not a chunk of the heap at {self.base:#x}")
            first = off >> 3
        for w, size, word in self._walk(first):
            if w == W[H_TOP]:
                state, b = "top", -1
            elif word & FOREIGN:
                state, b = "foreign", -1
            elif self._is_free(w, size):
                state, b = "free", bin_index(size)
            else:
                state, b = "in use", -1
            yield Chunk(self.base + (w << 3), size, state, b)

    def check(self, full: bool = True) -> None:
        """Verify the heap's invariants; raise HeapCorruption naming the address and what is wrong.

        `full=False` checks the header only; the full check walks every chunk and every bin.
        """
        if not self.region.base:
            raise self._closed()
        W = self._w
        base = self.base

        def bad(message: str, w: int = 0) -> HeapCorruption:
            return HeapCorruption(message, base + (w << 3))

        if W[H_MAGIC] != MAGIC or W[H_VERSION] != VERSION:
            raise bad("heap header: bad magic number or version")
        end, top = W[H_END], W[H_TOP]
        if end << 3 > self.region.size or end & 1 or not HEAP_WORDS <= top <= end - 4 or top & 1:
            raise bad(f"heap header: end {base + (end << 3):#x} or top {base + (top << 3):#x} out of range")
        if not full:
            return
        foreign_chunks = 0
        free_chunks: dict[int, int] = {}
        prev_free = False
        for w, size, word in self._walk():
            at = base + (w << 3)
            if bool(word & PREV_INUSE) == prev_free:
                raise bad(f"chunk at {at:#x}: PREV_INUSE bit disagrees with the chunk before", w)
            if size & 15 or word & IS_MMAPPED:
                raise bad(f"chunk at {at:#x}: bad size word {word:#x}", w)
            if w == top:
                if word & TAG_MASK:
                    raise bad("the top chunk carries an in-use tag", w)
                break
            free = not W[w + (size >> 3) + 1] & PREV_INUSE
            if word & FOREIGN:
                if free:
                    raise bad(f"foreign chunk at {at:#x} is marked free", w)
                foreign_chunks += size
            elif free:
                if word & TAG_MASK:
                    raise bad(f"free chunk at {at:#x} carries an in-use tag", w)
                if prev_free:
                    raise bad(f"free chunks at {at:#x} and before it were not coalesced", w)
                if W[w + (size >> 3)] != size:
                    raise bad(f"free chunk at {at:#x}: boundary tag differs from its size", w)
                free_chunks[w] = size
            elif word & TAG_MASK != tag(w):
                raise bad(f"in-use chunk at {at:#x}: header tag overwritten", w)
            prev_free = free and not word & FOREIGN
        if foreign_chunks != W[H_FOREIGN_CHUNKS]:
            raise bad(f"heap header: foreign chunks of {W[H_FOREIGN_CHUNKS]} bytes counted, {foreign_chunks} found")
        for i in range(N_BINS):
            head = W[H_BINS + i]
            mask_word, bit = (H_SMALLMAP, i) if i < 64 else (H_LARGEMAP, i - 64)
            if bool(head) != bool(W[mask_word] >> bit & 1):
                raise bad(f"bin {i}: bitmap bit disagrees with the bin's head")
            prev, c, last_size = 0, head, 0
            while c:
                size = free_chunks.pop(c, -1)
                if size < 0:
                    raise bad(f"bin {i} links to {base + (c << 3):#x}, which is not a free chunk", c)
                if bin_index(size) != i:
                    raise bad(f"free chunk at {base + (c << 3):#x} of size {size} is in bin {i}", c)
                if W[c + 3] != prev:
                    raise bad(f"free chunk at {base + (c << 3):#x}: back link broken", c)
                if size < last_size:
                    raise bad(f"bin {i} is not sorted by size at {base + (c << 3):#x}", c)
                prev, last_size, c = c, size, W[c + 2]
        if free_chunks:
            w = min(free_chunks)
            raise bad(f"free chunk at {base + (w << 3):#x} is in no bin", w)
        clean = W[H_CLEAN]
        if clean < top + 2 and clean < end:
            raise bad(f"heap header: clean mark {base + (clean << 3):#x} is below the top chunk's header")

    def free_stats(self) -> tuple[int, int]:
        """(number, bytes) of free chunks in the bins."""
        W = self._w
        count = size = 0
        for i in range(N_BINS):
            for c in bins.members(W, i):
                count += 1
                size += W[c + 1] & SIZE_MASK
        return count, size
