"""The CS:APP malloc-lab `.rep` format: reading both header variants, and writing.

A `.rep` file is ASCII text: a header of four non-negative integers, then one request a line
(`a ID N`, `r ID N`, `f ID`). The header has two variants, which agree on the two numbers that matter:

    classic (2002)      suggested heap size, number of ids, number of requests, weight
    newer (2016)        weight (0-3),        number of ids, number of requests, peak live bytes

The first and fourth numbers are read and ignored. The drivers read the header with `fscanf`, so the four
numbers need not be on four lines: any whitespace separates them, as here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .model import ALLOC, FREE, REALLOC, Op, Trace, TraceError, peak_live

HEADER_NUMBERS = 4
_OPS = {"a": ALLOC, "r": REALLOC, "f": FREE}
_LETTERS = {ALLOC: "a", REALLOC: "r", FREE: "f"}
_MAX_SIZE = (1 << 63) - 1  # a size_t request beyond this is nonsense in a trace


def _read_ascii_lines(path: str | os.PathLike[str]) -> list[str]:
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
    return lines


def parse_rep(path: str | os.PathLike[str]) -> Trace:
    """Parse a malloc-lab `.rep` file (either header variant, LF or CRLF line ends); TraceError if malformed.

    Strict where the real files are exact: the declared op count must match, every id must be below the
    declared id count (or -1, in `f` only), and numbers are plain non-negative decimals. Blank lines and
    surrounding whitespace are tolerated, since they cannot be misread.

    Each id must also be used as a C program would use its pointer, since a replay would otherwise hide the
    fault (it frees NULL, or leaks): refused are an `a` of an id still live (its block would leak), an `f` of
    an id already freed (a double free) or never allocated yet (a free before its allocation; free(NULL) is
    `f -1`), and an `r` of a freed id (a use after free). Allowed, as C allows them: an id allocated again
    after its free, an `r` of an id never allocated (realloc(NULL, N), a malloc), and an `f` or `r` after a
    realloc to 0 (which freed the block and left NULL).
    """
    where = os.fspath(path)
    lines = _read_ascii_lines(path)

    def fail(lineno: int, what: str) -> TraceError:
        return TraceError(f"{where}:{lineno}: {what}")

    header: list[int] = []
    body = len(lines)  # index of the first request line
    for index, line in enumerate(lines):
        for word in line.split():
            if len(header) == HEADER_NUMBERS:
                raise fail(index + 1, f"junk after the header's {HEADER_NUMBERS} numbers: {word!r}")
            if word in _OPS:
                raise fail(index + 1, f"truncated header: {len(header)} of {HEADER_NUMBERS} numbers before a request")
            if not word.isdigit():
                raise fail(index + 1, f"bad number: header number {word!r} is not a non-negative integer")
            header.append(int(word))
        if len(header) == HEADER_NUMBERS:
            body = index + 1
            break
    else:
        raise fail(len(lines) + 1, f"truncated header: {len(header)} of {HEADER_NUMBERS} numbers")
    num_ids, num_ops = header[1], header[2]

    ops: list[Op] = []
    append = ops.append
    # id -> its pointer's state: +L live since line L, -L freed on line L, 0 NULL after a realloc to 0;
    # an id never allocated is absent.
    state: dict[int, int] = {}
    for lineno, line in enumerate(lines[body:], start=body + 1):
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
        else:
            state[ident] = _next_state(state.get(ident), code, size, lineno, ident, fail)
        append((code, ident, size))
    if len(ops) != num_ops:
        raise fail(len(lines) + 1, f"wrong op count: {len(ops)} ops, the header declares {num_ops}")
    name = os.path.basename(where)
    if name.endswith(".rep"):
        name = name[:-4]
    return Trace(name, num_ids, tuple(ops))


def _next_state(now: int | None, code: int, size: int, lineno: int, ident: int,
                fail: Callable[[int, str], TraceError]) -> int:
    """An id's pointer state after a request on line `lineno` (see `parse_rep`); TraceError for a misuse."""
    if code == ALLOC:
        if now is not None and now > 0:
            raise fail(lineno, f"id {ident} allocated twice: it is live since line {now} (its block would leak)")
        return lineno
    if code == FREE:
        if now is None:
            raise fail(lineno, f"free of id {ident} before its allocation (free(NULL) is 'f -1')")
        if now < 0:
            raise fail(lineno, f"double free: id {ident} was freed on line {-now} and not allocated since")
        return -lineno if now > 0 else 0
    if now is not None and now < 0:
        raise fail(lineno, f"realloc of id {ident} after its free on line {-now} (a use after free)")
    # realloc(p, 0) frees p and returns NULL; realloc(NULL, n) is malloc(n), which returns a block even for 0
    return 0 if size == 0 and now else lineno


def format_rep(trace: Trace) -> str:
    """The trace as `.rep` text, LF line ends.

    The header is written as `1`, the id count, the op count and the peak live bytes: weight 1 ("count
    this trace") for the newer drivers, an ignored first number for the classic ones, whose ignored fourth
    number then carries the peak. A source file's own first and fourth numbers are not kept, nor is
    `skipped_frees` (the format has no place for it).
    """
    out = ["1", str(trace.num_ids), str(trace.num_ops), str(peak_live(trace))]
    for code, ident, size in trace.ops:
        out.append(f"f {ident}" if code == FREE else f"{_LETTERS[code]} {ident} {size}")
    out.append("")
    return "\n".join(out)


def write_rep(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write the trace as a `.rep` file (see `format_rep` for what the header holds)."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(format_rep(trace))
