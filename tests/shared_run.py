"""Running the shared heap's scenes (shared_scenes.py, shared_work.py) from the tests: each in a child process of
its own session, so that a crash fails a test instead of killing pytest, and whatever it started is stopped by
the session's id even when it hangs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import malloc

HERE = Path(__file__).resolve().parent
SRC = Path(malloc.__file__).resolve().parent.parent
LONG = bool(os.environ.get("MALLOC_SHARED_LONG"))


def run(script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run tests/`script` with `args` in a new session; the JSON line it prints last. A non-zero exit or a run past
    `timeout` fails the test; every process of the session is stopped by the session's id."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    proc = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(HERE), env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"{script} {' '.join(args)}: still running after {timeout} s (a hang)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the scene's own processes, should any outlive it
        proc.wait()
    assert proc.returncode == 0 and out.strip(), f"exit {proc.returncode}\n{err[-5000:]}"
    facts: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return facts
