"""`malloc maps [PID|self]`: a process's address space drawn top-down, or as JSON; `--aslr N` shows randomisation."""

from __future__ import annotations

import argparse
import json
import os
import sys

MIN_ASLR_RUNS = 2  # a base can only be seen to move between two runs


def _pid(text: str) -> int | str:
    """A process id as given on the command line: a number, or "self" (this process)."""
    if text == "self":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id or 'self': {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", nargs="?", type=_pid, help="the process to map: a process id, or 'self' (the "
                                                         "default: this one, with the allocator's own ranges marked; "
                                                         "shared heaps are marked in any process)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the drawing")
    parser.add_argument("--no-color", action="store_true", help="no ANSI colours (also off when not a terminal "
                                                                "or when NO_COLOR is set)")
    parser.add_argument("--aslr", type=int, metavar="N", help="instead of the map, start N fresh processes and "
                                                              "show how their bases move between runs")


def run(args: argparse.Namespace) -> int:
    from ..inspect import aslr, maps

    if args.aslr is not None:
        if args.pid is not None:
            print("malloc maps: --aslr starts its own processes; give no PID with it", file=sys.stderr)
            return 2
        if args.aslr < MIN_ASLR_RUNS:
            print(f"malloc maps: --aslr needs at least {MIN_ASLR_RUNS} runs, not {args.aslr} "
                  "(a base can only be seen to move between runs)", file=sys.stderr)
            return 2
        setting = aslr.randomize_va_space()
        runs = aslr.sample(args.aslr)
        print(json.dumps(aslr.to_json(runs, setting), indent=2) if args.json else aslr.render_text(runs, setting),
              end="\n" if args.json else "")
        return 0
    pid = "self" if args.pid in (None, "self", os.getpid()) else args.pid
    try:
        amap = maps.address_map(pid, maps.owned_ranges() if pid == "self" else ())
    except (ProcessLookupError, PermissionError, ValueError) as e:
        print(f"malloc maps: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(maps.to_json(amap), indent=2))
    else:
        color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        sys.stdout.write(maps.render_text(amap, color=color))
    return 0
