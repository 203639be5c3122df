"""Shared heaps from the command line and in the docs: `malloc heap --shared NAME | --file PATH` (the strip, the
HTML page, `--check`), `malloc maps` marking a shared heap's mapping and reservation, and the example of a pool
of workers sharing arrays (examples/shared_pool.py). Every heap here is a real segment in /dev/shm or a real
file, drawn, checked or mapped by another process, and removed at the end."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from procfs import TESTS_DIR, child_env
from test_heapmap import chunk_elements, dump_dom

from malloc import HeapCorruption, SharedHeap
from malloc.inspect import heapmap, maps, shared_heap

np = pytest.importorskip("numpy")

EXAMPLE = TESTS_DIR.parent / "examples" / "shared_pool.py"
ODD_NAME = "odd \x1b[31mred\x1b[0m <b>"  # a name that must not act on a terminal or a page


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def populate(h: SharedHeap) -> dict[str, int]:
    """Blocks of every state and names of every kind: an array, bytes, a plain block, a name that leads into
    the middle of a block; returns the names' offsets."""
    h.put("matrix", np.arange(600, dtype=np.float64).reshape(20, 30))
    h.put("greeting", b"hello")
    keep = h.malloc(200)
    gone = h.malloc(3000)
    h.malloc(100)  # keeps the freed block off the top
    h.free(gone)
    h.roots["plain"] = keep
    h.roots[ODD_NAME] = keep + 16
    return dict(h.roots)


@pytest.fixture
def shm_heap() -> Iterator[SharedHeap]:
    h = SharedHeap.create(unique("cli-test"), 1 << 20)
    try:
        populate(h)
        yield h
    finally:
        h.close()
        if os.path.exists(h.path):
            h.unlink()


@pytest.fixture
def file_heap(tmp_path: Path) -> Iterator[SharedHeap]:
    h = SharedHeap.open(tmp_path / "kept.heap", 1 << 20)
    try:
        populate(h)
        yield h
    finally:
        h.close()


def run_malloc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "malloc", *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env())


