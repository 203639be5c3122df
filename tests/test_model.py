"""Model-based tests: random malloc/calloc/realloc/memalign/free sequences checked against a model.

The model is the set of live blocks: address, size asked for, usable size and the byte each block was filled
with. After every step: no two live blocks overlap, `check()` passes, every block still has the usable size
it had and at least what was asked, its first and last bytes are intact, and the allocator's own accounting
(bytes in use, mapped chunks) agrees with the model. A block's whole contents are verified before it is
freed, after a realloc (the preserved prefix) and after a trim; calloc memory must read as zero; memalign
addresses must be aligned.

Three targets: a fresh `ProcessAllocator` (program break and mmap), a `Heap` over a `MapRegion`, and a
`Heap` over a small `BufferRegion`, where MemoryError is an expected outcome once it is full: the model then
checks that the failed call changed nothing at all.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule

import malloc
from malloc.heap import HEAP_HEADER
from malloc.layout import HEADER, MIN_CHUNK, request_to_size
from malloc.process import CACHE_MAX

KiB = 1024
MiB = 1024 * KiB

# Small sizes dominate; the rest sit on the boundaries that change the code path: the small-bin limit
# (1008/1024-byte chunks, glibc's tcache limit of 1032 usable bytes), the process allocator's fast-cache
# limit, the 128 KiB mmap threshold, and a few MiB (mapped, or grown into the heap once the dynamic
# threshold has risen).
SIZES = st.one_of(
    st.integers(0, 48),
    st.integers(0, 256),
    st.integers(0, 256),
    st.integers(49, 1000),
    st.integers(990, 1060),
    st.integers(CACHE_MAX - 96, CACHE_MAX + 64),
    st.integers(1000, 70_000),
    st.integers(128 * KiB - 64, 128 * KiB + 64),
    st.integers(1 * MiB, 3 * MiB),
)
ALIGNMENTS = st.sampled_from([1, 2, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536])
COUNTS = st.sampled_from([0, 1, 2, 3, 7, 16, 100])

SETTINGS = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@dataclass(eq=False)
class Block:
    """A live block as the model knows it."""

    address: int
    requested: int
    usable: int
    byte: int
    mapped: bool = False

    @property
    def end(self) -> int:
        return self.address + self.usable


def contents(b: Block) -> bytes:
    return ctypes.string_at(b.address, b.usable)


def assert_filled(b: Block, length: int | None = None) -> None:
    n = b.usable if length is None else length
    data = ctypes.string_at(b.address, n)
    if data != bytes([b.byte]) * n:
        bad = next(i for i, x in enumerate(data) if x != b.byte)
        raise AssertionError(f"block {b.address:#x} ({b.usable} usable bytes, filled with {b.byte:#x}) "
                             f"changed at offset {bad}: {data[bad:bad + 16].hex()}")


class AllocatorModel(RuleBasedStateMachine):
    """The rules and invariants; subclasses say what the allocator is."""

    blocks = Bundle("blocks")
    may_run_out = False  # whether MemoryError is a legal answer

    def __init__(self) -> None:
        super().__init__()
        self.alloc: Any = self.make()
        self.live: dict[int, Block] = {}
        self.next_byte = 0
        self.steps = 0

    # --------------------------------------------------------------- per target

    def make(self) -> Any:
        raise NotImplementedError

    def fingerprint(self) -> object:
        """What a call that fails with MemoryError must leave unchanged."""
        raise NotImplementedError

    def accounting(self) -> None:
        """The allocator's own figures agree with the model."""

    def close(self) -> None:
        """Free what the target holds beyond its blocks."""

    def empty_state(self) -> None:
        """Checks once every block is freed."""

    # --------------------------------------------------------------- helpers

    def attempt(self, call: Any, need: int) -> int | None:
        """The call's result, or None when it ran out of memory where that is allowed (and changed nothing).

        `need` is the chunk size the call needs; a MemoryError while a free chunk or the top could hold
        that many bytes is a failure.
        """
        if not self.may_run_out:
            result: int = call()
            return result
        before = self.fingerprint()
        room = self.room()
        try:
            result = call()
        except MemoryError:
            event("MemoryError (nothing changed)")
            assert self.fingerprint() == before, "a call that raised MemoryError changed the heap"
            self.alloc.check()
            assert need > room, f"MemoryError for a {need}-byte chunk while the heap had room for {room}"
            return None
        return result

    def room(self) -> int:
        """The largest chunk the heap can hand out without growing."""
        return 0

    def adopt(self, p: int, requested: int, *, zero: bool = False, alignment: int = 16) -> Block:
        assert p != 0, "a block (even of 0 bytes) is never at address 0"
        assert p % max(alignment, 16) == 0, f"{p:#x} is not aligned to {max(alignment, 16)}"
        assert p not in self.live, f"{p:#x} handed out while still live"
        usable = self.alloc.usable_size(p)
        assert usable >= requested, f"usable_size {usable} < {requested} requested"
        if zero:
            data = ctypes.string_at(p, requested)
            assert data == bytes(requested), f"calloc block at {p:#x} is not zero"
        self.next_byte = self.next_byte % 250 + 1
        b = Block(p, requested, usable, self.next_byte, self.is_mapped(p))
        if b.mapped:
            event("mapped block")
        elif usable >= 128 * KiB:
            event("heap block of 128 KiB or more")
        ctypes.memset(p, b.byte, usable)
        self.live[p] = b
        return b

    def is_mapped(self, p: int) -> bool:
        return False

    def forget(self, b: Block) -> None:
        del self.live[b.address]

    # --------------------------------------------------------------- rules

    @rule(target=blocks, n=SIZES)
    def malloc(self, n: int) -> Any:
        p = self.attempt(lambda: self.alloc.malloc(n), request_to_size(n))
        return multiple() if p is None else self.adopt(p, n)

    @rule(target=blocks, count=COUNTS, n=SIZES)
    def calloc(self, count: int, n: int) -> Any:
        size = n // max(count, 1)
        p = self.attempt(lambda: self.alloc.calloc(count, size), request_to_size(count * size))
        return multiple() if p is None else self.adopt(p, count * size, zero=True)

    @rule(target=blocks, alignment=ALIGNMENTS, n=SIZES)
    def memalign(self, alignment: int, n: int) -> Any:
        need = request_to_size(n) + (alignment + MIN_CHUNK if alignment > 16 else 0)
        p = self.attempt(lambda: self.alloc.memalign(alignment, n), need)
        return multiple() if p is None else self.adopt(p, n, alignment=alignment)

    @rule(target=blocks, n=SIZES)
    def realloc_of_null(self, n: int) -> Any:
        p = self.attempt(lambda: self.alloc.realloc(0, n), request_to_size(n))
        return multiple() if p is None else self.adopt(p, n)

    @rule(target=blocks, b=consumes(blocks), n=SIZES)
    def realloc(self, b: Block, n: int) -> Any:
        assert_filled(b)
        q = self.attempt(lambda: self.alloc.realloc(b.address, n), request_to_size(n))
        if q is None:  # ran out: the old block is untouched and still live
            assert_filled(b)
            assert self.alloc.usable_size(b.address) == b.usable
            return b
        self.forget(b)
        if n == 0:
            assert q == 0, "realloc(p, 0) frees p and returns 0"
            return multiple()
        kept = min(b.usable, n)
        data = ctypes.string_at(q, kept)
        assert data == bytes([b.byte]) * kept, f"realloc({b.address:#x}, {n}) -> {q:#x} lost the old contents"
        return self.adopt(q, n)

    @rule(target=blocks, b=consumes(blocks), percent=st.integers(0, 100))
    def realloc_shrink(self, b: Block, percent: int) -> Any:
        """Shrinking never fails and, for a heap block, never moves."""
        n = b.requested * percent // 100
        assert_filled(b)
        q = self.alloc.realloc(b.address, n)
        self.forget(b)
        if n == 0:
            assert q == 0
            return multiple()
        if not b.mapped:
            assert q == b.address, "shrinking a heap block moved it"
        assert ctypes.string_at(q, n) == bytes([b.byte]) * n
        return self.adopt(q, n)

    @rule(b=consumes(blocks))
    def free(self, b: Block) -> None:
        assert_filled(b)
        self.alloc.free(b.address)
        self.forget(b)

    @rule()
    def free_null(self) -> None:
        before = self.fingerprint()
        self.alloc.free(0)
        assert self.fingerprint() == before

    @rule(pad=st.sampled_from([0, 4096, 128 * KiB]))
    def trim(self, pad: int) -> None:
        self.alloc.trim(pad)
        for b in self.live.values():  # released pages must never be those of a live block
            assert_filled(b)

    # --------------------------------------------------------------- invariants

    @invariant()
    def heap_is_consistent(self) -> None:
        self.alloc.check()

    @invariant()
    def blocks_are_disjoint_and_intact(self) -> None:
        ordered = sorted(self.live.values(), key=lambda b: b.address)
        for b, c in pairwise(ordered):
            assert b.end <= c.address, f"blocks {b.address:#x}+{b.usable} and {c.address:#x} overlap"
        for b in ordered:
            assert self.alloc.usable_size(b.address) == b.usable >= b.requested
            edge = min(b.usable, 16)
            expected = bytes([b.byte]) * edge
            assert ctypes.string_at(b.address, edge) == expected, f"start of {b.address:#x} overwritten"
            assert ctypes.string_at(b.end - edge, edge) == expected, f"end of {b.address:#x} overwritten"

    @invariant()
    def figures_agree(self) -> None:
        self.accounting()

    def teardown(self) -> None:
        try:
            for b in list(self.live.values()):
                assert_filled(b)
                self.alloc.free(b.address)
                self.forget(b)
            self.alloc.check()
            self.empty_state()
        finally:
            self.close()


