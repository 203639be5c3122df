"""The calls that hand out a block (malloc, calloc, memalign, realloc) as Python methods, in both builds.

A signal handler's exception must not lose a block between the allocator's return and the caller's store
(`p = malloc.malloc(n)`). CPython checks for pending handlers right after a C function returns, but not when
a Python function returns. The interpreted build's methods are Python functions already. The compiled
build's are C functions: there `install` replaces them, on the class, with Python methods that reach the
compiled ones by subscript (the gates in process.py), which has no check after it either. The compiled
code's own calls of these methods are direct C calls, which the class's attributes do not affect.
"""

from __future__ import annotations

from types import FunctionType
from typing import SupportsIndex

from .process import CallocGate, MallocGate, MemalignGate, ProcessAllocator, ReallocGate


def compiled() -> bool:
    """Whether the engine runs as the compiled build (its methods are not Python functions)."""
    return not isinstance(ProcessAllocator.__dict__["free"], FunctionType)


def install() -> None:
    """In the compiled build, give `ProcessAllocator` Python methods for the calls that return a block."""
    if not compiled() or isinstance(ProcessAllocator.__dict__["malloc"], FunctionType):
        return
    malloc_gate = MallocGate()
    calloc_gate = CallocGate()
    memalign_gate = MemalignGate()
    realloc_gate = ReallocGate()

    # mypyc keeps no docstrings, so these carry the methods' first lines.
    def malloc(self: ProcessAllocator, n: SupportsIndex) -> int:
        """Address of at least `n` usable bytes, 16-byte aligned; MemoryError when none can be had."""
        return malloc_gate[self, n]

    def calloc(self: ProcessAllocator, count: SupportsIndex, size: SupportsIndex) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product overflows."""
        return calloc_gate[self, count, size]

    def memalign(self: ProcessAllocator, alignment: SupportsIndex, n: SupportsIndex) -> int:
        """A block of at least `n` bytes at a multiple of `alignment` (a power of two)."""
        return memalign_gate[self, alignment, n]

    def realloc(self: ProcessAllocator, p: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `p` to `n` bytes; returns its address, which may have moved. `realloc(0, n)` is
        `malloc(n)`; `realloc(p, 0)` frees `p` and returns 0."""
        return realloc_gate[self, p, n]

    for method in (malloc, calloc, memalign, realloc):
        method.__qualname__ = f"ProcessAllocator.{method.__name__}"
        method.__module__ = ProcessAllocator.__module__
        setattr(ProcessAllocator, method.__name__, method)
