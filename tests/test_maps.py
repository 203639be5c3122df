"""The address-space map: the maps parser on this machine's files and on a saved sample of unusual lines,
classification, the allocator's own ranges and the break, another process's map, the command, and ASLR."""

from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import malloc
from malloc.inspect import aslr, maps
from malloc.os import libc

SAMPLE = Path(__file__).resolve().parent / "data" / "maps_sample.txt"
SAMPLE_EXE = "/opt/demo app/bin/demo server"
SRC = Path(__file__).resolve().parent.parent / "src"


def sample_map() -> maps.AddressMap:
    areas = maps.classify(maps.parse_maps(SAMPLE.read_text()), SAMPLE_EXE)
    return maps.AddressMap(4242, SAMPLE_EXE, tuple(areas), 0x5581C7E3D000, 0x5581C7E5D4A0)


def check_consistent(mappings: list[maps.Mapping]) -> None:
    for m in mappings:
        assert m.start < m.end
    for a, b in itertools.pairwise(mappings):
        assert a.end <= b.start, f"{a} overlaps or precedes {b}"


# ------------------------------------------------------------------------------------- parsing, live

def test_parses_every_line_of_this_process() -> None:
    raw = Path("/proc/self/maps").read_text()
    mappings = maps.parse_maps(raw)
    lines = raw.splitlines()
    assert len(mappings) == len(lines) > 5
    for m, line in zip(mappings, lines, strict=True):
        fields = line.split(maxsplit=5)
        assert f"{m.start:x}-{m.end:x}" == fields[0]
        assert (m.perms, m.offset, m.dev, m.inode) == (fields[1], int(fields[2], 16), fields[3], int(fields[4]))
        assert m.pathname == (fields[5].strip() if len(fields) > 5 else "")
    check_consistent(mappings)


def test_read_maps_of_this_process_finds_the_usual_parts() -> None:
    amap = maps.address_map()
    assert amap.pid == os.getpid()
    check_consistent([a.mapping for a in amap.areas])
    kinds = {a.kind for a in amap.areas}
    assert {"text", "library", "stack", "vdso"} <= kinds
    assert all(a.kind in maps.KINDS for a in amap.areas)
    text = [a for a in amap.areas if a.kind == "text"]
    assert all(a.mapping.pathname == os.readlink("/proc/self/exe") for a in text)
    # The stack is above everything but the vsyscall page; the text is below the stack and the libraries.
    stack = next(a for a in amap.areas if a.kind == "stack")
    assert all(a.end <= stack.start for a in amap.areas if a.kind in ("text", "library", "heap"))


def test_the_c_librarys_bss_follows_its_data() -> None:
    areas = maps.address_map().areas
    data = [i for i, a in enumerate(areas) if a.name == "libc.so.6" and a.mapping.perms == "rw-p"]
    if not data:
        pytest.skip("this process has no libc.so.6 (not glibc)")
    after = areas[data[-1] + 1]
    assert after.start == areas[data[-1]].end and after.mapping.anonymous
    assert after.kind == "library" and after.name.startswith("libc.so.6 (bss)")


def test_the_c_librarys_bss_from_its_elf_headers_starts_in_its_data_page_and_is_not_in_the_file() -> None:
    mappings = maps.read_maps()
    data = [m for m in mappings if m.path.endswith("/libc.so.6") and m.perms == "rw-p"]
    if not data:
        pytest.skip("this process has no libc.so.6 (not glibc)")
    bss = maps.bss_of(data[-1], mappings)
    assert bss is not None and bss.path == data[-1].path and bss.size > 0
    assert data[-1].start <= bss.start < data[-1].end < bss.end  # past the file's part, into the anonymous mapping
    assert bss.offset - data[-1].offset == bss.start - data[-1].start  # the file offset it would have had
    assert bss.offset <= os.path.getsize(bss.path)
    not_elf = maps.Mapping(data[-1].start, data[-1].end, "rw-p", 0, data[-1].dev, os.stat(SAMPLE).st_ino, str(SAMPLE))
    assert maps.bss_of(not_elf, mappings) is None


