"""Heap maps: the chunks from `walk()` drawn as a strip per segment, in the terminal or as one HTML file.

A segment is a run of chunks that follow each other in memory: each heap's range, and each mapped chunk on
its own. In both drawings a chunk's width is proportional to its size, with a minimum so that the smallest
chunks stay visible, and a segment wraps onto as many rows as it needs, left to right like text.

    segs = segments(malloc.walk(), malloc.allocator.heaps)    # or segments(heap.walk(), [heap])
    print(render_terminal(segs, color=False))
    Path("heap.html").write_text(render_html(segs, title="my heap"))

A heap that keeps names for its blocks (a shared heap's `roots`) passes them as `Name`s: `render_names` lists
them for the terminal, and `render_html(..., names=...)` adds a table and marks each named chunk.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..heap import Chunk, Heap
from ..layout import HEADER, N_BINS, SMALL_LIMIT, bin_index
from ..units import size_approx


@dataclass(frozen=True)
class Style:
    """How one chunk state is drawn."""

    letter: str  # in the no-colour terminal strip; its lower case marks every other chunk
    ansi: tuple[int, int]  # 256-colour backgrounds for the terminal, alternating between neighbours
    colour: str  # fill in the HTML drawing
    meaning: str


STYLES: dict[str, Style] = {
    "in use": Style("U", (25, 32), "#4e79a7", "handed out by malloc"),
    "cached": Style("C", (208, 214), "#f28e2b", "freed, kept in the fast cache for the next request of its size"),
    "free": Style("F", (28, 71), "#59a14f", "free, in a bin (merged with any free neighbour)"),
    "top": Style("T", (245, 250), "#c9c3bd", "the top chunk: free space at the heap's end, split last"),
    "foreign": Style("X", (96, 133), "#b07aa1", "the C library's own memory inside the heap's range"),
    "mapped": Style("M", (178, 220), "#edc948", "a large block in a mapping of its own"),
}


@dataclass(frozen=True)
class Name:
    """A name a heap keeps for a block (a shared heap's `roots`), the block's address, and what it holds."""

    name: str
    block: int  # as the heap's handles are: an offset, for a shared heap
    what: str


@dataclass(frozen=True)
class Segment:
    """Chunks that are contiguous in memory, in address order, and a label saying what holds them."""

    label: str
    chunks: tuple[Chunk, ...]

    @property
    def start(self) -> int:
        return self.chunks[0].address

    @property
    def end(self) -> int:
        last = self.chunks[-1]
        return last.address + last.size

    @property
    def size(self) -> int:
        return self.end - self.start


def segments(chunks: Iterable[Chunk], heaps: Sequence[Heap] = ()) -> list[Segment]:
    """Group chunks (in address order, as `walk()` gives them) into segments.

    A chunk starts a new segment when it does not begin where the previous one ended, and every mapped chunk
    is a segment of its own. Labels name the heap (its position in `heaps` and its region's kind) when a
    heap in `heaps` holds the segment. Raises ValueError for a chunk whose state has no style.
    """
    groups: list[list[Chunk]] = []
    for c in chunks:
        if c.state not in STYLES:
            raise ValueError(f"chunk at {c.address:#x} has an unknown state {c.state!r}")
        last = groups[-1][-1] if groups else None
        if (last is not None and c.state != "mapped" and last.state != "mapped"
                and last.address + last.size == c.address):
            groups[-1].append(c)
        else:
            groups.append([c])
    return [Segment(_label(g[0], heaps), tuple(g)) for g in groups]


def _label(first: Chunk, heaps: Sequence[Heap]) -> str:
    if first.state == "mapped":
        return "mapped chunk"
    for i, heap in enumerate(heaps):
        if heap.base <= first.address < heap.end:
            return f"heap {i} ({heap.region.kind})"
    return "heap"


def totals(segs: Iterable[Segment]) -> dict[str, tuple[int, int]]:
    """Per state present, in the order of STYLES: (number of chunks, bytes)."""
    counts: dict[str, list[int]] = {}
    for seg in segs:
        for c in seg.chunks:
            entry = counts.setdefault(c.state, [0, 0])
            entry[0] += 1
            entry[1] += c.size
    return {state: (counts[state][0], counts[state][1]) for state in STYLES if state in counts}


@functools.cache
def _bin_ranges() -> tuple[tuple[int, int], ...]:
    """(smallest, largest) chunk size of every bin index; large bins' bounds are multiples of 64."""
    low = [0] * N_BINS
    high = [0] * N_BINS
    for i in range(SMALL_LIMIT >> 4):
        low[i] = high[i] = i << 4
    for size in range(SMALL_LIMIT, 524288 + 64, 64):
        i = bin_index(size)
        if not low[i]:
            low[i] = size
        high[i] = size + 48
    high[N_BINS - 1] = 0  # the last bin has no upper bound
    return tuple(zip(low, high, strict=True))


def bin_text(index: int) -> str:
    """What a bin holds, e.g. "bin 3 (48-byte chunks)" or "bin 70 (1408 to 1456 bytes)"."""
    low, high = _bin_ranges()[index]
    if low == high:
        return f"bin {index} ({low}-byte chunks)"
    if not high:
        return f"bin {index} ({low} bytes and up)"
    return f"bin {index} ({low} to {high} bytes)"


def details(c: Chunk, names: Sequence[str] = ()) -> str:
    """A chunk described for a person, one fact a line; `names` are the names its block goes by."""
    head = c.state + (f", {bin_text(c.bin)}" if c.state == "free" and c.bin >= 0 else "")
    lines = [head, f"chunk {c.address:#x}, {c.size} bytes ({size_approx(c.size)})"]
    if c.state in ("in use", "cached", "mapped"):
        lines.append(f"block {c.address + HEADER:#x}")
    if c.request >= 0:
        lines.append(f"asked for {c.request} bytes")
    lines.extend(f"named {name!r}" for name in names)
    return "\n".join(lines)


def render_names(names: Sequence[Name]) -> str:
    """The names, one a line with the block it leads to and what that holds. Names are shown as Python
    literals, so that no character a name holds can act on the terminal."""
    if not names:
        return "No names."
    width = min(40, max(len(repr(n.name)) for n in names))
    rows = [f"  {n.name!r:<{width}}  {n.block:#x}  {n.what}" for n in names]
    return f"Names ({len(names)}), each leading to a block:\n" + "\n".join(rows)


def _widths(sizes: Sequence[int], target: int, minimum: int) -> list[int]:
    """Whole widths summing to exactly `target`, none below `minimum`, the rest proportional to `sizes`.

    Chunks whose share would be under the minimum get the minimum, and the others share what is left in
    proportion to their sizes (`target` must be at least `minimum * len(sizes)`).
    """
    if minimum * len(sizes) > target:
        raise ValueError(f"{len(sizes)} widths of at least {minimum} do not fit in {target}")
    small: set[int] = set()
    while True:
        rest = sum(s for i, s in enumerate(sizes) if i not in small)
        room = target - minimum * len(small)
        grew = {i for i, s in enumerate(sizes) if i not in small and s * room < minimum * rest}
        if not grew:
            break
        small |= grew
    exact = [minimum if i in small else s * room / (rest or 1) for i, s in enumerate(sizes)]
    widths = [max(minimum, math.floor(x)) for x in exact]
    # Hand out what flooring left over to the largest remainders, so the rows fill exactly.
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - widths[i], reverse=True)
    for i in by_remainder[:max(0, target - sum(widths))]:
        widths[i] += 1
    return widths


# ----------------------------------------------------------------------------- terminal

ADDRESS_COLUMN = 17  # "  0x7f0123456780 "


def render_terminal(segs: Sequence[Segment], *, width: int = 80, color: bool = True) -> str:
    """The strips (one per segment, wrapped to `width` columns, each line led by about the address it starts at)
    and a legend of the states present. Without colour, each state is a letter, and every other chunk in a
    run is in lower case so neighbours stay apart; with colour, neighbours alternate between two shades."""
    strip = max(16, width - ADDRESS_COLUMN)
    out: list[str] = []
    for seg in segs:
        n = len(seg.chunks)
        # Twice as many cells as chunks, at least: room for proportion as well as the one-cell minimum.
        cells = _widths([c.size for c in seg.chunks], strip * max(1, math.ceil(2 * n / strip)), 1)
        out.append(f"{seg.label}  {seg.start:#x} - {seg.end:#x}  {size_approx(seg.size)} in {n} chunk"
                   f"{'s' if n != 1 else ''}, a cell is about {size_approx(max(1, seg.size // sum(cells)))}")
        line: list[str] = []
        used = 0
        line_address = seg.start
        previous = ""
        shade = 0
        for c, count in zip(seg.chunks, cells, strict=True):
            shade = 1 - shade if c.state == previous else 0
            previous = c.state
            style = STYLES[c.state]
            done = 0
            while done < count:
                if not line:
                    line_address = _inside(c, done, count)
                take = min(count - done, strip - used)
                line.append(_cells(style, shade, take, color))
                used += take
                done += take
                if used == strip:
                    out.append(_line(line_address, line, color))
                    line, used = [], 0
        if line:
            out.append(_line(line_address, line, color))
        out.append("")
    out.append(_legend(totals(segs), color))
    return "\n".join(out)


def _inside(c: Chunk, part: int, parts: int) -> int:
    """The address `part` of `parts` equal parts into chunk `c`, rounded down to 16 bytes."""
    return c.address + (c.size * part // parts) // 16 * 16


def _cells(style: Style, shade: int, count: int, color: bool) -> str:
    if color:
        return f"\x1b[48;5;{style.ansi[shade]}m" + " " * count
    return (style.letter.lower() if shade else style.letter) * count


def _line(address: int, parts: list[str], color: bool) -> str:
    return f"  {address:#014x} " + "".join(parts) + ("\x1b[0m" if color else "")


def _legend(present: dict[str, tuple[int, int]], color: bool) -> str:
    rows = []
    for state, (count, size) in present.items():
        style = STYLES[state]
        swatch = f"\x1b[48;5;{style.ansi[0]}m  \x1b[48;5;{style.ansi[1]}m  \x1b[0m" if color else (
            f"{style.letter}{style.letter.lower()}  ")
        rows.append(f"  {swatch} {state:<7} {count:>6} chunk{'s' if count != 1 else ' '} {size_approx(size):>10}  "
                    f"{style.meaning}")
    return "Legend (every chunk is at least one cell wide):\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- HTML

ROW_WIDTH = 960  # drawing units (about pixels) of chunks per row
ROW_HEIGHT = 28
ROW_GAP = 8
MIN_WIDTH = 3  # no chunk is drawn narrower
MAX_MIN_WIDTH = 14  # the minimum a segment of few chunks gets
LABEL_WIDTH = 124  # the row's start address, left of the row
SCALE = 100  # positions are laid out in integer hundredths of a unit, so rows wrap exactly

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #f7f6f3;
       margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 28px 0 8px; font-weight: 600; }
h2 .range, td.num, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
h2 .range { font-weight: 400; color: #555; font-size: 13px; margin-left: 10px; }
h2 .facts { font-weight: 400; color: #666; font-size: 13px; margin-left: 10px; }
p.note { color: #555; margin: 0 0 18px; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { padding: 5px 12px; text-align: left; border-bottom: 1px solid #eee; }
th { font-weight: 600; background: #fafafa; }
td.num { text-align: right; }
tr.total td { font-weight: 600; border-bottom: 0; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px;
          margin-right: 6px; }
section.segment { background: #fff; padding: 6px 14px 10px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
svg { display: block; width: 100%; height: auto; }
svg text { font: 11px ui-monospace, Menlo, Consolas, monospace; fill: #777; }
.chunk { stroke: #fff; stroke-width: 1; cursor: default; }
.dense .chunk { stroke-width: .5; }
.chunk.hover, .dense .chunk.hover { stroke: #111; stroke-width: 2; }
#tip { position: fixed; pointer-events: none; display: none; background: #222; color: #fff; padding: 7px 10px;
       border-radius: 5px; font: 12px/1.5 ui-monospace, Menlo, Consolas, monospace; white-space: pre;
       box-shadow: 0 2px 8px rgba(0,0,0,.3); z-index: 10; }
#tip b { color: #ffd98a; font-weight: 600; }
footer { color: #777; margin-top: 22px; font-size: 13px; }
"""

# Records any script error on the root element, so a headless browser's dumped DOM shows it.
_ERROR_HOOK = """
window.onerror = function (message, source, line) {
  var root = document.documentElement;
  root.setAttribute("data-script-errors", (root.getAttribute("data-script-errors") || "") + message +
                    " (line " + line + "); ");
};
"""

_SCRIPT = """
(function () {
  var tip = document.getElementById("tip");
  var texts = new WeakMap();
  var chunks = document.querySelectorAll(".chunk");
  // The <title> children are the tooltip without a script; with it, they would show a second tooltip.
  chunks.forEach(function (c) {
    var t = c.querySelector("title");
    texts.set(c, t.textContent);
    c.setAttribute("aria-label", t.textContent);
    t.remove();
  });
  var current = null;
  function place(e) {
    var x = e.clientX + 14, y = e.clientY + 16;
    if (x + tip.offsetWidth > window.innerWidth - 8) { x = e.clientX - tip.offsetWidth - 14; }
    if (y + tip.offsetHeight > window.innerHeight - 8) { y = e.clientY - tip.offsetHeight - 16; }
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }
  document.addEventListener("mouseover", function (e) {
    var c = e.target.closest ? e.target.closest(".chunk") : null;
    if (current && current !== c) { current.classList.remove("hover"); }
    current = c;
    if (!c) { tip.style.display = "none"; return; }
    c.classList.add("hover");
    var lines = texts.get(c).split("\\n");
    tip.textContent = "";
    var head = document.createElement("b");
    head.textContent = lines[0];
    tip.appendChild(head);
    tip.appendChild(document.createTextNode("\\n" + lines.slice(1).join("\\n")));
    tip.style.display = "block";
    place(e);
  });
  document.addEventListener("mousemove", function (e) { if (current) { place(e); } });
  document.body.setAttribute("data-chunks-drawn", String(chunks.length));
})();
"""


def render_html(segs: Sequence[Segment], title: str = "Heap map", note: str = "",
                names: Sequence[Name] = ()) -> str:
    """One self-contained HTML page (inline CSS, SVG and script; nothing fetched, no server): a table of the
    states present with their totals and colours, then a drawing per segment with one `<path class="chunk">`
    per chunk. Each carries data-address, data-size, data-state, data-bin and data-request, and a <title>;
    hovering shows the chunk's details. `note` is a line shown under the title. With `names`, a table of them
    follows the drawings, and a named chunk also carries data-names (its names, comma-separated) and shows them
    in its details."""
    present = totals(segs)
    by_chunk: dict[int, list[str]] = {}
    for n in names:
        by_chunk.setdefault(n.block - HEADER, []).append(n.name)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<script>{_ERROR_HOOK}</script>",
        f"<style>{_CSS}</style></head>",
        "<body><main>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append(_summary(present))
    for seg in segs:
        parts.append(_segment_html(seg, by_chunk))
    if names:
        parts.append(_names_html(names))
    parts.append("<footer>A chunk's width is proportional to its size, except that small chunks are drawn "
                 f"wider (at least {MIN_WIDTH} units, more when a segment has few chunks) so they stay visible; "
                 "each segment's rows read left to right, and the address left of a row is (about) where it "
                 "starts. Hover over a chunk for its details.</footer>")
    parts.append('</main><div id="tip"></div>')
    parts.append(f"<script>{_SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(present: dict[str, tuple[int, int]]) -> str:
    rows = ["<table><tr><th>state</th><th>chunks</th><th>bytes</th><th>what it is</th></tr>"]
    for state, (count, size) in present.items():
        style = STYLES[state]
        rows.append(f'<tr><td><span class="swatch" style="background:{style.colour}"></span>{state}</td>'
                    f'<td class="num">{count}</td><td class="num" title="{size} bytes">{size_approx(size)}</td>'
                    f"<td>{html.escape(style.meaning)}</td></tr>")
    count = sum(c for c, _ in present.values())
    size = sum(s for _, s in present.values())
    rows.append(f'<tr class="total"><td>total</td><td class="num">{count}</td>'
                f'<td class="num" title="{size} bytes">{size_approx(size)}</td><td></td></tr></table>')
    return "\n".join(rows)


def _names_html(names: Sequence[Name]) -> str:
    rows = [f"<h2>names<span class=\"facts\">{len(names)}</span></h2>",
            "<table><tr><th>name</th><th>block</th><th>what it holds</th></tr>"]
    rows.extend(f'<tr class="name"><td class="mono">{html.escape(n.name)}</td><td class="num">{n.block:#x}</td>'
                f"<td>{html.escape(n.what)}</td></tr>" for n in names)
    rows.append("</table>")
    return "\n".join(rows)


def _number(hundredths: int) -> str:
    return f"{hundredths / SCALE:.2f}".rstrip("0").rstrip(".")


def _segment_html(seg: Segment, names: dict[int, list[str]]) -> str:
    n = len(seg.chunks)
    rows = max(1, math.ceil(n * MIN_WIDTH * 3 / ROW_WIDTH))  # room for proportion beside the minimum widths
    # Few chunks can afford wider minimums: up to MAX_MIN_WIDTH, at most a third of the room.
    minimum = max(MIN_WIDTH * SCALE, min(MAX_MIN_WIDTH * SCALE, ROW_WIDTH * SCALE * rows // (3 * n)))
    widths = _widths([c.size for c in seg.chunks], ROW_WIDTH * SCALE * rows, minimum)
    row_width = ROW_WIDTH * SCALE
    pitch = ROW_HEIGHT + ROW_GAP
    paths: list[str] = []
    row_starts: dict[int, int] = {}  # row -> the address where it starts
    position = 0
    for c, w in zip(seg.chunks, widths, strict=True):
        d = []
        start, end = position, position + w
        while start < end:
            row = start // row_width
            row_starts.setdefault(row, _inside(c, start - position, w))
            stop = min(end, (row + 1) * row_width)
            x = LABEL_WIDTH * SCALE + start - row * row_width
            d.append(f"M{_number(x)} {row * pitch}h{_number(stop - start)}v{ROW_HEIGHT}h-{_number(stop - start)}z")
            start = stop
        position = end
        named = names.get(c.address, ())
        marked = f' data-names="{html.escape(", ".join(named))}"' if named else ""
        paths.append(
            f'<path class="chunk" d="{"".join(d)}" fill="{STYLES[c.state].colour}" data-address="{c.address:#x}" '
            f'data-size="{c.size}" data-state="{c.state}" data-bin="{c.bin}" data-request="{c.request}"{marked}>'
            f"<title>{html.escape(details(c, named))}</title></path>")
    n_rows = rows
    labels = [f'<text x="0" y="{row * pitch + ROW_HEIGHT // 2 + 4}">{address:#x}</text>'
              for row, address in sorted(row_starts.items())]
    width = LABEL_WIDTH + ROW_WIDTH
    height = n_rows * pitch - ROW_GAP
    density = "dense" if minimum == MIN_WIDTH * SCALE else "sparse"  # dense: thinner gaps between chunks
    return (f'<h2>{html.escape(seg.label)}<span class="range">{seg.start:#x} - {seg.end:#x}</span>'
            f'<span class="facts">{size_approx(seg.size)}, {n} chunk{"s" if n != 1 else ""}</span></h2>\n'
            f'<section class="segment"><svg class="{density}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(seg.label)}">\n'
            + "\n".join(labels + paths) + "\n</svg></section>")
