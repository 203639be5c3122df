"""Plain-text tables of replay results: one per trace (allocators side by side), or one row per trace.

Ratios are always ours over the other allocator, whatever the figure: above 1 means more footprint, more
utilization, more system calls or more throughput for ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .lab import TraceResult
from .replay import SYSCALL_KINDS

Getter = Callable[[str], float | None]  # an allocator's name -> one of its figures


def number(x: float | None, spec: str = ",.0f") -> str:
    """`x` formatted, or "-" when it was not measured."""
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None unless both are measured and b is not 0."""
    return a / b if a is not None and b else None


def geomean(xs: Sequence[float | None]) -> float | None:
    """The geometric mean of the measured, positive values."""
    vals = [x for x in xs if x]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def render(rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Rows of cells as aligned text: the first `left` columns flush left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)


def _calls_of(r: TraceResult, kind: str) -> Getter:
    """The count of system call `kind` by allocator (None where not counted)."""

    def get(name: str) -> int | None:
        calls = r.allocators[name].syscalls
        return None if calls is None else calls.get(kind, 0)

    return get


def trace_table(r: TraceResult) -> str:
    """One trace's figures, each allocator a column, each baseline followed by the ratio ours/it."""
    names = list(r.allocators)
    head = [""]
    for name in names:
        head.append(name)
        if name != "ours":
            head.append(f"ours/{name}")

    def line(label: str, get: Getter, spec: str) -> list[str]:
        cells = [label]
        for name in names:
            cells.append(number(get(name), spec))
            if name != "ours":
                cells.append(number(ratio(get("ours"), get(name)), ".2f"))
        return cells

    rows = [head,
            line("peak footprint", lambda a: r.allocators[a].footprint, ","),
            line("utilization", r.utilization, ".3f")]
    for kind in SYSCALL_KINDS:
        rows.append(line(kind, _calls_of(r, kind), ","))
    rows.append(line("system calls", lambda a: r.allocators[a].syscall_total, ","))
    rows.append(line("ops/s", r.ops_per_s, ",.0f"))
    if any(a.verified is not None for a in r.allocators.values()):
        verified = ["verified"]
        for name in names:
            ok = r.allocators[name].verified
            verified.append("-" if ok is None else "ok" if ok else "FAILED")
            if name != "ours":
                verified.append("")
        rows.append(verified)
    title = f"{r.trace}: {r.ops:,} operations, peak live {r.peak_live:,} bytes"
    if r.skipped_frees:
        title += f", {r.skipped_frees:,} frees of blocks from before the trace skipped"
    lines = [title, render(rows)]
    lines += [f"ERROR {e}" for e in r.errors]
    return "\n".join(lines)
