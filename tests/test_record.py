"""`malloc record`: real programs traced with glibc's mtrace, their known requests found in the log, and the log
replayed. Needs a C compiler and glibc's libc_malloc_debug.so.0: skipped without them, except under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import malloc
from malloc.cli import main
from malloc.traces import record as recorder
from malloc.traces.formats import ALLOC, FREE, REALLOC, Op, Trace, parse_mtrace
from malloc.traces.record import RecordError, Recording, build_shim, find_compiler, find_debug_library, record

# A known sequence, with sizes no C library start-up asks for.
PROGRAM = r"""
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
    char *a = malloc(12345), *b = malloc(777);
    a = realloc(a, 54321);
    free(a);
    free(b);
    char *c = calloc(3, 1000);
    free(c);
    if (argc > 1) {  /* a child forked without exec, then a shell started by system() */
        pid_t child = fork();
        if (child == 0) {
            free(malloc(1111));
            exit(0);  /* flushes the child's copy of the log buffer: it must not reach the log */
        }
        waitpid(child, NULL, 0);
        free(malloc(2222));
        system("true");
    }
    return 3;
}
"""


@pytest.fixture(scope="module")
def tools() -> None:
    """Skip the tests that run a recording when this machine cannot record, saying what is missing; under CI,
    fail instead, since CI's machine must have them."""
    try:
        find_compiler()
        find_debug_library()
    except RecordError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to record: {e}")
        pytest.skip(f"this machine cannot record: {e}")


@pytest.fixture
def program(tools: None, tmp_path: Path) -> Path:
    source = tmp_path / "known.c"
    source.write_text(PROGRAM)
    binary = tmp_path / "known"
    subprocess.run([*find_compiler(), "-O0", "-o", str(binary), str(source)], check=True, timeout=120)
    return binary


def run(command: Sequence[str | Path], tmp_path: Path) -> Recording:
    return record([str(c) for c in command], tmp_path / "out.mtrace", cache_dir=tmp_path / "cache")


def known_sequence(trace: Trace) -> list[Op]:
    """The seven requests of PROGRAM's first lines, found in the trace by the first one's size."""
    start = next(i for i, op in enumerate(trace.ops) if op[0] == ALLOC and op[2] == 12345)
    return list(trace.ops[start : start + 7])


def expected(ops: list[Op]) -> list[Op]:
    a, b, c = ops[0][1], ops[1][1], ops[5][1]
    assert a != b
    return [(ALLOC, a, 12345), (ALLOC, b, 777), (REALLOC, a, 54321), (FREE, a, 0), (FREE, b, 0), (ALLOC, c, 3000),
            (FREE, c, 0)]


def test_a_c_program_is_recorded_with_its_known_requests(program: Path, tmp_path: Path) -> None:
    recording = run([program], tmp_path)
    assert recording.returncode == 3
    assert recording.path == tmp_path / "out.mtrace"
    assert recording.path.read_text().startswith("= Start\n")
    assert parse_mtrace(recording.path) == recording.trace
    ops = known_sequence(recording.trace)
    assert ops == expected(ops)
    assert recording.other_processes == 0
    assert os.listdir(tmp_path / "cache") == [build_shim(tmp_path / "cache").name]  # built once, then reused


def test_a_forked_child_does_not_write_into_the_log_and_a_started_one_writes_its_own(
    program: Path, tmp_path: Path
) -> None:
    recording = record([str(program), "fork"], tmp_path / "out.mtrace", cache_dir=tmp_path / "cache",
                       children=True)
    sizes = [op[2] for op in recording.trace.ops if op[0] == ALLOC]
    assert sizes.count(12345) == 1, "the parent's events are in the log once, not again from the child"
    assert 1111 not in sizes
    assert 2222 in sizes
    assert recording.other_processes >= 2  # the child forked without exec, and the shell system() ran
    # The forked child logged into a file of its own: its request, and none of the parent's
    children = [parse_mtrace(path) for path in recording.children]
    (forked,) = [log for log in children if any(op[0] == ALLOC and op[2] == 1111 for op in log.ops)]
    assert not any(op[0] == ALLOC and op[2] in (12345, 2222) for op in forked.ops)


def test_children_keeps_the_log_of_every_program_the_command_started(program: Path, tmp_path: Path) -> None:
    recording = record(["/bin/sh", "-c", f"{program}; {program}; true"], tmp_path / "out.mtrace",
                       cache_dir=tmp_path / "cache", children=True)
    assert recording.returncode == 0  # the shell's, from `true`
    assert recording.children and len(recording.children) == recording.other_processes
    pids = [int(path.name.split(".")[1]) for path in recording.children]
    assert [path.name for path in recording.children] == [f"out.{pid}.mtrace" for pid in pids]
    assert pids == sorted(pids) and all(path.parent == tmp_path for path in recording.children)
    assert not list((tmp_path).glob("[0-9]*.mtrace"))
    # The program ran twice, in two processes the shell started (or the last one in the shell's own, if it
    # exec'd it): its known requests are in exactly two of the logs.
    logs = [recording.trace, *(parse_mtrace(path) for path in recording.children)]
    found = [log for log in logs if any(op[0] == ALLOC and op[2] == 12345 for op in log.ops)]
    assert len(found) == 2
    for log in found:
        ops = known_sequence(log)
        assert ops == expected(ops)


