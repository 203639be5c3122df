"""Trace file formats: the CS:APP malloc-lab `.rep` format.

A parsed trace holds its requests as a tuple of `(op, id, size)` int tuples, the shape a replay loop
unpacks fastest. The id of `free(NULL)` stays -1, so a replay table of `num_ids + 1` slots can index it
directly: slot -1 is the spare last slot, which no real id uses and which therefore always holds NULL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ALLOC = 0  # a ID N: block ID = malloc(N)
REALLOC = 1  # r ID N: block ID = realloc(block ID, N); realloc(NULL, N) if ID is not live
FREE = 2  # f ID: free(block ID); ID -1 is free(NULL)

Op = tuple[int, int, int]

_OPS = {"a": ALLOC, "r": REALLOC, "f": FREE}
_MAX_SIZE = (1 << 63) - 1  # a size_t request beyond this is nonsense in a trace


class TraceError(ValueError):
    """A malformed trace file; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Trace:
    """A parsed trace: its name, the number of block ids it declares, and its requests in order."""

    name: str
    num_ids: int
    ops: tuple[Op, ...]  # (ALLOC | REALLOC | FREE, id, size); size is 0 for FREE

    @property
    def num_ops(self) -> int:
        return len(self.ops)


def parse_rep(path: str | os.PathLike[str]) -> Trace:
    """Parse a malloc-lab `.rep` file (LF or CRLF line ends); TraceError if it is malformed.

    Strict where the real files are exact: the declared op count must match, every id must be below the
    declared id count (or -1, in `f` only), and sizes are plain non-negative decimals. Blank lines and
    surrounding whitespace are tolerated, since they cannot be misread.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        bad = raw.count(b"\n", 0, e.start) + 1
        raise TraceError(f"{where}:{bad}: not ASCII text") from None
    # split("\n") rather than splitlines(): the latter also breaks on \v, \f and others, shifting line numbers.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start another

    def fail(lineno: int, what: str) -> TraceError:
        return TraceError(f"{where}:{lineno}: {what}")

    def header_number(lineno: int, what: str) -> int:
        text = lines[lineno - 1].strip()
        if not text.isdigit():
            raise fail(lineno, f"bad number: {what} {text!r} is not a non-negative integer")
        return int(text)

    if len(lines) < 4:
        raise fail(len(lines) + 1, f"truncated header: {len(lines)} of 4 header lines")
    num_ids = header_number(2, "number of ids")
    num_ops = header_number(3, "number of ops")

    ops: list[Op] = []
    append = ops.append
    for lineno, line in enumerate(lines[4:], start=5):
        fields = line.split()
        if not fields:
            continue
        code = _OPS.get(fields[0])
        if code is None:
            raise fail(lineno, f"unknown op {fields[0]!r} (expected a, r or f)")
        if len(ops) == num_ops:
            raise fail(lineno, f"wrong op count: more ops than the {num_ops} the header declares")
        if code == FREE:
            if len(fields) != 2:
                raise fail(lineno, f"expected 'f ID', got {line.strip()!r}")
            size = 0
        else:
            if len(fields) != 3:
                raise fail(lineno, f"expected '{fields[0]} ID SIZE', got {line.strip()!r}")
            size_text = fields[2]
            if not size_text.isdigit():
                raise fail(lineno, f"bad number: size {size_text!r} is not a non-negative integer")
            size = int(size_text)
            if size > _MAX_SIZE:
                raise fail(lineno, f"bad number: size {size} is too large")
        id_text = fields[1]
        if not id_text.removeprefix("-").isdigit():
            raise fail(lineno, f"bad number: id {id_text!r} is not an integer")
        ident = int(id_text)
        if ident == -1:
            if code != FREE:
                raise fail(lineno, "id out of range: -1 (free(NULL)) is only valid in 'f'")
        elif not 0 <= ident < num_ids:
            raise fail(lineno, f"id out of range: {ident} is not in [0, {num_ids}) (the declared id count)")
        append((code, ident, size))
    if len(ops) != num_ops:
        raise fail(len(lines) + 1, f"wrong op count: {len(ops)} ops, the header declares {num_ops}")
    name = os.path.basename(where)
    if name.endswith(".rep"):
        name = name[:-4]
    return Trace(name, num_ids, tuple(ops))


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
