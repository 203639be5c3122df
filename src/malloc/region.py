"""Regions: the contiguous address ranges a heap lives in, with word access and a way to grow.

A region knows where its memory comes from and nothing about chunks. It exposes `base` (absolute address,
16-byte aligned), `size` (bytes usable from `base`), and `words`, a memoryview of unsigned 64-bit words
over `[base, base + size)`, rebuilt whenever the range changes. Growth may be non-contiguous only for
the program break: `grow` returns the offset where the new memory starts, past any span the C library
took in between (the heap covers that span with a foreign chunk).
"""

from __future__ import annotations

import ctypes
import operator
import struct
from typing import Final, SupportsIndex

from .errors import HeapCorruption
from .layout import ALIGNMENT, MAX_REQUEST, page_align_up
from .os import libc

PAGE = libc.PAGE_SIZE
# The word format of `words`: C's unsigned long, 64 bits on the LP64 Linux targets. Not "Q": CPython
# converts an int to unsigned long long through a byte-array routine, so storing a header word (its
# in-use tag sets the top bits) costs more, about 1% of a replay's instructions (callgrind, amptjp).
WORD_FORMAT: Final = "L"
if struct.calcsize(WORD_FORMAT) != 8:
    raise ImportError("malloc needs 64-bit unsigned long words (an LP64 platform)")
# Default address space reserved for a heap over a mapping (glibc's HEAP_MAX_SIZE on 64-bit).
MAP_RESERVE = 64 << 20


def region_size(n: SupportsIndex, what: str) -> int:
    """`n` checked as a region size: TypeError for a non-integer, ValueError for a negative one, MemoryError
    beyond MAX_REQUEST (no machine can give it, and larger values would wrap in the system calls' C types)."""
    if isinstance(n, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        size = operator.index(n)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(n).__name__}") from None
    if size < 0:
        raise ValueError(f"{what} must not be negative: {size}")
    if size > MAX_REQUEST:
        raise MemoryError(f"{what} of {size} bytes is more than any machine can give")
    return size


