"""The process allocator: the fast cache, the heaps and the mapped chunks behind one lock.

A request tries the fast cache (small sizes), then every heap's bins and top. Only when the OS must
supply more does the size decide the system call, as in glibc: at or above the mmap threshold the
request gets a mapping of its own (page-rounded, its header in the first 16 bytes, IS_MMAPPED set;
unmapped on free), below it the main heap grows the break. When the break cannot grow, a heap over a
mapping takes over.

An address given to `free` is checked against the ranges this allocator owns before any memory is read,
then against its chunk header; a wrong one raises and changes nothing.

Every call is all or nothing, under a signal handler's exception as under a raised error. It rests on the
rule stated in heap.py (a handler runs only at a call, a loop's backward jump or a function's start, never
between two stores) and on four arrangements here:
- The fast cache is taken from and added to by runs of subscript stores with no call between, without the
  lock: a block is cached or handed over, never both or neither, for other threads as for handlers.
- A block allocated but not yet handed to the caller is in flight: in `_inflight` while the lock is held,
  in a local after. When an exception comes first it is deferred (below) to be freed.
- What must not come between a call's last step and its return is deferred: recorded by a store and done
  at the next call, first thing under the lock (`_mend`): the old block of a realloc that moved (or that
  `realloc(p, 0)` frees), the tail of a block that a realloc shrank in place, and every free asked for
  while this thread was inside the allocator. The lock-free paths step aside while anything is deferred
  (`_slow`), so the order of calls is kept.
- A call made while this thread is already inside the allocator (from a signal handler, or a finalizer
  that the garbage collector runs) never touches a heap: it takes from the fast cache or maps a chunk of
  its own, and its frees are deferred. The interrupted call's plans stay true.
"""

from __future__ import annotations

import threading
import warnings
from bisect import bisect_right
from collections.abc import Iterator
from typing import SupportsIndex

from .cache import CACHE_COUNT, CACHE_MAX_CHUNK, FastCache
from .errors import DoubleFree, HeapCorruption, HeapError, InvalidPointer
from .exports import UNSHARED as _UNSHARED
from .exports import Exporter
from .exports import most_referenced as _most_referenced
from .heap import HEAP_HEADER, Chunk, Heap, address_arg, alignment_arg, size_arg
from .info import MallInfo
from .layout import (
    HEADER,
    IS_MMAPPED,
    MAX_REQUEST,
    MIN_CHUNK,
    OVERHEAD,
    check_request,
    page_align_up,
    request_to_size,
)
from .options import Options
from .os import libc, signals
from .region import MAP_RESERVE, BreakRegion, MapRegion
from .units import size_approx, size_text

CACHE_MAX = CACHE_MAX_CHUNK
PAGE = libc.PAGE_SIZE
# A heap over a mapping, made when the break cannot grow, starts with at least this much (glibc's
# MMAP_AS_MORECORE_SIZE).
FALLBACK_HEAP_MIN = 1 << 20
MAP_FAILED = (1 << 64) - 1

def _view_alive(p: int, what: str) -> BufferError:
    return BufferError(f"cannot {what} the block at {p:#x}: a view of it is still alive (a memoryview from "
                       f"view(), or a slice, cast or array made from one); release it first")


