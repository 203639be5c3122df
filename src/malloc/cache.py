"""The fast cache: recently freed blocks kept per chunk size and handed out again without the heap.

Like glibc's tcache it is process-local and sits in front of the heaps: a freed block of a cacheable
size goes onto its size's list (at most `CACHE_COUNT` of them), and a request of that size takes the
last one back. Cached blocks stay in use as far as their heap knows, so they are not coalesced; before a
request is sent to the OS, the process allocator gives back to the heaps the cached blocks that could
serve it (alone, or coalesced with their free neighbours), and keeps the rest, as glibc keeps its tcache's
chunks. Larger caches (up to 64 KiB, 32 blocks a size) were measured: twice the hits on the compiler
traces, but several top pads more footprint on the random ones, so the sizes stay tcache's.

The process allocator changes the lists and `members` together, in runs of subscript stores with no call
between (`del entries[-1]`, `entries += (p,)`, `members[p] = size`), which neither another thread nor a
signal handler can come between; so it uses the cache without taking its lock, and a block is listed
exactly when it is a member.
"""

from __future__ import annotations

CACHE_MAX_CHUNK = 1040  # blocks of up to 1032 usable bytes, as tcache
CACHE_COUNT = 7  # per size, as tcache


class FastCache:
    """Per chunk size, a LIFO list of cached block addresses; `members` maps each to its chunk size."""

    def __init__(self) -> None:
        self.bins: dict[int, list[int]] = {}
        self.members: dict[int, int] = {}

    def stats(self) -> tuple[int, int]:
        """(number, chunk bytes) of the blocks in the cache."""
        count = size = 0
        for chunk_size, entries in list(self.bins.items()):
            count += len(entries)
            size += len(entries) * chunk_size
        return count, size

    def snapshot(self) -> dict[int, list[int]]:
        """A copy of the lists, by chunk size."""
        return {size: list(entries) for size, entries in list(self.bins.items())}
