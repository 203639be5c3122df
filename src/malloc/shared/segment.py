"""A shared heap's segment: one file mapped MAP_SHARED by every process, its header, and its undo journal.

Layout (64-bit words at offset 0 of the file; the engine's heap starts at SEG_HEADER):

    0 magic   1 version   2 extent (bytes of the file in use)   3 limit (bytes the segment may grow to)
    4 roots (offset of the names table, 0 for none)   5 journal length (the next free journal word)
    8-12 the lock (a robust pthread mutex, os/mutex.py)   16-1535 the journal: (word index, old value) pairs
    1536-1791 the process table: (process id, start time) of each process that holds a cache slot

Every process reserves `limit` bytes of address space (PROT_NONE) and maps the file over the start of it, so
growth maps the new part in place: the base never moves, and addresses and views stay valid.

The journal makes an operation all or nothing for a process killed at any instant. Every store the engine
makes to the segment goes through `Words.__setitem__`, which first appends the word's index and old value to
the journal and only then stores. An operation ends by setting the journal's length back to empty: that one
store is its commit. Whoever takes the lock and finds the journal not empty (its holder died, or an
exception cut its operation short) restores the old values, newest first, and empties it. Restoring is
idempotent, so a repair cut short is simply run again. The heap's clean mark is the one word not restored: a
mark left higher than needed only makes a later calloc zero memory that was zero already, while memory that
an undone operation wrote above the old mark must not be taken for fresh zeroes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from ..errors import HeapCorruption
from ..exports import UNSHARED, Exporter, most_referenced
from ..heap import H_CLEAN
from ..layout import MAX_REQUEST, page_align_up
from ..os import files, libc, mutex
from ..region import PAGE, WORD_FORMAT, Region

SEG_MAGIC = int.from_bytes(b"pyMshare", "little")
SEG_VERSION = 1
S_MAGIC, S_VERSION, S_EXTENT, S_LIMIT, S_ROOTS, S_JOURNAL = range(6)
S_MUTEX = 8
J_START = 16
SEG_HEADER = 16384  # the heap starts on a page of its own
OWNERS = 1536  # the process table: (process id, start time) per cache slot, slot k at OWNERS + 2 * (k - 1)
SLOTS = 128
J_END = OWNERS
HEAP_WORD = SEG_HEADER // 8  # the segment word index of the heap's word 0
# A block in a process's cache (see heap.py) holds these in its first two words: the mark, then the slot.
CACHE_MARK = int.from_bytes(b"pyMcache", "little")
MUTEX_OFFSET = S_MUTEX * 8
SEG_MIN = SEG_HEADER + PAGE  # the smallest segment: the header and one page of heap
# Address space reserved when the caller names no limit: reservations cost no memory, and 128 heaps of this
# size still fit in a quarter of x86-64's 128 TiB of user address space.
DEFAULT_LIMIT = 256 << 30


class JournalFull(RuntimeError):
    """One operation wrote more words than the journal holds (a bug: no operation needs that many)."""


def journaled_words(address: int, nwords: int, log: memoryview, bias: int) -> ctypes.Array[ctypes.c_ulong]:
    """The heap's words at `address` as an array whose stores journal the old value first (module docstring).

    `bias` turns the array's index into the segment's word index. Reads are plain ctypes reads.
    """
    base: Any = ctypes.c_ulong * nwords
    get: Callable[[Any, int], int] = base.__getitem__
    put: Callable[[Any, int, int], None] = base.__setitem__

    class Words(base):  # type: ignore[misc]
        __slots__ = ()

        def __setitem__(self, i: int, v: int) -> None:
            if i != H_CLEAN:
                n = log[S_JOURNAL]
                if n >= J_END:
                    raise JournalFull("a shared heap operation overflowed its journal")
                if i < 0:
                    raise IndexError("negative word index")
                log[n] = i + bias
                log[n + 1] = get(self, i)
                log[S_JOURNAL] = n + 2
            put(self, i, v)

    words: ctypes.Array[ctypes.c_ulong] = Words.from_address(address)
    return words


def journal_store(log: memoryview, i: int, v: int) -> None:
    """Store `v` in header word `i`, journaled as the engine's stores are."""
    n = log[S_JOURNAL]
    if n >= J_END:
        raise JournalFull("a shared heap operation overflowed its journal")
    log[n] = i
    log[n + 1] = log[i]
    log[S_JOURNAL] = n + 2
    log[i] = v


