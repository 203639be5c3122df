"""Plain-text tables of replay results: one per trace (allocators side by side), a summary of several traces
(wins, ties and losses of ours against each baseline, and the geometric mean of each ratio), or one row per trace.

Ratios are always ours over the other allocator, whatever the figure: above 1 means more footprint, more
utilization, more system calls or more throughput for ours. So ours does better below 1 in footprint and
system calls, above 1 in utilization and ops/s; each table with ratios says so under it (RATIO_LEGEND).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence

from .lab import TraceResult
from .replay import SYSCALL_KINDS

Getter = Callable[[str], float | None]  # an allocator's name -> one of its figures
RATIO_LEGEND = ("ours/X: ours' figure over X's; better for ours below 1 in footprint and system calls, "
                "above 1 in utilization and ops/s")


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


def trace_label(path: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]] = ()) -> str:
    """How a trace is named in its table and plot: its file name, suffix and all (x.rep and x.mtrace are two
    traces), or the path as given when another of `paths` (the run's traces) has the same file name."""
    name = os.path.basename(os.fspath(path))
    clash = sum(os.path.basename(os.fspath(p)) == name for p in paths) > 1
    return os.fspath(path) if clash else name


def trace_title(r: TraceResult, label: str) -> str:
    """The line above a trace's table (and its plot's title): its name, size and peak."""
    return f"{label}: {r.ops:,} operations, peak live {r.peak_live:,} bytes"


def trace_table(r: TraceResult, label: str | None = None) -> str:
    """One trace's figures, each allocator a column, each baseline followed by the ratio ours/it; the trace
    is named by `label` (by default its file name, as `trace_label` gives it)."""
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
    title = trace_title(r, trace_label(r.path) if label is None else label)
    if r.skipped_frees:
        title += f", {r.skipped_frees:,} frees of blocks from before the trace skipped"
    lines = [title, render(rows)]
    if len(names) > 1:
        lines.append(RATIO_LEGEND)
    lines += [f"ERROR {e}" for e in r.errors]
    return "\n".join(lines)


# The figures a summary compares: label, the figure by allocator, and whether more of it is better.
_SUMMARY_FIGURES: tuple[tuple[str, Callable[[TraceResult], Getter], bool], ...] = (
    ("peak footprint", lambda r: lambda a: r.allocators[a].footprint, False),
    ("utilization", lambda r: r.utilization, True),
    ("system calls", lambda r: lambda a: r.allocators[a].syscall_total, False),
    ("ops/s", lambda r: r.ops_per_s, True),
)


def summary_table(results: Sequence[TraceResult]) -> str:
    """Ours against each baseline over several traces: for each figure, on how many traces ours did better
    (wins), the same (ties) or worse (losses), and the geometric mean of the ratio ours/baseline. A trace
    counts only where both figures were measured; the mean is over the positive ratios among them."""
    baselines = list(dict.fromkeys(name for r in results for name in r.allocators if name != "ours"))
    rows = [["", "", "wins", "ties", "losses", "geomean"]]
    for label, figure, more_is_better in _SUMMARY_FIGURES:
        for name in baselines:
            tally: Counter[str] = Counter()
            ratios: list[float | None] = []
            for r in results:
                if name not in r.allocators:
                    continue
                get = figure(r)
                ours, theirs = get("ours"), get(name)
                if ours is None or theirs is None:
                    continue
                better = ours > theirs if more_is_better else ours < theirs
                tally["wins" if better else "ties" if ours == theirs else "losses"] += 1
                ratios.append(ratio(ours, theirs))
            rows.append([label, f"ours/{name}", str(tally["wins"]), str(tally["ties"]), str(tally["losses"]),
                         number(geomean(ratios), ".2f")])
    title = f"summary of {len(results)} traces: wins, ties and losses of ours, and the geometric mean of each ratio"
    return "\n".join([title, render(rows, left=2), RATIO_LEGEND])
