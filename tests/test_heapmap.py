"""The heap inspector's reports and pictures: malloc_info's XML, the terminal strip, the HTML heap map (also
opened in a real headless chromium), and the `malloc heap` command."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from procfs import child_env

import malloc
from malloc import Options, ProcessAllocator
from malloc.inspect import heapmap
from malloc.inspect.malloc_info import malloc_info

# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def small_heap() -> Iterator[malloc.Heap]:
    """A heap over a 64 KiB buffer holding in-use blocks, two free chunks (in different bins) and the top."""
    buf = bytearray(64 << 10)
    heap = malloc.Heap(malloc.BufferRegion(buf))
    blocks = [heap.malloc(n) for n in (24, 100, 40, 2000, 300, 24, 5000, 64)]
    heap.free(blocks[1])
    heap.free(blocks[3])
    heap.free(blocks[6])
    yield heap
    heap.check()
    del heap, buf


@pytest.fixture
def allocator() -> Iterator[tuple[ProcessAllocator, list[int]]]:
    """A process allocator (of its own) with blocks of every kind: in use, cached, free in bins, mapped."""
    a = ProcessAllocator(Options())
    a.remember_requests()
    blocks = [a.malloc(n) for n in (24, 100, 1500, 40, 3000, 24, 600, 64, 5000, 100)]
    blocks.append(a.malloc(300 << 10))
    for i in (1, 2, 4, 8):
        a.free(blocks[i])
    live = [p for i, p in enumerate(blocks) if i not in (1, 2, 4, 8)]
    yield a, live
    for p in live:
        a.free(p)
    a.check()
    a.trim()


class ChunkElements(HTMLParser):
    """Collects the attributes of every element whose class is "chunk", and of the root and body."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[dict[str, str]] = []
        self.roots: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if "chunk" in values.get("class", "").split():
            self.chunks.append(values)
        if tag in ("html", "body"):
            self.roots[tag] = values


def chunk_elements(page: str) -> ChunkElements:
    parser = ChunkElements()
    parser.feed(page)
    return parser


def expected_attributes(chunks: list[malloc.Chunk]) -> list[tuple[str, str, str, str, str]]:
    return [(f"{c.address:#x}", str(c.size), c.state, str(c.bin), str(c.request)) for c in chunks]


def found_attributes(elements: list[dict[str, str]]) -> list[tuple[str, str, str, str, str]]:
    return [(e["data-address"], e["data-size"], e["data-state"], e["data-bin"], e["data-request"]) for e in elements]


def strip_cells(text: str) -> str:
    """The strip's cells, every line joined (the address column removed)."""
    return "".join(m.group(1) for m in re.finditer(r"^  0x[0-9a-f]+ (\S+)$", text, re.M))


# ----------------------------------------------------------------------------- malloc_info


def test_malloc_info_parses_and_its_totals_agree_with_mallinfo(allocator: tuple[ProcessAllocator, list[int]]) -> None:
    a, _ = allocator
    root = ET.fromstring(malloc_info(a))
    info = a.mallinfo()
    assert root.tag == "malloc" and root.get("version") == "1"

    def total(parent: ET.Element, kind: str) -> tuple[int, int]:
        (element,) = parent.findall(f"total[@type='{kind}']")
        return int(element.get("count", "")), int(element.get("size", ""))

    def system(parent: ET.Element, kind: str) -> int:
        (element,) = parent.findall(f"system[@type='{kind}']")
        return int(element.get("size", ""))

    assert total(root, "fast") == (info.smblks, info.fsmblks) and info.smblks == 1
    assert total(root, "rest") == (info.ordblks, info.fordblks)
    assert total(root, "mmap") == (info.hblks, info.hblkhd) == (1, sum(a.mapped_chunks().values()))
    assert (system(root, "current"), system(root, "max")) == (info.system_current, info.system_max)
    heaps = root.findall("heap")
    assert [h.get("nr") for h in heaps] == [str(i) for i in range(len(a.heaps))]
    assert sum(system(h, "current") for h in heaps) == info.arena
    # Each heap's <sizes> lists its free and cached chunks; with its top they make up the heap's totals.
    chunks = list(a.walk())
    for element, heap in zip(heaps, a.heaps, strict=True):
        inside = [c for c in chunks if heap.base <= c.address < heap.end]
        entries = element.findall("sizes/size")
        assert sum(int(e.get("count", "")) for e in entries) == sum(c.state in ("free", "cached") for c in inside)
        listed = sum(int(e.get("total", "")) for e in entries)
        top = sum(c.size for c in inside if c.state == "top")
        assert listed + top == total(element, "fast")[1] + total(element, "rest")[1]
        for e in entries:
            assert int(e.get("from", "")) <= int(e.get("to", "")) and int(e.get("count", "")) >= 1


