"""The lab's binary form of a trace: it round-trips every trace in traces/, refuses damaged files, and a worker
reading it leaves glibc's dynamic mmap threshold where it was (parsing the trace itself raised it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from malloc.traces.formats import load
from malloc.traces.model import TraceError
from malloc.traces.opsfile import MAGIC, is_ops_file, read_ops, write_ops
from malloc.traces.worker import RESERVE

TRACES = Path(__file__).resolve().parent.parent / "traces"
ALL = sorted([*TRACES.glob("rep/*.rep"), *TRACES.glob("mtrace/*.mtrace")])


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_every_trace_round_trips(path: Path, tmp_path: Path) -> None:
    trace = load(path)
    write_ops(trace, tmp_path / "t.ops")
    assert is_ops_file(tmp_path / "t.ops") and not is_ops_file(path)
    assert read_ops(tmp_path / "t.ops") == trace


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    write_ops(load(TRACES / "rep" / "short1-bal.rep"), tmp_path / "t.ops")
    whole = (tmp_path / "t.ops").read_bytes()
    for name, data, message in (("cut.ops", whole[:-8], "ends early"), ("head.ops", whole[:20], "ends early"),
                                ("other.ops", b"MALLOPS0" + whole[8:], "not an ops file"),
                                ("negative.ops", MAGIC + (-1).to_bytes(8, sys.byteorder, signed=True) + whole[16:],
                                 "negative count")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TraceError, match=message):
            read_ops(tmp_path / name)


PROBE = """
import ctypes, json, sys
from malloc.traces.baselines import glibc, plug_glibc
from malloc.traces.formats import load
from malloc.traces.opsfile import read_ops
libc = glibc()

def threshold():
    # the smallest request glibc maps, by bisection; every probe is kept, since freeing a mapped one
    # would raise the threshold it measures. The heap is filled first: a free chunk or a top left by what
    # ran before would serve a probe above the threshold without a mapping
    plug_glibc(libc)
    lo, hi = 100_000, 40_000_000
    while hi - lo > 16:
        mid = (lo + hi) // 2
        p = libc.malloc(mid)
        lo, hi = (lo, mid) if ctypes.c_size_t.from_address(p - 8).value & 2 else (mid, hi)
    return hi

before = threshold()
trace = read_ops(sys.argv[1]) if sys.argv[2] == "ops" else load(sys.argv[1])
print(json.dumps([before, threshold()]))
"""


def test_a_worker_starts_with_glibcs_threshold_where_a_fresh_program_has_it() -> None:
    """The lab starts workers with RESERVE first: the interpreter's big module reads then come from glibc's
    heap, and no freed mapping raises the threshold from its 128 KiB start, as `import typing` does in a
    plain interpreter."""
    probe = PROBE.split("before = threshold()")[0] + "print(threshold())\n"

    def threshold(code: str) -> int:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert threshold(RESERVE + "import malloc.traces.worker\n" + probe) <= 131072 + 512
    assert threshold("import malloc.traces.worker\n" + probe) > 160_000


def test_reading_the_binary_form_leaves_glibcs_threshold_where_parsing_moves_it(tmp_path: Path) -> None:
    path = TRACES / "mtrace" / "python-json.mtrace"
    write_ops(load(path), tmp_path / "t.ops")

    def thresholds(source: Path, how: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", PROBE, str(source), how], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        result: list[int] = json.loads(out.stdout)
        return result

    before, after = thresholds(tmp_path / "t.ops", "ops")
    assert after == before
    before, after = thresholds(path, "parse")
    assert after > before  # what the lab's workers no longer do
