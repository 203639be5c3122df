"""Replay tables: each trace named by its file, ratios that say which way is better, and a summary of many."""

from __future__ import annotations

from malloc.traces.lab import AllocatorResult, TraceResult
from malloc.traces.table import RATIO_LEGEND, summary_table, trace_label, trace_table


def result(path: str, ours: int, glibc: int, ours_s: float, glibc_s: float, calls: tuple[int, int]) -> TraceResult:
    """A trace of 1,000 operations peaking at 1,000 live bytes, with these footprints, times and system calls."""
    r = TraceResult(path.rsplit("/", 1)[-1].split(".")[0], path, 1000, 1000, 0)
    r.allocators = {"ours": AllocatorResult(ours, [ours_s], {"brk": calls[0]}),
                    "glibc": AllocatorResult(glibc, [glibc_s], {"brk": calls[1]})}
    return r


def test_a_trace_is_named_by_its_file_name_or_its_path_where_names_clash() -> None:
    assert trace_label("t/x.rep") == "x.rep"
    assert trace_label("t/x.rep", ["t/x.rep", "t/x.mtrace"]) == "x.rep"
    assert trace_label("a/x.rep", ["a/x.rep", "b/x.rep"]) == "a/x.rep"
    table = trace_table(result("t/x.mtrace", 2000, 2000, 1.0, 1.0, (1, 1)))
    assert table.startswith("x.mtrace: 1,000 operations, peak live 1,000 bytes\n")


def test_the_ratio_legend_says_which_side_of_1_is_better() -> None:
    lines = trace_table(result("x.rep", 2000, 4000, 1.0, 2.0, (1, 2))).splitlines()
    assert RATIO_LEGEND in lines
    assert "below 1 in footprint and system calls" in RATIO_LEGEND
    assert "above 1 in utilization and ops/s" in RATIO_LEGEND
    # a table without baselines has no ratios, and so no legend
    alone = result("x.rep", 2000, 4000, 1.0, 2.0, (1, 2))
    del alone.allocators["glibc"]
    assert RATIO_LEGEND not in trace_table(alone)


def test_the_summary_counts_wins_ties_and_losses_and_takes_the_geometric_mean() -> None:
    results = [
        result("a.rep", 2000, 4000, 1.0, 2.0, (1, 2)),  # ours: half the footprint, twice as fast, fewer calls
        result("b.rep", 8000, 4000, 4.0, 1.0, (3, 3)),  # ours: twice the footprint, 4 times slower, as many calls
        result("c.rep", 4000, 4000, 1.0, 1.0, (0, 0)),  # the same (no calls on either side: no ratio)
    ]
    lines = summary_table(results).splitlines()
    assert lines[0].startswith("summary of 3 traces")
    assert lines[1].split() == ["wins", "ties", "losses", "geomean"]
    rows = {line[:line.index(" ours/")].strip(): line.split()[-4:] for line in lines[2:-1]}
    assert rows == {
        "peak footprint": ["1", "1", "1", "1.00"],  # (0.5 x 2 x 1) ** (1/3)
        "utilization": ["1", "1", "1", "1.00"],
        "system calls": ["1", "2", "0", "0.71"],  # (0.5 x 1) ** (1/2): 0 calls against 0 is a tie with no ratio
        "ops/s": ["1", "1", "1", "0.79"],  # (2 x 0.25 x 1) ** (1/3)
    }
    assert all(" ours/glibc " in line for line in lines[2:-1])
    assert lines[-1] == RATIO_LEGEND
