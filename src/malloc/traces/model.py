"""The parsed form of an allocation trace, whatever file it came from.

A trace holds its requests as a tuple of `(op, id, size)` int tuples, the shape a replay loop unpacks
fastest. Block ids are in `[0, num_ids)`; the id of `free(NULL)` is -1, so a replay table of `num_ids + 1`
slots can index it directly: slot -1 is the spare last slot, which no real id uses and which therefore
always holds NULL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ALLOC = 0  # block ID = malloc(N)
REALLOC = 1  # block ID = realloc(block ID, N); realloc(NULL, N) if ID is not live
FREE = 2  # free(block ID); ID -1 is free(NULL)

Op = tuple[int, int, int]


class TraceError(ValueError):
    """A malformed trace file; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Trace:
    """A parsed trace: its name, the number of block ids it uses, and its requests in order.

    `skipped_frees` counts the frees in a recorded log of blocks allocated before the log began (and reallocs
    of such blocks, which become mallocs): they are not in `ops`, since no replay can free what it never
    allocated. A `.rep` file has none. `warnings` are what the reader tolerated in the file with a warning,
    each naming the file and line and saying what a replay does about it; they describe the file, not the
    requests, and so take no part in comparing traces.
    """

    name: str
    num_ids: int
    ops: tuple[Op, ...]  # (ALLOC | REALLOC | FREE, id, size); size is 0 for FREE
    skipped_frees: int = 0
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_ops(self) -> int:
        return len(self.ops)


def peak_live(trace: Trace) -> int:
    """The most requested payload bytes live at once over the trace.

    A block re-allocated under a live id leaks in a replay (the old pointer is lost but never freed), so it
    stays counted; realloc to 0 frees.
    """
    sizes = [0] * (trace.num_ids + 1)  # slot -1 is free(NULL)'s, always 0
    live = peak = 0
    for code, ident, size in trace.ops:
        if code == ALLOC:
            live += size
            sizes[ident] = size
        elif code == REALLOC:
            live += size - sizes[ident]
            sizes[ident] = size
        else:
            live -= sizes[ident]
            sizes[ident] = 0
        if live > peak:
            peak = live
    return peak


def churn(n: int = 100_000, seed: int = 7) -> Trace:
    """A synthetic trace: `n` mallocs and frees over at most 16 live blocks of a few sizes (24 B to 3 KiB), long
    but with a small heap; the timeline's 100,000-operation page (tests, bench/timeline.py) is made from it."""
    rng = random.Random(seed)
    ops: list[Op] = []
    live: list[int] = []
    ids = 0
    for _ in range(n):
        if live and (len(live) >= 16 or rng.random() < 0.45):
            ops.append((FREE, live.pop(rng.randrange(len(live))), 0))
        else:
            ops.append((ALLOC, ids, rng.choice((24, 40, 100, 200, 700, 1500, 3000))))
            live.append(ids)
            ids += 1
    return Trace("long", ids, tuple(ops))