class ProcessAllocator:
    """malloc, free, realloc and friends for this process: routing, the mmap path, options, lock, fork."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else Options.from_environment()
        # Re-entrant only so that `_is_owned` tells a nested call (a handler's, a finalizer's) from a
        # contended one; a nested call never takes it again.
        self._lock = threading.RLock()
        self._main: Heap | None = None  # the heap on the program break, made on first need
        self._heaps: list[Heap] = []  # every heap, the main one first
        self._starts: list[int] = []  # heap bases, sorted, for bisect
        self._by_start: list[Heap] = []  # the heaps in the order of _starts
        self._mapped: dict[int, tuple[int, int]] = {}  # block address -> (mapping address, mapping length)
        self._mapped_bytes = 0
        self._system_max = 0
        self._cache = FastCache()
        self._cache_bins = self._cache.bins  # the hot paths' direct handles on the cache
        self._cached = self._cache.members
        # All-or-nothing bookkeeping (see the module's docstring).
        self._deferred: list[int] = []  # blocks to free at the next call
        self._shrinks: list[tuple[int, int]] = []  # (block, chunk or mapping length) to shrink at the next call
        self._mending = False  # something is deferred, or a call was cut short: the next call mends first
        self._inflight = 0  # under the lock: the block this call allocated and has not handed over
        self._aligning: tuple[Heap, int, int, int] | None = None  # (heap, chunk, aligned chunk, its request)
        self._map_out: list[int] = []  # the raw result of the mmap for a new mapped chunk, until recorded
        self._map_length = 0  # ... and the length it asked for
        self._unmapping: list[int] = []  # [address, length] of a mapping whose munmap may not have run
        self._unmap_out: list[int] = []  # ... and that munmap's raw result once it has
        self._remap_out: list[int] = []  # the raw result of a deferred shrink's mremap, until its bookkeeping
        self._perturb = 0  # _sync_options keeps these in step with the options
        self._requests: dict[int, int] | None = None  # block address -> bytes asked for, while remembered
        self._extra = False  # perturbing or remembering requests
        self._slow = False  # _extra or _mending: the lock-free fast paths step aside
        self._trim_trigger = 0  # top size from which a free tries to trim
        # Block address -> the objects that export its memory to view(), the newest spanning the whole block
        # (an older one remains from before an in-place growth). A block is here from its first view until
        # a free or realloc finds none of them referenced by any buffer: then its entry goes.
        self._views: dict[int, list[Exporter]] = {}
        self._sync_options()

    # ----------------------------------------------------------- allocation

    def malloc(self, n: SupportsIndex) -> int:
        """Address of at least `n` usable bytes, 16-byte aligned; MemoryError when none can be had."""
        size = n if type(n) is int and n >= 0 else size_arg(n)
        nb = (size + 23) & ~15 if size > 24 else MIN_CHUNK  # layout.request_to_size, written out on the hot path
        if nb <= CACHE_MAX and not self._slow:
            entries = self._cache_bins.get(nb)
            if entries:
                p = entries[-1]  # taken in one run of stores: cached, or handed over
                del entries[-1]
                del self._cached[p]
                return p
            return self._serve(size, nb, False, 16, False)
        return self._serve(size, nb, False, 16, nb <= CACHE_MAX)  # the lock-free path stepped aside

    def calloc(self, count: SupportsIndex, size: SupportsIndex) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product overflows.

        Memory fresh from the OS (a new mapping, or the top beyond the heap's clean mark) is not zeroed again.
        """
        total = size_arg(count, "count") * size_arg(size)
        if total > MAX_REQUEST:
            raise MemoryError(f"calloc({count}, {size}) overflows")
        return self._serve(total, request_to_size(total), True, 16, True)

    def memalign(self, alignment: SupportsIndex, n: SupportsIndex) -> int:
        """A block of at least `n` bytes at a multiple of `alignment` (a power of two)."""
        a = alignment_arg(alignment)
        size = size_arg(n)
        if size > MAX_REQUEST or a > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {size} bytes aligned to {a}")
        return self._serve(size, request_to_size(size), False, a, False)

    def _serve(self, n: int, nb: int, zero: bool, alignment: int, cache: bool) -> int:
        """A new block of `n` bytes (chunk size `nb`) for malloc, calloc and memalign: from the fast cache
        (when `cache`: malloc's lock-free path has not just looked), the heaps or the OS, under the lock. A
        block allocated but not handed over goes back (deferred)."""
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            return self._nested_serve(n, nb, zero, alignment)
        p = 0
        try:
            with lock:
                try:
                    if self._mending:
                        self._mend()
                    if alignment <= 16:
                        p = self._cache_take(nb) if cache and nb <= CACHE_MAX else 0
                        if p:
                            if zero:
                                libc.memset(p, 0, nb - OVERHEAD)
                        elif not zero and (main := self._main) is not None and n <= MAX_REQUEST \
                                and (c := main.allocate(nb)):
                            p = main.base + (c << 3) + HEADER  # the common case, written out
                        else:
                            p = self._allocate(n, nb, zero)
                    else:
                        p = self._memalign(n, nb, alignment)
                    self._inflight = 0
                    if self._extra:
                        self._after_malloc(p, n, zero)
                except BaseException:
                    q = p or self._inflight
                    p = self._inflight = 0
                    if q:
                        self._deferred += (q,)
                    self._mending = self._slow = True
                    raise
        except BaseException:
            if p:  # the lock's release raised: the block was never handed over
                self._deferred += (p,)
                self._mending = self._slow = True
            raise
        return p

    def _after_malloc(self, p: int, n: int, zero: bool) -> None:
        """The optional work after a malloc: fill with the perturb byte (not a calloc's block), remember the
        request."""
        if self._perturb and not zero:
            libc.memset(p, self._perturb ^ 0xFF, n)
        if self._requests is not None:
            self._requests[p] = n

    def _cache_take(self, nb: int) -> int:
        """A cached block of chunk size `nb`, or 0, taken in one run of stores."""
        entries = self._cache_bins.get(nb)
        if entries:
            p = entries[-1]
            del entries[-1]
            del self._cached[p]
            return p
        return 0

    def _uncache(self, heap: Heap, p: int, c: int) -> bool:
        """Give the cached block `p` (chunk `c` of `heap`, found by `chunk_of`) back to the heap; False if it
        is no longer cached (another thread took it).

        Checked and taken out of the cache into `_deferred` in one run with no call before the list's
        `remove` (which runs before anything can interrupt), then released and taken off `_deferred` in one
        commit: at every instant the block is cached, deferred or free."""
        members = self._cached
        if p not in members:
            return False
        size = members[p]
        del members[p]
        self._deferred += (p,)
        self._mending = self._slow = True
        self._cache_bins[size].remove(p)
        i = self._deferred.index(p)
        heap.release(c)
        del self._deferred[i]
        return True

    def _search(self, nb: int, zero: bool) -> tuple[Heap | None, int, int]:
        """(heap, chunk, the heap's clean mark before, when `zero` asks for it) for `nb` bytes from any heap's
        bins or top, or (None, 0, 0). Cached blocks are invisible to the heaps, so before giving up, those that
        could serve the request go back into them, coalesced, and they are searched again: no request goes to
        the OS while freed memory could serve it."""
        for released in (False, True):
            for heap in self._heaps:
                clean = heap.clean if zero else 0
                c = heap.allocate(nb)
                if c:
                    return heap, c, clean
            if released or not self._cached or not self._release_cache_for(nb):
                break
        return None, 0, 0

    def _release_cache_for(self, nb: int) -> bool:
        """Give back to their heaps the cached blocks that could serve a chunk of `nb` bytes: alone, or
        coalesced with free neighbours, the top, or neighbours cached too; True if any went back.

        The others, smaller than the request and between chunks in use, could not serve it even freed: they
        stay cached, as glibc's tcache keeps its chunks when the heap grows (releasing all of them placed
        later blocks differently from glibc: on random-bal, 7 pages more at the peak). The scan costs about
        2 µs a cached block each time a request would go to the OS.
        """
        cached = set(self._cached)
        released = False
        for heap in self._heaps:
            blocks = cached if len(self._heaps) == 1 else {p for p in cached if heap.owns(p)}
            chosen = [(p, heap.chunk_of(p)) for p in heap.would_serve(blocks, nb)]  # all checked first
            for p, c in chosen:
                if self._uncache(heap, p, c):
                    released = True
        return released

    def _from_os(self, need: int, nb: int, alignment: int, what: str) -> tuple[Heap | None, int]:
        """Memory for `what` from the OS, glibc's way: at or above the mmap threshold a mapping of its own,
        (None, block address); else, or if that fails, a heap grown to serve `need` bytes, (heap, 0)."""
        opts = self.options
        if need >= opts.mmap_threshold and len(self._mapped) < opts.mmap_max:
            try:
                return None, self._map_chunk(nb, alignment, f"{what} is at or above the "
                                                            f"{size_text(opts.mmap_threshold)} mmap threshold")
            except MemoryError:
                pass  # as glibc does, try the heap before giving up
        return self._grow(need, f"heap top too small for {what}"), 0

    def _allocate(self, n: int, nb: int, zero: bool) -> int:
        """Serve a request the cache could not: the heaps' free memory first, then the OS. The block is in
        flight (`_inflight`) from the commit that makes it."""
        check_request(n)
        heap, c, clean = self._search(nb, zero)
        if heap is None:
            heap, p = self._from_os(nb, nb, 16, f"a request of {size_text(n)}")
            if heap is None:
                return p
            clean = heap.clean
            c = heap.allocate(nb)
        p = heap.base + (c << 3) + HEADER
        self._inflight = p
        if zero:
            heap.zero_fresh(c, clean)
        return p

    def _memalign(self, n: int, nb: int, a: int) -> int:
        """An `a`-aligned block of `n` bytes (chunk size `nb`), under the lock: a chunk with room to align,
        then `Heap.align_chunk`. While that runs, `_aligning` says which of the two blocks is in flight."""
        need = nb + a + MIN_CHUNK
        heap, c, _clean = self._search(need, False)
        if heap is None:
            heap, p = self._from_os(need, nb, a, f"a request of {size_text(n)} aligned to {a}")
            if heap is None:
                return p
            c = heap.allocate(need)
        self._inflight = heap.base + (c << 3) + HEADER
        self._aligning = (heap, c, heap.aligned_chunk(c, a), need)
        self._inflight = 0
        q = heap.base + (heap.align_chunk(c, nb, a) << 3) + HEADER
        self._inflight = q
        self._aligning = None
        return q

    def _nested_serve(self, n: int, nb: int, zero: bool, alignment: int) -> int:
        """A block for a call made while this thread is inside the allocator: from the fast cache, else a
        mapping of its own (zero already), never from a heap, which the interrupted call may be changing."""
        check_request(n)
        if alignment <= 16 and nb <= CACHE_MAX:
            p = self._cache_take(nb)
            if p:
                if zero:
                    libc.memset(p, 0, nb - OVERHEAD)
                return p
        return self._map_chunk(nb, alignment, "a request made while this thread was inside the allocator "
                                              "(a signal handler's or a finalizer's): it gets a mapping of its "
                                              "own, away from the heap the interrupted call is changing", [])

    def _grow(self, nb: int, reason: str) -> Heap:
        """A heap whose top can now serve `nb` bytes: the main heap grown, else a heap over a mapping."""
        opts = self.options
        main = self._main
        held_back: signals.Saved = []
        try:
            if main is None:
                # Made as glibc makes its first heap, whose first chunk is the thread's tcache: the header,
                # the top pad and a minimal chunk, in whole pages. The request then comes from that top, or
                # grows it as any other would, so a program's first request does not set the heap's size.
                # Signals wait until the heap is in the allocator's lists: else a handler's exception would
                # leave the break raised for a region nobody holds.
                signals.block(held_back)
                try:
                    try:
                        region = BreakRegion(HEAP_HEADER + MIN_CHUNK + opts.top_pad, "first heap: " + reason)
                    except MemoryError:  # a pad the break cannot give: start without it, as Heap.extend grows
                        region = BreakRegion(HEAP_HEADER + MIN_CHUNK,
                                             "first heap: " + reason + " (without the top pad)")
                    main = Heap(region, top_pad=opts.top_pad, trim_threshold=opts.trim_threshold)
                    self._add_heap(main, True)
                finally:
                    signals.restore(held_back)
            main.top_pad = opts.top_pad
            main.extend(nb, reason)
            self._note_system()
            return main
        except MemoryError:
            pass
        for heap in self._heaps:
            if heap is main:
                continue
            try:
                heap.extend(nb, reason + " (the break cannot grow)")
                self._note_system()
                return heap
            except MemoryError:
                continue
        size = max(HEAP_HEADER + nb + MIN_CHUNK, FALLBACK_HEAP_MIN)
        reason += ": the break cannot grow, so a heap over a mapping"
        signals.block(held_back)  # until the heap is in the lists (as for the first heap)
        try:
            if size <= MAP_RESERVE:
                mapping = MapRegion(min(size + opts.top_pad, MAP_RESERVE), reason, reserve=MAP_RESERVE)
            else:
                # Larger than a heap's reservation: one plain mapping of the size needed, as glibc maps when
                # sbrk fails. The kernel charges it at once, so a request it cannot back is a MemoryError now
                # rather than the OOM killer later; wholly free again, it is unmapped (_drop_if_empty).
                mapping = MapRegion(size, reason, reserve=size)
            heap = Heap(mapping, top_pad=opts.top_pad, trim_threshold=opts.trim_threshold)
            self._add_heap(heap)
        finally:
            signals.restore(held_back)
        self._note_system()
        return heap

    def _add_heap(self, heap: Heap, main: bool = False) -> None:
        """Put `heap` in every list (and make it the main heap) in one run of stores: a handler's exception
        finds it in all of them or in none."""
        i = bisect_right(self._starts, heap.base)
        entry = (heap,)
        start = (heap.base,)
        self._heaps += entry
        self._starts[i:i] = start
        self._by_start[i:i] = entry
        if main:
            self._main = heap

    def _map_chunk(self, nb: int, alignment: int, reason: str, out: list[int] | None = None) -> int:
        """A chunk in a mapping of its own; returns the block's address (aligned to `alignment`), in flight.

        The mmap's result lands in `out` (by default the allocator's journal, `_map_out`) before anything
        can interrupt; `_mend` unmaps a mapping that was made but not recorded."""
        length = page_align_up(nb + OVERHEAD + (alignment - 16 if alignment > 16 else 0), PAGE)
        journal = out is None
        if out is None:
            out = self._map_out
            self._map_length = length
        m = libc.mmap_anonymous(length, reason, out=out)
        p = (m + HEADER + alignment - 1) & ~(alignment - 1)
        offset = p - HEADER - m
        header = libc.memory_view(p - HEADER, HEADER).cast("Q")
        header[0] = offset
        header[1] = (length - offset) | IS_MMAPPED
        header.release()
        self._mapped[p] = (m, length)  # one commit: recorded and in flight, the journal cleared
        self._mapped_bytes += length
        if journal:
            self._inflight = p
        del out[:]
        self._note_system()
        return p

    def _note_system(self) -> None:
        now = self.system_current
        if now > self._system_max:
            self._system_max = now

    # ---------------------------------------------------------------- free

    def free(self, p: SupportsIndex) -> None:
        """Free the block at `p`; `free(0)` does nothing. InvalidPointer or DoubleFree if `p` is not live,
        BufferError while a view of it is alive (see `view`)."""
        ptr = p if type(p) is int and p >= 0 else address_arg(p)
        if not ptr:
            return
        if self._views and ptr in self._views and self._viewed(ptr):
            raise _view_alive(ptr, "free")
        main = self._main
        sz = main.block_size(ptr) if main is not None else 0
        if 0 < sz <= CACHE_MAX and not self._slow:
            # The common case needs no lock: a live small block of the main heap joins the fast cache.
            # Only the block's own header and its successor's are read, which no other thread may change.
            entries = self._cache_bins.get(sz)
            if entries is None:
                entries = self._cache_bins.setdefault(sz, [])
            if len(entries) < CACHE_COUNT:
                if ptr in self._cached:
                    raise DoubleFree(f"double free: the block at {ptr:#x} is already free (in the fast cache)")
                self._cached[ptr] = sz  # cached in one run of stores
                entries += (ptr,)
                return
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            self._deferred += (ptr,)  # nested in our own call (a handler, a finalizer): freed at the next call
            self._mending = self._slow = True
            return
        try:
            with lock:
                if self._mending:
                    self._mend()
                    sz = 0  # what mending changed is looked up again
                if sz and not self._perturb and (sz > CACHE_MAX or len(self._cache_bins.get(sz, ())) >= CACHE_COUNT):
                    # The common case, written out: a block of the main heap that its cache list has no room for.
                    heap, top = main, main.release((ptr - main.base - HEADER) >> 3)  # type: ignore[union-attr]
                else:
                    heap, top = self._free_block(ptr, None)
                if heap is not None and top >= self._trim_trigger:
                    self._trim_heap(heap, "after a free")
        except BaseException:
            self._mending = self._slow = True
            raise

    def _free_block(self, p: int, source: list[int] | None) -> tuple[Heap | None, int]:
        """Free the live block `p` (into the fast cache, its heap, or unmapped), under the lock, and take it
        off `source` (a list of blocks to free) in the same commit. Returns the heap and its top's size when
        the block went back to a heap, for the caller to trim; else (None, 0)."""
        i = source.index(p) if source is not None else 0
        mapped = self._mapped.get(p)
        if mapped is not None:
            m, length = mapped
            self._check_mapped(p, m, length)
            del self._mapped[p]  # one commit: out of the table, into the unmap journal
            self._mapped_bytes -= length
            self._unmapping[:] = (m, length)
            del self._unmap_out[:]
            if source is not None:
                del source[i]
            self._unmap(f"free of a mapped chunk of {size_text(length)}")
            if self.options.freed_mapped_chunk(length - (p - HEADER - m)):
                self._sync_options()
            return None, 0
        heap = self._heap_of(p)
        c = heap.chunk_of(p)
        if p in self._cached:
            raise DoubleFree(f"double free: the block at {p:#x} is already free (in the fast cache)")
        sz = heap.chunk_size(c)
        if self._perturb:
            libc.memset(p, self._perturb, sz - OVERHEAD)
        # Only the main heap's blocks are cached: a heap over a mapping goes back to the OS once wholly free,
        # which a cached block would prevent.
        if sz <= CACHE_MAX and heap is self._main:
            entries = self._cache_bins.get(sz)
            if entries is None:
                entries = self._cache_bins.setdefault(sz, [])
            if len(entries) < CACHE_COUNT:
                self._cached[p] = sz  # one commit: cached, and off `source`
                entries += (p,)
                if source is not None:
                    del source[i]
                return None, 0
        top = heap.release(c)
        if source is not None:
            del source[i]
        return heap, top

    def _unmap(self, reason: str) -> None:
        """munmap the mapping in the unmap journal; its result lands in `_unmap_out` before anything can
        interrupt, so `_mend` knows whether it ran."""
        m, length = self._unmapping
        libc.munmap(m, length, reason, self._unmap_out)
        del self._unmapping[:]

    def _trim_heap(self, heap: Heap, when: str) -> None:
        reason = (f"top chunk of {size_approx(heap.top_size)} exceeds the "
                  f"{size_text(self.options.trim_threshold)} trim threshold {when}")
        if heap.trim(self.options.top_pad, reason):
            self._note_system()
        self._drop_if_empty(heap)

    def _drop_if_empty(self, heap: Heap) -> None:
        """Unmap a heap over a mapping whose every chunk is free (only the main heap stays for good)."""
        if heap is self._main or not heap.empty:
            return
        i = self._by_start.index(heap)
        held_back: signals.Saved = []
        signals.block(held_back)  # until the mapping is gone: out of the lists, it would be held by nobody
        try:
            del self._starts[i], self._by_start[i]  # out of every list in one run of stores (remove runs last)
            self._heaps.remove(heap)
            heap.region.close()
        finally:
            signals.restore(held_back)

    def _heap_of(self, p: int) -> Heap:
        """The heap whose chunks hold address `p`, or InvalidPointer."""
        main = self._main
        if main is not None and main.owns(p):
            return main
        i = bisect_right(self._starts, p) - 1
        if i >= 0:
            heap = self._by_start[i]
            if heap.owns(p):
                return heap
        raise InvalidPointer(f"{p:#x} is not a live block of this allocator (freed, or never allocated here)")

    def _check_mapped(self, p: int, m: int, length: int) -> None:
        header = libc.memory_view(p - HEADER, HEADER).cast("Q")
        offset, word = header[0], header[1]
        header.release()
        if offset != p - HEADER - m or word != (length - offset) | IS_MMAPPED:
            raise HeapCorruption(f"header of the mapped chunk at {p - HEADER:#x} was overwritten", p - HEADER)

    def _live_chunk(self, p: int) -> tuple[Heap, int]:
        """(heap, chunk offset) of the live heap block at `p`; a block in the fast cache is not live."""
        heap = self._heap_of(p)
        c = heap.chunk_of(p)
        if p in self._cached:
            raise DoubleFree(f"the block at {p:#x} has been freed")
        return heap, c

    # ------------------------------------------------------ mending, deferred work

    def _mend(self) -> None:
        """First thing under the lock when `_mending` is set: finish what exceptions cut short, then carry out
        the deferred shrinks and frees. Each step is a commit of its own that also takes its work off its
        list, so this too can be cut short and run again at the next call."""
        for heap in self._heaps:
            heap.recover()
        self._settle_mappings()
        aligning = self._aligning
        if aligning is not None:
            # An aligned allocation cut short: its block in flight is the aligned chunk once the first
            # commit has made the lead a chunk of its own (smaller than the request), else the whole chunk.
            held, c, a, need = aligning
            lost = a if held.chunk_size(c) < need else c
            self._deferred += (held.block_address(lost),)
            self._aligning = None
        shrinks = self._shrinks
        while shrinks:
            p, size = shrinks[-1]
            self._shrink(p, size, shrinks, len(shrinks) - 1)
        deferred = self._deferred
        while deferred:
            p = deferred[-1]
            try:
                owner, top = self._free_block(p, deferred)
            except HeapError as exc:
                if p in deferred:
                    del deferred[deferred.index(p)]
                warnings.warn(f"a deferred free failed: {exc}", RuntimeWarning, stacklevel=4)
                continue
            if owner is not None and top >= self._trim_trigger:
                self._trim_heap(owner, "after a free")
        self._mending = False
        self._slow = self._extra

    def _settle_mappings(self) -> None:
        """Finish a mapped chunk's mmap or munmap whose bookkeeping an exception cut short."""
        made = self._map_out
        if made and made[0] not in (None, MAP_FAILED) and not any(m == made[0] for m, _ in self._mapped.values()):
            self._unmapping[:] = (made[0], self._map_length)  # made, never recorded: it goes
            del self._unmap_out[:]
            del made[:]
            self._unmap("a mapping an exception cut short before it was recorded")
        del made[:]
        if self._unmapping and not self._unmap_out:
            self._unmap("a free of a mapped chunk that an exception cut short")
        del self._unmapping[:]

    def _shrink(self, p: int, size: int, source: list[tuple[int, int]], i: int) -> None:
        """Shrink the block `p` in place to `size` (its chunk size, or its mapping's length) and take it off
        `source` at `i`; a block already that small is only taken off (the shrink ran, and its removal was
        cut short)."""
        mapped = self._mapped.get(p)
        if mapped is not None:
            m, length = mapped
            if size < length:
                done = self._remap_out  # the mremap's result, once it has run: then only the bookkeeping is left
                header = libc.memory_view(p - HEADER, HEADER).cast("Q")
                if not done:
                    self._check_mapped(p, m, length)
                    libc.mremap(m, length, size, f"realloc shrank a mapped chunk to {size_text(size)}",
                                may_move=False, out=done)
                # The bookkeeping: stores only.
                header[1] = (size - (p - HEADER - m)) | IS_MMAPPED
                self._mapped[p] = (m, size)
                self._mapped_bytes -= length - size
                del done[:]
            del source[i]
            return
        heap = self._heap_of(p)
        c = heap.chunk_of(p)
        if heap.chunk_size(c) > size:
            heap.resize_in_place(c, size, grow_top=False)
        del source[i]
        if heap.top_size >= self._trim_trigger:
            self._trim_heap(heap, "after a realloc shrank a block")

    # ------------------------------------------------------------- resizing

    def realloc(self, p: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `p` to `n` bytes; returns its address, which may have moved.

        `realloc(0, n)` is `malloc(n)` and `realloc(p, 0)` frees `p` and returns 0. A block grows in place
        into a free neighbour or the top when it can, a mapped block with mremap; otherwise it moves. A
        block that shrinks keeps its address; the memory it gives up goes back at the next call.
        """
        ptr = p if type(p) is int and p >= 0 else address_arg(p)
        size = n if type(n) is int and n >= 0 else size_arg(n)
        if not ptr:
            return self.malloc(size)
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            return self._nested_realloc(ptr, size)
        q = old = shrink = 0
        try:
            with lock:
                try:
                    if self._mending:
                        self._mend()
                    q, old, shrink = self._resize(ptr, size)
                    self._inflight = 0
                    if self._requests is not None and q:
                        self._requests[q] = size
                except BaseException:
                    moved = q if q != ptr else 0
                    r = moved or self._inflight
                    q = self._inflight = 0
                    if r:
                        self._deferred += (r,)
                    self._mending = self._slow = True
                    raise
        except BaseException:
            if q and q != ptr:  # the lock's release raised: the new block was never handed over
                self._deferred += (q,)
                self._mending = self._slow = True
            raise
        # The last steps, stores only: nothing can come between them and the return.
        if old:
            self._deferred += (old,)
            self._mending = self._slow = True
        elif shrink:
            self._shrinks += ((ptr, shrink),)
            self._mending = self._slow = True
        return q

    def _resize(self, p: int, n: int) -> tuple[int, int, int]:
        """realloc's work under the lock: (the block's address now, the old block to free once the call
        returns or 0, the size to shrink the block to once the call returns or 0). A block that moves is in
        flight until realloc returns it."""
        viewed = p in self._views and self._viewed(p)
        mapped = self._mapped.get(p)
        main = self._main
        if mapped is not None:
            self._check_mapped(p, *mapped)
            heap = main
            c = sz = 0
        elif main is not None and (sz := main.block_size(p)) and p not in self._cached:
            heap = main  # the common case, as free finds it: a live block of the main heap
            c = (p - main.base - HEADER) >> 3
        else:
            heap, c = self._live_chunk(p)
            sz = heap.chunk_size(c)
        if n == 0:
            # Freed once the call returns, as a moved block's old copy is: freed here, an exception after it
            # (at the lock's release) would leave a realloc that raised with its block gone.
            if viewed:
                raise _view_alive(p, "free")
            if mapped is None:
                heap.release(c, check_only=True)  # type: ignore[union-attr]
            return 0, p, 0
        check_request(n)
        nb = request_to_size(n)
        if mapped is not None:
            m, length = mapped
            new_length = page_align_up(nb + OVERHEAD + p - HEADER - m, PAGE)
            if new_length <= length:
                if viewed and new_length < length:
                    raise _view_alive(p, "shrink")
                return p, 0, new_length if new_length < length else 0
            if self._grow_mapping(p, m, length, new_length, n):
                if viewed:
                    self._view_grown(p)
                return p, 0, 0
            usable = length - (p - m)
        elif heap is not None:  # always, for a block not mapped
            if nb <= sz:
                if sz - nb < MIN_CHUNK:
                    return p, 0, 0
                if viewed:  # a tail of a minimal chunk or more would go
                    raise _view_alive(p, "shrink")
                return p, 0, nb
            # A block bordering the top grows in place even past the mmap threshold (glibc would move it
            # to a mapping): moving would copy it, and a growing mapped block costs an mremap per page.
            region = heap.region
            held = region.size
            if heap.resize_in_place(c, nb, grow_top=True):
                if region.size != held:
                    self._note_system()
                if viewed:
                    self._view_grown(p)
                return p, 0, 0
            heap.release(c, check_only=True)  # a block that cannot be freed must not be moved
            usable = sz - OVERHEAD
        if viewed:
            raise _view_alive(p, "move")
        q = self._allocate(n, nb, False)
        libc.memmove(q, p, min(usable, n))
        return q, p, 0

    def _view_grown(self, p: int) -> None:
        """After the viewed block `p` grew in place: later views span the whole block."""
        exporters = self._views[p]
        usable = self._usable(p)
        if usable != len(exporters[-1]):
            exporters.append(libc.memory_exporter(p, usable))

    def _grow_mapping(self, p: int, m: int, length: int, new_length: int, n: int) -> bool:
        """Grow the mapped chunk at `p` in place with mremap (never moving it: a move could not be undone if
        an exception came before realloc returns); False when the address space above it is taken."""
        try:
            libc.mremap(m, length, new_length, f"realloc of a mapped chunk to {size_text(n)}", may_move=False)
        except (MemoryError, OSError):
            return False
        header = libc.memory_view(p - HEADER, HEADER).cast("Q")
        header[1] = (new_length - (p - HEADER - m)) | IS_MMAPPED
        header.release()
        self._mapped[p] = (m, new_length)
        self._mapped_bytes += new_length - length
        self._note_system()
        return True

    def _nested_realloc(self, p: int, n: int) -> int:
        """realloc while this thread is inside the allocator: a new block as `_nested_serve` gives, the bytes
        copied, the old block freed at the next call."""
        if n == 0:
            self.free(p)
            return 0
        usable = self.usable_size(p)
        q = self._nested_serve(n, request_to_size(n), False, 16)
        libc.memmove(q, p, min(usable, n))
        self._deferred += (p,)
        self._mending = self._slow = True
        return q

    # ------------------------------------------------------------ questions

    def usable_size(self, p: SupportsIndex) -> int:
        """Bytes usable in the live block at `p` (0 for address 0)."""
        ptr = address_arg(p)
        if not ptr:
            return 0
        with self._settled():
            return self._usable(ptr)

    def _usable(self, p: int) -> int:
        """Bytes usable in the live block at `p` (the lock held)."""
        mapped = self._mapped.get(p)
        if mapped is not None:
            return mapped[1] - (p - HEADER - mapped[0]) - HEADER
        heap, c = self._live_chunk(p)
        return heap.chunk_size(c) - OVERHEAD

    def view(self, p: SupportsIndex, n: SupportsIndex | None = None) -> memoryview:
        """A writable memoryview of the live block at `p`: its first `n` bytes, by default all of its
        usable size (which may exceed the size asked for).

        While the view, or any slice, cast or numpy array made from it, is alive, the block stays where it
        is: free, and a realloc that would shrink or move it, raise BufferError and change nothing (as
        `mmap.close()` does while buffers are exported). Release the view (`del`, `release()` or a `with`
        block) and everything made from it first. A realloc that grows the block in place is allowed.
        """
        ptr = p if type(p) is int and p > 0 else address_arg(p)
        exporters = self._views.get(ptr) or self._first_view(ptr)
        if n is None:
            return memoryview(exporters[-1]).cast("B")
        size = n if type(n) is int and n >= 0 else size_arg(n)
        usable = len(exporters[-1])
        if size > usable:
            raise ValueError(f"the block at {ptr:#x} has {usable} usable bytes, not {size}")
        return memoryview(exporters[-1]).cast("B")[:size]

    def _first_view(self, p: int) -> list[Exporter]:
        """The exporters of the live block at `p`, made for its first view; InvalidPointer or DoubleFree
        if it is not live."""
        if not p:
            raise InvalidPointer("cannot view address 0")
        if p in self._deferred:
            raise DoubleFree(f"the block at {p:#x} has been freed")
        # A mapped block, or a live block of the main heap, is known without the lock, as free knows it.
        mapped = self._mapped.get(p)
        main = self._main
        if mapped is not None:
            m, length = mapped
            usable = m + length - p
        elif main is not None and not self._slow and p not in self._cached and (size := main.block_size(p)):
            usable = size - OVERHEAD
        else:
            usable = self.usable_size(p)
        return self._views.setdefault(p, [libc.memory_exporter(p, usable)])

    def _viewed(self, p: int) -> bool:
        """True while a buffer made from a view of the block at `p` is alive; when none is, the block's
        exporters are forgotten."""
        exporters = self._views.get(p)
        if exporters is None:
            return False
        if _most_referenced(exporters) > _UNSHARED:
            return True
        self._views.pop(p, None)
        return False

    @property
    def system_current(self) -> int:
        """Bytes held from the OS now: the heaps' extents (less foreign spans) plus mapped chunks."""
        return sum(h.held for h in self._heaps) + self._mapped_bytes

    @property
    def system_max(self) -> int:
        """The most bytes ever held from the OS at once."""
        return max(self._system_max, self.system_current)

    @property
    def heaps(self) -> list[Heap]:
        """The heaps, the main (break) heap first."""
        return list(self._heaps)

    def _settled(self) -> threading.RLock:
        """The lock, to hold while reading the allocator's state. Unless this thread is already inside the
        allocator, what was deferred is done first, so that what is read is what the calls made."""
        lock = self._lock
        if self._mending and not lock._is_owned():  # type: ignore[attr-defined]
            with lock:
                if self._mending:
                    self._mend()
        return lock

    def mapped_chunks(self) -> dict[int, int]:
        """Block address -> mapping length of every mapped chunk."""
        with self._settled():
            return {p: length for p, (_m, length) in self._mapped.items()}

    def cached_blocks(self) -> dict[int, int]:
        """Block address -> chunk size of every block in the fast cache (in use to its heap, free to a caller)."""
        with self._settled():
            return self._cached.copy()

    def mappings(self) -> dict[int, tuple[int, int]]:
        """Block address -> (mapping address, mapping length) of every mapped chunk; the mapping starts
        before the chunk's header when the block was aligned beyond 16 bytes."""
        with self._settled():
            return dict(self._mapped)

    def mallinfo(self) -> MallInfo:
        """glibc's mallinfo2 figures for this allocator, plus system_current and system_max."""
        with self._settled():
            arena = in_use = ordblks = fordblks = keepcost = 0
            for heap in self._heaps:
                count, free_bytes = heap.free_stats()
                top = heap.top_size
                arena += heap.held
                in_use += heap.in_use
                ordblks += count + 1
                fordblks += free_bytes + top
                keepcost += top
            cached, cached_size = self._cache.stats()
            return MallInfo(
                arena=arena, ordblks=ordblks, smblks=cached, hblks=len(self._mapped),
                hblkhd=self._mapped_bytes, usmblks=self.system_max, fsmblks=cached_size,
                uordblks=in_use - cached_size, fordblks=fordblks, keepcost=keepcost,
                system_current=self.system_current, system_max=self.system_max)

    def remember_requests(self, on: bool = True) -> None:
        """Start (or stop) remembering the size asked for by each allocation, for `walk` to report.

        Off by default: it costs a dictionary store per allocation. Starting forgets what was remembered before.
        """
        with self._lock:
            self._requests = {} if on else None
            self._sync_options()

    def walk(self) -> Iterator[Chunk]:
        """Every chunk of every heap in address order (blocks in the fast cache show as "cached"),
        then every mapped chunk. A block's `request` is the size asked for when `remember_requests` was on
        as it was made, else -1."""
        with self._settled():
            cached = {p - HEADER for p in list(self._cached)}
            chunks = [c for heap in self._by_start for c in heap.walk()]
            mapped = sorted(self._mapped.copy().items())
            requests = dict(self._requests) if self._requests is not None else {}
        for chunk in chunks:
            if chunk.address in cached:
                yield Chunk(chunk.address, chunk.size, "cached", -1)
            elif chunk.state == "in use":
                yield Chunk(chunk.address, chunk.size, "in use", -1, requests.get(chunk.address + HEADER, -1))
            else:
                yield chunk
        for p, (m, length) in mapped:
            yield Chunk(p - HEADER, length - (p - HEADER - m), "mapped", -1, requests.get(p, -1))

    def check(self) -> None:
        """Verify every invariant of every heap, the fast cache and the mapped chunks' headers."""
        with self._settled():
            for heap in self._heaps:
                heap.check()
            bins = self._cache.snapshot()
            members = self._cached.copy()
            listed = [p for entries in bins.values() for p in entries]
            # The lock-free paths change a list and the members together, in runs no thread can come between.
            if len(set(listed)) != len(listed) or set(listed) != set(members):
                raise HeapCorruption("the fast cache's lists and its members disagree")
            for size, entries in bins.items():
                for p in entries:
                    heap = self._heap_of(p)
                    if heap.chunk_size(heap.chunk_of(p)) != size or members[p] != size:
                        raise HeapCorruption(f"cached block at {p:#x} is not of size {size}", p - HEADER)
            for p, (m, length) in self._mapped.copy().items():
                self._check_mapped(p, m, length)

    # ------------------------------------------------------ giving memory back

    def trim(self, pad: SupportsIndex = 0) -> bool:
        """Give free memory back to the OS now; True if anything was released (malloc_trim).

        Empties the fast cache into the heaps first, then releases each heap's top beyond `pad`
        (lowering the break where it can) and the whole pages inside large free chunks. Only free memory
        goes back: the top keeps its header and a free chunk its first 32 bytes, so no byte of a live block
        (whose last 8 bytes are the next chunk's first word) is released, and a live view never stops a trim.
        Inside the allocator (a signal handler's call) it does nothing and returns False.
        """
        pad = size_arg(pad, "pad")
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            return False
        try:
            with lock:
                if self._mending:
                    self._mend()
                self._flush_cache()
                released = False
                for heap in list(self._heaps):
                    if heap.trim(pad, "malloc_trim", inner=True):
                        released = True
                    self._drop_if_empty(heap)
                return released
        except BaseException:
            self._mending = self._slow = True
            raise

    def _flush_cache(self) -> None:
        """Every cached block back into its heap."""
        for p in list(self._cached):
            heap = self._heap_of(p)
            self._uncache(heap, p, heap.chunk_of(p))

    def mallopt(self, param: SupportsIndex, value: SupportsIndex) -> int:
        """Change a setting under glibc's rules (see `options`); returns 1."""
        with self._lock:
            result = self.options.mallopt(param, value)
            self._sync_options()
            return result

    def _sync_options(self) -> None:
        """Copy the settings the hot paths read into plain attributes (and onto the heaps)."""
        opts = self.options
        self._perturb = opts.perturb
        self._extra = bool(self._perturb) or self._requests is not None
        self._slow = self._extra or self._mending
        # glibc tries to trim once the top reaches the trim threshold; a trim can release nothing
        # until the top exceeds the pad by a page, so that is checked here, once, instead of on every free.
        self._trim_trigger = max(opts.trim_threshold, opts.top_pad + MIN_CHUNK + PAGE)
        for heap in self._heaps:
            heap.top_pad = opts.top_pad
            heap.trim_threshold = opts.trim_threshold

    # ----------------------------------------------------------------- fork

    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_parent(self) -> None:
        self._lock.release()

    def after_fork_child(self) -> None:
        """In the child: a fresh lock, and the inherited fast cache emptied back into the heap."""
        self._lock = threading.RLock()
        self._mend()
        self._flush_cache()


