"""Views of raw memory that must not outlive it: which exporters still have a view alive.

A view is made from an exporter, a ctypes array over the memory (`libc.memory_exporter`). Every memoryview
made from it, and every slice, cast or numpy array made from that view, keeps the exporter referenced until
the last of them is gone; so the exporter's reference count says whether freeing, moving or unmapping the
memory would leave a view reading memory that is no longer there.
"""

from __future__ import annotations

import ctypes
from sys import getrefcount
from typing import Final

Exporter = ctypes.Array[ctypes.c_char]


def most_referenced(exporters: list[Exporter]) -> int:
    """The highest reference count among `exporters`, as this function sees it."""
    most = 0
    for exporter in exporters:
        count = getrefcount(exporter)
        if count > most:
            most = count
    return most


# What most_referenced reports for an exporter that only its list references: measured, not assumed, as the
# interpreter counts the loop's reference and mypyc's compiled loop borrows the list's.
UNSHARED: Final = most_referenced([(ctypes.c_char * 1)()])
