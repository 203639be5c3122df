"""`malloc record -o FILE.mtrace -- COMMAND [ARGS...]`: record a program's allocations with glibc's mtrace."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """-o FILE, --shim, --children, and the command after `--`."""
    parser.add_argument("-o", "--output", required=True, metavar="FILE.mtrace", help="where to write the mtrace log")
    parser.add_argument(
        "--shim",
        metavar="FILE.so",
        help="a start-up shim built beforehand (from malloc.traces.record.SHIM_SOURCE), when there is no C compiler",
    )
    parser.add_argument(
        "--children",
        action="store_true",
        help="also keep the logs of the other processes the command starts, as FILE.PID.mtrace beside FILE",
    )
    parser.add_argument("program", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the program to run")


def run(args: argparse.Namespace) -> int:
    """Run the command traced, write the log and print a summary on standard error (the command's own
    output stays on standard output). The exit status is the command's (128 + N for signal N), or 2 if
    recording failed."""
    from ..traces.formats import FREE, REALLOC, TraceError, peak_live
    from ..traces.record import RecordError, record

    command: list[str] = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        print("malloc record: no command given (malloc record -o FILE.mtrace -- COMMAND [ARGS...])", file=sys.stderr)
        return 2
    try:
        recording = record(command, args.output, shim=args.shim, children=args.children)
    except (RecordError, TraceError, OSError) as e:
        print(f"malloc record: {e}", file=sys.stderr)
        return 2
    trace = recording.trace
    reallocs = sum(1 for op in trace.ops if op[0] == REALLOC)
    frees = sum(1 for op in trace.ops if op[0] == FREE)
    lines = [
        f"recorded {shlex.join(command)} into {recording.path}",
        f"  {trace.num_ops} requests: {recording.blocks} mallocs, {reallocs} reallocs, {frees} frees",
        f"  {recording.blocks} distinct blocks, at most {trace.num_ids} live at once, "
        f"at most {peak_live(trace)} bytes live",
    ]
    if trace.skipped_frees:
        lines.append(f"  {trace.skipped_frees} frees of blocks allocated before tracing began: counted, left out")
    if recording.children:
        names = ", ".join(str(p) for p in recording.children)
        lines.append(f"  {len(recording.children)} other processes the command started, recorded into {names}")
    elif recording.other_processes:
        lines.append(f"  {recording.other_processes} other processes the command started: "
                     "not kept (--children keeps them)")
    status = recording.returncode
    if status < 0:
        status = 128 - status
        lines.append(f"  the command was killed by {signal.Signals(-recording.returncode).name}")
    elif status:
        lines.append(f"  the command exited with status {status}")
    print("\n".join(lines), file=sys.stderr)
    return status