# ----------------------------------------------------------------------------- the process allocator


class ProcessModel(AllocatorModel):
    """A fresh process allocator per example: the program break (shared with the module's allocator and the
    C library's malloc), mapped chunks, the fast cache and the dynamic mmap threshold."""

    def make(self) -> malloc.ProcessAllocator:
        return malloc.ProcessAllocator(malloc.Options())

    def is_mapped(self, p: int) -> bool:
        return p in self.alloc.mapped_chunks()

    def fingerprint(self) -> object:
        return self.alloc.mallinfo(), list(self.alloc.walk())

    def accounting(self) -> None:
        pa: malloc.ProcessAllocator = self.alloc
        info = pa.mallinfo()
        mapped = pa.mapped_chunks()
        assert set(mapped) == {p for p, b in self.live.items() if b.mapped}, "mapped chunks differ from the model"
        assert info.hblks == len(mapped)
        assert info.hblkhd == sum(mapped.values())
        heap_bytes = sum(b.usable + 8 for b in self.live.values() if not b.mapped)
        assert info.uordblks == heap_bytes, f"mallinfo says {info.uordblks} bytes in use, the model {heap_bytes}"
        assert info.arena == sum(h.held for h in pa.heaps)
        assert info.system_current == info.arena + info.hblkhd

    @rule(threshold=st.sampled_from([64 * KiB, 128 * KiB, 1 * MiB]))
    def set_mmap_threshold(self, threshold: int) -> None:
        assert self.alloc.mallopt(malloc.M_MMAP_THRESHOLD, threshold) == 1

    @rule(value=st.sampled_from([0, 0x5A]))
    def set_perturb(self, value: int) -> None:
        # Perturbation fills freed and new blocks; calloc must still give zeros and live blocks stay put.
        self.alloc.mallopt(malloc.M_PERTURB, value)

    @rule()
    def walk_matches_the_model(self) -> None:
        chunks = {c.address + HEADER: c for c in self.alloc.walk()}
        for p, b in self.live.items():
            assert p in chunks, f"live block {p:#x} is not in walk()"
            assert chunks[p].state == ("mapped" if b.mapped else "in use")

    def empty_state(self) -> None:
        pa: malloc.ProcessAllocator = self.alloc
        pa.trim(0)
        pa.check()
        states = {c.state for c in pa.walk()}
        assert states <= {"free", "top", "foreign"}, f"chunks left after freeing everything: {states}"
        info = pa.mallinfo()
        assert (info.uordblks, info.hblks, info.hblkhd, info.smblks) == (0, 0, 0, 0)


