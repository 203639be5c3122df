"""`malloc replay TRACE...`: replay allocation traces through this allocator (and baselines), one table each.

Every replay runs in a fresh interpreter (see `malloc.traces.lab`). Settings, traces and the plot extra are
checked before anything runs. Ctrl-C stops at once, kills the running worker, and still prints (and writes
as JSON) the traces already done; the exit status is then 130. With --timeline, one trace's page stepping
through its operations is written too (`malloc.traces.timeline`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from ..traces.formats import Trace
from ..traces.lab import BASELINES, Plan, TraceResult, report_json
from ..traces.settings import Setting, SettingError, parse_setting
from ..units import size_approx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (.rep or glibc mtrace logs)")
    parser.add_argument("--against", default="", metavar="LIST",
                        help=f"comma-separated baselines to replay side by side: {', '.join(BASELINES)}")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the figures as JSON to FILE (standard output without FILE, the tables "
                             "then going to standard error; before a trace name, write --json=FILE or --json -)")
    parser.add_argument("--plot", metavar="FILE.svg",
                        help="draw live bytes and footprints per operation (one trace: FILE.svg; several: "
                             "FILE-<trace file name>.svg each); needs the extra 'plot'")
    parser.add_argument("--timeline", metavar="OUT.html",
                        help="also write one page stepping through the trace's operations, the heap after each "
                             "(ours, and glibc's with --against glibc); one trace only")
    parser.add_argument("--verify", action="store_true",
                        help="also replay writing a pattern over every block and checking it")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                        help="a mallopt setting for ours and glibc, e.g. M_MMAP_THRESHOLD=65536 (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="timed replays per allocator, in fresh processes; the best counts (default 3)")


class ProgressBar:
    """A one-line bar on standard error, redrawn at every step; silent unless standard error is a terminal."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.shown = stream.isatty()

    def step(self, label: str) -> None:
        """Draw the bar with `label` (what runs now), then count the step."""
        if self.shown:
            filled = self.WIDTH * self.done // self.total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r\x1b[K[{bar}] {self.done}/{self.total} {label}")
            self.stream.flush()
        self.done += 1

    def clear(self) -> None:
        """Erase the bar, so that a table can be printed in its place."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _parse(args: argparse.Namespace) -> tuple[Plan, list[Path]]:
    """The plan and the trace paths; SettingError or ValueError for anything wrong."""
    against = tuple(dict.fromkeys(a.strip() for a in args.against.split(",") if a.strip()))
    unknown = [a for a in against if a not in BASELINES]
    if unknown:
        raise ValueError(f"--against: unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
    if args.timeline is not None and len(args.traces) != 1:
        raise ValueError(f"--timeline draws one trace, not {len(args.traces)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, not {args.repeats}")
    settings: tuple[Setting, ...] = tuple(parse_setting(text) for text in args.settings)
    plan = Plan(against=against, settings=settings, repeats=args.repeats, verify=args.verify,
                series=args.plot is not None)
    return plan, [Path(p) for p in args.traces]


def run(args: argparse.Namespace) -> int:
    """Replay every trace, printing its table as soon as it is done; the exit status (1 if anything failed)."""
    from ..traces import plot as plotting
    from ..traces.formats import load, warnings_shown
    from ..traces.lab import replay_traces
    from ..traces.replay import live_bytes
    from ..traces.table import summary_table, trace_label, trace_table

    try:
        plan, paths = _parse(args)
        if args.plot is not None:
            plotting.require_matplotlib()
        traces = [load(p) for p in paths]  # every file is checked before minutes go into the others
        if args.timeline is not None and not traces[0].num_ops:
            raise ValueError(f"{paths[0]}: no operations, so no timeline to draw")
    except (SettingError, ValueError, OSError, plotting.PlotUnavailable) as exc:
        # a TraceError's message names the file and line already
        print(f"malloc replay: error: {exc}", file=sys.stderr)
        return 2
    for path, trace in zip(paths, traces, strict=True):
        for warning in warnings_shown(trace, path):
            print(f"malloc replay: warning: {warning}", file=sys.stderr)
    out = sys.stderr if args.json == "-" else sys.stdout
    labels = [trace_label(p, paths) for p in paths]
    plots = plotting.plot_paths(args.plot, paths) if args.plot is not None else []
    bar = ProgressBar(plan.runs_per_trace() * len(traces) + (args.timeline is not None))

    def done(i: int, result: TraceResult) -> None:
        bar.clear()
        print(trace_table(result, labels[i]) + "\n", file=out, flush=True)
        if plots:
            plotting.plot_trace(result, live_bytes(traces[i]), plots[i], labels[i])
            print(f"plot: {plots[i]}\n", file=out, flush=True)
        if args.timeline is not None:
            _timeline(traces[i], args.timeline, plan, result, bar, out)

    start = time.perf_counter()
    results, interrupted = replay_traces(paths, traces, plan, bar.step, done)
    if interrupted:
        bar.clear()
        print(f"interrupted: {len(results)} of {len(traces)} traces done", file=out, flush=True)
    elapsed = time.perf_counter() - start
    if len(results) > 1 and plan.against:
        print(summary_table(results) + "\n", file=out)
    if not interrupted:
        print(_footer(plan, len(results), elapsed), file=out)
    if args.json is not None:
        text = json.dumps(report_json(results, plan, elapsed, interrupted), indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if interrupted:
        return 130
    return 1 if any(r.errors for r in results) else 0


def _timeline(trace: Trace, path: str, plan: Plan, result: TraceResult, bar: ProgressBar, out: TextIO) -> None:
    """Write the timeline page of `trace`; its errors join the trace's."""
    from ..traces.timeline import write_timeline

    try:
        written = write_timeline(trace, path, plan, bar.step)
    except (OSError, RuntimeError) as exc:
        written = {"errors": [str(exc)]}
    result.errors.extend(f"timeline: {e}" for e in written["errors"])
    bar.clear()
    for e in written["errors"]:
        print(f"timeline: {e}", file=sys.stderr, flush=True)
    if "bytes" not in written:
        return
    print(f"timeline: {path} ({size_approx(written['bytes'])}, {written['ops']:,} operations, "
          f"{written['seconds']:.1f} s)\n", file=out, flush=True)


def _footer(plan: Plan, count: int, elapsed: float) -> str:
    notes = [f"{count} trace{'s' if count != 1 else ''} in {elapsed:.1f} s",
             f"ops/s best of {plan.repeats} fresh process{'es' if plan.repeats != 1 else ''} each",
             "footprint = peak bytes held from the OS (break extent plus mapped bytes)"]
    if plan.settings:
        applies = "ours and glibc" if "glibc" in plan.against else "ours"
        notes.append(f"settings for {applies}: {' '.join(map(str, plan.settings))}")
    if plan.against and not plan.use_strace:
        notes.append(f"{' and '.join(plan.against)}'s system calls not counted: strace is not installed")
    return "(" + "; ".join(notes) + ")"
