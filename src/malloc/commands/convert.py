"""`malloc convert IN OUT [--to rep|mtrace]`: convert a trace between the .rep and mtrace formats."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """IN, OUT and --to."""
    parser.add_argument("input", metavar="IN", help="a .rep file or an mtrace log (told apart by content)")
    parser.add_argument("output", metavar="OUT", help="the file to write")
    parser.add_argument(
        "--to", choices=("rep", "mtrace"), help="the format to write (default: by OUT's suffix, .rep or .mtrace)"
    )


def run(args: argparse.Namespace) -> int:
    """Convert, print one line saying what was written (and what was left out); 1 on a bad input."""
    from ..traces.formats import TraceError, format_of, load, save, suffix_format, warnings_shown

    try:
        target = args.to or suffix_format(args.output)
        source = format_of(args.input)
        trace = load(args.input)
        save(trace, args.output, target)
    except (OSError, TraceError, ValueError) as e:
        print(f"malloc convert: {e}", file=sys.stderr)
        return 1
    for warning in warnings_shown(trace, args.input):
        print(f"malloc convert: warning: {warning}", file=sys.stderr)
    print(f"{args.input} ({source}) -> {args.output} ({target}): {trace.num_ops} requests, {trace.num_ids} ids")
    if trace.skipped_frees:
        print(f"left out: {trace.skipped_frees} frees of blocks allocated before the log began")
    return 0
