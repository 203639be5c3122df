"""The damage both fuzzers (test_fuzz.py, test_shared_fuzz.py) make to one word: what a stray write might leave."""

from __future__ import annotations

import random


def damaged(old: int, rng: random.Random, span: int) -> int:
    """A new value for a word that held `old`: a high or a low bit flipped, random bits, a size nudged by a
    chunk's step or a page, an offset below `span` (in the caller's unit: words or bytes, as the word it replaces
    counts), or a run of 0x00, 0x41 or 0xFF bytes, as a string overflow writes."""
    how = rng.randrange(6)
    if how == 0:
        return old ^ (1 << rng.randrange(64))
    if how == 1:
        return old ^ (1 << rng.randrange(16))
    if how == 2:
        return rng.getrandbits(64)
    if how == 3:
        return (old + rng.choice((-32, -16, -8, 8, 16, 32, 4096, -4096))) % (1 << 64)
    if how == 4:
        return rng.randrange(span)
    return int.from_bytes(bytes([rng.choice((0x00, 0x41, 0xFF))]) * rng.randrange(1, 9), "little")
