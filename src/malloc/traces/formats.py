"""Trace file formats: the CS:APP malloc-lab `.rep` format and glibc's mtrace log.

This module is the one place to import them from: the parsed form (`Trace`, the op codes, `TraceError`,
`peak_live`, from `model`), each format's reader and writer (`rep`, `mtrace`), and `load`/`save`, which pick
the format by content (reading) or by the file name's suffix (writing).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .model import ALLOC, FREE, REALLOC, Op, Trace, TraceError, peak_live
from .mtrace import format_mtrace, parse_mtrace, write_mtrace
from .rep import format_rep, parse_rep, write_rep

__all__ = [
    "ALLOC",
    "FORMATS",
    "FREE",
    "REALLOC",
    "Op",
    "Trace",
    "TraceError",
    "format_mtrace",
    "format_of",
    "format_rep",
    "load",
    "parse_mtrace",
    "parse_rep",
    "peak_live",
    "save",
    "suffix_format",
    "warnings_shown",
    "write_mtrace",
    "write_rep",
]

FilePath = str | os.PathLike[str]
Reader = Callable[[FilePath], Trace]
Writer = Callable[[Trace, FilePath], None]

# name -> (reader, writer); the name is also the file suffix
FORMATS: dict[str, tuple[Reader, Writer]] = {
    "rep": (parse_rep, write_rep),
    "mtrace": (parse_mtrace, write_mtrace),
}
_SNIFF_BYTES = 4096  # enough for the first line of either format
WARNINGS_SHOWN = 5  # per file: a log of a threaded program may hold thousands


def format_of(path: str | os.PathLike[str]) -> str:
    """Which format the file holds, from its first non-blank line: "rep" (a number) or "mtrace" (an event).

    TraceError if it is empty or neither; OSError if it cannot be read.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    for lineno, line in enumerate(head.split(b"\n"), start=1):
        words = line.split()
        if not words:
            continue
        first = words[0]
        if first.isdigit():
            return "rep"
        if first in (b"=", b"@", b"+", b"-", b"<", b">", b"!"):
            return "mtrace"
        raise TraceError(
            f"{where}:{lineno}: not a trace: a .rep file starts with a number, an mtrace log with '= Start'"
        )
    raise TraceError(f"{where}:1: not a trace: the file is empty")


def load(path: str | os.PathLike[str]) -> Trace:
    """Parse a `.rep` file or an mtrace log, whichever the file holds; TraceError if it is malformed."""
    return FORMATS[format_of(path)][0](path)


def suffix_format(path: str | os.PathLike[str]) -> str:
    """The format a file name asks for by its suffix (`.rep` or `.mtrace`); ValueError for any other."""
    suffix = os.path.splitext(os.fspath(path))[1].removeprefix(".")
    if suffix not in FORMATS:
        raise ValueError(f"{os.fspath(path)}: cannot tell the format from the suffix {suffix!r}: use .rep or .mtrace")
    return suffix


def save(trace: Trace, path: str | os.PathLike[str], fmt: str | None = None) -> None:
    """Write the trace in format `fmt` ("rep" or "mtrace"; by default the one `path`'s suffix names).

    What a conversion cannot carry over is listed in `format_rep` and `format_mtrace`.
    """
    if fmt is None:
        fmt = suffix_format(path)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}: expected one of {', '.join(FORMATS)}")
    FORMATS[fmt][1](trace, path)


def warnings_shown(trace: Trace, path: str | os.PathLike[str], limit: int = WARNINGS_SHOWN) -> list[str]:
    """The warnings from reading `trace` (from the file `path`) for a person: the first `limit`, then how many
    more there are."""
    shown = list(trace.warnings[:limit])
    if len(trace.warnings) > limit:
        shown.append(f"{os.fspath(path)}: {len(trace.warnings) - limit:,} more warnings like these")
    return shown
