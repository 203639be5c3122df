"""The replay lab and `malloc replay`: figures checked against hand-computed ones, every run a real replay.

Each command runs the real workers (fresh interpreters replaying through this allocator, glibc and
multiprocessing.heap); traces are small, so the file stays quick on a loaded machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from malloc.cli import main
from malloc.os.libc import PAGE_SIZE
from malloc.traces.baselines import (
    BEGIN_MARK,
    END_MARK,
    count_strace,
    from_foreign_call,
    from_mmap_module,
    replay_mpheap_verified,
    tcache_chunk,
)
from malloc.traces.formats import ALLOC, FREE, REALLOC, load, peak_live
from malloc.traces.lab import run_worker
from malloc.traces.opsfile import write_ops
from malloc.traces.record import RecordError, find_compiler
from malloc.traces.replay import live_bytes, replay_verified
from malloc.traces.settings import SettingError, parse_setting

TRACES = Path(__file__).resolve().parent.parent / "traces"  # the repository's own copies
BIG = 1_000_000  # far above any mmap threshold glibc or ours start with
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


def write_rep(path: Path, num_ids: int, lines: list[str]) -> Path:
    path.write_text("\n".join(["0", str(num_ids), str(len(lines)), "0", *lines]) + "\n")
    return path


def mapped_chunk(request: int) -> int:
    """Bytes of the mapping glibc (and ours, by the same rule) gives one request above the threshold: the
    chunk (request + 8 header bytes, rounded up to 16) plus the 8-byte size word, rounded up to a page."""
    chunk = (request + 8 + 15) & ~15
    return -(-(chunk + 8) // PAGE_SIZE) * PAGE_SIZE


def replay(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "malloc", "replay", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_live_bytes_of_a_hand_written_trace(tmp_path: Path) -> None:
    trace = load(write_rep(tmp_path / "hand.rep", 3, [
        "a 0 100", "a 1 50", "r 0 300", "f 1", "f -1", "r 2 20", "a 1 0", "r 0 0", "f 2"]))
    assert live_bytes(trace) == [100, 150, 350, 300, 300, 320, 320, 20, 0]
    assert peak_live(trace) == 350
    assert trace.num_ops == 9


@needs_strace
def test_one_mapped_block_figures_and_json(tmp_path: Path) -> None:
    path = write_rep(tmp_path / "big.rep", 1, [f"a 0 {BIG}", "f -1", "f 0"])
    out = replay(path, "--against", "glibc,mpheap", "--repeats", "1", "--json", tmp_path / "out.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "big.rep: 3 operations, peak live 1,000,000 bytes" in out.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data) >= {"repeats", "against", "settings", "strace", "elapsed_s", "interrupted", "traces"}
    (t,) = data["traces"]
    assert (t["trace"], t["ops"], t["peak_live"], t["errors"]) == ("big", 3, BIG, [])
    ours, glibc = t["allocators"]["ours"], t["allocators"]["glibc"]
    for figures in t["allocators"].values():
        assert set(figures) == {"footprint", "utilization", "syscalls", "syscall_total", "seconds",
                                "all_seconds", "ops_per_s", "verified"}
    # one mapping of its own, unmapped on free; nothing else held from the OS
    assert ours["syscalls"] == {"mmap": 1, "munmap": 1}
    assert ours["footprint"] == mapped_chunk(BIG) == 1_003_520
    assert ours["utilization"] == pytest.approx(BIG / 1_003_520)
    # glibc's footprint is the mapped chunk's size plus the heap a fresh program's first malloc makes
    # for its tcache, whatever the size asked for: one sbrk of the tcache's 656-byte chunk, the top pad
    # and a minimal chunk, in whole pages (a C program replaying this trace reports the same)
    fresh_heap = -(-(656 + 128 * 1024 + 32) // PAGE_SIZE) * PAGE_SIZE
    assert glibc["footprint"] == mapped_chunk(BIG) + fresh_heap
    assert glibc["syscalls"] == {"brk": 1, "mmap": 1, "munmap": 1}
    # multiprocessing.heap maps one arena for the block and keeps it when the block is freed (it unmaps
    # only arenas of 4 MiB and more); the arena's unmapping when the heap goes away is not counted
    assert t["allocators"]["mpheap"]["footprint"] >= BIG
    assert t["allocators"]["mpheap"]["syscalls"] == {"mmap": 1}


def test_the_plug_leaves_glibc_nothing_free_not_even_in_the_tcache() -> None:
    """After `plug_glibc`, every request of a tcache size comes from new memory at the top. Taking a chunk
    from a small bin moves its same-size neighbours into the tcache, where they are invisible to mallinfo:
    left there, they served the replay's first requests from the interpreter's old holes, and glibc's peak
    footprint moved with the worker's history (by up to a top pad)."""
    code = """
import sys
from malloc.traces.baselines import glibc, plug_glibc
libc = glibc()
blocks, guards = [], []
for _ in range(20):  # 20 free chunks of each of two sizes, between kept guards
    for size in (56, 370):
        blocks.append(libc.malloc(size))
        guards.append(libc.malloc(24))
for p in blocks:
    libc.free(p)
plug_glibc(libc)
end = libc.sbrk(0)
print([size for size in range(24, 1033, 16) if libc.malloc(size) < end - 64])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@needs_strace
def test_glibcs_peak_is_the_same_whatever_the_worker_did_before(tmp_path: Path) -> None:
    """Workers with different histories before the plug (strace attached or not, a setting that cannot
    matter) give glibc the same peak: it moved by pages to a top pad before the plug drained the tcache
    twice and workers stopped parsing traces themselves."""
    trace = load(TRACES / "rep" / "random-bal.rep")
    write_ops(trace, tmp_path / "t.ops")
    peaks = {run_worker("glibc", "footprint", tmp_path / "t.ops")["footprint"],
             run_worker("glibc", "footprint", tmp_path / "t.ops", (parse_setting("M_PERTURB=0"),))["footprint"],
             run_worker("glibc", "footprint", tmp_path / "t.ops", strace=True)["footprint"]}
    assert len(peaks) == 1, peaks


def test_the_tcache_chunk_is_read_from_the_start_of_glibcs_heap() -> None:
    """glibc's tcache struct: 64 two-byte counts and 64 list heads since 2.30 (a 656-byte chunk), one-byte
    counts before (592)."""
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    major, minor = map(int, libc.gnu_get_libc_version().decode().split(".")[:2])
    assert tcache_chunk() == (656 if (major, minor) >= (2, 30) else 592)


@pytest.mark.parametrize("name", ["rep/coalescing-bal.rep", "rep/cccp-bal.rep", "rep/random-bal.rep",
                                  "rep/realloc-bal.rep", "mtrace/python-json.mtrace"])
def test_glibcs_footprint_is_a_fresh_c_programs(name: str, tmp_path: Path) -> None:
    """The lab's glibc, replaying in an interpreter after the plug and `fresh_start`, has the peak footprint
    of the same trace replayed by a compiled C program of its own (tests/data/glibc_replay.c). Without
    `fresh_start` glibc lacked the tcache a fresh program's first malloc puts in its heap, and its peak was
    off by a page or a top pad either way on 7 of the 18 traces in traces/ (cccp one page lower, random-bal
    31 pages higher, coalescing-bal a page higher)."""
    try:
        compiler = find_compiler()
    except RecordError as e:
        pytest.skip(f"no C compiler: {e}")
    binary = tmp_path / "glibc_replay"
    subprocess.run([*compiler, "-O2", "-o", str(binary), str(Path(__file__).parent / "data" / "glibc_replay.c")],
                   check=True, timeout=120)
    write_ops(load(TRACES / name), tmp_path / "t.ops")
    in_c = subprocess.run([binary, tmp_path / "t.ops"], capture_output=True, text=True, check=True, timeout=120)
    assert run_worker("glibc", "footprint", tmp_path / "t.ops")["footprint"] == int(in_c.stdout)


def test_strace_stacks_are_told_apart_by_origin() -> None:
    libc = " > /usr/lib/x86_64-linux-gnu/libc.so.6(__mmap+0x13) [0x1019b3]"
    python = " > /usr/lib/libpython3.11.so.1.0(_PyEval_EvalFrameDefault+0x2e53) [0xfd9c3]"
    mmap_module = [libc, " > /usr/lib/python3.11/lib-dynload/mmap.cpython-311-x86_64-linux-gnu.so"
                         "(new_mmap_object+0x222) [0x3232]", python]
    ctypes_call = [libc, " > /usr/lib/x86_64-linux-gnu/libffi.so.8(ffi_call+0x12e) [0x6f6e]", python]
    interpreter = [libc, " > /usr/lib/libpython3.11.so.1.0(_PyObject_ArenaMmap+0x2d) [0x1ed]", python]
    unmapped_arena = [" > /usr/lib/libc.so.6(munmap+0xb) [0x1]", " > /usr/bin/python3.11(mmap_object_dealloc+0x40)"]
    assert [from_mmap_module(s) for s in (mmap_module, ctypes_call, interpreter, unmapped_arena)] == [
        True, False, False, True]
    assert [from_foreign_call(s) for s in (mmap_module, ctypes_call, interpreter)] == [False, True, False]
    log = "\n".join([f'access("{BEGIN_MARK}", F_OK) = -1', "mmap(NULL, 4096) = 0x7f", *mmap_module,
                      "mmap(NULL, 8192) = 0x7e", *interpreter, f'access("{END_MARK}", F_OK) = -1',
                      "mmap(NULL, 4096) = 0x7d", *mmap_module])
    assert count_strace(log, from_mmap_module) == ({"mmap": 1}, {"mmap": 1})


@needs_strace
def test_set_raises_the_threshold_so_the_block_comes_from_the_break(tmp_path: Path) -> None:
    path = write_rep(tmp_path / "big.rep", 1, [f"a 0 {BIG}", "f 0"])
    out = replay(path, "--against", "glibc", "--repeats", "1", "--json", "--set", "M_MMAP_THRESHOLD=2000000")
    assert out.returncode == 0, out.stdout + out.stderr
    (t,) = json.loads(out.stdout)["traces"]
    for name in ("ours", "glibc"):
        calls = t["allocators"][name]["syscalls"]
        assert "mmap" not in calls and calls.get("brk", 0) >= 1, (name, calls)
        assert t["allocators"][name]["footprint"] >= BIG
    assert "settings for ours and glibc: M_MMAP_THRESHOLD=2000000" in out.stderr


def test_verify_finds_nothing_on_real_traces() -> None:
    paths = [TRACES / "rep" / f"{name}.rep" for name in ("short1-bal", "short2-bal", "perl")]
    out = replay(*paths, "--against", "glibc,mpheap", "--repeats", "1", "--verify", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    traces = json.loads(out.stdout)["traces"]
    assert [t["trace"] for t in traces] == ["short1-bal", "short2-bal", "perl"]
    for t in traces:
        assert t["errors"] == []
        assert [a["verified"] for a in t["allocators"].values()] == [True, True, True]


def test_the_mpheap_verifier_finds_blocks_that_overlap() -> None:
    """A heap that hands every request the same bytes: the second block's pattern overwrites the first's,
    which the check before the first block's free must report."""

    class Arena:
        buffer = bytearray(4096)

    class SameBytes:
        def malloc(self, n: int) -> tuple[Arena, int, int]:
            return (Arena(), 0, max(n, 1))

        def free(self, block: tuple[Arena, int, int]) -> None:
            pass

    ops = [(ALLOC, 0, 100), (ALLOC, 1, 100), (FREE, 0, 0)]
    damage = r"op 2: block 0 \(arena offset 0, 100 bytes\) was overwritten before free"
    with pytest.raises(AssertionError, match=damage):
        replay_mpheap_verified(ops, [None] * 3, SameBytes())
    replay_mpheap_verified([(ALLOC, 0, 100), (REALLOC, 0, 300), (FREE, 0, 0)], [None] * 2, SameBytes())