class Region:
    """A contiguous range of memory; subclasses say where it comes from."""

    base: int = 0
    size: int = 0
    words: memoryview

    def _rebuild(self) -> None:
        self.words = self._view(self.size)

    def _view(self, size: int) -> memoryview:
        """Word view of the first `size` bytes. A region builds the new view before it stores the new size
        and view (two stores, no call between), so that an exception cannot leave them disagreeing."""
        return libc.memory_view(self.base, size).cast(WORD_FORMAT)

    def grow(self, min_bytes: int, reason: str) -> int:
        """Add at least `min_bytes` at the end; return the offset where the new memory starts."""
        raise MemoryError(f"{type(self).__name__} cannot grow")

    def can_shrink(self, nbytes: int) -> bool:
        """Whether `shrink(nbytes)` would give memory back now (it checks again)."""
        return False

    def shrink(self, nbytes: int, reason: str) -> bool:
        """Give the last `nbytes` (a page multiple) back to the OS now, if this region can."""
        return False

    def settle(self) -> None:
        """Finish a shrink whose system call an exception cut short (see BreakRegion)."""

    def release(self, offset: int, nbytes: int, reason: str) -> bool:
        """Let the OS reclaim the whole pages in `[offset, offset + nbytes)`, which read as zero after;
        False when there is no whole page."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"release of [{offset:#x}, {offset + nbytes:#x}) is outside the region's "
                             f"{self.size:#x} bytes")
        start = page_align_up(self.base + offset, PAGE)
        end = (self.base + offset + nbytes) & ~(PAGE - 1)
        if end <= start:
            return False
        libc.madvise_dontneed(start, end - start, reason)
        return True

    def close(self) -> None:
        """Return the whole region to the OS (regions that cannot, keep it)."""

    @property
    def kind(self) -> str:
        return "region"


class BreakRegion(Region):
    """The process heap: memory from the program break, grown with sbrk.

    The C library's malloc moves the same break. When the break is not where this region left it,
    the region continues above it and reports the gap to the heap.
    """

    _owed = 0  # bytes a shrink has taken off the region but not yet off the break
    _done: list[int]  # the result of the last such sbrk, stored before anything can interrupt

    def __init__(self, initial: int, reason: str) -> None:
        if region_size(initial, "initial size") == 0:
            raise ValueError("initial size must be positive")
        self._done = []
        start = libc.current_break()
        incr = page_align_up(start + initial, PAGE) - start
        old = libc.sbrk(incr, reason)
        self.base = (old + ALIGNMENT - 1) & ~(ALIGNMENT - 1)
        self.size = (old + incr - self.base) & ~(ALIGNMENT - 1)
        self._rebuild()

    @property
    def kind(self) -> str:
        return "brk"

    def grow(self, min_bytes: int, reason: str) -> int:
        region_size(min_bytes, "growth")  # a positive increment that fits sbrk's ssize_t: the break only rises
        end = self.base + self.size
        incr = page_align_up(end + min_bytes, PAGE) - end
        words = self._view(self.size + incr)
        old = libc.sbrk(incr, reason)
        if old == end:
            self.words = words
            self.size += incr
            return end - self.base
        if old < end:
            # Someone lowered the break into our memory; nothing can be trusted above it.
            libc.sbrk(-incr, "undo: the break was below this heap's end")
            raise HeapCorruption(f"program break {old:#x} moved below the heap's end {end:#x}", end)
        # Foreign sbrk: the C library took [end, old). Continue at the next aligned address above it.
        start = (old + ALIGNMENT - 1) & ~(ALIGNMENT - 1)
        new_end = old + incr
        if new_end - start < min_bytes:
            extra = page_align_up(start + min_bytes, PAGE) - new_end
            more = libc.sbrk(extra, reason + " (after a foreign sbrk)")
            if more != new_end:
                libc.sbrk(-extra, "undo: the break moved again")
                libc.sbrk(-incr, "undo: the break moved again")
                raise MemoryError("the program break keeps moving under this heap")
            new_end += extra
        size = (new_end - self.base) & ~(ALIGNMENT - 1)
        words = self._view(size)
        self.words = words
        self.size = size
        return start - self.base

    def can_shrink(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.size and libc.thread_count() == 1 \
            and libc.current_break() == self.base + self.size

    def shrink(self, nbytes: int, reason: str) -> bool:
        end = self.base + self.size
        if nbytes > self.size:
            raise ValueError(f"cannot shrink a {self.size:#x}-byte region by {nbytes:#x} bytes")
        if nbytes <= 0 or libc.thread_count() != 1:
            return False
        words = self._view(self.size - nbytes)
        # Compare the break right before lowering it, with nothing in between that could make the C
        # library move it. The region shrinks first and owes the break's move (`_owed`): an exception
        # before the sbrk leaves the break above the region's end, which `settle` lowers.
        if libc.current_break() != end:
            return False
        self.words = words
        self.size -= nbytes
        self._owed = nbytes
        del self._done[:]
        libc.sbrk(-nbytes, reason, self._done)
        self._owed = 0
        return True

    def settle(self) -> None:
        owed = self._owed
        if owed and not self._done and libc.current_break() == self.base + self.size + owed:
            libc.sbrk(-owed, "a trim cut short by an exception: the break goes down to the heap's end", self._done)
        self._owed = 0


class MapRegion(Region):
    """A heap over a private anonymous mapping: address space reserved up front, committed as it grows.

    The reservation is PROT_NONE, so untouched address space costs nothing; growing makes pages
    readable and writable with mprotect, as glibc does for its secondary heaps. A region with no room
    to grow (`reserve` at most `initial`) is one plain writable mapping instead, which the kernel charges
    against its commit limit: one it cannot back fails at once with MemoryError, as glibc's malloc then
    returns NULL, instead of being touched into the OOM killer later.
    """

    def __init__(self, initial: int, reason: str, reserve: int = MAP_RESERVE) -> None:
        initial = page_align_up(max(region_size(initial, "initial size"), PAGE), PAGE)
        self._reserved = page_align_up(max(region_size(reserve, "reserve"), initial), PAGE)
        if self._reserved == initial:
            self.base = libc.mmap_anonymous(initial, reason)
        else:
            self.base = libc.mmap_anonymous(self._reserved, reason, prot=libc.PROT_NONE,
                                            flags=libc.MAP_NORESERVE)
            try:
                libc.mprotect(self.base, initial, libc.PROT_READ | libc.PROT_WRITE, reason)
            except BaseException:
                libc.munmap(self.base, self._reserved, "undo: a new heap mapping could not be committed")
                raise
        self.size = initial
        self._rebuild()

    @property
    def kind(self) -> str:
        return "mmap"

    @property
    def reserved(self) -> int:
        return self._reserved

    def grow(self, min_bytes: int, reason: str) -> int:
        incr = page_align_up(region_size(min_bytes, "growth"), PAGE)
        if self.size + incr > self._reserved:
            raise MemoryError(f"heap mapping at {self.base:#x} is full ({self._reserved} bytes reserved)")
        libc.mprotect(self.base + self.size, incr, libc.PROT_READ | libc.PROT_WRITE, reason)
        old = self.size
        words = self._view(old + incr)
        self.words = words
        self.size = old + incr
        return old

    def can_shrink(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.size

    def shrink(self, nbytes: int, reason: str) -> bool:
        if nbytes > self.size:
            raise ValueError(f"cannot shrink a {self.size:#x}-byte region by {nbytes:#x} bytes")
        if nbytes <= 0:
            return False
        # The region shrinks first: an exception before the system calls leaves pages readable and
        # writable past its end, which a later growth makes readable and writable again anyway.
        words = self._view(self.size - nbytes)
        self.words = words
        self.size -= nbytes
        start = self.base + self.size
        libc.madvise_dontneed(start, nbytes, reason)
        libc.mprotect(start, nbytes, libc.PROT_NONE, reason)
        return True

    def close(self) -> None:
        if self.base:
            self.words.release()
            libc.munmap(self.base, self._reserved, "heap mapping closed")
            self.base = 0
            self.size = 0


class BufferRegion(Region):
    """A fixed region over memory the caller already owns (a bytearray, an mmap object, a numpy array).

    It never grows and makes no system calls; the caller keeps the buffer alive and unmoved.
    """

    def __init__(self, buffer: object) -> None:
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if view.readonly:
            raise ValueError("the buffer is read-only")
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        skip = -address % ALIGNMENT
        usable = (len(view) - skip) & ~(ALIGNMENT - 1) if len(view) > skip else 0
        self._buffer = view  # kept alive: the words view depends on it
        self.base = address + skip
        self.size = usable
        self.words = view[skip:skip + usable].cast(WORD_FORMAT)

    @property
    def kind(self) -> str:
        return "buffer"

    def _rebuild(self) -> None:
        raise AssertionError("a buffer region never changes")

    def release(self, offset: int, nbytes: int, reason: str) -> bool:
        """Memory the caller owns is not given back."""
        return False
