"""The `malloc` command (`python -m malloc ...`): one subcommand per module in `malloc.commands`.

A subcommand's module is imported only when that subcommand runs, so `malloc record` does not start the
allocator and `malloc --help` stays quick. Each module has `add_arguments(parser)` and `run(args) -> int` (the exit
status); its one-line help is in COMMANDS.

When standard output is a pipe whose reader has gone (`malloc tour | head -2`), the command stops quietly, as
Unix tools do: no message, no traceback, and the exit status 141 that a shell reports for a process killed by
SIGPIPE (128 + 13), so that `set -o pipefail` sees the same as for `yes | head`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

# name -> (module under malloc.commands, one-line help); the help is here so that --help imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "tour": ("tour", "how malloc gets memory from the OS: a live tour of this process, every claim checked"),
    "replay": ("replay", "replay allocation traces through this allocator and baselines, side by side"),
    "record": ("record", "record a program's allocations with glibc's mtrace (-o FILE.mtrace -- COMMAND ...)"),
    "convert": ("convert", "convert a trace between the .rep and mtrace formats"),
    "maps": ("maps", "a process's address space drawn top-down (or --json), and ASLR across fresh runs (--aslr N)"),
    "heap": ("heap", "a heap chunk by chunk, this process's or a shared one (--shared NAME, --file PATH): a colour "
                     "strip, an HTML page (--html), XML (--xml), or a check (--check)"),
}
BROKEN_PIPE_STATUS = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"malloc.commands.{COMMANDS[name][0]}")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the subcommand; returns its exit status (BROKEN_PIPE_STATUS,
    quietly, when standard output's reader has gone)."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a reader gone shows here, where it is caught, rather than at the interpreter's exit
    except BrokenPipeError:
        # Python ignores SIGPIPE, so every later write (the interpreter's last flush included) would fail
        # again: the rest goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="malloc", description="A real memory allocator in Python.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, description=text)
    # Parse the command name first, then let only that command's module add its arguments.
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in COMMANDS:
        module = _module(first)
        module.add_arguments(sub.choices[first])
    args = parser.parse_args(argv)
    try:
        status: int = _module(args.command).run(args)
    except BrokenPipeError:
        raise
    except OSError as exc:  # a file that cannot be read or written: say which, without a traceback
        print(f"malloc {args.command}: {exc}", file=sys.stderr)
        return 1
    return status
