#!/usr/bin/env python3
"""The replay benchmark: every trace in traces/ through ours, glibc and multiprocessing.heap, against issue 4's targets.

    python bench/replay.py [--self-check] [--verify] [--repeats N] [--json PATH] [TRACE ...]

The measuring is the lab's (`malloc.traces.lab`, also behind `malloc replay`): each replay in a fresh
process, glibc started as from a fresh heap, its footprint sampled after every operation and its system
calls counted with strace. This prints one row per trace and then the targets, each met or not:

- utilization (peak live bytes / peak footprint) at least glibc's, on every trace;
- system calls (brk + mmap + munmap + mremap + madvise) at most twice glibc's count or one per 1,000
  operations, whichever is larger, on every trace;
- throughput at least twice multiprocessing.heap.Heap's (geometric mean over the traces).

Throughput is only meaningful as a ratio measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("malloc") is None:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from malloc.traces.formats import load  # noqa: E402
from malloc.traces.lab import Plan, TraceResult, replay_traces, report_json, self_check  # noqa: E402
from malloc.traces.table import geomean, number, ratio, render  # noqa: E402

TRACES = ROOT / "traces"
PATTERNS = ("rep/*.rep", "mtrace/*.mtrace")
THROUGHPUT_TARGET = 2.0  # ours / mpheap, geometric mean
SYSCALL_FACTOR = 2  # at most this many times glibc's count ...
OPS_PER_SYSCALL = 1000  # ... or one per this many operations, whichever allows more


@dataclass(frozen=True)
class Targets:
    """Which per-trace targets one trace meets (None: not measured)."""

    utilization: bool | None
    syscalls: bool | None
    syscall_limit: float | None


def check_targets(r: TraceResult) -> Targets:
    """Issue 4's per-trace targets for one trace."""
    ours, glibc = r.utilization("ours"), r.utilization("glibc")
    util = None if ours is None or glibc is None else ours >= glibc
    calls, theirs = r.allocators["ours"].syscall_total, r.allocators["glibc"].syscall_total
    limit = None if theirs is None else max(SYSCALL_FACTOR * theirs, r.ops / OPS_PER_SYSCALL)
    within = None if calls is None or limit is None else calls <= limit
    return Targets(util, within, limit)


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "NO"


def summary(results: Sequence[TraceResult]) -> str:
    """One row per trace, a geometric-mean row, and the targets met or not."""
    head = ["trace", "ops", "peak live", "ours util", "glibc util", "mpheap util", "ours sys", "glibc sys",
            "mpheap sys", "sys limit", "ours ops/s", "glibc ops/s", "mpheap ops/s", "ours/mpheap", "util ok", "sys ok"]
    rows = [head]
    speedups = []
    for r in results:
        t = check_targets(r)
        speedup = ratio(r.ops_per_s("ours"), r.ops_per_s("mpheap"))
        speedups.append(speedup)
        rows.append([r.trace, f"{r.ops:,}", f"{r.peak_live:,}",
                     *(number(r.utilization(a), ".3f") for a in ("ours", "glibc", "mpheap")),
                     *(number(r.allocators[a].syscall_total, ",") for a in ("ours", "glibc", "mpheap")),
                     number(t.syscall_limit, ",.0f"),
                     *(number(r.ops_per_s(a), ",.0f") for a in ("ours", "glibc", "mpheap")),
                     number(speedup, ".2f"), _mark(t.utilization), _mark(t.syscalls)])
    mean = geomean(speedups)
    rows.append(["geometric mean", *[""] * 12, number(mean, ".2f"), "", ""])
    targets = [check_targets(r) for r in results]
    lines = [render(rows), "", "targets:"]
    for label, met in (("utilization at least glibc's", [t.utilization for t in targets]),
                       ("system calls within max(2 x glibc's, ops / 1,000)", [t.syscalls for t in targets])):
        misses = [r.trace for r, ok in zip(results, met, strict=True) if ok is False]
        measured = sum(ok is not None for ok in met)
        verdict = "met" if measured == len(results) and not misses else "NOT met"
        lines.append(f"  {label}: {verdict} ({measured - len(misses)} of {len(results)} traces"
                     + (f"; missed on {', '.join(misses)})" if misses else ")"))
    ok = mean is not None and mean >= THROUGHPUT_TARGET
    lines.append(f"  throughput at least {THROUGHPUT_TARGET:g}x multiprocessing.heap (geometric mean): "
                 f"{'met' if ok else 'NOT met'} ({number(mean, '.2f')}x)")
    return "\n".join(lines)


def engine_build() -> str:
    """Which build of the engine the workers run: "compiled (mypyc)" or "interpreted", and from where."""
    import malloc.heap

    where = Path(malloc.heap.__file__ or "?")
    kind = "interpreted" if where.suffix == ".py" else "compiled (mypyc)"
    return f"{kind}, {where.parent.parent}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("traces", nargs="*", type=Path,
                    help=f"trace files (default: {', '.join(str(TRACES / p) for p in PATTERNS)})")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per allocator; the best counts")
    ap.add_argument("--verify", action="store_true", help="also replay every allocator checking block contents")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    ap.add_argument("--self-check", action="store_true", help="first check the glibc footprint harness")
    args = ap.parse_args(argv)

    if args.self_check:
        with tempfile.TemporaryDirectory(prefix="replay-self-check-") as tmp:
            problems = self_check(tmp)
        print("self-check: " + ("ok" if not problems else "FAILED\n  " + "\n  ".join(problems)))
        if problems:
            return 1
    paths: list[Path] = args.traces or [p for pattern in PATTERNS for p in sorted(TRACES.glob(pattern))]
    if not paths:
        ap.error(f"no traces given and none in {TRACES}")
    try:
        traces = [load(p) for p in paths]  # a bad file fails before minutes go into the others
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = Plan(against=("glibc", "mpheap"), repeats=args.repeats, verify=args.verify)
    if not plan.use_strace:
        print("note: strace is not installed, so glibc's system calls (and that target) are not measured",
              file=sys.stderr)
    build = engine_build()
    print(f"engine: {build}")
    start = time.perf_counter()
    results, interrupted = replay_traces(paths, traces, plan,
                                         done=lambda _, r: print(f"  {r.trace}: done", file=sys.stderr, flush=True))
    if interrupted:
        print(f"interrupted: {len(results)} of {len(paths)} traces done", file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(summary(results))
    print(f"({len(results)} traces in {elapsed:.0f} s; ops/s best of {args.repeats} fresh processes each; "
          f"sys = brk + mmap + munmap + mremap + madvise)")
    if args.verify:
        bad = [f"{r.trace}/{a}" for r in results for a, f in r.allocators.items() if f.verified is False]
        print("verify: " + ("all blocks intact" if not bad else "FAILED: " + ", ".join(bad)))
    errors = [f"{r.trace}: {e}" for r in results for e in r.errors]
    for message in errors:
        print("ERROR " + message)
    if args.json:
        data = report_json(results, plan, elapsed, interrupted)
        data["targets"] = {r.trace: vars(check_targets(r)) for r in results}
        data["engine"] = build
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    if interrupted:
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