def test_read_touched_sees_a_page_once_it_is_written() -> None:
    m = mmap.mmap(-1, 3 * libc.PAGE_SIZE)
    first = ctypes.c_char.from_buffer(m)
    start = ctypes.addressof(first)
    try:
        assert maps.read_touched(start, start + 3 * libc.PAGE_SIZE) == [False, False, False]
        m[libc.PAGE_SIZE] = 1
        assert maps.read_touched(start, start + 3 * libc.PAGE_SIZE) == [False, True, False]
    finally:
        del first
        m.close()
    for lo, hi in ((1, libc.PAGE_SIZE), (2 * libc.PAGE_SIZE, libc.PAGE_SIZE), (-libc.PAGE_SIZE, 0)):
        with pytest.raises(ValueError, match="not a page-aligned range"):
            maps.read_touched(lo, hi)


# ------------------------------------------------------------------------------------ parsing, saved

def test_sample_parses_with_exact_fields() -> None:
    mappings = maps.parse_maps(SAMPLE.read_text())
    assert len(mappings) == len(SAMPLE.read_text().splitlines()) == 24
    first = mappings[0]
    assert first == maps.Mapping(0x5581C6A00000, 0x5581C6A01000, "r--p", 0, "fe:01", 131075, SAMPLE_EXE)
    bare = mappings[4]
    assert bare == maps.Mapping(0x5581C6A07000, 0x5581C6A09000, "rw-p", 0, "00:00", 0, "")
    assert bare.anonymous and bare.size == 0x2000
    memfd = mappings[8]
    assert (memfd.perms, memfd.dev, memfd.inode) == ("rw-s", "00:05", 1034)
    assert memfd.pathname == "/memfd:wayland-shm (deleted)"
    assert memfd.deleted and memfd.path == "/memfd:wayland-shm"
    scratch = mappings[9]
    assert scratch.pathname == "/tmp/scratch file.bin (deleted)" and scratch.path == "/tmp/scratch file.bin"
    assert mappings[13].offset == 0x1D4000
    assert mappings[17].pathname == "/usr/share/locale/en locale/LC_TIME" and not mappings[17].deleted
    assert mappings[18].pathname == "[anon:demo arena]"
    vsyscall = mappings[-1]
    assert vsyscall == maps.Mapping(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]")
    check_consistent(mappings)


def test_sample_classification() -> None:
    areas = maps.classify(maps.parse_maps(SAMPLE.read_text()), SAMPLE_EXE)
    assert [(a.kind, a.name) for a in areas] == [
        ("rodata", "demo server"), ("text", "demo server"), ("rodata", "demo server"), ("data", "demo server"),
        ("bss", "demo server (bss)"),
        ("heap", "[heap]"),
        ("anonymous", ""), ("anonymous", "(no access)"),
        ("shm", "memfd:wayland-shm (deleted)"),
        ("file", "scratch file.bin (deleted)"),
        ("library", "libdemo.so.6"), ("library", "libdemo.so.6"), ("library", "libdemo.so.6"),
        ("library", "libdemo.so.6"), ("library", "libdemo.so.6"), ("library", "libdemo.so.6 (bss)"),
        ("shm", "SYSV0000162e (deleted)"),
        ("file", "LC_TIME"),
        ("anonymous", "[anon:demo arena]"),
        ("other", "anon_inode:[perf_event]"),
        ("vvar", "[vvar]"), ("vdso", "[vdso]"), ("stack", "[stack]"), ("vsyscall", "[vsyscall]"),
    ]


def test_without_an_executable_path_the_lowest_file_is_taken() -> None:
    areas = maps.classify(maps.parse_maps(SAMPLE.read_text()))
    assert [a.kind for a in areas[:5]] == ["rodata", "text", "rodata", "data", "bss"]


@pytest.mark.parametrize("line", [
    "garbage",
    "5581c6a00000 r--p 00000000 fe:01 131075 /bin/x",       # no end address
    "5581c6a00000-5581c6a01000 rwzp 00000000 fe:01 1 /bin/x",  # bad permissions
    "5581c6a01000-5581c6a00000 r--p 00000000 fe:01 1 /bin/x",  # end below start
    "5581c6a00000-5581c6a01000 r--p 00000000 fe01 1 /bin/x",   # bad device
])
def test_malformed_lines_are_named(line: str) -> None:
    good = "7ffd6c3b1000-7ffd6c3d2000 rw-p 00000000 00:00 0                          [stack]"
    with pytest.raises(ValueError, match=re.escape("line 2: ")) as info:
        maps.parse_maps(f"{good}\n{line}\n")
    assert repr(line) in str(info.value)


