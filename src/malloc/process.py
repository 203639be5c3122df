"""The process allocator: the fast cache, the heaps and the mapped chunks behind one lock.

A request tries the fast cache (small sizes), then every heap's bins and top. Only when the OS must
supply more does the size decide the system call, as in glibc: at or above the mmap threshold the
request gets a mapping of its own (page-rounded, its header in the first 16 bytes, IS_MMAPPED set;
unmapped on free, resized with mremap); below it the main heap grows the break. When the break cannot
grow, a heap over a mapping takes over.

An address given to `free` is checked against the ranges this allocator owns before any memory is read,
then against its chunk header; a wrong one raises and changes nothing.
"""

from __future__ import annotations

import threading
import warnings
from bisect import bisect_right
from collections.abc import Iterator
from typing import SupportsIndex

from .cache import CACHE_COUNT, CACHE_MAX_CHUNK, FastCache
from .errors import DoubleFree, HeapCorruption, HeapError, InvalidPointer
from .heap import H_CLEAN, H_TOP, HEAP_HEADER, Chunk, Heap, address_arg, alignment_arg, size_arg
from .info import MallInfo
from .layout import HEADER, IS_MMAPPED, MAX_REQUEST, MIN_CHUNK, OVERHEAD, SIZE_MASK, page_align_up, request_to_size
from .options import Options
from .os import libc
from .region import MAP_RESERVE, BreakRegion, MapRegion
from .units import size_approx, size_text

CACHE_MAX = CACHE_MAX_CHUNK
PAGE = libc.PAGE_SIZE
# A heap over a mapping, made when the break cannot grow, starts with at least this much (glibc's
# MMAP_AS_MORECORE_SIZE).
FALLBACK_HEAP_MIN = 1 << 20