TestProcessAllocatorModel = ProcessModel.TestCase
TestProcessAllocatorModel.settings = SETTINGS


# ----------------------------------------------------------------------------- a heap over a mapping


class HeapModel(AllocatorModel):
    """Shared checks of the standalone heaps (no cache, no mapped chunks)."""

    region: malloc.Region

    def fingerprint(self) -> object:
        h: malloc.Heap = self.alloc
        return ctypes.string_at(h.base, HEAP_HEADER), list(h.walk()), h.region.size

    def room(self) -> int:
        """The largest free chunk, or what the top can give while keeping a minimal top chunk."""
        h: malloc.Heap = self.alloc
        sizes = [c.size - (MIN_CHUNK if c.state == "top" else 0) for c in h.walk() if c.state in ("free", "top")]
        return max(sizes, default=0)

    def accounting(self) -> None:
        h: malloc.Heap = self.alloc
        expected = sum(b.usable + 8 for b in self.live.values())
        assert h.in_use == expected, f"heap says {h.in_use} bytes in use, the model {expected}"
        chunks = list(h.walk())
        assert sum(c.size for c in chunks) == h.end - h.base - HEAP_HEADER
        in_use = {c.address + HEADER for c in chunks if c.state == "in use"}
        assert in_use == set(self.live), "walk()'s in-use chunks differ from the model's blocks"

    def empty_state(self) -> None:
        h: malloc.Heap = self.alloc
        assert h.in_use == 0
        states = [c.state for c in h.walk()]
        assert states == ["top"], f"after freeing everything the heap is not one top chunk: {states}"