def test_bad_pids_are_refused() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        maps.read_maps(-1)
    with pytest.raises(TypeError, match="pid"):
        maps.read_maps(1.5)  # type: ignore[arg-type]
    with pytest.raises(ProcessLookupError, match="no process"):
        maps.read_maps(2**22 + 1)  # above the kernel's largest pid


# -------------------------------------------------------------------------------------- rendering

def test_render_text_is_top_down_with_gaps_and_the_break() -> None:
    text = maps.render_text(sample_map())
    addresses = [int(m[1], 16) for m in re.finditer(r"^([0-9a-f]{16})-[0-9a-f]{16} ", text, re.M)]
    assert len(addresses) == 24
    assert addresses == sorted(addresses, reverse=True)
    lines = text.splitlines()
    assert lines[3].startswith("ffffffffff600000-ffffffffff601000") and "vsyscall" in lines[3]
    assert "unmapped" in lines[4] and "EiB" in lines[4]  # the whole kernel half, one line
    heap = next(i for i, line in enumerate(lines) if line.endswith("[heap]"))
    assert "00005581c7e5d4a0" in lines[heap + 1] and "program break" in lines[heap + 1]
    assert "\033[" not in text
    assert "\033[" in maps.render_text(sample_map(), color=True)
    # The gap between the heap and the text's bss: 0x5581c7e3d000 - 0x5581c6a09000.
    assert lines[heap + 2].strip() == f"~ {maps.size_approx(0x5581C7E3D000 - 0x5581C6A09000)} unmapped ~"


def test_to_json_of_the_sample() -> None:
    doc = json.loads(json.dumps(maps.to_json(sample_map())))
    assert doc["pid"] == 4242 and doc["exe"] == SAMPLE_EXE
    assert doc["break"] == {"start": "0x5581c7e3d000", "current": "0x5581c7e5d4a0", "exact": True}
    assert len(doc["regions"]) == 24
    scratch = doc["regions"][9]
    assert scratch["pathname"] == "/tmp/scratch file.bin (deleted)" and scratch["deleted"] is True
    assert scratch["kind"] == "file" and scratch["size"] == 0x10000
    assert doc["regions"][-1]["start"] == "0xffffffffff600000"
    starts = [int(r["start"], 16) for r in doc["regions"]]
    ends = [int(r["end"], 16) for r in doc["regions"]]
    gaps = [(int(g["start"], 16), int(g["end"], 16)) for g in doc["gaps"]]
    assert gaps == [(e, s) for e, s in zip(ends, starts[1:], strict=False) if s > e]


# ------------------------------------------------------------------------ the allocator and the break

def test_an_aligned_mapped_chunk_is_owned_from_the_start_of_its_mapping() -> None:
    p = malloc.memalign(1 << 16, 33 << 20)  # mapped; the block sits up to 64 KiB into its mapping
    try:
        start, length = malloc.allocator.mappings()[p]
        (owned,) = [o for o in maps.owned_ranges() if o.start <= p < o.end]
        assert (owned.start, owned.end) == (start, start + length) and start < p - 16
        area = maps.address_map().area_of(start)
        assert area is not None and area.start <= start and start + length <= area.end
    finally:
        malloc.free(p)


def test_a_mapped_chunk_is_marked_as_the_allocators() -> None:
    p = malloc.malloc(33 << 20)  # above any threshold earlier tests can have left (the dynamic one stops at 32 MiB)
    try:
        amap = maps.address_map(owned=maps.owned_ranges())
        area = amap.area_of(p)
        assert area is not None and area.kind == "anonymous"
        labels = [o for o in area.owned if o.start <= p < o.end]
        assert len(labels) == 1 and "mapped chunk" in labels[0].label and f"{p:#x}" in labels[0].label
        assert labels[0].end - labels[0].start == malloc.allocator.mapped_chunks()[p]
        assert "mapped chunk" in maps.render_text(amap)
    finally:
        malloc.free(p)
    after = maps.address_map(owned=maps.owned_ranges())
    assert not any(o.start <= p < o.end for a in after.areas for o in a.owned)


