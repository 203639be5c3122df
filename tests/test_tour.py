"""`malloc tour` runs to the end, every claim it checks holds, and its JSON record holds what it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from malloc.inspect import fault, maps
from malloc.options import Options
from malloc.units import size_text


def _tour(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "malloc", "tour", "--no-color", "--aslr-runs", "2", *args],
                          capture_output=True, text=True, timeout=300, input=stdin, env=env)


def _events(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for section in record["sections"] for e in section["events"]]


def _facts(record: dict[str, Any], key: str) -> Any:
    return next(s["facts"][key] for s in record["sections"] if key in s["facts"])


def _without_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One run of the whole tour under glibc's defaults: its output and its JSON record."""
    path = tmp_path_factory.mktemp("tour") / "tour.json"
    out = _tour("--json", str(path), env=_without_settings())
    assert out.returncode == 0, out.stdout + out.stderr
    return out, json.loads(path.read_text())


def test_tour_runs_and_its_record_holds_the_measured_events(
        tour: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    out, record = tour
    assert "FAILED" not in out.stdout and "Every claim held." in out.stdout
    assert "Your environment sets" not in out.stdout and "Settings: glibc's defaults" in out.stdout
    assert record["ok"] and record["failed"] == 0
    claims = [c for s in record["sections"] for c in s["claims"]]
    assert len(claims) >= 25 and all(c["ok"] for c in claims)
    events = _events(record)
    # At least one break move: an sbrk whose before/after breaks the tour saw differ by its increment.
    first = _facts(record, "first")
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
    assert {"sbrk", "mmap", "munmap", "madvise"} <= {e["name"] for e in events}


def test_the_child_that_reads_an_unmapped_address_dies_of_sigsegv_quietly(
        tour: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    out, record = tour
    fault = _facts(record, "fault")
    assert fault["returncode"] == -signal.SIGSEGV and fault["signal"] == "SIGSEGV"
    assert fault["gap"]["start"] <= fault["address"] < fault["gap"]["end"]
    assert fault["address"] % os.sysconf("SC_PAGE_SIZE") == 0
    assert fault["stderr"] == ""  # no faulthandler traceback, no core dump message
    assert fault["ours_in_child"] != b"only in this process".hex()
    assert f"child {fault['pid']}: killed by SIGSEGV (returncode -11)" in out.stdout


def test_the_fault_helper_refuses_negative_addresses_and_lengths() -> None:
    for ours, length in ((-1, 4), (0x1000, -1)):
        with pytest.raises(ValueError, match="must not be negative"):
            fault.touch_unmapped(ours, length)


def test_the_bss_is_found_from_the_elf_headers_and_reads_as_zero(
        tour: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _out, record = tour
    shown = _facts(record, "bss")
    assert shown and any(b["own_mapping"] for b in shown)
    assert shown[0]["path"] == os.path.realpath(sys.executable)
    own = next(b for b in shown if b["own_mapping"])
    # The same file's bss, found in this process: the same size and file offset (ASLR moves only the addresses).
    mine = [m for m in maps.read_maps() if m.path == own["path"] and m.perms == "rw-p" and m.inode]
    bss = maps.bss_of(mine[-1], maps.read_maps())
    assert bss is not None and (bss.size, bss.offset) == (own["end"] - own["start"], own["file_offset"])
    # Most of it still reads as zero, and every page the process never touched does.
    assert own["zero_bytes"] > (own["end"] - own["start"]) // 2
    assert 0 < own["untouched_pages"] == own["untouched_zero_pages"] <= own["pages"]
    for b in shown:
        if not b["own_mapping"]:  # the rest of the data's last page: all zero, though the file holds other bytes
            assert b["page_tail_zero_bytes"] == b["page_tail"] and b["page_tail_nonzero_in_file"] > 0
    code = _facts(record, "code")
    assert code["in"] and code["text"] >= code["executable_text"] > 0


def test_a_large_block_under_a_live_one_is_only_madvised_and_a_mapped_one_is_unmapped(
        tour: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _out, record = tour
    heap = _facts(record, "heap_block")
    chunk = heap["address"] - 16
    assert heap["above"] > heap["address"] + heap["size"]
    assert heap["break_before"] == heap["break_after_free"] and heap["break_after_trim"] >= heap["above"] + 1000
    (madvise,) = heap["madvise_inside"]
    start, length = madvise["args"][0], madvise["args"][1]
    assert chunk < start and start + length <= heap["above"] - 16 and length >= heap["size"] - 2 * 4096
    assert f"free 1.0 MiB chunk at {chunk:#x}" in madvise["reason"] and "block in use above it" in madvise["reason"]
    assert heap["madvised_pages_in_memory"] == 0 and heap["madvised_read_zero"]
    # Every trim call says which range and why, not just "malloc_trim".
    trims = [e for e in _events(record) if e["reason"].startswith("malloc_trim")]
    assert trims and all(e["reason"] != "malloc_trim" and "0x" in e["reason"] for e in trims)
    mapped = _facts(record, "mapped_block")
    (mmap,), (munmap,) = mapped["mmap"], mapped["munmap"]
    assert munmap["args"] == [mmap["result"], mmap["args"][1]]
    assert mmap["result"] < mapped["address"] < mmap["result"] + mmap["args"][1]


def test_the_trim_section_counts_only_its_own_blocks_and_thresholds_have_one_unit(
        tour: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    out, record = tour
    top = _facts(record, "top")
    assert top["with_blocks"] <= top["before"] - 8 * (64 << 10) or top["with_blocks"] < (64 << 10)
    assert top["after_free"] >= top["before"]
    # The threshold the sweep's frees left is named in one unit wherever it is shown.
    raised = size_text(_facts(record, "threshold_after_free"))
    assert f"raised the threshold to {raised}" in out.stdout and f"the mmap threshold is now {raised}" in out.stdout


@pytest.mark.parametrize("setting", ["MALLOC_MMAP_THRESHOLD_=65536", "MALLOC_TOP_PAD_=0", "MALLOC_TRIM_THRESHOLD_=0"])
def test_the_tour_holds_under_the_users_malloc_settings(setting: str, tmp_path: Path) -> None:
    name, value = setting.split("=")
    out = _tour("--json", str(tmp_path / "tour.json"), env={**_without_settings(), name: value})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Your environment sets {setting}" in out.stdout and "Settings: glibc's defaults" in out.stdout
    assert "FAILED" not in out.stdout and "Every claim held." in out.stdout
    record = json.loads((tmp_path / "tour.json").read_text())
    assert record["ok"]
    assert record["settings"] == asdict(Options())
    sweep = next(s["facts"] for s in record["sections"] if "smallest_mapped" in s["facts"])
    assert sweep["threshold"] == 128 * 1024 and (sweep["smallest_mapped"] + 8 + 15) & ~15 == 128 * 1024


def test_the_tour_refuses_to_run_in_a_process_whose_settings_are_not_glibcs_defaults() -> None:
    code = "import malloc; from malloc import tour; malloc.mallopt(malloc.M_TOP_PAD, 0); tour.run()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=_without_settings())
    assert out.returncode != 0 and "RuntimeError: the tour shows glibc's default settings" in out.stderr
    assert "How malloc gets memory" not in out.stdout


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
