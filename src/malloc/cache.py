"""The fast cache: recently freed small blocks kept per size, handed out again without touching the heap.

Like glibc's tcache it holds at most `CACHE_COUNT` blocks of each chunk size up to `CACHE_MAX_CHUNK`
bytes (blocks of up to 1032 usable bytes). Cached blocks stay in use as far as their heap knows, so they
are not coalesced; the cache is process-local (plain lists of addresses), and a forked child empties it
back into the heap.
"""

from __future__ import annotations

CACHE_MAX_CHUNK = 1040
CACHE_COUNT = 7


def new_cache() -> list[list[int]]:
    """One list of cached block addresses per chunk size class (index = chunk size // 16)."""
    return [[] for _ in range((CACHE_MAX_CHUNK >> 4) + 1)]


def drain(cache: list[list[int]]) -> list[int]:
    """Empty the cache; returns the addresses it held."""
    out: list[int] = []
    for entries in cache:
        while entries:  # pop one at a time: a block freed meanwhile by another thread stays or goes whole
            try:
                out.append(entries.pop())
            except IndexError:
                break
    return out


def cached_bytes(cache: list[list[int]]) -> tuple[int, int]:
    """(number, chunk bytes) of the blocks in the cache."""
    count = size = 0
    for i, entries in enumerate(cache):
        count += len(entries)
        size += len(entries) * (i << 4)
    return count, size
