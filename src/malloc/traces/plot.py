"""Pictures of a replay: live bytes and each allocator's footprint against the operation number (SVG).

Needs matplotlib, the optional extra `plot` (`pip install 'malloc[plot]'`); `require_matplotlib` says so
before any replay runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .lab import TraceResult

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


def plot_paths(base: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """Where each trace's picture goes: `base` itself for one trace, else BASE-<trace>.svg for each."""
    base = Path(base)
    if len(names) == 1:
        return [base]
    stem = base.name.removesuffix(".svg")
    return [base.with_name(f"{stem}-{name}.svg") for name in names]


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


def plot_trace(result: TraceResult, live: Sequence[int], path: str | os.PathLike[str]) -> None:
    """Draw live bytes and each allocator's sampled footprint for one trace into the SVG file `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    # text stays text in the SVG (searchable, and smaller than glyph outlines)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        _draw(result, live, path)


def _draw(result: TraceResult, live: Sequence[int], path: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    try:
        ax.step(*_bucket_max(live), where="post", label="live bytes", color="black", linewidth=1.2)
        # Footprints often coincide to the byte (the policies are glibc's): each gets its own dash and width,
        # drawn widest first, so that every line stays visible on top of the others.
        styles = (("-", 3.0), ("--", 1.8), (":", 1.4))
        drawn = [(name, f) for name, f in result.allocators.items() if f.series]
        for (name, figures), (dash, width) in zip(drawn, styles, strict=False):
            ax.step(*_bucket_max(figures.series or []), where="post", label=f"{name} footprint",
                    linestyle=dash, linewidth=width, alpha=0.85)
        ax.set_xlabel("operation")
        ax.set_ylabel("bytes")
        ax.set_title(f"{result.trace}: {result.ops:,} operations, peak live {result.peak_live:,} bytes")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="svg", metadata={"Date": None})  # same figures, same file
    finally:
        plt.close(fig)
