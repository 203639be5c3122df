"""The exceptions the allocator raises.

Caller mistakes (`InvalidPointer`, `DoubleFree`) are kept apart from damage found in the heap
(`HeapCorruption`); all three are `HeapError`. A call that raises one of them has changed nothing.
Memory that cannot be had is the built-in `MemoryError`; wrong argument types and values are
`TypeError` and `ValueError`.
"""

from __future__ import annotations


class HeapError(Exception):
    """Base class of the allocator's own errors."""


class InvalidPointer(HeapError, ValueError):
    """An address the heap never handed out, or not the start of a live block."""


class DoubleFree(HeapError, ValueError):
    """A block freed (or reallocated) after it was already freed."""


class HeapCorruption(HeapError):
    """A chunk header or free-list link that breaks the heap's invariants.

    `address` is an absolute address, as the allocator's functions take and return them: the header of the
    chunk where the damage was found, or the heap's base when it is in the heap's own header (0 when no
    heap is concerned, as for the fast cache's bookkeeping).
    """

    def __init__(self, message: str, address: int = 0) -> None:
        super().__init__(message)
        self.address = address