def test_malloc_info_of_the_process_is_the_default() -> None:
    p = malloc.malloc(200)
    try:
        root = ET.fromstring(malloc_info())
        assert int(root.findall("system[@type='current']")[0].get("size", "")) == malloc.mallinfo().system_current
        assert malloc.malloc_info() == malloc_info()  # the package-level function reports the same allocator
    finally:
        malloc.free(p)


def test_malloc_info_refuses_what_is_not_an_allocator() -> None:
    with pytest.raises(TypeError, match="ProcessAllocator"):
        malloc_info("heap")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- segments and the terminal strip


def test_segments_split_heaps_and_mapped_chunks(allocator: tuple[ProcessAllocator, list[int]]) -> None:
    a, _ = allocator
    chunks = list(a.walk())
    segs = heapmap.segments(chunks, a.heaps)
    assert [c for s in segs for c in s.chunks] == chunks
    mapped = [s for s in segs if s.label == "mapped chunk"]
    assert len(mapped) == 1 and len(mapped[0].chunks) == 1 and mapped[0].chunks[0].state == "mapped"
    for s in segs:
        assert all(x.address + x.size == y.address for x, y in zip(s.chunks, s.chunks[1:], strict=False))
    assert segs[0].label == f"heap 0 ({a.heaps[0].region.kind})"


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown state 'lost'"):
        heapmap.segments([malloc.Chunk(0x1000, 32, "lost", -1)])


def test_terminal_strip_without_colour_has_one_letter_run_per_chunk(small_heap: malloc.Heap) -> None:
    chunks = list(small_heap.walk())
    text = heapmap.render_terminal(heapmap.segments(chunks, [small_heap]), width=60, color=False)
    cells = strip_cells(text)
    runs = [m.group(0) for m in re.finditer(r"(.)\1*", cells)]
    letters = {style.letter: state for state, style in heapmap.STYLES.items()}
    assert [letters[r[0].upper()] for r in runs] == [c.state for c in chunks]
    assert all(len(line) <= 60 for line in text.splitlines() if line.startswith("  0x"))
    legend = text[text.index("Legend"):]
    present = {c.state for c in chunks}
    assert present == {"in use", "free", "top"}
    for state in heapmap.STYLES:
        count = sum(c.state == state for c in chunks)
        shown = re.search(rf"^  \S+\s+{state}\s+(\d+) chunk", legend, re.M)
        assert (int(shown.group(1)) if shown else 0) == count


def test_terminal_strip_with_colour_uses_each_present_states_colours(small_heap: malloc.Heap) -> None:
    chunks = list(small_heap.walk())
    text = heapmap.render_terminal(heapmap.segments(chunks, [small_heap]), width=80, color=True)
    for state, style in heapmap.STYLES.items():
        assert (f"\x1b[48;5;{style.ansi[0]}m" in text) == (state in {c.state for c in chunks})
    strip_lines = [line for line in text.splitlines() if line.startswith("  0x")]
    assert strip_lines and all(line.endswith("\x1b[0m") for line in strip_lines)
    # Two free chunks with in-use chunks between them: every colour change is a chunk boundary.
    changes = len(re.findall(r"\x1b\[48;5;\d+m", "".join(strip_lines)))
    assert changes == len(chunks)


def test_widths_fill_the_rows_exactly_and_keep_the_minimum() -> None:
    sizes = [32] * 500 + [1 << 20, 4096, 48]
    widths = heapmap._widths(sizes, 96000 * 3, 300)
    assert sum(widths) == 96000 * 3 and min(widths) == 300
    assert widths[500] > widths[501] > widths[502] == 300
    with pytest.raises(ValueError, match="do not fit"):
        heapmap._widths([1, 2, 3], 5, 2)


# ----------------------------------------------------------------------------- HTML


def test_html_has_one_chunk_element_per_chunk_with_its_facts(small_heap: malloc.Heap) -> None:
    chunks = list(small_heap.walk())
    page = heapmap.render_html(heapmap.segments(chunks, [small_heap]), title="small <heap>")
    found = chunk_elements(page)
    assert found_attributes(found.chunks) == expected_attributes(chunks)
    assert "<title>small &lt;heap&gt;</title>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing fetched from anywhere
    for state in {c.state for c in chunks}:
        assert heapmap.STYLES[state].colour in page


