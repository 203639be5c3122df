"""Replay pictures: one file per trace, never one over another, and sizes in binary units."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from malloc.traces.lab import AllocatorResult, TraceResult
from malloc.traces.plot import plot_paths, plot_trace
from malloc.units import scale_for


def test_scale_for_picks_the_largest_binary_unit_not_above_the_size() -> None:
    assert scale_for(0) == (1, "bytes")
    assert scale_for(1023) == (1, "bytes")
    assert scale_for(1024) == (1024, "KiB")
    assert scale_for(5_000_000) == (1 << 20, "MiB")
    assert scale_for(3 << 30) == (1 << 30, "GiB")


def test_two_traces_of_one_stem_get_two_pictures(tmp_path: Path) -> None:
    base = tmp_path / "fig.svg"
    assert plot_paths(base, ["x.rep"]) == [base]
    assert plot_paths(base, ["a/x.mtrace", "a/x.rep"]) == [tmp_path / "fig-x.mtrace.svg", tmp_path / "fig-x.rep.svg"]
    # the same file name in two folders (or one file twice): numbered by position
    assert plot_paths(base, ["a/x.rep", "b/x.rep", "y.rep"]) == [
        tmp_path / "fig-1-x.rep.svg", tmp_path / "fig-2-x.rep.svg", tmp_path / "fig-y.rep.svg"]


def test_the_size_axis_is_in_mib_and_the_title_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    live = [3_000_000, 3_500_000, 500_000, 0]
    result = TraceResult("x", str(tmp_path / "x.mtrace"), len(live), max(live), 0,
                         {"ours": AllocatorResult(footprint=4 << 20, series=[3 << 20, 4 << 20, 4 << 20, 1 << 20])})
    plot_trace(result, live, tmp_path / "x.svg")
    root = ET.parse(tmp_path / "x.svg").getroot()
    text = [t.strip() for t in root.itertext() if t.strip()]
    assert "MiB" in text and "bytes" not in text
    assert "x.mtrace: 4 operations, peak live 3,500,000 bytes" in text
    assert not any("e+" in t or t.startswith("1e") for t in text)  # no raw bytes, no offset

    def ticks(axis: str) -> list[str]:
        return ["".join(g.itertext()).strip() for g in root.iter() if g.get("id", "").startswith(f"{axis}tick_")]

    assert "4.0" in ticks("y")  # the footprint's top, 4 MiB
    assert ticks("x") == ["1", "2", "3", "4"]  # operation numbers are whole