def test_the_record_command_says_which_child_logs_it_kept(
    program: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run.mtrace"
    assert main(["record", "-o", str(out), "--", "/bin/sh", "-c", f"{program}; true"]) == 0
    said = capsys.readouterr().err
    assert "other processes the command started: not kept (--children keeps them)" in said
    assert not list(tmp_path.glob("run.*.mtrace"))
    assert main(["record", "-o", str(out), "--children", "--", "/bin/sh", "-c", f"{program}; true"]) == 0
    said = capsys.readouterr().err
    kept = sorted(tmp_path.glob("run.*.mtrace"))
    assert kept and f"recorded into {', '.join(map(str, kept))}" in said


def test_a_wrapper_that_execs_is_replaced_by_the_program_it_runs(program: Path, tmp_path: Path) -> None:
    recording = run(["/bin/sh", "-c", f"exec {program}"], tmp_path)
    ops = known_sequence(recording.trace)
    assert ops == expected(ops)


def test_python_is_recorded_and_the_recording_replays(tools: None, tmp_path: Path) -> None:
    recording = run([sys.executable, "-c", "b = bytearray(987654); del b"], tmp_path)
    assert recording.returncode == 0
    trace = recording.trace
    buffer = next(op for op in trace.ops if op[0] == ALLOC and 987654 <= op[2] < 987654 + 64)
    assert (FREE, buffer[1], 0) in trace.ops[trace.ops.index(buffer) :]
    assert recording.blocks > 1000  # the interpreter's own start-up
    table = [0] * (trace.num_ids + 1)
    for code, ident, size in trace.ops:
        if code == ALLOC:
            table[ident] = malloc.malloc(size)
        elif code == REALLOC:
            table[ident] = malloc.realloc(table[ident], size)
        else:
            malloc.free(table[ident])
            table[ident] = 0
    malloc.check()
    for p in table:
        malloc.free(p)
    malloc.check()


def test_a_program_that_ends_with_exit_underscore_still_logs_its_last_requests(tools: None, tmp_path: Path) -> None:
    # os._exit skips the flush of stdio buffers, where glibc keeps the log's last events: the shim ends the
    # trace in _exit, which also writes muntrace's "= End".
    recording = run([sys.executable, "-c", "import os; b = bytearray(876543); del b; os._exit(5)"], tmp_path)
    assert recording.returncode == 5
    assert recording.path.read_text().endswith("= End\n")
    buffer = next(op for op in recording.trace.ops if op[0] == ALLOC and 876543 <= op[2] < 876543 + 64)
    assert (FREE, buffer[1], 0) in recording.trace.ops


def test_the_record_command_prints_a_summary_and_passes_on_the_exit_status(
    program: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "cli.mtrace"
    assert main(["record", "-o", str(out), "--", str(program)]) == 3
    said = capsys.readouterr().err
    assert f"recorded {program} into {out}" in said
    assert "distinct blocks" in said and "exited with status 3" in said
    assert known_sequence(parse_mtrace(out))
    assert list((tmp_path / "cache" / "malloc").glob("mtrace-start-*.so"))
    assert main(["record", "-o", str(out), "--", str(tmp_path / "missing")]) == 2
    assert "cannot run" in capsys.readouterr().err
    assert main(["record", "-o", str(tmp_path / "no" / "x.mtrace"), "--", str(program)]) == 2
    assert f"cannot write the log there: no directory {tmp_path / 'no'}" in capsys.readouterr().err


def test_a_static_program_writes_no_log_and_that_is_said(tools: None, tmp_path: Path) -> None:
    source = tmp_path / "static.c"
    source.write_text("#include <stdlib.h>\nint main(void) { free(malloc(100)); return 0; }\n")
    built = subprocess.run([*find_compiler(), "-static", "-o", str(tmp_path / "static"), str(source)],
                           capture_output=True, timeout=120)
    if built.returncode != 0:
        pytest.skip("this compiler cannot link statically (no libc.a)")
    with pytest.raises(RecordError, match="wrote no malloc trace: it must be a dynamically linked program"):
        run([tmp_path / "static"], tmp_path)
    assert not (tmp_path / "out.mtrace").exists()


def test_without_a_compiler_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RecordError, match=r"none found: install a C compiler .*apt-get install gcc libc6-dev"):
        find_compiler()
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RecordError, match="cannot run the C compiler 'false'"):
        build_shim(tmp_path / "cache")
    monkeypatch.setenv("CC", f"{sys.executable} -c 'raise SystemExit(\"no headers\")'")
    with pytest.raises(RecordError, match=r"(?s)building the start-up shim with .* failed:\nno headers"):
        build_shim(tmp_path / "cache")


def test_the_debug_library_is_looked_for_only_where_glibc_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "glibc_version", lambda: (2, 33))
    assert find_debug_library() is None  # mtrace was in libc itself
    monkeypatch.setattr(recorder, "glibc_version", lambda: None)
    with pytest.raises(RecordError, match="not glibc"):
        find_debug_library()
    monkeypatch.setattr(recorder, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(os.path, "isfile", lambda path: False)
    with pytest.raises(RecordError, match=r"libc_malloc_debug.so.0 not found: .*apt-get install libc6"):
        find_debug_library()