def test_html_of_thousands_of_chunks_wraps_inside_the_rows() -> None:
    buf = bytearray(4 << 20)
    heap = malloc.Heap(malloc.BufferRegion(buf))
    blocks = [heap.malloc(16 + (i * 37) % 1000) for i in range(3000)]
    for p in blocks[::3]:
        heap.free(p)
    chunks = list(heap.walk())
    page = heapmap.render_html(heapmap.segments(chunks, [heap]))
    found = chunk_elements(page)
    assert found_attributes(found.chunks) == expected_attributes(chunks) and len(chunks) > 3000
    right = heapmap.LABEL_WIDTH + heapmap.ROW_WIDTH
    for element in found.chunks:
        pieces = [(float(x), float(w)) for x, w in re.findall(r"M([\d.]+) \d+h([\d.]+)", element["d"])]
        assert sum(w for _, w in pieces) >= heapmap.MIN_WIDTH  # a chunk wrapped over rows is in several pieces
        assert all(x >= heapmap.LABEL_WIDTH and x + w <= right + 1e-9 for x, w in pieces)
    heap.check()
    del heap, buf


# ----------------------------------------------------------------------------- a real browser


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing, and CI needs the browser test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def dump_dom(page: str) -> str:
    """Open `page` from a file in headless chromium and return the DOM after its scripts ran."""
    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="heapmap-") as tmp:
        html_file = Path(tmp, "heap.html")
        html_file.write_text(page, encoding="utf-8")
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp}/profile", "--dump-dom", html_file.as_uri()]
        # Its own session, so that the browser's helper processes go with it, by its group id.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0 or "</html>" not in out:
        raise AssertionError(f"chromium exited with {proc.returncode}:\n{err[-3000:]}")
    return out


# Run after the page's own script: hover the third chunk, note what the tooltip shows.
HOVER = """<script>
var target = document.querySelectorAll(".chunk")[2];
target.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: 40, clientY: 40}));
var tip = document.getElementById("tip");
document.body.setAttribute("data-tip", tip.textContent);
document.body.setAttribute("data-tip-shown", tip.style.display);
document.body.setAttribute("data-hovered", target.getAttribute("class"));
</script>
</body>"""


def test_html_in_a_headless_browser_shows_every_chunk_without_script_errors(small_heap: malloc.Heap) -> None:
    chunks = list(small_heap.walk())
    page = heapmap.render_html(heapmap.segments(chunks, [small_heap]), title="small heap")
    dom = chunk_elements(dump_dom(page.replace("</body>", HOVER)))
    assert "data-script-errors" not in dom.roots["html"]
    body = dom.roots["body"]
    assert body["data-chunks-drawn"] == str(len(chunks))
    assert found_attributes(dom.chunks) == expected_attributes(chunks)
    # Hover: the tooltip is shown with the third chunk's details, and that chunk is highlighted.
    assert body["data-tip-shown"] == "block"
    assert body["data-tip"].startswith(chunks[2].state) and f"chunk {chunks[2].address:#x}" in body["data-tip"]
    assert body["data-hovered"] == "chunk hover"


def test_the_browser_test_sees_script_errors(small_heap: malloc.Heap) -> None:
    page = heapmap.render_html(heapmap.segments(small_heap.walk(), [small_heap]))
    dom = chunk_elements(dump_dom(page.replace("</body>", "<script>no_such_function();</script></body>")))
    assert "no_such_function" in dom.roots["html"]["data-script-errors"]


# ----------------------------------------------------------------------------- the command


def run_heap_command(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "malloc", "heap", *args], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_heap_command_draws_the_demonstration_heap_with_every_state() -> None:
    out = run_heap_command("--no-color")
    assert "demonstration heap" in out
    legend = out[out.index("Legend"):]
    for state in ("in use", "cached", "free", "top", "mapped"):
        assert re.search(rf"^  \S+\s+{state}\s+\d+ chunk", legend, re.M), state
    assert "\x1b[" not in out
    assert re.search(r"^mapped chunk  0x[0-9a-f]+ - 0x[0-9a-f]+", out, re.M)


def test_heap_command_writes_html_and_xml() -> None:
    with tempfile.TemporaryDirectory(prefix="heapmap-") as tmp:
        target = Path(tmp, "map.html")
        out = run_heap_command("--html", str(target))
        wrote = re.search(r"(\d+) chunks", out)
        assert wrote, out
        drawn = int(wrote.group(1))
        elements = chunk_elements(target.read_text(encoding="utf-8")).chunks
        assert len(elements) == drawn and {e["data-state"] for e in elements} >= {"in use", "cached", "free",
                                                                                   "top", "mapped"}
        assert any(int(e["data-request"]) > 0 for e in elements)
    root = ET.fromstring(run_heap_command("--xml"))
    assert root.tag == "malloc" and root.findall("total[@type='mmap']")[0].get("count") == "1"
