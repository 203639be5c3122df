"""Pictures of a replay: live bytes and each allocator's footprint against the operation number (SVG).

Sizes are drawn in the binary unit that suits the largest (bytes, KiB, MiB or GiB), named on the axis.

Needs matplotlib, the optional extra `plot` (`pip install 'malloc[plot]'`); `require_matplotlib` says so
before any replay runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..units import scale_for
from .lab import TraceResult
from .table import trace_label, trace_title

MAX_POINTS = 2000  # per line: a longer series is cut into buckets and each bucket drawn by its maximum


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """PlotUnavailable, naming the extra to install, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'malloc[plot]' (or pip install matplotlib)") \
            from None


def plot_paths(base: str | os.PathLike[str], traces: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Where each trace's picture goes: `base` itself for one trace, else BASE-<file name>.svg for each, the
    trace's suffix kept (fig-x.rep.svg, fig-x.mtrace.svg); where file names clash, BASE-<n>-<file name>.svg,
    n the trace's position (from 1) among `traces`."""
    base = Path(base)
    if len(traces) == 1:
        return [base]
    stem = base.name.removesuffix(".svg")
    names = [os.path.basename(os.fspath(t)) for t in traces]
    return [base.with_name(f"{stem}-{name}.svg" if names.count(name) == 1 else f"{stem}-{i}-{name}.svg")
            for i, name in enumerate(names, start=1)]


def _bucket_max(series: Sequence[int]) -> tuple[list[int], list[int]]:
    """(operation numbers, values) of at most MAX_POINTS points keeping every bucket's peak."""
    step = max(1, -(-len(series) // MAX_POINTS))
    xs: list[int] = []
    ys: list[int] = []
    for start in range(0, len(series), step):
        chunk = series[start:start + step]
        xs.append(start + 1)
        ys.append(max(chunk))
    return xs, ys


def plot_trace(result: TraceResult, live: Sequence[int], path: str | os.PathLike[str],
               label: str | None = None) -> None:
    """Draw live bytes and each allocator's sampled footprint for one trace into the SVG file `path`, titled
    as its table is (`label` names the trace: by default its file name)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    # text stays text in the SVG (searchable, and smaller than glyph outlines)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        _draw(result, live, path, trace_label(result.path) if label is None else label)


def _draw(result: TraceResult, live: Sequence[int], path: str | os.PathLike[str], label: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    drawn = [(name, f) for name, f in result.allocators.items() if f.series]
    scale, unit = scale_for(max([*live, *(max(f.series or [0]) for _, f in drawn)], default=0))

    def scaled(series: Sequence[int]) -> tuple[list[int], list[float]]:
        xs, ys = _bucket_max(series)
        return xs, [y / scale for y in ys]

    fig, ax = plt.subplots(figsize=(9, 5))
    try:
        ax.step(*scaled(live), where="post", label="live bytes", color="black", linewidth=1.2)
        # Footprints often coincide to the byte (the policies are glibc's): each gets its own dash and width,
        # drawn widest first, so that every line stays visible on top of the others.
        styles = (("-", 3.0), ("--", 1.8), (":", 1.4))
        for (name, figures), (dash, width) in zip(drawn, styles, strict=False):
            ax.step(*scaled(figures.series or []), where="post", label=f"{name} footprint",
                    linestyle=dash, linewidth=width, alpha=0.85)
        ax.set_xlabel("operation")
        ax.set_ylabel(unit)
        # operation numbers: whole, with thousands separators, never an offset such as "1e6" at the axis' end
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.set_title(trace_title(result, label))
        ax.set_ylim(bottom=0)
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="svg", metadata={"Date": None})  # same figures, same file
    finally:
        plt.close(fig)
