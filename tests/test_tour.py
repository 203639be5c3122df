"""`malloc tour` runs to the end, every claim it checks holds, and its JSON record holds what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def _tour(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "malloc", "tour", "--no-color", "--aslr-runs", "2", *args],
                          capture_output=True, text=True, timeout=300, input=stdin)


def _events(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for section in record["sections"] for e in section["events"]]


def test_tour_runs_and_its_record_holds_the_measured_events(tmp_path: Path) -> None:
    out = _tour("--json", str(tmp_path / "tour.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout and "Every claim held." in out.stdout
    record = json.loads((tmp_path / "tour.json").read_text())
    assert record["ok"] and record["failed"] == 0
    claims = [c for s in record["sections"] for c in s["claims"]]
    assert len(claims) >= 15 and all(c["ok"] for c in claims)
    events = _events(record)
    # At least one break move: an sbrk whose before/after breaks the tour saw differ by its increment.
    first = record["sections"][1]["facts"]["first"]
    grow = [e for e in events if e["name"] == "sbrk" and e["args"][0] > 0]
    assert grow and first["break_after"] - first["break_before"] == grow[0]["args"][0]
    # One mmap and its munmap: the same address and length.
    mapping = next(s["facts"]["mapping"] for s in record["sections"] if "mapping" in s["facts"])
    (mmap,), (munmap,) = mapping["mmap"], mapping["munmap"]
    assert munmap["args"] == [mmap["result"], mmap["args"][1]]
    assert mmap["result"] < mapping["address"] < mmap["result"] + mmap["args"][1]
    # One reuse of a freed address, with no system call.
    reuse = next(s["facts"]["reuse"] for s in record["sections"] if "reuse" in s["facts"])
    assert any(r["address"] == r["again"] and r["events"] == [] for r in reuse)
    # The threshold the sweep measured is the default one, and every event says why it was made.
    sweep = next(s["facts"] for s in record["sections"] if "smallest_mapped" in s["facts"])
    assert sweep["threshold"] == 128 * 1024 and (sweep["smallest_mapped"] + 8 + 15) & ~15 == 128 * 1024
    assert all(e["reason"] for e in events)
    assert {"sbrk", "mmap", "munmap"} <= {e["name"] for e in events}


def test_tour_json_on_standard_output_and_step_mode() -> None:
    out = _tour("--json", "--step", stdin="\n" * 20)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)  # only the record goes to standard output; the narration to stderr
    assert record["ok"]
    assert out.stderr.count("press Enter") == len(record["sections"]) - 1


def test_tour_rejects_a_bad_option() -> None:
    out = _tour("--aslr-runs", "1")
    assert out.returncode != 0 and "aslr-runs" in out.stderr


def test_an_unwritable_record_path_fails_at_once_without_a_traceback(tmp_path: Path) -> None:
    out = _tour("--json", str(tmp_path / "missing" / "tour.json"))
    assert out.returncode == 1
    assert "malloc tour:" in out.stderr and "Traceback" not in out.stderr
    assert "1. " not in out.stdout  # nothing ran