def test_the_address_verifier_finds_blocks_that_overlap() -> None:
    """The same for a C-style allocator whose malloc hands out one address every time."""
    buffer = ctypes.create_string_buffer(4096)
    address = ctypes.addressof(buffer)
    ops = [(ALLOC, 0, 100), (ALLOC, 1, 100), (FREE, 0, 0)]
    damage = rf"op 2: block 0 at {address:#x} \(100 bytes\) was overwritten before free"
    with pytest.raises(AssertionError, match=damage):
        replay_verified(ops, [0] * 3, lambda n: address, lambda p: None, lambda p, n: address)


@pytest.mark.parametrize(("setting", "message"), [
    ("M_BOGUS=1", "unknown name 'M_BOGUS'"),
    ("M_MMAP_THRESHOLD", "expected NAME=VALUE"),
    ("M_MMAP_THRESHOLD=lots", "'lots' is not an integer"),
    ("M_TOP_PAD=-1", "must not be negative"),
    ("M_MMAP_THRESHOLD=67108864", "may be at most 33554432"),
    ("M_TRIM_THRESHOLD=4294967296", "does not fit"),
])
def test_bad_setting_is_refused_before_anything_runs(setting: str, message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = write_rep(tmp_path / "t.rep", 1, ["a 0 10", "f 0"])
    assert main(["replay", str(path), f"--set={setting}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err and err.startswith("malloc replay: error: setting")
    with pytest.raises(SettingError, match=re.escape(message)):
        parse_setting(setting)


def test_parse_setting_accepts_glibc_names_and_hex() -> None:
    s = parse_setting("m_mmap_threshold=0x10000")
    assert (s.name, s.param, s.value, str(s)) == ("M_MMAP_THRESHOLD", -3, 65536, "M_MMAP_THRESHOLD=65536")


def test_malformed_trace_is_refused_with_no_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_rep(tmp_path / "good.rep", 1, ["a 0 10", "f 0"])
    bad = write_rep(tmp_path / "bad.rep", 1, ["a 0 10", "x 0 4"])
    assert main(["replay", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{bad}:6:" in err and "unknown op" in err


def test_a_double_free_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_rep(tmp_path / "good.rep", 1, ["a 0 10", "f 0"])
    bad = write_rep(tmp_path / "bad.rep", 1, ["a 0 10", "f 0", "f 0"])
    assert main(["replay", str(good), str(bad), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"malloc replay: error: {bad}:7: double free: id 0 was freed on line 6 and not allocated since\n"


def test_an_odd_mtrace_log_is_replayed_with_its_warnings(tmp_path: Path) -> None:
    path = tmp_path / "odd.mtrace"
    path.write_text("= Start\n+ 0x10 0x8\n- 0x10\n- 0x10\n= End\n")
    out = replay(path, "--repeats", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == (f"malloc replay: warning: {path}:4: free of 0x10, already freed on line 3 and not "
                          "returned since (a double free, or an allocation missing from the log); the replay "
                          "leaves this free out\n")
    assert "odd.mtrace: 2 operations" in out.stdout


def test_unknown_baseline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_rep(tmp_path / "t.rep", 1, ["a 0 10", "f 0"])
    assert main(["replay", str(path), "--against", "glibc,jemalloc"]) == 2
    assert "unknown baseline 'jemalloc'" in capsys.readouterr().err


def test_plot_writes_one_svg_per_trace(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a = write_rep(tmp_path / "a.rep", 2, ["a 0 5000", "a 1 300000", "f 0", "f 1"])
    b = TRACES / "rep" / "short1-bal.rep"
    out = replay(a, b, "--against", "glibc,mpheap", "--repeats", "1", "--plot", tmp_path / "fig.svg")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("a.rep", "short1-bal.rep"):
        root = ET.parse(tmp_path / f"fig-{name}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        text = "".join(root.itertext())
        assert "live bytes" in text and "ours footprint" in text and "glibc footprint" in text
    assert not (tmp_path / "fig.svg").exists()


def test_two_traces_of_one_stem_get_their_own_tables_plots_and_a_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rep = write_rep(tmp_path / "x.rep", 2, ["a 0 5000", "a 1 300000", "f 0", "f 1"])
    assert main(["convert", str(rep), str(tmp_path / "x.mtrace")]) == 0
    out = replay(rep, tmp_path / "x.mtrace", "--against", "glibc", "--repeats", "1", "--plot", tmp_path / "fig.svg")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("x.rep", "x.mtrace"):
        assert f"\n{name}: 4 operations, peak live 305,000 bytes\n" in "\n" + out.stdout
        assert f"plot: {tmp_path / f'fig-{name}.svg'}" in out.stdout
        text = "".join(ET.parse(tmp_path / f"fig-{name}.svg").getroot().itertext())
        assert f"{name}: 4 operations" in text and "KiB" in text
    summary = out.stdout[out.stdout.index("summary of 2 traces"):].splitlines()
    rows = summary[2:6]
    assert [row.split(" ours/")[0].strip() for row in rows] == ["peak footprint", "utilization", "system calls",
                                                                "ops/s"]
    for row in rows:
        *_, wins, ties, losses, mean = row.split()
        assert int(wins) + int(ties) + int(losses) == 2 and float(mean) > 0
    assert "better for ours below 1 in footprint" in summary[6]


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    path = write_rep(tmp_path / "t.rep", 1, ["a 0 10", "f 0"])
    # a matplotlib that cannot be imported, ahead of the real one on the path
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    out = subprocess.run([sys.executable, "-m", "malloc", "replay", str(path), "--plot", str(tmp_path / "x.svg")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "malloc[plot]" in out.stderr and out.stdout == ""


def _worker_files(parent: int) -> list[str]:
    """The ops files that `parent`'s replay workers are reading now (a worker's last argument is its
    trace: the lab's binary form of it, in a temporary directory of the lab's)."""
    files = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and any(b"malloc.traces.worker" in a for a in args):
            files += [a.decode() for a in args if a.endswith(b".ops")]
    return files


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return pids


def test_ctrl_c_prints_the_traces_done_and_leaves_no_worker(tmp_path: Path) -> None:
    quick = write_rep(tmp_path / "quick.rep", 1, ["a 0 10", "f 0"])
    slow = write_rep(tmp_path / "slow.rep", 1, ["a 0 64", "f 0"] * 100_000)
    # A job started in the background by a shell inherits SIGINT ignored, and so would the command: give
    # it the default disposition, as a terminal's foreground job has.
    proc = subprocess.Popen([sys.executable, "-m", "malloc", "replay", str(quick), str(slow), "--repeats", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]  # the first trace's title and table head
        assert lines[0].startswith("quick.rep: 2 operations"), lines
        deadline = time.monotonic() + 30
        files: list[str] = []
        while not files and time.monotonic() < deadline:
            time.sleep(0.01)  # until a worker is replaying the slow trace (quick's table is out: all of it is done)
            files = _worker_files(proc.pid)
        assert files, "no worker replaying the slow trace was seen"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: 1 of 2 traces done" in rest
    assert "slow:" not in rest
    assert _processes_mentioning(files[0]) == []  # no worker left
    assert not Path(files[0]).exists()  # and the lab's temporary directory is gone
