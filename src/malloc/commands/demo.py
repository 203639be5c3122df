"""`malloc demo`: the short live demonstration."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demonstration takes no arguments."""


def run(args: argparse.Namespace) -> int:
    from .. import demo

    return demo.main()
