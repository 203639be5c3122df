"""Heaps shared between processes and kept in files: the engine over a segment many processes map.

`heap.SharedHeap` is the API; `segment` holds the file's layout, its mapping and the undo journal;
`names` the names table (`roots`); `values` the format of named bytes and arrays (`put`, `get`).
"""

from .heap import SharedHeap

__all__ = ["SharedHeap"]
