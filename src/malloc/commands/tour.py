"""`malloc tour`: how malloc gets memory from the OS, live in this process, every claim checked.

The tour shows glibc's default settings: when MALLOC_*_ variables are set, it says so and runs in a child
process without them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step", action="store_true", help="pause for Enter between sections")
    parser.add_argument("--json", metavar="FILE", nargs="?", const="-",
                        help="write the record of every section (events, facts, claims) as JSON to FILE "
                             "(standard output when FILE is '-' or left out; the narration then goes to stderr)")
    parser.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    parser.add_argument("--aslr-runs", type=int, default=4, metavar="N",
                        help="fresh processes started to show address-space randomisation (default 4)")


def _settings(environ: Mapping[str, str]) -> dict[str, str]:
    """glibc's malloc settings in `environ`: its MALLOC_*_ variables (this allocator reads them too)."""
    return {k: v for k, v in environ.items() if k.startswith("MALLOC_") and k.endswith("_")}


def _without_settings(args: argparse.Namespace, settings: dict[str, str], stream: TextIO) -> int:
    """Run the tour again in a child process whose environment lacks `settings`; its exit status."""
    shown = " ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    print(f"Your environment sets {shown}: glibc's malloc and this allocator follow it. The tour shows glibc's "
          "defaults, so it runs in a child process without it.", file=stream, flush=True)
    argv = [sys.executable, "-m", "malloc", "tour", "--aslr-runs", str(args.aslr_runs)]
    argv += ["--step"] * args.step + ["--no-color"] * args.no_color
    argv += ["--json", args.json] if args.json is not None else []
    env = {k: v for k, v in os.environ.items() if k not in settings}
    code = subprocess.run(argv, env=env, check=False).returncode
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def run(args: argparse.Namespace) -> int:
    from .. import tour

    if args.aslr_runs < 2:
        raise SystemExit("malloc tour: --aslr-runs must be at least 2 (a layout can only move between runs)")
    to_stdout = args.json == "-"
    stream = sys.stderr if to_stdout else sys.stdout
    settings = _settings(os.environ)
    if settings:
        return _without_settings(args, settings, stream)
    record_file = open(args.json, "w", encoding="utf-8") if args.json not in (None, "-") else None  # noqa: SIM115

    def out(line: str) -> None:
        print(line, file=stream, flush=True)

    color = stream.isatty() and not args.no_color
    # The record's file is opened first, so that a path that cannot be written fails before the tour runs.
    try:
        result = tour.run(out, step=args.step, color=color, aslr_runs=args.aslr_runs)
        if args.json is not None:
            text = json.dumps(result.record(), indent=2)
            if record_file is None:
                print(text)
            else:
                record_file.write(text + "\n")
    finally:
        if record_file is not None:
            record_file.close()
    return 1 if result.failed else 0
