"""The `malloc` command: `malloc demo` runs the live demonstration."""

from __future__ import annotations

import argparse
import sys

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="malloc", description="A real memory allocator in Python.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show, live, how the allocator gets memory from the OS")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
