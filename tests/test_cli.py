"""The `malloc` command as a whole: what every subcommand shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.mark.parametrize("args", [["tour"], ["heap"], ["heap", "--xml"], ["maps"], ["maps", "--json"]])
def test_a_reader_gone_ends_the_command_quietly_with_sigpipes_status(args: list[str]) -> None:
    # `malloc tour | head -2`, made certain: the pipe's reader is closed before the command writes anything
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "malloc", *args], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)})
    finally:
        os.close(write)
    assert out.stderr == ""  # neither "[Errno 32] Broken pipe" nor "Exception ignored ... BrokenPipeError"
    assert out.returncode == 128 + 13  # as a shell reports a process killed by SIGPIPE
