"""The calls that hand out a block (malloc, calloc, memalign, realloc) as Python functions of one allocator.

A signal handler's exception must not lose a block between the allocator's return and the caller's store
(`p = malloc.malloc(n)`). CPython checks for pending handlers right after a C function returns, but not when
a Python function returns. The interpreted build's methods are Python functions already; the compiled
build's are C functions, so there each call goes through a Python function that reaches the method by
subscript (see the gates in process.py), which has no check after it either.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType
from typing import SupportsIndex

from .process import CallocGate, MallocGate, MemalignGate, ProcessAllocator, ReallocGate

Unary = Callable[[SupportsIndex], int]
Binary = Callable[[SupportsIndex, SupportsIndex], int]


def compiled() -> bool:
    """Whether the engine runs as the compiled build (its methods are not Python functions)."""
    return not isinstance(ProcessAllocator.__dict__["malloc"], FunctionType)


def block_calls(allocator: ProcessAllocator) -> tuple[Unary, Binary, Binary, Binary]:
    """(malloc, calloc, memalign, realloc) of `allocator`, each returning its block to its caller with no
    check for signal handlers in between."""
    if not compiled():
        return allocator.malloc, allocator.calloc, allocator.memalign, allocator.realloc
    malloc_gate = MallocGate(allocator)
    calloc_gate = CallocGate(allocator)
    memalign_gate = MemalignGate(allocator)
    realloc_gate = ReallocGate(allocator)

    # mypyc keeps no docstrings, so these carry the methods' first lines.
    def malloc(n: SupportsIndex) -> int:
        """Address of at least `n` usable bytes, 16-byte aligned; MemoryError when none can be had."""
        return malloc_gate[n]

    def calloc(count: SupportsIndex, size: SupportsIndex) -> int:
        """A zeroed block for `count` elements of `size` bytes; MemoryError if the product overflows."""
        return calloc_gate[count, size]

    def memalign(alignment: SupportsIndex, n: SupportsIndex) -> int:
        """A block of at least `n` bytes at a multiple of `alignment` (a power of two)."""
        return memalign_gate[alignment, n]

    def realloc(p: SupportsIndex, n: SupportsIndex) -> int:
        """Resize the block at `p` to `n` bytes; returns its address, which may have moved. `realloc(0, n)` is
        `malloc(n)`; `realloc(p, 0)` frees `p` and returns 0."""
        return realloc_gate[p, n]

    for function in (malloc, calloc, memalign, realloc):
        function.__qualname__ = function.__name__  # shown as the module's function, not as a local one
        function.__module__ = "malloc"
    return malloc, calloc, memalign, realloc