def roll_back(seg: memoryview) -> None:
    """Undo the operation the journal describes (the segment's words `seg`, as far as this process maps them)
    and empty the journal; HeapCorruption, changing nothing, when an entry names a word it may not."""
    n = seg[S_JOURNAL]
    if n < J_START or n > J_END or n & 1:
        raise HeapCorruption(f"shared heap journal: length word {n} is out of range")
    limit = len(seg)
    for k in range(J_START, n, 2):
        i = seg[k]
        if not (HEAP_WORD <= i < limit or i in (S_EXTENT, S_ROOTS) or OWNERS <= i < OWNERS + 2 * SLOTS):
            raise HeapCorruption(f"shared heap journal: entry {(k - J_START) >> 1} names word {i}, outside the heap")
    while n > J_START:
        n -= 2
        seg[seg[n]] = seg[n + 1]
    seg[S_JOURNAL] = J_START


HEADER_START = 64  # the bytes `read_header` needs


def read_header(start: bytes, path: str) -> tuple[int, int]:
    """(extent, limit) from a segment's first HEADER_START bytes, read before anything is mapped; HeapCorruption
    naming `path` and what is wrong when they are not the header of a whole heap of this version."""
    if len(start) < HEADER_START:
        raise HeapCorruption(f"{path} is not a shared heap (too short: {len(start)} bytes)")
    word = [int.from_bytes(start[i * 8:i * 8 + 8], "little") for i in range(HEADER_START // 8)]
    if word[S_MAGIC] != SEG_MAGIC:
        raise HeapCorruption(f"{path} is not a shared heap (no magic number; or it is still being made)")
    if word[S_VERSION] != SEG_VERSION:
        raise HeapCorruption(f"{path} is a shared heap of version {word[S_VERSION]}, not {SEG_VERSION}")
    extent, limit = word[S_EXTENT], word[S_LIMIT]
    if not SEG_MIN <= limit <= MAX_REQUEST or limit & (PAGE - 1):
        raise HeapCorruption(f"{path}: shared heap header has a bad size limit {limit}")
    if not SEG_MIN <= extent <= limit:
        raise HeapCorruption(f"{path}: shared heap header has a bad extent {extent}")
    return extent, limit


def format_header(log: memoryview, extent: int, limit: int) -> None:
    """Write a new segment's header, all but its magic number (the lock is made separately)."""
    log[S_VERSION] = SEG_VERSION
    log[S_EXTENT] = extent
    log[S_LIMIT] = limit
    log[S_ROOTS] = 0
    log[S_JOURNAL] = J_START


class SharedRegion(Region):
    """The heap part of a segment file, mapped shared inside a reservation of the segment's limit.

    `base`, `size` and `words` describe the heap (from SEG_HEADER to the extent); `seg_base` and `log` the
    whole segment and its header words. `follow` brings this process's mapping and size to the extent another
    process may have grown; `map_to` maps more of the file.
    """

    def __init__(self, fd: int, limit: int, reason: str) -> None:
        self.fd = fd
        self.limit = limit
        self.seg_base = libc.mmap_anonymous(limit, reason + ": address space reserved for growth",
                                            prot=libc.PROT_NONE, flags=libc.MAP_NORESERVE)
        self.mapped = 0
        self.trimmed = False  # an operation's trim found whole free pages at the top (see `release`)
        self.exporters: list[Exporter] = []
        try:
            self.map_to(SEG_HEADER, reason)
        except BaseException:
            libc.munmap(self.seg_base, limit, "undo: a shared heap could not be mapped")
            raise
        self.base = self.seg_base + SEG_HEADER
        self.log = libc.memory_view(self.seg_base, SEG_HEADER).cast(WORD_FORMAT)
        self.size = 0
        self.words = journaled_words(self.base, 0, self.log, HEAP_WORD)  # type: ignore[assignment]

    @property
    def kind(self) -> str:
        return "shared"

    def map_to(self, nbytes: int, reason: str) -> None:
        """Map the file's first `nbytes` bytes (page-rounded), if this process maps less."""
        nbytes = page_align_up(nbytes, PAGE)
        if nbytes <= self.mapped:
            return
        if nbytes > self.limit:
            raise HeapCorruption(f"shared heap: {nbytes} bytes asked of a segment limited to {self.limit}",
                                 self.seg_base)
        # `mapped` last, after the calls: a signal handler's exception at any of them leaves it behind the new
        # views (the next call maps the same pages again), never ahead of them with views that stop short.
        libc.mmap_file(self.seg_base + self.mapped, nbytes - self.mapped, self.fd, self.mapped, reason)
        seg = libc.memory_view(self.seg_base, nbytes).cast(WORD_FORMAT)
        self.exporters.append(libc.memory_exporter(self.seg_base, nbytes))
        self.seg = seg
        self.mapped = nbytes

    def rename(self, fd: int, reason: str) -> None:
        """Map the same file again, opened by its final name as `fd`, over the present mapping (same pages, same
        addresses), so that /proc/PID/maps names it; the old descriptor is closed."""
        libc.mmap_file(self.seg_base, self.mapped, fd, 0, reason)
        files.close(self.fd)
        self.fd = fd

    def follow(self) -> None:
        """Take the extent in the header as this process's heap size, mapping what another process added.
        HeapCorruption when the extent is not a size this segment can have."""
        extent = self.log[S_EXTENT]
        if extent < SEG_MIN or extent > self.limit or extent & (PAGE - 1):
            raise HeapCorruption(f"shared heap header: extent {extent} out of range", self.seg_base)
        if extent > self.mapped:
            if files.file_size(self.fd) < extent:
                raise HeapCorruption(f"shared heap header: extent {extent} lies past the end of its file",
                                     self.seg_base)
            self.map_to(extent, "shared heap grown by another process: map the new part")
        if extent - SEG_HEADER != self.size:  # the words first, then the size they describe (as in map_to)
            self.words = journaled_words(self.base, (extent - SEG_HEADER) >> 3, self.log,  # type: ignore[assignment]
                                         HEAP_WORD)
            self.size = extent - SEG_HEADER

    def map_file(self, reason: str) -> None:
        """Map all of the file this segment's limit allows (a repair may touch words past the extent)."""
        self.map_to(min(files.file_size(self.fd) & ~(PAGE - 1), self.limit), reason)

    def grow(self, min_bytes: int, reason: str) -> int:
        extent = SEG_HEADER + self.size
        room = self.limit - extent
        need = page_align_up(min_bytes, PAGE)
        if need > room:
            raise MemoryError(f"shared heap is full: {min_bytes} more bytes asked, {room} left of its limit "
                              f"of {self.limit}")
        # Geometric growth: every growth is a system call in each process that uses the heap.
        incr = min(max(need, page_align_up(self.size >> 3, PAGE)), room)
        new_extent = extent + incr
        if files.file_size(self.fd) < new_extent:
            files.allocate(self.fd, new_extent)
        self.map_to(new_extent, reason)
        journal_store(self.log, S_EXTENT, new_extent)
        old = self.size
        words = journaled_words(self.base, (old + incr) >> 3, self.log, HEAP_WORD)
        self.words = words  # type: ignore[assignment]
        self.size = old + incr
        return old

    def can_shrink(self, nbytes: int) -> bool:
        return False  # other processes map the file: it never shrinks under them

    def shrink(self, nbytes: int, reason: str) -> bool:
        return False

    def release(self, offset: int, nbytes: int, reason: str) -> bool:
        # Not now: the operation may still be undone (its process killed, an exception), and an undone free
        # needs its bytes and the old top's header back. The heap gives the top's pages back after the
        # commit (SharedHeap._give_back); here the trim only asks for it.
        self.trimmed = True
        return False

    def views_alive(self) -> bool:
        """Whether a view made from this mapping (or a slice, cast or numpy array of one) is alive."""
        return most_referenced(self.exporters) > UNSHARED

    def close(self) -> None:
        if self.seg_base:
            self.log.release()
            self.seg.release()
            libc.munmap(self.seg_base, self.limit, "shared heap closed")
            files.close(self.fd)
            self.seg_base = self.base = 0
            self.size = self.mapped = 0
            self.exporters.clear()

    def lock_address(self) -> int:
        return self.seg_base + MUTEX_OFFSET

    def make_lock(self) -> None:
        mutex.init(self.seg_base + MUTEX_OFFSET)
