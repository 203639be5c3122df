#!/usr/bin/env python3
"""What writing a timeline page costs: `malloc replay TRACE --against glibc` with and without `--timeline`.

    python bench/timeline.py [--repeats N] [--long] [TRACE ...]

For each trace both commands run alternately, N times each (default 3), each in a fresh interpreter; the
best of each counts. The write time is the difference, and issue 13's target is that it be at most 3 times
the replay's own time. `--long` adds a synthetic trace of 100,000 operations (the recipe of the long trace in
tests/test_timeline.py: at most 16 live blocks of seven sizes), since the repository's longest has 21,850.
Only the ratio means anything: the machine is shared and its load changes the seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("malloc") is None:
    sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from malloc.traces.formats import load, save  # noqa: E402
from malloc.traces.model import churn  # noqa: E402

TARGET = 3.0  # write time / replay time
DEFAULT_TRACES = ("traces/rep/amptjp-bal.rep", "traces/rep/random-bal.rep", "traces/rep/realloc-bal.rep",
                  "traces/rep/xterm.rep", "traces/mtrace/python-json.mtrace")


def seconds(args: list[str]) -> float:
    """Wall time of `python -m malloc ARGS` (RuntimeError if it fails)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT / "src"), env.get("PYTHONPATH"))))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "malloc", *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"malloc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="*", metavar="TRACE", help=f"default: {', '.join(DEFAULT_TRACES)}")
    parser.add_argument("--repeats", type=int, default=3, metavar="N", help="runs of each command (default 3)")
    parser.add_argument("--long", action="store_true", help="add a synthetic trace of 100,000 operations")
    args = parser.parse_args()
    met = True
    with tempfile.TemporaryDirectory(prefix="malloc-bench-timeline-") as tmp:
        paths = [Path(p) for p in (args.traces or [str(ROOT / t) for t in DEFAULT_TRACES])]
        if args.long:
            paths.append(Path(tmp) / "long.rep")
            save(churn(), paths[-1])
        page = Path(tmp) / "page.html"
        print(f"{'trace':<14} {'ops':>8} {'replay s':>9} {'+timeline s':>12} {'write s':>8} {'write/replay':>13} "
              f"{'page MB':>8}  target", flush=True)
        for path in paths:
            replay = ["replay", str(path), "--against", "glibc"]
            plain, timed = [], []
            for _ in range(args.repeats):
                plain.append(seconds(replay))
                timed.append(seconds([*replay, "--timeline", str(page)]))
            a, b = min(plain), min(timed)
            ratio = (b - a) / a
            met = met and ratio <= TARGET
            print(f"{path.stem:<14} {load(path).num_ops:>8,} {a:>9.2f} {b:>12.2f} {b - a:>8.2f} {ratio:>12.2f}x "
                  f"{page.stat().st_size / 1e6:>8.1f}  {'met' if ratio <= TARGET else 'MISSED'}", flush=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
