"""Trace formats: every trace in traces/ parses, the edge cases mean what they should, malformed files are refused
with the file, the line and the fault, and conversions keep the requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from malloc.cli import main
from malloc.traces.formats import (
    ALLOC,
    FREE,
    REALLOC,
    Op,
    Trace,
    TraceError,
    format_of,
    load,
    parse_mtrace,
    parse_rep,
    peak_live,
    save,
    write_mtrace,
    write_rep,
)

DATA = Path(__file__).parent / "data"
TRACES = Path(__file__).resolve().parents[1] / "traces"
REP_FILES = sorted((TRACES / "rep").glob("*.rep"))
MTRACE_FILES = sorted((TRACES / "mtrace").glob("*.mtrace"))
README_EXAMPLE = (
    (ALLOC, 0, 512),
    (ALLOC, 1, 128),
    (REALLOC, 0, 640),
    (ALLOC, 2, 128),
    (FREE, 1, 0),
    (REALLOC, 0, 768),
    (FREE, 0, 0),
    (FREE, 2, 0),
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def assert_refused(parse: Callable[[Path], Trace], path: Path, line: int, what: str) -> None:
    """`parse(path)` raises TraceError starting with "PATH:LINE: " and saying `what`."""
    with pytest.raises(TraceError) as caught:
        parse(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert what in str(caught.value)


def event_of(line: str) -> str:
    """The event sign of an mtrace line: the third field from the end for +, > and !, else the second."""
    fields = line.split()
    return fields[-3] if len(fields) >= 3 and fields[-3] in ("+", ">", "!") else fields[-2]


def lifetimes(trace: Trace) -> list[Op]:
    """The requests with each block named by the order it was created in, and with the forms a replay treats
    alike written one way: realloc of a block not live is a malloc, realloc of a live block to 0 a free, a
    free of a block not live free(NULL). Two traces with equal lifetimes replay alike."""
    live: dict[int, int] = {}
    out: list[Op] = []
    blocks = 0
    for code, ident, size in trace.ops:
        if code == FREE or (code == REALLOC and size == 0 and ident in live):
            out.append((FREE, live.pop(ident, -1), 0))
        elif code == REALLOC and ident in live:
            out.append((REALLOC, live[ident], size))
        else:
            live[ident] = blocks
            out.append((ALLOC, blocks, size))
            blocks += 1
    return out


def test_the_traces_are_there() -> None:
    assert len(REP_FILES) >= 17, f"expected the malloc-lab traces in {TRACES / 'rep'}"
    assert MTRACE_FILES, f"expected an mtrace log in {TRACES / 'mtrace'}"


@pytest.mark.parametrize("path", REP_FILES, ids=lambda p: p.name)
def test_every_rep_parses_to_its_header_and_lines(path: Path) -> None:
    lines = path.read_text().split("\n")
    trace = parse_rep(path)
    assert trace.name == path.stem
    assert trace.num_ids == int(lines[1])
    assert trace.num_ops == int(lines[2])
    letters = Counter(line.split()[0] for line in lines[4:] if line.strip())
    kinds = Counter(op[0] for op in trace.ops)
    assert (kinds[ALLOC], kinds[REALLOC], kinds[FREE]) == (letters["a"], letters["r"], letters["f"])
    assert all(0 <= i < trace.num_ids or (code == FREE and i == -1) for code, i, _ in trace.ops)
    assert all(size >= 0 for _, _, size in trace.ops)
    assert trace.skipped_frees == 0


@pytest.mark.parametrize("path", MTRACE_FILES, ids=lambda p: p.name)
def test_every_mtrace_parses_into_blocks_that_are_live_when_used(path: Path) -> None:
    events = Counter(event_of(line) for line in path.read_text().splitlines() if not line.startswith("="))
    trace = parse_mtrace(path)
    assert trace.name == path.stem
    kinds = Counter(op[0] for op in trace.ops)
    # every block returned is one malloc or realloc; every free is a request or a skipped one
    assert kinds[ALLOC] + kinds[REALLOC] == events["+"] + events[">"]
    assert events[">"] == events["<"]
    assert kinds[FREE] + trace.skipped_frees >= events["-"]
    live: set[int] = set()
    most = 0
    for code, ident, _ in trace.ops:
        assert 0 <= ident < trace.num_ids
        if code == ALLOC:
            assert ident not in live, "a new block gets an id not in use"
            live.add(ident)
        else:
            assert ident in live, "a realloc or free names a live block"
            if code == FREE:
                live.remove(ident)
        most = max(most, len(live))
    assert most == trace.num_ids, "ids are reused, so there are as many as blocks live at once"


@pytest.mark.parametrize("path", REP_FILES + MTRACE_FILES, ids=lambda p: p.name)
def test_crlf_copies_parse_the_same(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert b"\r\n" in copy.read_bytes()
    assert load(copy) == load(path)


@pytest.mark.parametrize("name", ["header-classic.rep", "header-newer.rep", "header-one-line.rep"])
def test_both_header_variants_and_a_header_on_fewer_lines(name: str) -> None:
    trace = parse_rep(DATA / name)
    assert (trace.num_ids, trace.ops) == (3, README_EXAMPLE)


def test_corners_rep_means_what_the_readme_says() -> None:
    trace = parse_rep(TRACES / "rep" / "corners.rep")
    assert trace.ops[0] == (FREE, -1, 0)  # free(NULL)
    assert (ALLOC, 5, 52428800) in trace.ops  # a 50 MB block
    assert (REALLOC, 6, 10) in trace.ops  # realloc of an id never allocated (a malloc in a replay)
    assert trace.ops[-1] == (REALLOC, 10, 0)  # realloc to 0
    # 1+2+3+4 + 50 MB + 10 (realloc of nothing) + 200 + 50 + 100 + 100, before the last realloc frees 100
    assert peak_live(trace) == 10 + 52428800 + 10 + 200 + 50 + 100 + 100


def test_peak_live_counts_a_leak_under_a_reused_id_and_realloc_to_zero_frees() -> None:
    # no file can say this (a .rep file allocating a live id is refused): a trace made in code can
    trace = Trace("leak", 2, ((ALLOC, 0, 100), (ALLOC, 0, 50), (REALLOC, 0, 0), (ALLOC, 1, 70), (FREE, 1, 0)))
    assert peak_live(trace) == 100 + 70  # the first 100 leaked; the 50 went with the realloc to 0


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("a 0 8\nf 0\nf 0\n", 7, "double free: id 0 was freed on line 6 and not allocated since"),
        ("a 0 8\nr 0 16\nf 0\nf 0\n", 8, "double free: id 0 was freed on line 7"),
        ("f 1\na 1 8\nf 1\n", 5, "free of id 1 before its allocation (free(NULL) is 'f -1')"),
        ("a 0 8\na 1 8\na 0 16\n", 7, "id 0 allocated twice: it is live since line 5"),
        ("a 0 8\nr 0 16\na 0 4\n", 7, "id 0 allocated twice: it is live since line 6"),
        ("a 0 8\nf 0\nr 0 16\n", 7, "realloc of id 0 after its free on line 6 (a use after free)"),
    ],
)
def test_a_rep_misusing_an_id_names_file_line_and_fault(tmp_path: Path, body: str, line: int, what: str) -> None:
    text = f"1\n2\n{body.count(chr(10))}\n0\n{body}"
    assert_refused(parse_rep, write(tmp_path, "misuse.rep", text), line, what)


def test_a_rep_may_do_what_c_allows_with_an_id(tmp_path: Path) -> None:
    body = ["a 0 8", "f 0", "a 0 16",  # an id allocated again after its free
            "r 1 8",  # realloc(NULL, 8): a malloc
            "r 1 0", "f 1", "r 1 0", "r 1 4",  # realloc to 0 leaves NULL: free(NULL), realloc(NULL, 0), ...
            "f -1", "f 0", "f 1"]
    path = write(tmp_path, "fine.rep", "\n".join(["1", "2", str(len(body)), "0", *body]) + "\n")
    trace = parse_rep(path)
    assert trace.num_ops == len(body) and trace.warnings == ()


def test_an_mtrace_log_of_events_no_thread_could_make_is_replayed_with_warnings(tmp_path: Path) -> None:
    log = ["= Start", "+ 0x10 0x8", "- 0x10", "- 0x10", "- 0x99", "+ 0x20 0x8", "+ 0x20 0x9", "< 0x10",
           "> 0x30 0x10", "- 0x30", "- 0x20", "= End"]
    path = write(tmp_path, "odd.mtrace", "\n".join(log) + "\n")
    trace = parse_mtrace(path)
    assert trace.ops == (
        (ALLOC, 0, 8),
        (FREE, 0, 0),  # line 3; line 4, the second free of 0x10, is left out
        (ALLOC, 0, 8),  # line 6
        (FREE, 0, 0),  # line 7 returns 0x20 again: the block of line 6 is freed first
        (ALLOC, 0, 9),
        (ALLOC, 1, 16),  # the realloc of the freed 0x10 is a malloc
        (FREE, 1, 0),
        (FREE, 0, 0),
    )
    assert trace.skipped_frees == 1  # 0x99, never returned: a block from before the log, tolerated silently
    assert trace.warnings == (
        f"{path}:4: free of 0x10, already freed on line 3 and not returned since (a double free, or an "
        "allocation missing from the log); the replay leaves this free out",
        f"{path}:7: 0x20 returned while the block returned there on line 6 is live: its free is missing from "
        "the log (a thread's free logged late?); the replay frees that block first",
        f"{path}:8: realloc of 0x10, already freed on line 3 and not returned since (a use after free, or an "
        "allocation missing from the log); the replay makes its new block a malloc",
    )
    # the warnings describe the file, not the requests
    assert trace == Trace(trace.name, trace.num_ids, trace.ops, trace.skipped_frees)


def test_convert_prints_the_warnings_and_how_many_were_not_shown(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    log = ["+ 0x10 0x8", "- 0x10"] + ["- 0x10"] * 7
    path = write(tmp_path, "twice.mtrace", "\n".join(log) + "\n")
    assert main(["convert", str(path), str(tmp_path / "twice.rep")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"malloc convert: warning: {path}:3: free of 0x10, already freed on line 2 and not returned "
                      "since (a double free, or an allocation missing from the log); the replay leaves this free out")
    assert len(err) == 6 and err[-1] == f"malloc convert: warning: {path}: 2 more warnings like these"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("", 1, "truncated header: 0 of 4"),
        ("1\n3\n8\n", 4, "truncated header: 3 of 4"),
        ("1\n3\n8\na 0 1\n", 4, "truncated header: 3 of 4 numbers before a request"),
        ("1\nthree\n1\n1\na 0 1\n", 2, "bad number: header number 'three'"),
        ("1\n3\n1\n1 7\na 0 1\n", 4, "junk after the header"),
        ("1\n3\n2\n1\na 0 1\nx 1 2\n", 6, "unknown op 'x'"),
        ("1\n3\n1\n1\na 3 1\n", 5, "id out of range: 3"),
        ("1\n3\n1\n1\na -1 1\n", 5, "id out of range: -1"),
        ("1\n3\n1\n1\nf -2\n", 5, "id out of range: -2"),
        ("1\n3\n1\n1\na 0 12a\n", 5, "bad number: size '12a'"),
        ("1\n3\n1\n1\na 0 -5\n", 5, "bad number: size '-5'"),
        ("1\n3\n1\n1\nf 1.5\n", 5, "bad number: id '1.5'"),
        ("1\n3\n1\n1\na 0 99999999999999999999\n", 5, "bad number: size 99999999999999999999 is too large"),
        ("1\n3\n1\n1\na 0\n", 5, "expected 'a ID SIZE'"),
        ("1\n3\n1\n1\nf 0 4\n", 5, "expected 'f ID'"),
        ("1\n3\n3\n1\na 0 1\nf 0\n", 7, "wrong op count: 2 ops, the header declares 3"),
        ("1\n3\n1\n1\na 0 1\nf 0\n", 6, "wrong op count: more ops"),
        ("1\n3\n1\n1\na 0 1 \xe9\n", 5, "not ASCII"),
    ],
)
def test_a_malformed_rep_names_file_line_and_fault(tmp_path: Path, text: str, line: int, what: str) -> None:
    assert_refused(parse_rep, write(tmp_path, "bad.rep", text), line, what)


def test_mtrace_events_become_blocks() -> None:
    trace = parse_mtrace(DATA / "small.mtrace")
    assert trace.ops == (
        (ALLOC, 0, 0x20),
        (ALLOC, 1, 0x10),
        (REALLOC, 0, 0x100),  # the < > pair: block 0 moves from 0x1000 to 0x2000
        (ALLOC, 2, 0),  # a caller path with a space, a size of 0
        (FREE, 1, 0),
        (ALLOC, 1, 0x40),  # 0x1030 again after its free: a new block (under the id just released)
        (FREE, 1, 0),
        (FREE, -1, 0),  # free((nil)); the failed realloc (!) after it changes nothing
        (ALLOC, 1, 0x30),  # realloc of 0x6000, from before the log: its new block is a malloc
        (ALLOC, 3, 0x18),  # a line with no caller
        (FREE, 0, 0),  # block 0 freed at its new address
    )
    assert trace.skipped_frees == 2  # the free of 0x5000 and the realloc of 0x6000
    assert trace.num_ids == 4
    assert trace.name == "small"


def test_an_address_returned_again_while_live_frees_the_block_the_log_missed(tmp_path: Path) -> None:
    path = write(tmp_path, "t.mtrace", "+ 0x10 0x8\n+ 0x20 0x8\n+ 0x10 0x9\n< 0x10\n> 0x20 0x10\n- 0x20\n")
    assert parse_mtrace(path).ops == (
        (ALLOC, 0, 8),
        (ALLOC, 1, 8),
        (FREE, 0, 0),
        (ALLOC, 0, 9),
        (FREE, 1, 0),  # the realloc's new address held block 1
        (REALLOC, 0, 16),
        (FREE, 0, 0),
    )


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("= Start\n@ ./p:[0x1] ? 0x10\n", 2, "unknown event"),
        ("@ ./p:[0x1] + 0x10\n", 1, "unknown event"),
        ("junk + 0x10 0x20\n", 1, "not '@ CALLER'"),
        ("+ 0xZZ 0x10\n", 1, "bad number: address '0xZZ'"),
        ("+ 0x10 16\n", 1, "bad number: size '16'"),
        ("+ 0x10 0x8\n- -0x10\n", 2, "bad number: address '-0x10'"),
        ("+ 0x10 0x8\n> 0x20 0x10\n", 2, "'>' line without the '<' line"),
        ("+ 0x10 0x8\n< 0x10\n+ 0x30 0x8\n", 3, "'<' on line 2 is not followed by its '>'"),
        ("+ 0x10 0x8\n< 0x10\n> (nil) 0x10\n", 3, "(nil) address"),
        ("+ 0x10 0x8\n< 0x10\n", 2, "ends after a '<' line"),
    ],
)
def test_a_malformed_mtrace_names_file_line_and_fault(tmp_path: Path, text: str, line: int, what: str) -> None:
    assert_refused(parse_mtrace, write(tmp_path, "bad.mtrace", text), line, what)


def test_load_tells_the_formats_apart_by_content(tmp_path: Path) -> None:
    rep_named_oddly = write(tmp_path, "x.mtrace", (DATA / "header-classic.rep").read_text())
    mtrace_named_oddly = write(tmp_path, "y.rep", (DATA / "small.mtrace").read_text())
    assert format_of(rep_named_oddly) == "rep"
    assert load(rep_named_oddly).ops == README_EXAMPLE
    assert format_of(mtrace_named_oddly) == "mtrace"
    assert load(mtrace_named_oddly).ops == parse_mtrace(DATA / "small.mtrace").ops
    with pytest.raises(TraceError, match=":1: not a trace: the file is empty"):
        load(write(tmp_path, "e.rep", "\n\n"))
    with pytest.raises(TraceError, match=":2: not a trace"):
        load(write(tmp_path, "g.txt", "\nhello\n"))


@pytest.mark.parametrize("path", REP_FILES, ids=lambda p: p.name)
def test_rep_written_and_read_back_is_the_same_trace(path: Path, tmp_path: Path) -> None:
    trace = parse_rep(path)
    out = tmp_path / path.name
    write_rep(trace, out)
    assert parse_rep(out) == trace
    assert out.read_text().split("\n")[3] == str(peak_live(trace))


@pytest.mark.parametrize("path", REP_FILES + MTRACE_FILES, ids=lambda p: p.name)
def test_round_trip_rep_mtrace_rep_keeps_the_requests(path: Path, tmp_path: Path) -> None:
    trace = load(path)
    write_mtrace(trace, tmp_path / "a.mtrace")
    via_mtrace = parse_mtrace(tmp_path / "a.mtrace")
    write_rep(via_mtrace, tmp_path / "b.rep")
    back = parse_rep(tmp_path / "b.rep")
    assert back.ops == via_mtrace.ops
    assert lifetimes(back) == lifetimes(trace)
    assert peak_live(back) == peak_live(trace)


def test_conversion_writes_glibcs_forms_of_the_corner_cases(tmp_path: Path) -> None:
    trace = parse_rep(TRACES / "rep" / "corners.rep")
    write_mtrace(trace, tmp_path / "c.mtrace")
    back = parse_mtrace(tmp_path / "c.mtrace")
    assert back.ops[0] == (FREE, -1, 0)  # written as "- (nil)"
    assert back.ops[6][0] == ALLOC and back.ops[6][2] == 10  # realloc of nothing: glibc logs a malloc
    assert back.ops[-1][0] == FREE  # realloc to 0: glibc logs a free
    assert (tmp_path / "c.mtrace").read_text().splitlines()[1] == "- (nil)"


def test_save_picks_the_format_by_suffix_or_by_name(tmp_path: Path) -> None:
    trace = parse_rep(DATA / "header-classic.rep")
    save(trace, tmp_path / "a.mtrace")
    save(trace, tmp_path / "b.txt", "rep")
    assert format_of(tmp_path / "a.mtrace") == "mtrace"
    assert parse_rep(tmp_path / "b.txt").ops == README_EXAMPLE
    with pytest.raises(ValueError, match="suffix 'txt'"):
        save(trace, tmp_path / "c.txt")
    with pytest.raises(ValueError, match="unknown trace format 'json'"):
        save(trace, tmp_path / "c.rep", "json")


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.rep"
    assert main(["convert", str(DATA / "small.mtrace"), str(out)]) == 0
    said = capsys.readouterr().out
    assert "(mtrace) -> " in said and "11 requests" in said and "left out: 2 frees" in said
    assert parse_rep(out).ops == parse_mtrace(DATA / "small.mtrace").ops
    assert main(["convert", str(out), str(tmp_path / "x.log"), "--to", "mtrace"]) == 0
    assert format_of(tmp_path / "x.log") == "mtrace"
    bad = write(tmp_path, "bad.rep", "1\n3\n1\n1\nq 0 1\n")
    assert main(["convert", str(bad), str(tmp_path / "never.mtrace")]) == 1
    assert f"{bad}:5: unknown op 'q'" in capsys.readouterr().err
    assert not (tmp_path / "never.mtrace").exists()
