"""bench/shared.py: its operation sequences are valid, and a run, finished or stopped by SIGTERM, leaves no
segment behind. No figure is checked (the machine is noisy; the benchmark prints ratios, not verdicts)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "shared.py"


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_shared", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leftovers(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"bench-shared-{pid}-")
            or n.startswith(f".bench-shared-{pid}-")]


def remove(names: list[str]) -> list[str]:
    """Unlink segments a failed run left (so that a failing test leaves nothing either); their names."""
    for n in names:
        os.unlink(f"/dev/shm/{n}")
    return names


def test_a_mixed_sequence_mallocs_into_empty_slots_frees_live_ones_and_ends_with_nothing_live() -> None:
    b = bench()
    ops = b.mixed_ops(5, 3000)
    assert ops == b.mixed_ops(5, 3000)  # every process and contender replays the same sequence for a seed
    assert ops != b.mixed_ops(6, 3000)
    live: set[int] = set()
    kinds = set()
    for kind, slot, size in ops:
        kinds.add(kind)
        assert 0 <= slot < b.SLOTS
        if kind == b.MALLOC:
            assert slot not in live and 1 <= size <= 65536
            live.add(slot)
        elif kind == b.FREE:
            live.remove(slot)
        else:
            assert kind == b.REALLOC and slot in live and 1 <= size <= 65536
    assert live == set()
    assert kinds == {b.MALLOC, b.FREE, b.REALLOC}
    assert len(ops) > 3000  # the closing frees come after the count


def test_rounds_rotate_which_contender_runs_first() -> None:
    b = bench()
    order: list[str] = []
    times = b.rounds([lambda: order.append("a") or 1.0, lambda: order.append("b") or 2.0], 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert times == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]


def test_a_finished_run_prints_its_table_and_leaves_no_segment() -> None:
    p = subprocess.Popen([sys.executable, str(BENCH), "--only", "blocks", "--repeats", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert remove(leftovers(p.pid)) == []
    assert p.returncode == 0, err
    assert "SharedMemory µs/block" in out and "one at a time" in out and "target: at least 15x" in out


def test_sigterm_mid_run_removes_the_segment() -> None:
    p = subprocess.Popen([sys.executable, str(BENCH), "--only", "many"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not leftovers(p.pid):
            if time.monotonic() > deadline or p.poll() is not None:
                pytest.fail("the benchmark never made its heap")
            time.sleep(0.05)
        time.sleep(0.5)  # inside the million mallocs
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert remove(leftovers(p.pid)) == []
    assert p.returncode == 128 + signal.SIGTERM
