"""The demonstration runs to the end and every claim it checks holds."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_its_claims_hold() -> None:
    out = subprocess.run([sys.executable, "-m", "malloc", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout
    assert out.stdout.count("[ok]") >= 8
    assert "sbrk(" in out.stdout and "mmap(" in out.stdout and "munmap(" in out.stdout