def legend_counts(text: str) -> dict[str, int]:
    legend = text[text.index("Legend"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  \S+\s+(in use|free|top)\s+(\d+) chunk", legend, re.M)}


def walk_counts(h: SharedHeap) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in h.walk():
        counts[c.state] = counts.get(c.state, 0) + 1
    return counts


def damage(h: SharedHeap, offset: int, value: int) -> None:
    """Write one word into the heap's file, as a stray writer in another process would."""
    fd = os.open(h.path, os.O_RDWR)
    try:
        os.pwrite(fd, value.to_bytes(8, "little"), offset)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- names, in this process


def test_names_are_described_by_what_their_blocks_hold(shm_heap: SharedHeap) -> None:
    roots = shm_heap.roots
    shm_heap.ndarray("fields", (3, 4), [("x", "<i4"), ("y", ">f8")])
    plain = next(c for c in shm_heap.walk() if c.address + 16 == roots["plain"])
    described = {n.name: (n.block, n.what) for n in shared_heap.describe_names(shm_heap, shm_heap.walk())}
    assert described == {
        "fields": (roots["fields"], "array [('x', '<i4'), ('y', '>f8')] (3, 4), 144 B"),
        "greeting": (roots["greeting"], "bytes, 5 B"),
        "matrix": (roots["matrix"], "array float64 (20, 30), 4.7 KiB"),
        "plain": (roots["plain"], f"a block of {plain.size - 8} usable bytes"),
        ODD_NAME: (roots[ODD_NAME], "not the start of a block in use"),
    }
    # A value whose header was damaged is named as such, and describing it left no view behind.
    damage(shm_heap, roots["matrix"] + 8 * 4, 1000)  # its number of dimensions
    described = {n.name: n.what for n in shared_heap.describe_names(shm_heap, shm_heap.walk())}
    assert described["matrix"].startswith("a value whose header is damaged")
    shm_heap.delete("fields")


def test_the_names_list_shows_each_name_as_a_literal() -> None:
    names = [heapmap.Name(ODD_NAME, 0x4490, "bytes, 5 B"), heapmap.Name("b", 0x5000, "a block of 8 usable bytes")]
    text = heapmap.render_names(names)
    assert text.splitlines()[0] == "Names (2), each leading to a block:"
    assert "\x1b" not in text and repr(ODD_NAME) in text
    assert heapmap.render_names([]) == "No names."


# ----------------------------------------------------------------------------- malloc heap: the strip


def test_the_strip_of_a_shared_heap_shows_its_chunks_at_offsets_and_its_names(shm_heap: SharedHeap) -> None:
    proc = run_malloc("heap", "--shared", shm_heap.name, "--no-color")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    chunks = shm_heap.walk()
    first, last = chunks[0], chunks[-1]
    assert re.search(rf"^shared heap '{shm_heap.name}' \(offsets\)  {first.address:#x} - "
                     rf"{last.address + last.size:#x}  \S+ \S+ in {len(chunks)} chunks", out, re.M), out
    assert legend_counts(out) == walk_counts(shm_heap) and legend_counts(out)["free"] == 1
    assert "\x1b" not in out  # no colour, and the odd name's escapes are shown, not sent
    roots = shm_heap.roots
    names = out[out.index("Names (4)"):]
    assert re.search(rf"^  'greeting'\s+{roots['greeting']:#x}  bytes, 5 B$", names, re.M), names
    assert re.search(rf"^  'matrix'\s+{roots['matrix']:#x}  array float64 \(20, 30\), 4.7 KiB$", names, re.M)
    assert re.search(rf"^  'plain'\s+{roots['plain']:#x}  a block of \d+ usable bytes$", names, re.M)
    assert f"{ODD_NAME!r}" in names and "not the start of a block in use" in names


def test_a_file_heap_is_drawn_by_its_path(file_heap: SharedHeap) -> None:
    proc = run_malloc("heap", "--file", file_heap.path, "--no-color")
    assert proc.returncode == 0, proc.stderr
    assert f"heap file {file_heap.path} (offsets)" in proc.stdout
    assert legend_counts(proc.stdout) == walk_counts(file_heap)
    assert "Names (4)" in proc.stdout


def test_drawing_changes_nothing_and_never_unlinks(shm_heap: SharedHeap) -> None:
    before = [(c.address, c.size, c.state) for c in shm_heap.walk()]
    for args in (["--no-color"], ["--check"]):
        assert run_malloc("heap", "--shared", shm_heap.name, *args).returncode == 0
    # A process that attached and exited leaves the segment where it was: attaching never schedules someone
    # else's segment for unlinking (here a child that does not even close it).
    child = subprocess.run([sys.executable, "-c", f"import malloc; malloc.SharedHeap.attach({shm_heap.name!r})"],
                           capture_output=True, text=True, timeout=60, env=child_env())
    assert child.returncode == 0, child.stderr
    assert os.path.exists(shm_heap.path)
    assert [(c.address, c.size, c.state) for c in shm_heap.walk()] == before
    assert bytes(shm_heap.get("greeting")) == b"hello"
    shm_heap.check()


# ----------------------------------------------------------------------------- malloc heap: the page


class Page(HTMLParser):
    """The chunk elements' attributes and the names table's cells of a heap map page."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[dict[str, str]] = []
        self.name_rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if values.get("class") == "chunk":
            self.chunks.append(values)
        elif tag == "tr" and values.get("class") == "name":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.name_rows.append(self._row)
            self._row = None


def test_the_page_of_a_shared_heap_has_every_chunk_and_marks_the_named_ones(shm_heap: SharedHeap,
                                                                             tmp_path: Path) -> None:
    target = tmp_path / "shared.html"
    proc = run_malloc("heap", "--shared", shm_heap.name, "--html", str(target))
    assert proc.returncode == 0, proc.stderr
    page = Page()
    page.feed(target.read_text(encoding="utf-8"))
    chunks = shm_heap.walk()
    assert [(e["data-address"], e["data-size"], e["data-state"]) for e in page.chunks] == \
        [(f"{c.address:#x}", str(c.size), c.state) for c in chunks]
    roots = shm_heap.roots
    named = {e["data-address"]: e["data-names"] for e in page.chunks if "data-names" in e}
    assert named == {f"{roots[n] - 16:#x}": n for n in ("matrix", "greeting", "plain")}
    rows = {row[0]: row[1:] for row in page.name_rows}
    assert set(rows) == set(roots)  # the odd name arrives whole, as text (escaped in the page)
    assert rows["matrix"] == [f"{roots['matrix']:#x}", "array float64 (20, 30), 4.7 KiB"]
    assert "<b>" not in target.read_text(encoding="utf-8").split("<h2>names")[1].split("</table>")[0]


# Run after the page's own script: hover the chunk named "matrix", note what the tooltip shows.
HOVER_NAMED = """<script>
var target = document.querySelector('.chunk[data-names="matrix"]');
target.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: 40, clientY: 40}));
document.body.setAttribute("data-tip", document.getElementById("tip").textContent);
</script>
</body>"""


def test_the_page_in_a_headless_browser_shows_a_named_chunks_names(shm_heap: SharedHeap) -> None:
    chunks = shm_heap.walk()
    page = heapmap.render_html([heapmap.Segment("shared heap", tuple(chunks))], title="shared heap",
                               names=shared_heap.describe_names(shm_heap, chunks))
    dom = chunk_elements(dump_dom(page.replace("</body>", HOVER_NAMED)))
    assert "data-script-errors" not in dom.roots["html"]
    body = dom.roots["body"]
    assert body["data-chunks-drawn"] == str(len(chunks))
    assert body["data-tip"].startswith("in use") and "named 'matrix'" in body["data-tip"]


# ----------------------------------------------------------------------------- malloc heap --check


def test_check_of_a_whole_heap_exits_0(shm_heap: SharedHeap, file_heap: SharedHeap) -> None:
    for source in (["--shared", shm_heap.name], ["--file", file_heap.path]):
        proc = run_malloc("heap", *source, "--check")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.fullmatch(rf".* is whole: {len(shm_heap.walk())} chunks, 4 names, \d+ bytes in use in a segment "
                            rf"of {shm_heap.size} bytes\n", proc.stdout), proc.stdout


def test_check_of_a_damaged_link_exits_1_with_the_damage_at_its_offset(shm_heap: SharedHeap) -> None:
    free = next(c for c in shm_heap.walk() if c.state == "free")
    damage(shm_heap, free.address + 16, 0x123450)  # the free chunk's forward link, pointing nowhere
    with pytest.raises(HeapCorruption) as caught:
        shm_heap.check()
    where = caught.value.address - shm_heap.base
    proc = run_malloc("heap", "--shared", shm_heap.name, "--check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"shared heap {shm_heap.name!r} is damaged: ")
    assert proc.stdout.rstrip().endswith(f"(offset {where:#x} of the segment)")
    assert "Traceback" not in proc.stderr


def test_a_heap_whose_chunks_cannot_be_walked_is_not_drawn(shm_heap: SharedHeap) -> None:
    first = shm_heap.walk()[0]
    damage(shm_heap, first.address + 8, 0x7)  # the first chunk's size word: no size at all
    proc = run_malloc("heap", "--shared", shm_heap.name, "--no-color")
    assert proc.returncode == 1
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"malloc heap: shared heap {shm_heap.name!r} is damaged: " in proc.stderr
    assert run_malloc("heap", "--shared", shm_heap.name, "--check").returncode == 1


def test_a_segment_that_is_no_heap_is_damaged_not_a_crash() -> None:
    path = Path("/dev/shm", unique("cli-not-a-heap"))
    path.write_bytes(b"\xff" * 65536)
    try:
        for args in (["--check"], ["--no-color"]):
            proc = run_malloc("heap", "--shared", path.name, *args)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "is not a shared heap (no magic number" in proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        path.unlink()


def test_a_missing_heap_or_a_bad_name_cannot_be_checked_exit_2(tmp_path: Path) -> None:
    missing = unique("cli-missing")
    proc = run_malloc("heap", "--shared", missing, "--check")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"shared heap {missing!r}: there is none (/dev/shm/{missing} does not exist)" in proc.stderr
    proc = run_malloc("heap", "--file", str(tmp_path / "none.heap"), "--check")
    assert proc.returncode == 2 and "there is none" in proc.stderr
    assert not (tmp_path / "none.heap").exists()  # --file never makes a heap
    proc = run_malloc("heap", "--shared", "a/b")
    assert proc.returncode == 2 and "invalid shared heap name 'a/b'" in proc.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--check"], "--check verifies a shared heap"),
    (["--shared", "x", "--xml"], "--xml reports this process's allocator"),
    (["--shared", "x", "--demo"], "--demo makes blocks in this process's heap"),
    (["--shared", "x", "--file", "y"], "not allowed with argument"),
    (["--shared", "x", "--check", "--html", "y"], "not allowed with argument"),
])
def test_misused_options_are_refused_with_status_2(args: list[str], says: str) -> None:
    proc = run_malloc("heap", *args)
    assert proc.returncode == 2 and says in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------------------------- malloc maps


def heap_ranges(amap: maps.AddressMap) -> list[tuple[int, int, str]]:
    return sorted({(o.start, o.end, o.label) for a in amap.areas for o in a.owned if "shared heap" in o.label})


def test_maps_marks_the_creators_mapping_and_reservation(shm_heap: SharedHeap, file_heap: SharedHeap) -> None:
    # The creator made its heap under a temporary name and mapped it again by its published name once whole.
    amap = maps.address_map("self")
    mine = amap.area_of(shm_heap.base)
    assert mine is not None and not mine.mapping.deleted and mine.mapping.perms == "rw-s"
    assert mine.mapping.pathname == f"/dev/shm/{shm_heap.name}"
    found = heap_ranges(amap)
    shm_ranges = [r for r in found if shm_heap.base <= r[0] < shm_heap.base + shm_heap.max_size]
    assert [(s - shm_heap.base, e - shm_heap.base) for s, e, _ in shm_ranges] == \
        [(0, shm_heap.size), (shm_heap.size, shm_heap.max_size)]
    assert f"shared memory {shm_heap.name!r}: 1.0 MiB in use, may grow to 256 GiB" in shm_ranges[0][2]
    assert "reserve" in shm_ranges[1][2]
    assert any(f"file {file_heap.path}:" in label for _, _, label in found)
    reserve = amap.area_of(shm_heap.base + shm_heap.size)
    assert reserve is not None and reserve.mapping.perms == "---p"


def test_maps_follows_growth(shm_heap: SharedHeap) -> None:
    big = shm_heap.malloc(3 << 20)
    try:
        assert shm_heap.size > 3 << 20
        start, end, _ = heap_ranges(maps.address_map("self"))[0]
        assert (start, end) == (shm_heap.base, shm_heap.base + shm_heap.size)
    finally:
        shm_heap.free(big)


def test_an_unlinked_heap_is_marked_when_the_kernel_lets_its_mapping_be_read(shm_heap: SharedHeap) -> None:
    shm_heap.unlink()  # attached processes keep it; only /proc/PID/map_files still leads to the file
    area = maps.address_map("self").area_of(shm_heap.base)
    assert area is not None and area.mapping.deleted
    try:
        with open(f"/proc/self/map_files/{area.start:x}-{area.end:x}", "rb"):
            pass
    except PermissionError:
        assert not area.owned  # nothing left to read the header from
        pytest.skip("the kernel opens /proc/PID/map_files only for a privileged reader")
    assert [o.label for o in area.owned] == ["malloc shared heap, unlinked: 1.0 MiB in use, may grow to 256 GiB"]


def test_a_shared_mapping_that_is_no_heap_is_not_marked() -> None:
    path = Path("/dev/shm", unique("cli-plain-shm"))
    path.write_bytes(b"pyMshare" + b"\0" * 65528)  # the magic number alone does not make a heap header
    try:
        with path.open("r+b") as f:
            m = mmap.mmap(f.fileno(), 65536)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            address = ctypes.addressof(anchor)
            del anchor
            area = maps.address_map("self").area_of(address)
            assert area is not None and area.mapping.path == str(path) and area.mapping.perms == "rw-s"
            assert not area.owned
        finally:
            m.close()
    finally:
        path.unlink()


def test_the_maps_command_marks_the_heap_of_another_process(shm_heap: SharedHeap) -> None:
    script = ("import sys, malloc\n"
              f"h = malloc.SharedHeap.attach({shm_heap.name!r})\n"
              "print(hex(h.base), flush=True)\n"
              "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=child_env())
    try:
        assert child.stdout is not None
        base = int(child.stdout.readline(), 16)
        proc = run_malloc("maps", str(child.pid), "--json")
        assert proc.returncode == 0, proc.stderr
        owned = [(int(o["start"], 16), int(o["end"], 16), o["label"]) for r in json.loads(proc.stdout)["regions"]
                 for o in r["owned"]]
        heap = [o for o in owned if base <= o[0] < base + shm_heap.max_size]
        assert [(s - base, e - base) for s, e, _ in heap] == [(0, shm_heap.size), (shm_heap.size, shm_heap.max_size)]
        assert f"shared memory {shm_heap.name!r}" in heap[0][2]
        text = run_malloc("maps", str(child.pid), "--no-color").stdout
        assert f"▸ malloc shared heap, shared memory {shm_heap.name!r}" in text
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_deleted_file_whose_directory_is_gone_is_passed_over() -> None:
    mapping = maps.Mapping(0x10000, 0x20000, "rw-s", 0, "00:00", 1, f"/{unique('no-such-dir')}/x (deleted)")
    assert shared_heap.find([mapping], os.getpid()) == []


def test_a_fifo_where_a_mapped_file_was_is_passed_over_without_blocking(tmp_path: Path) -> None:
    # A FIFO opened for reading would wait for a writer: in a child, so that a hang fails the test.
    script = ("import os, sys\n"
              "from malloc.inspect import maps, shared_heap\n"
              "path = sys.argv[1]\n"
              "os.mkfifo(path)\n"
              "st = os.stat(path)\n"
              "dev = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}'\n"
              "mapping = maps.Mapping(0x10000, 0x20000, 'rw-s', 0, dev, st.st_ino, path)\n"
              "print(shared_heap.find([mapping], os.getpid()))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fifo")], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


# ----------------------------------------------------------------------------- the example


def test_the_pool_example_runs_and_cleans_up(tmp_path: Path) -> None:
    # Its own session, so that a failure cannot leave the pool's workers behind: the group goes at the end.
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--workers", "2", "--rows", "600", "--cols", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path,
                            start_new_session=True)
    segment = Path("/dev/shm", f"shared-pool-{proc.pid}")  # the name the example gives its heap
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        leftover = segment.exists()
        segment.unlink(missing_ok=True)
    assert proc.returncode == 0, out + err
    assert out.startswith(f"shared heap {segment.name!r}: 600 x 40 float64 input, 2 workers\n"), out
    assert "results match numpy's" in out
    assert re.search(r"\d+ tasks ran in [12] worker processes", out)
    assert not leftover
