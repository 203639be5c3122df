"""SharedHeap: one heap in a file that many processes map at once, reachable by name, surviving a killed process.

A shared heap is the engine (`heap.Heap`) over a `SharedRegion`: the heap's state lives in the file as offsets,
so every process reads the same heap wherever its mapping lies. A block's handle is its offset from the
segment's start; `address(off)` turns it into this process's address.

Every operation holds the segment's lock, a robust process-shared mutex (os/mutex.py), and writes through the
segment's undo journal (segment.py). Its shape, in `_run`:

    take the lock          a slice assignment runs the C call and stores its result before a signal
                           handler can run: we never hold the lock without knowing it
    repair                 a journal left non-empty (a holder died or was interrupted) is undone;
                           a grown extent is mapped
    the operation          the engine, through journaled stores
    commit and unlock      the journal is emptied (one store) and the lock released, with no point in
                           between where a handler can run, so a handler's exception comes before
                           the commit (undone: nothing happened) or after the return
    on an exception        the journal is undone and the lock released (in a `finally`, so a second
                           exception cannot keep the lock; an undo cut short is finished by the next holder)

Like glibc's tcache and the process allocator's fast cache, each process keeps the small blocks it frees
in a cache of its own (at most CACHE_COUNT per chunk size) and hands them out again without the lock or the
journal. A cached block stays in use as far as the heap knows; its first two words hold CACHE_MARK and the
process's slot in the segment's process table, written by the process alone (it owns the block), so that
the blocks of a process that died are found and freed by the next process that takes the lock to check,
walk or grow the heap, or to attach. The cache's lists change in runs of stores with no call between, as
the process allocator's do, so neither another thread nor a signal handler comes between a list and a mark;
a list entry whose mark is gone (a flush cut short) is skipped.

A process killed at any instant leaves the lock to the kernel (the next owner gets EOWNERDEAD) and the journal
to the next holder. The kernel cannot hand on a lock that the file itself shows held when no process holds it
(a copy or a power cut took the file during an operation, or it was crafted): whoever opens a heap that no
other process has open (files.lock_alone) makes its lock anew, and the journal still carries the repair.

A thread that calls into a heap it is already inside (from a signal handler or a finalizer) gets RuntimeError:
the interrupted operation's plans would no longer hold.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import operator
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, SupportsIndex, TypeVar, cast

from ..cache import CACHE_COUNT, CACHE_MAX_CHUNK
from ..errors import DoubleFree, HeapCorruption, HeapError, InvalidPointer
from ..heap import H_CLEAN, H_END, H_TOP, HEAP_HEADER, Chunk, Heap, address_arg, size_arg
from ..info import MallInfo
from ..layout import (
    HEADER,
    MIN_CHUNK,
    OVERHEAD,
    SIZE_MASK,
    TAG_BITS,
    TAG_SHIFT,
    check_request,
    page_align_up,
    request_to_size,
)
from ..os import events, files, libc, mutex, processes
from ..region import PAGE, region_size
from . import values
from .names import Names, name_bytes
from .segment import (
    CACHE_MARK,
    DEFAULT_LIMIT,
    HEADER_START,
    HEAP_WORD,
    J_START,
    OWNERS,
    S_EXTENT,
    S_JOURNAL,
    S_MAGIC,
    SEG_HEADER,
    SEG_MAGIC,
    SEG_MIN,
    SLOTS,
    SharedRegion,
    format_header,
    journal_store,
    read_header,
    roll_back,
)

T = TypeVar("T")

_try_lock = mutex.try_lock_fast
_timed_lock = mutex.timed_lock_fast
_unlock = mutex.unlock_fast
_CACHED_REQUEST = CACHE_MAX_CHUNK - 8 + 1  # requests whose chunks the cache keeps
_FIRST_BLOCK = SEG_HEADER + HEAP_HEADER + HEADER  # the offset of the heap's first block
_consistent = mutex.consistent_fast
_store: Any = operator.setitem  # a store that is a C call, not a Python frame
_WAIT_SLICE = 0.05  # seconds a blocked caller waits between chances for Python to run signal handlers
# Slices after which a waiter checks that the lock's holder exists: a dead holder is the kernel's to report
# (EOWNERDEAD), but a lock word crafted or damaged to name a thread that never held it would be waited on forever.
_PATIENCE = 100

# The heaps this process has open, by file identity, until closed: attaching or unpickling a heap that is
# already open returns it instead of mapping the segment again (a pool's tasks unpickle the same heap
# again and again, and each mapping reserves the heap's whole limit of address space).
_open: dict[tuple[int, int], SharedHeap] = {}
_open_lock = threading.Lock()


def _after_fork() -> None:
    """In a child: the caches copied from the parent are the parent's; each heap claims a slot of its own."""
    for heap in list(_open.values()):
        heap._bins = {}
        heap._slot = 0
        heap._wants_slot = True