def test_a_heap_block_is_in_heap_with_the_break_inside() -> None:
    p = malloc.malloc(200)
    try:
        amap = maps.address_map(owned=maps.owned_ranges())
        area = amap.area_of(p)
        assert area is not None and area.kind == "heap" and area.mapping.pathname == "[heap]"
        assert any(o.label == "malloc heap (break)" and o.start <= p < o.end for o in area.owned)
        assert amap.brk_exact and amap.start_brk == area.start
        assert amap.brk is not None and area.start < amap.brk <= area.end
        assert area.start < libc.current_break() <= area.end
    finally:
        malloc.free(p)


# --------------------------------------------------------------------------- another process, CLI

def test_the_map_of_another_process() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    child = subprocess.Popen([sleep, "30"])
    try:
        # Right after the exec only the program and the dynamic loader are mapped; wait for the C library.
        for _ in range(1000):
            amap = maps.address_map(child.pid)
            if any(a.name.startswith("libc.so") for a in amap.areas):
                break
            time.sleep(0.01)
        assert amap.pid == child.pid and amap.exe == os.path.realpath(sleep)
        assert not amap.brk_exact
        kinds = {a.kind for a in amap.areas}
        assert {"text", "stack", "library"} <= kinds
        assert all(a.mapping.pathname == amap.exe for a in amap.areas if a.kind == "text")
        assert not any(a.owned for a in amap.areas)
        assert amap.start_brk is not None
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


def test_the_command_prints_json() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-m", "malloc", "maps", "--json"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert isinstance(doc["pid"], int) and doc["pid"] > 0
    kinds = {r["kind"] for r in doc["regions"]}
    assert {"text", "stack", "library"} <= kinds
    assert doc["break"]["exact"] is True


def test_the_command_draws_without_colour_when_not_a_terminal() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-m", "malloc", "maps"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "\033[" not in out.stdout
    assert "program break" in out.stdout and "[stack]" in out.stdout and " text " in out.stdout


def test_the_command_names_a_missing_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-m", "malloc", "maps", str(2**22 + 1)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 1 and "no process" in out.stderr


def _maps_command(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "malloc", "maps", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_the_command_takes_self_as_the_error_for_a_bad_pid_offers() -> None:
    refused = _maps_command("0")
    assert refused.returncode == 1 and "'self'" in refused.stderr
    out = _maps_command("self", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # this process (the command's own), with the allocator's ranges marked, as with no pid at all
    assert doc["pid"] > 0 and doc["break"]["exact"] is True
    assert _maps_command("myself").returncode == 2


@pytest.mark.parametrize("runs", ["1", "0", "-3"])
def test_the_command_refuses_fewer_than_two_aslr_runs(runs: str) -> None:
    out = _maps_command("--aslr", runs)
    assert out.returncode == 2 and out.stdout == ""
    assert f"--aslr needs at least 2 runs, not {runs}" in out.stderr


# ---------------------------------------------------------------------------------------------- ASLR

def test_aslr_sample_of_three_runs() -> None:
    setting = aslr.randomize_va_space()
    assert setting in (0, 1, 2)
    runs = aslr.sample(3)
    assert len(runs) == 3 and len({r.pid for r in runs}) == 3
    for r in runs:
        assert r.text is not None and r.stack is not None and r.mmap is not None and r.heap is not None
        assert r.text < r.mmap < r.stack
    moved = aslr.moved(runs)
    if setting == 2:
        assert any(moved.values())
        assert moved["stack"] and moved["mmap"]
    table = aslr.render_text(runs, setting).splitlines()
    assert table[0].startswith(f"randomize_va_space = {setting}")
    assert len(table) == 1 + 1 + 3 + 1  # setting, header, three runs, moved
    assert table[-1].split()[0] == "moved"
    doc = json.loads(json.dumps(aslr.to_json(runs, setting)))
    assert len(doc["runs"]) == 3 and doc["moved"] == moved


def test_aslr_sample_refuses_bad_counts() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        aslr.sample(0)
    with pytest.raises(TypeError, match="runs"):
        aslr.sample("3")  # type: ignore[arg-type]