class ProcessAllocator:
    """malloc, free, realloc and friends for this process: routing, the mmap path, options, lock, fork."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else Options.from_environment()
        # Re-entrant, so that a free from a finalizer run by the garbage collector inside one of our own
        # locked sections can see it is nested (and defer) instead of deadlocking.
        self._lock = threading.RLock()
        self._deferred: list[int] = []  # frees made while this thread was inside the allocator
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
        self._perturb = 0  # _sync_options keeps these in step with the options
        self._requests: dict[int, int] | None = None  # block address -> bytes asked for, while remembered
        self._extra = False  # perturbing or remembering requests: the one test malloc's fast path pays
        self._trim_trigger = 0  # top size from which a free tries to trim
        self._sync_options()

    # ----------------------------------------------------------- allocation

    def malloc(self, n: SupportsIndex) -> int:
        """Address of at least `n` usable bytes, 16-byte aligned; MemoryError when none can be had."""
        size = n if type(n) is int and n >= 0 else size_arg(n)
        nb = (size + 23) & ~15 if size > 24 else MIN_CHUNK  # layout.request_to_size, written out on the hot path
        if nb <= CACHE_MAX:
            p = self._cache_take(nb)
            if p:
                if self._extra:
                    self._after_malloc(p, size)
                return p
        lock = self._lock
        lock.acquire()
        try:
            if self._deferred:
                self._free_deferred()
            main = self._main
            c = main.allocate(nb) if main is not None and size <= MAX_REQUEST else 0
            p = main.base + (c << 3) + HEADER if c else self._allocate(size, nb, False)  # type: ignore[union-attr]
        finally:
            lock.release()
        if self._extra:
            self._after_malloc(p, size)
        return p

    def _after_malloc(self, p: int, n: int) -> None:
        """The optional work after a malloc: fill with the perturb byte, remember the request."""
        if self._perturb:
            libc.memset(p, self._perturb ^ 0xFF, n)
        if self._requests is not None:
            self._requests[p] = n

    def calloc(self, count: SupportsIndex, size: SupportsIndex) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product overflows.

        Memory fresh from the OS (a new mapping, or the top beyond the heap's clean mark) is not zeroed again.
        """
        total = size_arg(count, "count") * size_arg(size)
        if total > MAX_REQUEST:
            raise MemoryError(f"calloc({count}, {size}) overflows")
        nb = request_to_size(total)
        p = self._cache_take(nb) if nb <= CACHE_MAX else 0
        if p:
            libc.memset(p, 0, nb - OVERHEAD)
        else:
            with self._lock:
                p = self._allocate(total, nb, True)
        if self._requests is not None:
            self._requests[p] = total
        return p

    def _cache_take(self, nb: int) -> int:
        """A cached block of chunk size `nb`, or 0. Needs no lock: `list.pop` is atomic under the GIL."""
        entries = self._cache_bins.get(nb)
        if not entries:
            return 0
        try:
            p = entries.pop()
        except IndexError:  # another thread took the last one
            return 0
        self._cached.discard(p)
        return p

    def _cache_put(self, p: int, sz: int) -> bool:
        """Keep the freed block `p` (chunk size `sz`) in the fast cache if its list has room; DoubleFree
        if it is there already. Needs no lock: only single atomic set and list calls change the cache."""
        cached = self._cached
        if p in cached:
            raise DoubleFree(f"double free: the block at {p:#x} is already free (in the fast cache)")
        entries = self._cache_bins.get(sz)
        if entries is None:
            entries = self._cache_bins.setdefault(sz, [])
        if len(entries) >= CACHE_COUNT:
            return False
        if self._perturb:
            libc.memset(p, self._perturb, sz - OVERHEAD)
        cached.add(p)  # the set first: every listed block is a member at any instant (see check)
        entries.append(p)
        return True

    def _search(self, nb: int) -> tuple[Heap | None, int, int]:
        """(heap, chunk, the heap's clean mark before) for `nb` bytes from any heap's bins or top, or
        (None, 0, 0). Cached blocks are invisible to the heaps, so before giving up, those that could serve
        the request go back into them, coalesced, and they are searched again: no request goes to the OS
        while freed memory could serve it."""
        for released in (False, True):
            for heap in self._heaps:
                clean = heap._w[H_CLEAN]
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
        stay cached, as glibc's tcache keeps its chunks when the heap grows. Releasing the whole cache (as
        this allocator did before) placed later blocks differently from glibc: on random-bal, 7 pages more
        at the peak. The scan costs about 2 µs a cached block each time a request would go to the OS.
        """
        cached = set(self._cached)
        released = False
        for heap in self._heaps:
            blocks = cached if len(self._heaps) == 1 else {p for p in cached if heap.owns(p)}
            chosen = [(p, heap.chunk_of(p)) for p in heap.would_serve(blocks, nb)]  # all checked first
            for p, c in chosen:
                if self._cache.remove(p, heap._w[c + 1] & SIZE_MASK):
                    heap.release(c)
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
        """Serve a request the cache could not: the heaps' free memory first, then the OS."""
        if n > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {n} bytes")
        heap, c, clean = self._search(nb)
        if heap is None:
            heap, p = self._from_os(nb, nb, 16, f"a request of {size_text(n)}")
            if heap is None:
                return p
            clean = heap._w[H_CLEAN]
            c = heap.allocate(nb)
        if zero:
            heap.zero_fresh(c, clean)
        return heap.base + (c << 3) + HEADER

    def _grow(self, nb: int, reason: str) -> Heap:
        """A heap whose top can now serve `nb` bytes: the main heap grown, else a heap over a mapping."""
        opts = self.options
        main = self._main
        try:
            if main is None:
                # Made as glibc makes its first heap, whose first chunk is the thread's tcache: the header,
                # the top pad and a minimal chunk, in whole pages. The request then comes from that top, or
                # grows it as any other would, so a program's first request does not set the heap's size.
                try:
                    region = BreakRegion(HEAP_HEADER + MIN_CHUNK + opts.top_pad, "first heap: " + reason)
                except MemoryError:  # a pad the break cannot give: start without it, as Heap.extend grows
                    region = BreakRegion(HEAP_HEADER + MIN_CHUNK, "first heap: " + reason + " (without the top pad)")
                main = self._main = Heap(region, top_pad=opts.top_pad, trim_threshold=opts.trim_threshold)
                self._add_heap(main)
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
        if size <= MAP_RESERVE:
            mapping = MapRegion(min(size + opts.top_pad, MAP_RESERVE), reason, reserve=MAP_RESERVE)
        else:
            # Larger than a heap's reservation: one plain mapping of the size needed, as glibc maps when sbrk
            # fails. The kernel charges it at once, so a request it cannot back is a MemoryError now rather
            # than the OOM killer later; wholly free again, it is unmapped (_drop_if_empty).
            mapping = MapRegion(size, reason, reserve=size)
        heap = Heap(mapping, top_pad=opts.top_pad, trim_threshold=opts.trim_threshold)
        self._add_heap(heap)
        self._note_system()
        return heap

    def _add_heap(self, heap: Heap) -> None:
        self._heaps.append(heap)
        i = bisect_right(self._starts, heap.base)
        self._starts.insert(i, heap.base)
        self._by_start.insert(i, heap)

    def _map_chunk(self, nb: int, alignment: int, reason: str) -> int:
        """A chunk in a mapping of its own; returns the block's address (aligned to `alignment`)."""
        length = page_align_up(nb + OVERHEAD + (alignment - 16 if alignment > 16 else 0), PAGE)
        m = libc.mmap_anonymous(length, reason)
        p = (m + HEADER + alignment - 1) & ~(alignment - 1)
        offset = p - HEADER - m
        header = libc.memory_view(p - HEADER, HEADER).cast("Q")
        header[0] = offset
        header[1] = (length - offset) | IS_MMAPPED
        header.release()
        self._mapped[p] = (m, length)
        self._mapped_bytes += length
        self._note_system()
        return p

    def _note_system(self) -> None:
        now = self.system_current
        if now > self._system_max:
            self._system_max = now

    # ---------------------------------------------------------------- free

    def free(self, p: SupportsIndex) -> None:
        """Free the block at `p`; `free(0)` does nothing. InvalidPointer or DoubleFree if `p` is not live."""
        ptr = p if type(p) is int and p >= 0 else address_arg(p)
        if not ptr:
            return
        main = self._main
        c = main.find_chunk(ptr) if main is not None else 0
        if c:
            # The common case needs no lock: a live small block of the main heap joins the fast cache.
            # Only the block's own header and its successor's are read, which no other thread may change.
            sz = main._w[c + 1] & SIZE_MASK  # type: ignore[union-attr]
            if sz <= CACHE_MAX and self._cache_put(ptr, sz):
                return
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            self._deferred.append(ptr)  # nested in our own call (a finalizer): free it on the way out
            return
        lock.acquire()
        try:
            if self._deferred:
                self._free_deferred()
            if c:
                self._release(main, c, sz)  # type: ignore[arg-type]
            else:
                self._free(ptr)
        finally:
            lock.release()

    def _free_deferred(self) -> None:
        """Carry out the frees that finalizers asked for while this thread was inside the allocator."""
        while self._deferred:
            p = self._deferred.pop()
            try:
                self._free(p)
            except HeapError as exc:
                warnings.warn(f"a deferred free failed: {exc}", RuntimeWarning, stacklevel=3)

    def _free(self, p: int) -> None:
        mapped = self._mapped.get(p)
        if mapped is not None:
            self._unmap_chunk(p, mapped)
            return
        heap = self._heap_of(p)
        c = heap.chunk_of(p)
        sz = heap._w[c + 1] & SIZE_MASK
        # Only the main heap's blocks are cached: a heap over a mapping goes back to the OS once wholly free,
        # which a cached block would prevent.
        if sz <= CACHE_MAX and heap is self._main and self._cache_put(p, sz):
            return
        self._release(heap, c, sz)

    def _release(self, heap: Heap, c: int, sz: int) -> None:
        """Give the live chunk `c` (of `sz` bytes) back to its heap, trimming if the top grew enough."""
        if self._perturb:
            libc.memset(heap.base + (c << 3) + HEADER, self._perturb, sz - OVERHEAD)
        if heap.release(c) >= self._trim_trigger:
            self._trim_heap(heap, "after a free")

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
        self._heaps.remove(heap)
        i = self._by_start.index(heap)
        del self._starts[i], self._by_start[i]
        heap.region.close()

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

    def _unmap_chunk(self, p: int, mapped: tuple[int, int]) -> None:
        m, length = mapped
        self._check_mapped(p, m, length)
        del self._mapped[p]
        self._mapped_bytes -= length
        libc.munmap(m, length, f"free of a mapped chunk of {size_text(length)}")
        if self.options.freed_mapped_chunk(length - (p - HEADER - m)):
            self._sync_options()

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

    # ------------------------------------------------------------- resizing

    def realloc(self, p: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `p` to `n` bytes; returns its address, which may have moved.

        `realloc(0, n)` is `malloc(n)` and `realloc(p, 0)` frees `p` and returns 0. A block grows in place
        into a free neighbour or the top when it can; a mapped block is moved with mremap.
        """
        p = address_arg(p)
        n = size_arg(n)
        if not p:
            return self.malloc(n)
        with self._lock:
            mapped = self._mapped.get(p)
            if mapped is not None:
                if n == 0:
                    self._unmap_chunk(p, mapped)
                    return 0
                if n > MAX_REQUEST:
                    raise MemoryError(f"cannot allocate {n} bytes")
                q = self._remap(p, mapped, n)
            else:
                heap, c = self._live_chunk(p)
                if n == 0:
                    self._free(p)
                    return 0
                if n > MAX_REQUEST:
                    raise MemoryError(f"cannot allocate {n} bytes")
                nb = request_to_size(n)
                # A block bordering the top grows in place even past the mmap threshold (glibc would move it
                # to a mapping): moving would copy it, and a growing mapped block costs an mremap per page.
                if heap.resize_in_place(c, nb, grow_top=True):
                    self._note_system()
                    W = heap._w
                    if W[W[H_TOP] + 1] & SIZE_MASK >= self._trim_trigger:
                        self._trim_heap(heap, "after a realloc shrank a block")
                    q = p
                else:
                    heap.release(c, check_only=True)  # a block that cannot be freed must not be moved
                    old_usable = (heap._w[c + 1] & SIZE_MASK) - OVERHEAD
                    q = self._allocate(n, nb, False)
                    libc.memmove(q, p, min(old_usable, n))
                    self._free(p)
        if self._requests is not None:  # the one test the optional request log costs a realloc
            self._requests[q] = n
        return q

    def _remap(self, p: int, mapped: tuple[int, int], n: int) -> int:
        m, length = mapped
        self._check_mapped(p, m, length)
        offset = p - HEADER - m
        new_length = page_align_up(request_to_size(n) + OVERHEAD + offset, PAGE)
        if new_length == length:
            return p
        m2 = libc.mremap(m, length, new_length, f"realloc of a mapped chunk to {size_text(n)}")
        p2 = m2 + offset + HEADER
        header = libc.memory_view(p2 - HEADER, HEADER).cast("Q")
        header[1] = (new_length - offset) | IS_MMAPPED
        header.release()
        del self._mapped[p]
        self._mapped[p2] = (m2, new_length)
        self._mapped_bytes += new_length - length
        self._note_system()
        return p2

    def memalign(self, alignment: SupportsIndex, n: SupportsIndex) -> int:
        """A block of at least `n` bytes at a multiple of `alignment` (a power of two)."""
        a = alignment_arg(alignment)
        size = size_arg(n)
        p = self._memalign(a, size)
        if self._requests is not None:
            self._requests[p] = size
        return p

    def _memalign(self, a: int, n: int) -> int:
        if a <= 16:
            return self.malloc(n)
        if n > MAX_REQUEST or a > MAX_REQUEST:
            raise MemoryError(f"cannot allocate {n} bytes aligned to {a}")
        nb = request_to_size(n)
        need = nb + a + MIN_CHUNK
        with self._lock:
            heap, c, _clean = self._search(need)
            if heap is None:
                heap, p = self._from_os(need, nb, a, f"a request of {size_text(n)} aligned to {a}")
                if heap is None:
                    return p
                c = heap.allocate(need)
            return heap.base + (heap.align_chunk(c, nb, a) << 3) + HEADER

    # ------------------------------------------------------------ questions

    def usable_size(self, p: SupportsIndex) -> int:
        """Bytes usable in the live block at `p` (0 for address 0)."""
        p = address_arg(p)
        if not p:
            return 0
        with self._lock:
            mapped = self._mapped.get(p)
            if mapped is not None:
                return mapped[1] - (p - HEADER - mapped[0]) - HEADER
            heap, c = self._live_chunk(p)
            return (heap._w[c + 1] & SIZE_MASK) - OVERHEAD

    def view(self, p: SupportsIndex, n: SupportsIndex | None = None) -> memoryview:
        """A writable memoryview of the live block at `p`: its first `n` bytes, by default all of it.

        The view is valid until the block is freed; using it after that is use-after-free.
        """
        usable = self.usable_size(p)
        p = address_arg(p)
        if not p:
            raise InvalidPointer("cannot view address 0")
        n = usable if n is None else size_arg(n)
        if n > usable:
            raise ValueError(f"the block at {p:#x} has {usable} usable bytes, not {n}")
        return libc.memory_view(p, n)

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

    def mapped_chunks(self) -> dict[int, int]:
        """Block address -> mapping length of every mapped chunk."""
        with self._lock:
            return {p: length for p, (_m, length) in self._mapped.items()}

    def mappings(self) -> dict[int, tuple[int, int]]:
        """Block address -> (mapping address, mapping length) of every mapped chunk; the mapping starts
        before the chunk's header when the block was aligned beyond 16 bytes."""
        with self._lock:
            return dict(self._mapped)

    def mallinfo(self) -> MallInfo:
        """glibc's mallinfo2 figures for this allocator, plus system_current and system_max."""
        with self._lock:
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
        with self._lock:
            cached = {p - HEADER for p in list(self._cached)}
            chunks = [c for heap in self._by_start for c in heap.walk()]
            mapped = sorted(self._mapped.items())
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
        with self._lock:
            for heap in self._heaps:
                heap.check()
            bins = self._cache.snapshot()
            listed = [p for entries in bins.values() for p in entries]
            # Lock-free paths add to the set before the list and take from the list before the set, so
            # every listed block is a member at any instant (the set may briefly hold one more).
            if len(set(listed)) != len(listed) or not set(listed) <= set(self._cached):
                raise HeapCorruption("the fast cache's lists and its set of members disagree")
            for size, entries in bins.items():
                for p in entries:
                    heap = self._heap_of(p)
                    c = heap.chunk_of(p)
                    if heap._w[c + 1] & SIZE_MASK != size:
                        raise HeapCorruption(f"cached block at {p:#x} is not of size {size}", p - HEADER)
            for p, (m, length) in self._mapped.items():
                self._check_mapped(p, m, length)

    # ------------------------------------------------------ giving memory back

    def trim(self, pad: SupportsIndex = 0) -> bool:
        """Give free memory back to the OS now; True if anything was released (malloc_trim).

        Empties the fast cache into the heaps first, then releases each heap's top beyond `pad`
        (lowering the break where it can) and the whole pages inside large free chunks.
        """
        pad = size_arg(pad, "pad")
        with self._lock:
            self._flush_cache()
            released = False
            for heap in list(self._heaps):
                if heap.trim(pad, "malloc_trim", inner=True):
                    released = True
                self._drop_if_empty(heap)
            return released

    def _flush_cache(self) -> None:
        for p in self._cache.drain():
            heap = self._heap_of(p)
            heap.release(heap.chunk_of(p))

    # ------------------------------------------------------------- settings

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
        self._flush_cache()
        # A block some other thread was caching or taking at the fork is in the set but in no list:
        # it stays in use, as that thread's call never finished in this process.
        self._cached.clear()