os.register_at_fork(after_in_child=_after_fork)


class SharedHeap:
    """A heap in POSIX shared memory (`create`, `attach`) or in a regular file (`open`), for many processes.

    Blocks are named by offsets (ints): `malloc`, `calloc`, `realloc`, `free`, `usable_size`, `view`, `address`,
    `offset`; `malloc_at`, `realloc_at` and `free_at` keep a block's offset in a word of another block, changed in
    the same operation as the block (so that a process killed at any instant leaves no block unnamed). Named
    values: `roots` (names to offsets), `put`, `get`, `ndarray`, `delete`. Misuse raises as the process heap does,
    and a call that raises changes nothing. A heap pickles as its name or path.
    """

    def __init__(self, region: SharedRegion, heap: Heap | None, kind: str, path: str) -> None:
        self._region = region
        self._heap = cast(Heap, heap)  # None only while `_adopt` checks the heap under the lock
        self._kind = kind  # "shm" or "file"
        self._path = path
        self._log = region.log
        self._lock_arg = (mutex.handle(region.lock_address()),)
        self._extent = 0  # the first operation follows the header's extent
        self._sink: list[object] = []
        self._names = Names(region, self._heap)
        self._slot = 0  # this process's slot in the process table; 0: no cache
        self._bins: dict[int, list[int]] = {}  # chunk size -> offsets of cached blocks, newest last
        self._wants_slot = True  # a slot is claimed at the next slow operation (after a fork: the child's own)
        self.roots: MutableMapping[str, int] = Roots(self)
        """Names (str) to offsets, stored in the heap: a process that attaches finds data by name."""

    # ------------------------------------------------------------ making and finding heaps

    @classmethod
    def create(cls, name: str, size: SupportsIndex, *, max_size: SupportsIndex | None = None,
               mode: int = 0o600) -> SharedHeap:
        """A new heap in POSIX shared memory (/dev/shm/`name`) of `size` bytes, growing on demand up to
        `max_size` (address space, not memory; 256 GiB when not given). FileExistsError if the name is taken."""
        path = files.shm_path(name)
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, f"a shared heap named {name!r} exists", path)
        return cls._make(path, "shm", size, max_size, mode)

    @classmethod
    def attach(cls, name: str) -> SharedHeap:
        """The heap made by `create(name)`, from any process. FileNotFoundError if there is none;
        HeapCorruption if the segment is not a heap of this version or is damaged."""
        return cls._adopt(files.shm_path(name), "shm")

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: SupportsIndex | None = None) -> SharedHeap:
        """A heap kept in the regular file at `path`: made with `size` bytes if the file is missing, reopened
        with its contents otherwise. Several processes may open the same file at once."""
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError("a heap file's path must be a str or os.PathLike[str]")
        if size is not None and not os.path.exists(path):
            try:
                return cls._make(os.path.abspath(path), "file", size, None, 0o600)
            except FileExistsError:
                pass  # another process made it first: open theirs
        return cls._adopt(os.path.abspath(path), "file")

    @classmethod
    def _make(cls, path: str, kind: str, size: SupportsIndex, max_size: SupportsIndex | None,
              mode: int) -> SharedHeap:
        n = region_size(size, "size")
        extent = page_align_up(SEG_HEADER + max(n, PAGE), PAGE)
        limit = max(DEFAULT_LIMIT, extent) if max_size is None else \
            page_align_up(region_size(max_size, "max_size"), PAGE)
        if limit < extent:
            raise ValueError(f"max_size {limit} is less than the heap's first {extent} bytes")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be a permission mask from 0 to 0o777, not {mode!r}")
        fd, tmp = files.make_temporary(path, mode)
        region = None
        try:
            files.lock_user(fd)
            files.allocate(fd, extent)
            region = SharedRegion(fd, limit, f"shared heap {path} made")
            region.map_to(extent, f"shared heap {path} made")
            format_header(region.seg, extent, limit)
            region.make_lock()
            region.follow()
            heap = Heap(region, top_pad=0, trim_threshold=DEFAULT_TRIM, undoable=True)
            region.log[S_JOURNAL] = J_START  # the format's stores need no undo
            region.log[S_MAGIC] = SEG_MAGIC  # last: a heap only once whole
            files.publish(tmp, path)
            named = files.open_existing(path)
            files.lock_user(named)  # before the first descriptor, and its hold, goes
            region.rename(named, f"shared heap {path} made: mapped by its name")
        except BaseException:
            if region is not None:
                region.close()
            else:
                files.close(fd)
            if os.path.exists(tmp):
                files.unlink(tmp)
            raise
        return cls._register(cls(region, heap, kind, path))

    @classmethod
    def _adopt(cls, path: str, kind: str) -> SharedHeap:
        fd = files.open_existing(path)
        try:
            key = files.identity(fd)
            with _open_lock:
                known = _open.get(key)
            if known is not None and known._region.seg_base:
                files.close(fd)
                return known
            size = files.file_size(fd)
            if size < SEG_MIN:
                raise HeapCorruption(f"{path} is not a shared heap (too short: {size} bytes)")
            _, limit = read_header(files.read_start(fd, HEADER_START), path)
            alone = files.lock_alone(fd)
        except BaseException:
            files.close(fd)
            raise
        region = SharedRegion(fd, limit, f"shared heap {path} attached")
        try:
            region.map_file(f"shared heap {path} attached")
            if alone:  # no process uses the heap: a lock the file shows held is no one's
                region.make_lock()
            files.lock_user(fd)
            shared = cls(region, None, kind, path)
            shared._run(shared._adopt_heap)
        except BaseException:
            region.close()
            raise
        return cls._register(shared)

    def _adopt_heap(self) -> None:
        """Under the lock, the journal repaired: adopt the engine's header (HeapCorruption if it is damaged)."""
        heap = Heap(self._region, attach=True, top_pad=0, trim_threshold=DEFAULT_TRIM, undoable=True)
        self._heap = heap
        self._names = Names(self._region, heap)
        self._reclaim()

    @classmethod
    def _register(cls, shared: SharedHeap) -> SharedHeap:
        with _open_lock:
            _open[files.identity(shared._region.fd)] = shared
        return shared

    # ---------------------------------------------------------------- the operation protocol

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` as one operation of this heap: under its lock, journaled, all or nothing."""
        got = [1]
        got[:] = map(_try_lock, self._lock_arg)
        try:
            if got[0]:
                self._acquire(got)
            log = self._log
            if log[S_JOURNAL] != J_START or log[S_EXTENT] != self._extent:
                self._sync()
            result = fn(*args)
            release: Iterator[object] = map(_unlock, self._lock_arg)
            sink = self._sink
            if self._region.trimmed:
                release, sink = self._give_back(release)
            log[S_JOURNAL] = J_START  # the commit
            sink[:] = release
            return result
        except BaseException:
            if got[0] == mutex.OWNER_DEAD:  # held, taken from a dead owner: unlocked unrepaired, it would be lost
                got[:] = map(_consistent, self._lock_arg)
            if not got[0]:
                try:
                    self._sync()  # undoes this operation's stores
                finally:
                    _unlock(self._lock_arg[0])
            raise

    def _give_back(self, unlock: Iterator[object]) -> tuple[Iterator[object], list[object]]:
        """Before the commit of an operation whose trim found whole free pages at the top: `unlock`, preceded by
        the C calls that give those pages back (MADV_REMOVE) and then lower the clean mark if they went, all to
        run after the commit in one step, with no point where a signal handler can run; and the list to run
        them into, which keeps madvise's result for the system-call log (owed to it: events.owe). The range is
        the top as the operation leaves it: a block the same operation took after its trim stays out of it."""
        region = self._region
        region.trimmed = False
        W = self._heap._w
        t, end, clean = W[H_TOP], W[H_END], W[H_CLEAN]
        lo = page_align_up((t << 3) + MIN_CHUNK, PAGE)
        hi = end << 3 & ~(PAGE - 1)
        if hi <= lo or clean << 3 <= lo:
            return unlock, self._sink
        results: list[object] = []
        address, length = region.base + lo, hi - lo
        events.owe("madvise", (address, length, libc.MADV_REMOVE), results, 1,
                   f"shared heap {self._path}: free pages at the top go back to the file (a hole), after the commit")
        # The result feeds the mark and, through tee's buffer (madvise runs once), lands in `results`.
        ran, kept = itertools.tee(map(libc.madvise_fast, (address,), (length,), (libc.MADV_REMOVE,)))
        pick = (lo >> 3, clean).__getitem__  # madvise's 0 (the pages now read as zero) lowers the mark; -1 keeps it
        marks = map(_store, (region.seg,), (HEAP_WORD + H_CLEAN,), map(pick, ran))
        return itertools.chain(marks, kept, unlock), results

    def _acquire(self, got: list[int]) -> None:
        """Wait for the lock after a failed first try (`got[0]` the errno); `got[0]` becomes 0 once it is held."""
        rc = got[0]
        slices = 0
        while rc == errno.EBUSY or rc == errno.ETIMEDOUT:
            until = mutex.deadline(_WAIT_SLICE)
            got[:] = map(_timed_lock, self._lock_arg, (until,))
            rc = got[0]
            slices += 1
            if not slices % _PATIENCE and rc == errno.ETIMEDOUT:
                owner = mutex.owner(self._region.lock_address())
                if owner and not processes.thread_exists(owner):
                    raise HeapCorruption(f"shared heap {self._path}: its lock names thread {owner} as its holder, "
                                         "and there is no such thread (a damaged or crafted lock)",
                                         self._region.seg_base)
        if rc == mutex.OWNER_DEAD:
            # The journal, not the lock, carries the repair. The call and the store of its result (0) are one
            # step for a signal handler: `got` never says "not held" of a lock still waiting to be marked.
            got[:] = map(_consistent, self._lock_arg)
        elif rc == errno.EDEADLK:
            raise RuntimeError("this thread is already inside this shared heap (a call from a signal handler or "
                               "a finalizer during an operation): the interrupted operation cannot be left")
        elif rc:
            raise HeapCorruption(f"shared heap {self._path}: its lock is damaged ({os.strerror(rc)})",
                                 self._region.seg_base)

    def _sync(self) -> None:
        """Under the lock: undo an operation left in the journal (another's that died, or this one's after an
        exception), then follow the extent."""
        region = self._region
        # Until the end, no extent is known: an undo that restores the extent and is then cut short (a second
        # exception) must not leave this process's size and words at the undone growth, taken for the heap's.
        self._extent = 0
        if self._log[S_JOURNAL] != J_START:
            region.map_file("shared heap: map all of the file to undo an interrupted operation")
            roll_back(region.seg)
        region.follow()
        if self._heap is not None:
            self._heap._w = region.words
        self._extent = self._log[S_EXTENT]

    # ------------------------------------------------------------------------ blocks

    def _addr(self, off: object) -> int:
        """The address of the block at offset `off`: TypeError for a non-integer, InvalidPointer outside the heap."""
        o = address_arg(off)
        region = self._region
        if not region.seg_base:
            raise self._closed()
        if not SEG_HEADER + HEAP_HEADER < o < region.limit:
            raise InvalidPointer(f"offset {o:#x} is not a block of this shared heap")
        return region.seg_base + o

    def malloc(self, n: SupportsIndex) -> int:
        """The offset of a new block of at least `n` bytes; MemoryError when the heap cannot grow enough."""
        if type(n) is int and 0 <= n < _CACHED_REQUEST:
            entries = self._bins.get((n + 23) & ~15 if n > 24 else 32)
            if entries:
                # Taken in one run of stores (see the module docstring).
                p = entries[-1]
                del entries[-1]
                seg = self._region.seg
                w = p >> 3
                if seg[w] == CACHE_MARK and seg[w + 1] == self._slot:
                    seg[w] = 0
                    return p
        if not self._region.seg_base:
            raise self._closed()
        if self._wants_slot:
            self._claim()
        return self._run(self._malloc, n) - self._region.seg_base

    def _malloc(self, n: SupportsIndex) -> int:
        """Under the lock: the engine's malloc, but before the segment grows, this process's cache and the
        caches of dead processes go back to the heap."""
        heap = self._heap
        k = size_arg(n)
        check_request(k)
        c = heap.allocate(request_to_size(k))
        if c:
            return heap.base + (c << 3) + HEADER
        self._flush()
        self._reclaim()
        return heap.malloc(k)  # from what the caches gave back, or the segment grows

    def calloc(self, count: SupportsIndex, size: SupportsIndex) -> int:
        """The offset of a new zeroed block for `count` elements of `size` bytes."""
        if not self._region.seg_base:
            raise self._closed()
        return self._run(self._heap.calloc, count, size) - self._region.seg_base

    def realloc(self, off: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `off` to `n` bytes, in place when possible; its (new) offset. `realloc(0, n)` is
        `malloc(n)`; `realloc(off, 0)` frees the block and returns 0."""
        o = address_arg(off)
        if not o:
            return self.malloc(n)
        return self._run(self._realloc, self._addr(o), n)

    def _realloc(self, p: int, n: SupportsIndex) -> int:
        """Under the lock: the engine's realloc, as an offset (the conversion is part of the operation: no call
        may come between an operation's commit and its return)."""
        self._refuse_cached(p, "realloc")
        q = self._heap.realloc(p, n)
        return q - self._region.seg_base if q else 0

    def free(self, off: SupportsIndex) -> None:
        """Free the block at `off` (0 does nothing); InvalidPointer or DoubleFree if it is not live."""
        if type(off) is int and self._slot and not off & 15 and _FIRST_BLOCK <= off < self._region.mapped - 16:
            seg = self._region.seg
            w = off >> 3
            h = seg[w - 1]
            size = h & SIZE_MASK
            # A live block's header carries its in-use tag (heap.py); reading it needs no lock, as nobody but
            # its owner changes an in-use chunk's size or tag.
            if MIN_CHUNK <= size <= CACHE_MAX_CHUNK and h >> TAG_SHIFT == (w - 2 - HEAP_WORD | 1) & TAG_BITS \
                    and seg[w] != CACHE_MARK:
                bins = self._bins
                entries = bins.get(size)
                if entries is None:
                    bins[size] = entries = []
                if len(entries) < CACHE_COUNT and off not in entries:
                    # Cached in one run of stores: the slot, the mark, the list.
                    seg[w + 1] = self._slot
                    seg[w] = CACHE_MARK
                    entries += (off,)
                    return
        o = address_arg(off)
        if o:
            p = self._addr(o)
            if self._wants_slot:
                self._claim()
            self._run(self._free, p)

    def _free(self, p: int) -> None:
        """Under the lock: free the block at `p`, refusing one that sits in a cache (freed already)."""
        self._refuse_cached(p, "free")
        self._heap.free(p)

    def _refuse_cached(self, p: int, what: str) -> None:
        """DoubleFree when the live block at `p` is in a process's cache."""
        w = (p - self._region.seg_base) >> 3
        seg = self._region.seg
        if w + 1 < len(seg) and seg[w] == CACHE_MARK and self._heap.find_chunk(p) and 0 < seg[w + 1] <= SLOTS:
            whose = "this process's" if seg[w + 1] == self._slot else "another process's"
            raise DoubleFree(f"double {what}: the block at offset {w << 3:#x} is free (in {whose} cache)")

    def usable_size(self, off: SupportsIndex) -> int:
        """Bytes usable in the live block at `off`."""
        return self._run(self._usable_size, self._addr(off))

    def _usable_size(self, p: int) -> int:
        self._refuse_cached(p, "use")
        return self._heap.usable_size(p)

    def view(self, off: SupportsIndex, n: SupportsIndex | None = None) -> memoryview:
        """A writable memoryview of the block at `off`: all its usable bytes, or the first `n`. It stays valid
        while the heap is open in this process (close() refuses while views are alive)."""
        p = self._addr(off)
        region = self._region
        heap = self._heap
        try:
            size = heap.block_size(p)
        except IndexError:  # the heap grew in another process: the locked path maps it
            size = 0
        if not size or p + size > region.seg_base + region.mapped or region.seg[(p - region.seg_base) >> 3] \
                == CACHE_MARK:
            size = self._run(self._usable_size, p) + OVERHEAD
        usable = size - OVERHEAD
        k = usable if n is None else size_arg(n)
        if k > usable:
            raise ValueError(f"the block at offset {p - region.seg_base:#x} has {usable} usable bytes, not {k}")
        o = p - region.seg_base
        return memoryview(region.exporters[-1]).cast("B")[o:o + k]

    def address(self, off: SupportsIndex) -> int:
        """The address, in this process, of offset `off` of the heap."""
        o = address_arg(off)
        region = self._region
        if not region.seg_base:
            raise self._closed()
        if o >= region.limit:
            raise InvalidPointer(f"offset {o:#x} lies outside this shared heap")
        return region.seg_base + o

    def offset(self, address: SupportsIndex) -> int:
        """The offset of `address` (an address in this process's mapping of the heap)."""
        a = address_arg(address)
        region = self._region
        if not region.seg_base:
            raise self._closed()
        if not region.seg_base <= a < region.seg_base + region.limit:
            raise InvalidPointer(f"{a:#x} is not inside this shared heap's mapping")
        return a - region.seg_base

    # ------------------------------------------------------- blocks whose handles live in the heap

    def malloc_at(self, table: SupportsIndex, index: SupportsIndex, n: SupportsIndex) -> int:
        """`malloc(n)`, storing the new block's offset in word `index` (8 bytes each) of the live block at offset
        `table` in the same operation, as PMDK's pmemobj_alloc stores into a persistent pointer: a process killed
        or interrupted at any instant leaves either no new block and the word as it was, or the block with its
        offset in the word, never a block that nothing names. The offset; what the word held is overwritten."""
        o, i = self._table_arg(table, index)
        return self._run(self._malloc_at, o, i, n)

    def realloc_at(self, table: SupportsIndex, index: SupportsIndex, n: SupportsIndex) -> int:
        """`realloc` of the block whose offset word `index` of the block at `table` holds (0: a new block, as
        `realloc(0, n)`), storing its new offset (0 when `n` is 0 freed it) in the word in the same operation."""
        o, i = self._table_arg(table, index)
        return self._run(self._realloc_at, o, i, n)

    def free_at(self, table: SupportsIndex, index: SupportsIndex) -> None:
        """Free the block whose offset word `index` of the block at `table` holds (0: nothing) and store 0 in the
        word, in the same operation."""
        o, i = self._table_arg(table, index)
        self._run(self._free_at, o, i)

    def _table_arg(self, table: SupportsIndex, index: SupportsIndex) -> tuple[int, int]:
        self._addr(table)
        return address_arg(table), size_arg(index, "index")

    def _word_of(self, table: int, index: int) -> int:
        """Under the lock: the heap word of word `index` of the live block at offset `table` (InvalidPointer,
        DoubleFree or HeapCorruption when it is none; IndexError past its end)."""
        heap = self._heap
        c = heap.chunk_of(self._region.seg_base + table)
        usable = heap.chunk_size(c) - OVERHEAD
        if (index + 1) * 8 > usable:
            raise IndexError(f"word {index} lies past the end of the {usable}-byte block at offset {table:#x}")
        return c + 2 + index

    def _malloc_at(self, table: int, index: int, n: SupportsIndex) -> int:
        w = self._word_of(table, index)
        heap = self._heap
        o = self._malloc(n) - self._region.seg_base
        heap._w[w] = o  # after the malloc, which may have grown the heap (new words)
        return o

    def _realloc_at(self, table: int, index: int, n: SupportsIndex) -> int:
        w = self._word_of(table, index)
        heap = self._heap
        old = self._held_at(table, index, w)
        o = self._realloc(self._addr(old), n) if old else self._malloc(n) - self._region.seg_base
        heap._w[w] = o
        return o

    def _free_at(self, table: int, index: int) -> None:
        w = self._word_of(table, index)
        heap = self._heap
        old = self._held_at(table, index, w)
        if old:
            self._free(self._addr(old))
            heap._w[w] = 0

    def _held_at(self, table: int, index: int, w: int) -> int:
        old: int = self._heap._w[w]
        if old == table:
            raise ValueError(f"word {index} of the block at offset {table:#x} holds that block's own offset")
        return old

    # ------------------------------------------------------------------ named values

    def put(self, name: str, value: object) -> int:
        """Copy `value` (a numpy array, or any bytes-like object) into the heap under `name`, replacing (and
        freeing) what a put stored there before, as a free would (another name that held the same block is
        left pointing at freed memory); its offset."""
        key = name_bytes(name)
        layout, data = values.layout_of(value)
        if not self._region.seg_base:
            raise self._closed()
        return self._run(self._store, key, layout, data, False)

    def ndarray(self, name: str, shape: object, dtype: object = float) -> Any:
        """A new zeroed numpy array of `shape` and `dtype` in the heap under `name`, to fill in place."""
        key = name_bytes(name)
        layout = values.array_layout(shape, dtype)
        if not self._region.seg_base:
            raise self._closed()
        return self._run(self._new_array, key, layout)

    def _new_array(self, key: bytes, layout: values.Layout) -> Any:
        """Under the lock: the zeroed value stored, and the array over it made before the commit (nothing may
        come after the commit that could raise)."""
        start = self._store(key, layout, None, True) + layout.data_offset
        view = memoryview(self._region.exporters[-1]).cast("B")[start:start + layout.nbytes]
        return values.as_value(layout, view)

    def get(self, name: str) -> Any:
        """The value stored under `name` by put or ndarray: a zero-copy numpy array, or a memoryview for bytes.
        KeyError if there is none."""
        key = name_bytes(name)
        if not self._region.seg_base:
            raise self._closed()
        layout, start = self._run(self._load, key, name)
        view = memoryview(self._region.exporters[-1]).cast("B")[start:start + layout.nbytes]
        return values.as_value(layout, view)

    def delete(self, name: str) -> None:
        """Free the value stored under `name` and remove the name; KeyError if there is none."""
        key = name_bytes(name)
        if not self._region.seg_base:
            raise self._closed()
        if self._run(self._delete, key) is None:
            raise KeyError(name)

    def _delete(self, key: bytes) -> int | None:
        old = self._names.delete(key)
        if old is not None:
            self._heap.free(self._region.seg_base + old)
        return old

    def _store(self, key: bytes, layout: values.Layout, data: memoryview | None, zero: bool) -> int:
        heap = self._heap
        total = layout.block_size
        p = heap.calloc(total, 1) if zero else heap.malloc(total)
        c = (p - heap.base - HEADER) >> 3
        if not zero:
            heap.claimed(c)
        region = self._region
        o = p - region.seg_base
        seg = region.seg
        for i, word in enumerate(layout.header_words):
            seg[(o >> 3) + i] = word
        if data is not None and layout.nbytes:
            start = o + layout.data_offset
            with memoryview(region.exporters[-1]).cast("B") as whole:
                whole[start:start + layout.nbytes] = data
        old = self._names.set(key, o)
        if old is not None and self._is_value(old):
            heap.free(region.seg_base + old)
        return o

    def _is_value(self, off: int) -> bool:
        size = self._names.block_size(off)
        return bool(size) and size - OVERHEAD >= values.V_SHAPE * 8 and \
            self._region.seg[off >> 3] == values.VALUE_MAGIC

    def _load(self, key: bytes, name: str) -> tuple[values.Layout, int]:
        off = self._names.get(key)
        if off is None:
            raise KeyError(name)
        p = self._region.seg_base + off
        size = self._names.block_size(off)
        if not size:
            raise HeapCorruption(f"shared heap: the name {name!r} leads to offset {off:#x}, not a live block", p)
        layout = values.read_layout(self._region.seg, off >> 3, size - OVERHEAD, p)
        return layout, off + layout.data_offset

    # ------------------------------------------------------------------- inspection

    def check(self) -> None:
        """Verify the whole heap (every chunk, bin and name); HeapCorruption naming what is wrong."""
        if not self._region.seg_base:
            raise self._closed()
        self._run(self._check)

    def _check(self) -> None:
        self._reclaim()
        self._heap.check()
        for _ in self._names.items():
            pass

    def mallinfo(self) -> MallInfo:
        """glibc's mallinfo2 figures for this heap."""
        if not self._region.seg_base:
            raise self._closed()
        return self._run(self._mallinfo)

    def _mallinfo(self) -> MallInfo:
        self._reclaim()
        heap = self._heap
        count, free_bytes = heap.free_stats()
        top = heap.top_size
        held = SEG_HEADER + heap.held
        cached = sum(len(entries) for entries in self._bins.values())
        cached_bytes = sum(len(entries) * size for size, entries in self._bins.items())
        return MallInfo(arena=heap.held, ordblks=count + 1, smblks=cached, hblks=0, hblkhd=0, usmblks=held,
                        fsmblks=cached_bytes, uordblks=heap.in_use - cached_bytes, fordblks=free_bytes + top,
                        keepcost=top, system_current=held, system_max=SEG_HEADER + heap.held_max)

    def walk(self) -> list[Chunk]:
        """Every chunk in address order, its `address` an offset in the heap (as handles are)."""
        if not self._region.seg_base:
            raise self._closed()
        return self._run(self._walk)

    def _walk(self) -> list[Chunk]:
        self._reclaim()
        b = self._region.seg_base
        seg = self._region.seg
        return [Chunk(c.address - b, c.size, "cached" if c.state == "in use" and seg[(c.address - b + HEADER) >> 3]
                      == CACHE_MARK else c.state, c.bin) for c in self._heap.walk()]

    # ------------------------------------------------------------------- the caches

    def _claim(self) -> None:
        """Take a slot in the process table for this process's cache (none free: no cache). Forgets the lists
        (after a fork they are the parent's). A claim that raises (a handler's exception) is tried again by
        the next call, so the process does not go without a cache for good."""
        self._bins = {}
        self._slot = 0
        self._slot = self._run(self._claim_slot, processes.this_process())
        self._wants_slot = False

    def _claim_slot(self, me: tuple[int, int]) -> int:
        log = self._log
        for attempt in range(2):
            for k in range(1, SLOTS + 1):
                if not log[_owner(k)]:
                    self._set_owner(k, *me)
                    return k
            if not attempt:
                self._reclaim()
        return 0

    def _flush(self) -> None:
        """Under the lock: give this process's cached blocks back to the heap, one commit each. A block leaves
        its list after its commit: an entry left behind by an exception has lost its mark and is skipped."""
        base = self._region.seg_base
        slot = self._slot
        for entries in list(self._bins.values()):
            while entries:
                p = entries[-1]
                seg = self._region.seg
                w = p >> 3
                if seg[w] == CACHE_MARK and seg[w + 1] == slot:
                    self._uncache(base + p)
                del entries[-1]

    def _reclaim(self) -> None:
        """Under the lock: free the blocks cached by processes that died, then their slots; one commit a block,
        so that a repair cut short is taken up by the next."""
        log = self._log
        dead = set()
        for k in range(1, SLOTS + 1):
            i = _owner(k)
            if log[i] and k != self._slot and not processes.alive(log[i], log[i + 1]):
                dead.add(k)
        if not dead:
            return
        heap = self._heap
        seg = self._region.seg
        base = self._region.seg_base
        orphans = [c.address + HEADER for c in heap.walk() if c.state == "in use"
                   and seg[(c.address - base + HEADER) >> 3] == CACHE_MARK
                   and seg[((c.address - base + HEADER) >> 3) + 1] in dead]
        for p in orphans:
            self._uncache(p)
        for k in dead:
            self._set_owner(k, 0, 0)

    def _uncache(self, p: int) -> None:
        """Under the lock: the cached block at address `p` freed in a commit of its own (its mark cleared,
        journaled, then released)."""
        heap = self._heap
        c = heap.chunk_of(p)
        heap._w[c + 2] = 0
        heap.release(c)
        self._log[S_JOURNAL] = J_START

    def _set_owner(self, slot: int, pid: int, started: int) -> None:
        """Under the lock: the process table's row for `slot`, journaled (0, 0: the slot is free)."""
        i = _owner(slot)
        journal_store(self._log, i, pid)
        journal_store(self._log, i + 1, started)

    @property
    def name(self) -> str:
        """The heap's name (shared memory) or absolute path (file)."""
        return os.path.basename(self._path) if self._kind == "shm" else self._path

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        """Bytes of the segment in use now (it grows on demand)."""
        return int(self._log[S_EXTENT]) if self._region.seg_base else 0

    @property
    def max_size(self) -> int:
        """The most bytes the segment may grow to."""
        return self._region.limit

    @property
    def base(self) -> int:
        """The address of offset 0 in this process (0 once closed)."""
        return self._region.seg_base

    # -------------------------------------------------------------------- lifetime

    def flush(self) -> None:
        """Write the heap's pages to its file and wait (msync, then fsync): after it returns, a power cut loses
        nothing made before it."""
        region = self._region
        if not region.seg_base:
            raise self._closed()
        libc.msync(region.seg_base, region.mapped)
        files.sync(region.fd)

    def close(self) -> None:
        """Unmap this process's view of the heap (the heap lives on), giving its cached blocks back first.
        BufferError while a view, or an array over one, is alive. Closing twice does nothing. A heap found
        damaged while the cache goes back is closed all the same: the cached blocks stay in use, marked as this
        process's, to be freed once it has ended, and the damage is left for `check()` to report."""
        region = self._region
        if not region.seg_base:
            return
        if region.views_alive():
            raise BufferError(f"cannot close the shared heap {self.name!r}: a view or array over it is still alive")
        if self._slot:
            with contextlib.suppress(HeapError):
                self._run(self._leave)
        self._bins = {}
        self._slot = 0
        with _open_lock:
            key = files.identity(region.fd)
            if _open.get(key) is self:
                del _open[key]
        region.close()

    def _leave(self) -> None:
        """Under the lock: the cache back to the heap, and this process's slot freed."""
        self._flush()
        self._set_owner(self._slot, 0, 0)
        self._slot = 0

    @property
    def closed(self) -> bool:
        return not self._region.seg_base

    def unlink(self) -> None:
        """Remove the heap's name (or file). Processes that have it open keep working with it."""
        files.unlink(self._path)

    def __enter__(self) -> SharedHeap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[[str, str], SharedHeap], tuple[str, str]]:
        return _reopen, (self._kind, self._path)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"<SharedHeap {self.name!r} ({'file' if self._kind == 'file' else 'shared memory'}), {state}>"

    def _closed(self) -> ValueError:
        return ValueError(f"the shared heap {self.name!r} is closed in this process")


def _owner(slot: int) -> int:
    """The header word where the process table's row for cache slot `slot` (from 1) starts."""
    return OWNERS + 2 * (slot - 1)


def _reopen(kind: str, path: str) -> SharedHeap:
    """Unpickling: the heap at `path`, attached (or the one this process has open)."""
    return SharedHeap._adopt(path, kind)


DEFAULT_TRIM = 1 << 20  # a free that leaves this much free at the top gives the whole pages back (MADV_REMOVE)


class Roots(MutableMapping[str, int]):
    """`SharedHeap.roots`: names to offsets, kept in the heap's names table."""

    def __init__(self, heap: SharedHeap) -> None:
        self._heap = heap

    def __getitem__(self, name: str) -> int:
        h = self._heap
        off = h._run(h._names.get, name_bytes(name))
        if off is None:
            raise KeyError(name)
        return off

    def __setitem__(self, name: str, off: int) -> None:
        h = self._heap
        key = name_bytes(name)
        o = address_arg(off)
        h._run(h._names.set, key, o)

    def __delitem__(self, name: str) -> None:
        h = self._heap
        key = name_bytes(name)
        if h._run(h._names.delete, key) is None:
            raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        h = self._heap
        return iter([k for k, _ in h._run(lambda: list(h._names.items()))])

    def __len__(self) -> int:
        h = self._heap
        return h._run(h._names.__len__)

    def __repr__(self) -> str:
        h = self._heap
        return f"Roots({dict(h._run(lambda: list(h._names.items())))!r})"