# ------------------------------------------------------------ gates
# In the compiled build the methods above are C functions, and CPython runs pending signal handlers right
# after a call to a C function returns, before the caller stores the result: a handler's exception there
# would lose the block the call handed over. A subscript has no such check after it, so `calls.py` gives the
# class Python methods that reach these by subscript (`gate[allocator, n]`), and a Python method's return
# to its caller has no check either.


class MallocGate:
    """`gate[allocator, n]` is `allocator.malloc(n)`."""

    def __getitem__(self, args: tuple[ProcessAllocator, SupportsIndex]) -> int:
        return args[0].malloc(args[1])


class CallocGate:
    """`gate[allocator, count, size]` is `allocator.calloc(count, size)`."""

    def __getitem__(self, args: tuple[ProcessAllocator, SupportsIndex, SupportsIndex]) -> int:
        return args[0].calloc(args[1], args[2])


class MemalignGate:
    """`gate[allocator, alignment, n]` is `allocator.memalign(alignment, n)`."""

    def __getitem__(self, args: tuple[ProcessAllocator, SupportsIndex, SupportsIndex]) -> int:
        return args[0].memalign(args[1], args[2])


class ReallocGate:
    """`gate[allocator, p, n]` is `allocator.realloc(p, n)`."""

    def __getitem__(self, args: tuple[ProcessAllocator, SupportsIndex, SupportsIndex]) -> int:
        return args[0].realloc(args[1], args[2])