class MapHeapModel(HeapModel):
    may_run_out = True  # the reservation can fill up (64 MiB)

    def make(self) -> malloc.Heap:
        self.region = malloc.MapRegion(64 * KiB, "model test")
        return malloc.Heap(self.region)

    def close(self) -> None:
        self.region.close()


TestMapHeapModel = MapHeapModel.TestCase
TestMapHeapModel.settings = SETTINGS


# ----------------------------------------------------------------------------- a heap over a small buffer


class BufferHeapModel(HeapModel):
    """512 KiB that never grows: large requests fail, and the failed call must change nothing at all."""

    may_run_out = True

    SIZE = 512 * KiB
    ALIGN = 64 * KiB  # so memalign's layouts, and with them when the buffer is full, repeat from run to run

    def make(self) -> malloc.Heap:
        self.buffer = bytearray(self.SIZE + self.ALIGN)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        skip = -address % self.ALIGN
        self.view = memoryview(self.buffer)[skip:skip + self.SIZE]
        self.region = malloc.BufferRegion(self.view)
        assert self.region.size == self.SIZE and self.region.base % self.ALIGN == 0
        return malloc.Heap(self.region)

    def fingerprint(self) -> object:
        return bytes(self.view)

    @rule(target=AllocatorModel.blocks, slack=st.integers(0, 4096))
    def use_up_the_top(self, slack: int) -> Any:
        """Take all but `slack` bytes of the top, so the next requests meet a full buffer."""
        n = max(self.alloc.top_size - MIN_CHUNK - 8 - slack, 0)
        p = self.attempt(lambda: self.alloc.malloc(n), request_to_size(n))
        return multiple() if p is None else self.adopt(p, n)

    @precondition(lambda self: len(self.live) > 0)
    @rule(target=AllocatorModel.blocks, n=st.integers(0, 600 * KiB))
    def fill_up(self, n: int) -> Any:
        """Ask for more than may be left; either it fits or nothing changes."""
        p = self.attempt(lambda: self.alloc.malloc(n), request_to_size(n))
        return multiple() if p is None else self.adopt(p, n)


TestBufferHeapModel = BufferHeapModel.TestCase
TestBufferHeapModel.settings = settings(SETTINGS, max_examples=200)
