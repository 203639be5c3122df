"""The timeline page: one self-contained HTML file stepping through a trace's operations, heaps side by side.

`render_page` takes the recordings of `malloc.traces.timeline` (one per allocator) and writes them into the
page as data; the page's script rebuilds the chunk list of any step from the keyframe before it and the
splices after it, and draws it by the heap map's rules (`malloc.inspect.heapmap`: its states, colours, sizes
and layout, handed to the script as constants, so that a step is drawn as `malloc heap --html` would draw
the same chunks). Steps are numbered from 1, as operations are in the page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..layout import N_BINS
from ..traces.formats import ALLOC, REALLOC, Trace
from ..traces.replay import Json
from ..traces.timeline import STATES
from . import heapmap

CHART_POINTS = 1000  # samples per line in the chart: the maximum over each stretch of operations


@dataclass(frozen=True)
class Side:
    """One allocator's column: its name, a line saying what its walk shows, and its recording."""

    name: str
    note: str
    recording: Json


def op_links(trace: Trace) -> tuple[list[int], list[int]]:
    """(made_by, ended_by) per operation: for a free or realloc, the operation that made the block it takes
    (-1 if none); for a malloc or realloc, the operation that frees or reallocs the block it made (-1 if
    none does)."""
    n = trace.num_ops
    made_by = [-1] * n
    ended_by = [-1] * n
    holder: dict[int, int] = {}
    for k, (code, i, size) in enumerate(trace.ops):
        if code != ALLOC:
            j = holder.pop(i, -1)
            made_by[k] = j
            if j >= 0:
                ended_by[j] = k
        if code == ALLOC or (code == REALLOC and size):
            holder[i] = k
    return made_by, ended_by


def _chart(series: Sequence[int], points: int) -> list[int]:
    """At most `points` samples of `series`: the maximum of each equal stretch."""
    n = len(series)
    if n <= points:
        return list(series)
    return [max(series[n * b // points:max(n * (b + 1) // points, n * b // points + 1)]) for b in range(points)]


def page_data(trace: Trace, live: Sequence[int], sides: Sequence[Side]) -> Json:
    """Everything the page's script reads."""
    made_by, ended_by = op_links(trace)
    growth: set[int] = set()
    calls: set[int] = set()
    for side in sides:
        footprint = side.recording["footprint"]
        growth.update(k for k in range(len(footprint)) if footprint[k] > (footprint[k - 1] if k else 0))
        calls.update(k for k, _ in side.recording["calls"])
    return {
        "trace": trace.name,
        "code": [op[0] for op in trace.ops], "id": [op[1] for op in trace.ops], "size": [op[2] for op in trace.ops],
        "madeBy": made_by, "endedBy": ended_by, "live": list(live),
        "growth": sorted(growth), "callSteps": sorted(calls),
        "chart": {"live": _chart(live, CHART_POINTS),
                  "sides": [_chart(s.recording["footprint"], CHART_POINTS) for s in sides]},
        "sides": [{"name": s.name, "note": s.note, **s.recording} for s in sides],
        "states": list(STATES),
        "styles": {state: {"colour": st.colour, "meaning": st.meaning} for state, st in heapmap.STYLES.items()},
        "binText": [heapmap.bin_text(i) for i in range(N_BINS)],
        "layout": {"ROW_WIDTH": heapmap.ROW_WIDTH, "ROW_HEIGHT": heapmap.ROW_HEIGHT, "ROW_GAP": heapmap.ROW_GAP,
                   "MIN_WIDTH": heapmap.MIN_WIDTH, "MAX_MIN_WIDTH": heapmap.MAX_MIN_WIDTH,
                   "LABEL_WIDTH": heapmap.LABEL_WIDTH, "SCALE": heapmap.SCALE},
    }


_CSS = """
main { max-width: 1500px; }
#controls { position: sticky; top: 0; z-index: 5; background: #f7f6f3; padding: 8px 0 6px;
            display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
#controls button { font: inherit; padding: 3px 9px; }
#controls input[type=range] { flex: 1 1 300px; }
#controls input[type=number] { width: 7em; font: inherit; }
#opline { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 4px 0 8px; }
#readout { color: #555; font-size: 13px; }
#chart { background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); height: 120px; }
#chart polyline { fill: none; vector-effect: non-scaling-stroke; }
#chart .cursor { stroke: #d62728; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.keys { color: #666; font-size: 12px; }
#sides { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 18px; }
.side h2 { margin-top: 14px; }
.side h3 { font-size: 13px; margin: 10px 0 4px; font-weight: 600; }
.side h3 .range { font-family: ui-monospace, Menlo, Consolas, monospace; font-weight: 400; color: #555; }
.side .note { color: #555; font-size: 13px; margin: 0 0 6px; }
.calls, .lists { font: 12px/1.5 ui-monospace, Menlo, Consolas, monospace; background: #fff; padding: 6px 10px;
                 box-shadow: 0 1px 2px rgba(0,0,0,.08); max-height: 190px; overflow: auto; white-space: pre-wrap; }
.calls .reason { color: #666; }
.chunk { cursor: pointer; }
.chunk.changed { stroke: #111; stroke-dasharray: 3 2; stroke-width: 1.5; }
.chunk.current, .dense .chunk.current { stroke: #d62728; stroke-width: 3; stroke-dasharray: none; }
.chunk.picked, .dense .chunk.picked { stroke: #000; stroke-width: 3; }
#detail { position: fixed; right: 16px; bottom: 16px; max-width: 460px; background: #222; color: #fff;
          padding: 10px 14px; border-radius: 6px; font: 12px/1.55 ui-monospace, Menlo, Consolas, monospace;
          white-space: pre-wrap; display: none; box-shadow: 0 2px 8px rgba(0,0,0,.3); z-index: 10; }
#detail b { color: #ffd98a; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var L = D.layout, S = L.SCALE, N = D.code.length;
  var OPS = ["malloc", "realloc", "free"];
  var FREE = D.states.indexOf("free"), MAPPED = D.states.indexOf("mapped"), CACHED = D.states.indexOf("cached");
  function hex(a) { return "0x" + a.toString(16); }
  function approx(n) {
    var units = [[1152921504606846976, "EiB"], [1125899906842624, "PiB"], [1099511627776, "TiB"],
                 [1073741824, "GiB"], [1048576, "MiB"], [1024, "KiB"]];
    for (var i = 0; i < units.length; i++) {
      if (n >= units[i][0]) {
        var v = n / units[i][0];
        return (v >= 100 || v === Math.floor(v) ? v.toFixed(0) : v.toFixed(1)) + " " + units[i][1];
      }
    }
    return n + " B";
  }
  function esc(t) { return String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
                                    .replace(/"/g, "&quot;"); }
  function opText(k) {
    var c = D.code[k], id = D.id[k], n = D.size[k];
    if (c === 2) { return id < 0 ? "free(NULL)" : "free(id " + id + ")"; }
    if (c === 1) { return "id " + id + " = realloc(id " + id + ", " + n + ")"; }
    return "id " + id + " = malloc(" + n + ")";
  }
  function lowerBound(list, x) {  // the first index whose value is >= x
    var lo = 0, hi = list.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (list[mid] < x) { lo = mid + 1; } else { hi = mid; } }
    return lo;
  }

  // ------------------------------------------------------------------ the chunk lists of a step
  function rowsOf(flat) {
    var rows = new Array(flat.length / 4);
    for (var i = 0; i < rows.length; i++) {
      rows[i] = [flat[4 * i], flat[4 * i + 1], flat[4 * i + 2], flat[4 * i + 3]];
    }
    return rows;
  }
  function applySplice(rows, s) {
    var inserted = rowsOf(s.slice(2));
    if (inserted.length < 1000) {
      Array.prototype.splice.apply(rows, [s[0], s[1]].concat(inserted));
      return rows;
    }
    return rows.slice(0, s[0]).concat(inserted, rows.slice(s[0] + s[1]));
  }
  D.sides.forEach(function (side) {
    side.keySteps = side.keys.map(function (key) { return key[0]; });
    side.callSteps = side.calls.map(function (c) { return c[0]; });
    side.step = -1;
    side.rows = [];
  });
  function moveTo(side, k) {  // side.rows := the chunks after operation k (0-based)
    var key = lowerBound(side.keySteps, k + 1) - 1;
    var first = side.keySteps[key];
    if (!(side.step >= first && side.step <= k)) {
      side.rows = rowsOf(side.keys[key][1]);
      side.step = first;
    }
    for (var s = side.step + 1; s <= k; s++) { side.rows = applySplice(side.rows, side.splices[s]); }
    side.step = k;
  }
  function chunksOf(rows) {
    var out = new Array(rows.length), end = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i], address = end + r[0], free = r[2] === FREE;
      out[i] = {address: address, size: r[1], state: D.states[r[2]], code: r[2], bin: free ? r[3] : -1,
                request: free ? -1 : r[3], index: i};
      end = address + r[1];
    }
    return out;
  }

  // ------------------------------------------------------------------ the heap map's drawing rules
  function widths(sizes, target, minimum) {
    var n = sizes.length, small = new Uint8Array(n), rest = 0, room = 0, i;
    if (minimum * n > target) { throw new Error(n + " widths of at least " + minimum + " do not fit in " + target); }
    for (;;) {
      rest = 0;
      var smallCount = 0, grew = [];
      for (i = 0; i < n; i++) { if (small[i]) { smallCount++; } else { rest += sizes[i]; } }
      room = target - minimum * smallCount;
      for (i = 0; i < n; i++) { if (!small[i] && sizes[i] * room < minimum * rest) { grew.push(i); } }
      if (!grew.length) { break; }
      grew.forEach(function (j) { small[j] = 1; });
    }
    var exact = new Array(n), w = new Array(n), sum = 0;
    for (i = 0; i < n; i++) {
      exact[i] = small[i] ? minimum : sizes[i] * room / (rest || 1);
      w[i] = Math.max(minimum, Math.floor(exact[i]));
      sum += w[i];
    }
    var order = [];
    for (i = 0; i < n; i++) { order.push(i); }
    order.sort(function (a, b) { return (exact[b] - w[b]) - (exact[a] - w[a]); });
    for (i = 0; i < Math.max(0, target - sum) && i < n; i++) { w[order[i]] += 1; }
    return w;
  }
  function num(h) {  // hundredths of a unit, as heapmap._number writes them
    var whole = Math.floor(h / S), part = h - whole * S;
    if (!part) { return String(whole); }
    var t = (part < 10 ? "0" : "") + part;
    return whole + "." + t.replace(/0+$/, "");
  }
  function inside(c, part, parts) {
    return c.address + Math.floor(Math.floor(c.size * part / parts) / 16) * 16;
  }
  function segmentsOf(chunks) {
    var groups = [];
    chunks.forEach(function (c) {
      var g = groups.length ? groups[groups.length - 1] : null, last = g ? g[g.length - 1] : null;
      if (last && c.state !== "mapped" && last.state !== "mapped" && last.address + last.size === c.address) {
        g.push(c);
      } else {
        groups.push([c]);
      }
    });
    return groups;
  }
  function segmentSvg(seg, marks) {
    var n = seg.length, RW = L.ROW_WIDTH * S, pitch = L.ROW_HEIGHT + L.ROW_GAP;
    var rows = Math.max(1, Math.ceil(n * L.MIN_WIDTH * 3 / L.ROW_WIDTH));
    var minimum = Math.max(L.MIN_WIDTH * S, Math.min(L.MAX_MIN_WIDTH * S, Math.floor(RW * rows / (3 * n))));
    var w = widths(seg.map(function (c) { return c.size; }), RW * rows, minimum);
    var paths = [], rowStarts = {}, position = 0;
    for (var i = 0; i < n; i++) {
      var c = seg[i], d = "", start = position, end = position + w[i];
      while (start < end) {
        var row = Math.floor(start / RW);
        if (!(row in rowStarts)) { rowStarts[row] = inside(c, start - position, w[i]); }
        var stop = Math.min(end, (row + 1) * RW), x = L.LABEL_WIDTH * S + start - row * RW;
        d += "M" + num(x) + " " + row * pitch + "h" + num(stop - start) + "v" + L.ROW_HEIGHT + "h-" +
             num(stop - start) + "z";
        start = stop;
      }
      position = end;
      var cls = "chunk" + (marks[c.index] || "");
      paths.push('<path class="' + cls + '" d="' + d + '" fill="' + D.styles[c.state].colour +
                 '" data-i="' + c.index + '" data-address="' + hex(c.address) + '" data-size="' + c.size +
                 '" data-state="' + c.state + '" data-bin="' + c.bin + '" data-request="' + c.request + '"></path>');
    }
    var labels = Object.keys(rowStarts).map(function (row) {
      return '<text x="0" y="' + (row * pitch + (L.ROW_HEIGHT >> 1) + 4) + '">' + hex(rowStarts[row]) + "</text>";
    });
    var width = L.LABEL_WIDTH + L.ROW_WIDTH, height = rows * pitch - L.ROW_GAP;
    var density = minimum === L.MIN_WIDTH * S ? "dense" : "sparse";
    return '<svg class="' + density + '" viewBox="0 0 ' + width + " " + height + '" width="' + width +
           '" height="' + height + '">' + labels.concat(paths).join("") + "</svg>";
  }

  // ------------------------------------------------------------------ one side at one step
  function labelOf(side, first) {
    if (first.state === "mapped") { return "mapped chunk"; }
    if (side.heaps) {
      var best = null;
      side.heaps.forEach(function (h) { if (h[0] <= first.address) { best = h[1]; } });
      if (best) { return best; }
    }
    return side.start !== undefined ? "glibc's main heap, from the replay's first chunk" : "heap";
  }
  function binName(side, c) {
    return side.heaps ? D.binText[c.bin] : "bin " + c.bin + " (by its size)";
  }
  function lists(side, chunks) {
    var cache = {}, bins = {}, top = null, out = [];
    chunks.forEach(function (c) {
      if (c.state === "cached") { (cache[c.size] = cache[c.size] || []).push(hex(c.address)); }
      else if (c.state === "free") { (bins[c.bin] = bins[c.bin] || []).push(hex(c.address) + " (" + c.size + ")"); }
      else if (c.state === "top") { top = c; }
    });
    if (side.heaps) {
      out.push("fast cache:" + (Object.keys(cache).length ? "" : " empty"));
      Object.keys(cache).map(Number).sort(function (a, b) { return a - b; }).forEach(function (size) {
        out.push("  " + size + " bytes: " + cache[size].join(", "));
      });
    } else {
      out.push("tcache and fastbins: not seen by a header walk (their chunks read as in use)");
    }
    out.push("bins:" + (Object.keys(bins).length ? "" : " empty"));
    Object.keys(bins).map(Number).sort(function (a, b) { return a - b; }).forEach(function (b) {
      out.push("  " + binName(side, {bin: b}) + ": " + bins[b].join(", "));
    });
    if (top) { out.push("top: " + hex(top.address) + ", " + approx(top.size)); }
    return out.join("\n");
  }
  function callsOf(side, k) {
    var i = lowerBound(side.callSteps, k);
    return i < side.calls.length && side.calls[i][0] === k ? side.calls[i][1] : [];
  }
  function drawSide(side, el, k) {
    var chunks = chunksOf(side.rows), marks = {}, s = side.splices[k];
    for (var i = s[0]; i < s[0] + (s.length - 2) / 4; i++) { marks[i] = " changed"; }
    var block = side.addr[k];
    if (block) {
      chunks.forEach(function (c) {
        if (c.address <= block - 16 && block - 16 < c.address + c.size && c.state !== "top") {
          marks[c.index] = " current";
        }
      });
    }
    if (side.picked !== undefined && side.picked < chunks.length) {
      marks[side.picked] = (marks[side.picked] || "") + " picked";
    }
    var calls = callsOf(side, k);
    el.querySelector(".calls").innerHTML = calls.length ? calls.map(function (c) {
      return esc(c[0]) + '\n  <span class="reason">' + esc(c[1]) + "</span>";
    }).join("\n") : "no system call in this operation";
    var html = segmentsOf(chunks).map(function (seg) {
      var first = seg[0], last = seg[seg.length - 1], size = last.address + last.size - first.address;
      return "<h3>" + esc(labelOf(side, first)) + ' <span class="range">' + hex(first.address) + " - " +
             hex(last.address + last.size) + "</span> " + approx(size) + ", " + seg.length + " chunk" +
             (seg.length === 1 ? "" : "s") + '</h3><section class="segment">' + segmentSvg(seg, marks) + "</section>";
    }).join("");
    el.querySelector(".heap").innerHTML = html;
    el.querySelector(".lists").textContent = lists(side, chunks);
    side.chunks = chunks;
    el.querySelector(".footprint").textContent = approx(side.footprint[k]) + " held from the OS";
  }

  // ------------------------------------------------------------------ stepping
  var slider = document.getElementById("slider"), jump = document.getElementById("jump");
  var sideEls = document.querySelectorAll(".side");
  var current = 0;
  function go(k) {  // to operation k (0-based)
    k = Math.max(0, Math.min(N - 1, k));
    current = k;
    D.sides.forEach(function (side, i) { moveTo(side, k); drawSide(side, sideEls[i], k); });
    slider.value = String(k + 1);
    jump.value = String(k + 1);
    var made = D.madeBy[k], line = "operation " + (k + 1).toLocaleString("en") + " of " + N.toLocaleString("en") +
                                   ": " + opText(k);
    if (made >= 0) { line += "   (the block made by operation " + (made + 1) + ")"; }
    document.getElementById("opline").textContent = line;
    var readout = "live " + approx(D.live[k]);
    D.sides.forEach(function (side) { readout += " · " + side.name + " footprint " + approx(side.footprint[k]); });
    document.getElementById("readout").textContent = readout;
    var x = N > 1 ? 1000 * k / (N - 1) : 0;
    var cursor = document.getElementById("cursor");
    cursor.setAttribute("x1", String(x));
    cursor.setAttribute("x2", String(x));
    document.body.setAttribute("data-step", String(k + 1));
  }
  function nextIn(list, k, forward) {
    if (forward) { var i = lowerBound(list, k + 1); return i < list.length ? list[i] : k; }
    var j = lowerBound(list, k) - 1;
    return j >= 0 ? list[j] : k;
  }
  var actions = {
    prev: function () { go(current - 1); }, next: function () { go(current + 1); },
    call: function () { go(nextIn(D.callSteps, current, true)); },
    prevcall: function () { go(nextIn(D.callSteps, current, false)); },
    grow: function () { go(nextIn(D.growth, current, true)); },
    prevgrow: function () { go(nextIn(D.growth, current, false)); },
    first: function () { go(0); }, last: function () { go(N - 1); },
    back100: function () { go(current - 100); }, on100: function () { go(current + 100); }
  };
  document.querySelectorAll("#controls button[data-act]").forEach(function (b) {
    b.addEventListener("click", function () { actions[b.getAttribute("data-act")](); });
  });
  slider.addEventListener("input", function () { go(Number(slider.value) - 1); });
  jump.addEventListener("change", function () { go(Number(jump.value) - 1); });
  var KEYS = {ArrowRight: "next", ArrowLeft: "prev", n: "next", p: "prev", s: "call", S: "prevcall",
              g: "grow", G: "prevgrow", Home: "first", End: "last", PageDown: "on100", PageUp: "back100"};
  document.addEventListener("keydown", function (e) {
    if (e.target === jump || e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.key === "j") { jump.focus(); jump.select(); e.preventDefault(); return; }
    var act = KEYS[e.key];
    if (act) { actions[act](); e.preventDefault(); }
  });

  // ------------------------------------------------------------------ clicking a chunk
  function makes(j) { return D.code[j] === 0 || D.code[j] === 1 && D.size[j] > 0; }
  function holder(addr, block, k) {  // the operation at or before k that made the block at `block`, if still held
    for (var j = k; j >= 0; j--) {
      if (makes(j) && addr[j] === block) { return (D.endedBy[j] < 0 || D.endedBy[j] > k) ? j : -1; }
    }
    return -1;
  }
  function freer(addr, block, k) {  // the last operation at or before k that freed (or moved) the block
    for (var j = k; j >= 0; j--) {
      var made = D.madeBy[j];
      if (made >= 0 && addr[made] === block && (!makes(j) || addr[j] !== block)) { return j; }
    }
    return -1;
  }
  function describe(side, c, k) {
    var lines = ["<b>" + esc(side.name + ": " + c.state + (c.state === "free" ? ", " + binName(side, c) : "")) + "</b>",
                 "chunk " + hex(c.address) + ", " + c.size + " bytes (" + approx(c.size) + ")"];
    var block = c.address + 16;
    if (c.state === "in use" || c.state === "mapped" || c.state === "cached") {
      lines.push("block " + hex(block));
      var j = c.state === "cached" ? -1 : holder(side.addr, block, k);
      if (j >= 0) {
        lines.push("holds trace id " + D.id[j] + ", made by operation " + (j + 1) + ": " + opText(j));
        lines.push(D.endedBy[j] >= 0 ? "freed by operation " + (D.endedBy[j] + 1) + ": " + opText(D.endedBy[j])
                                     : "never freed by the trace");
        lines.push("asked for " + D.size[j] + " bytes, chunk of " + c.size + " (" + (c.size - D.size[j]) +
                   " bytes of header, rounding and slack)");
      } else {
        var f = freer(side.addr, block, k);
        if (f >= 0) {
          lines.push("no block of the trace: freed by operation " + (f + 1) + " (" + opText(f) + ")" +
                     (side.heaps ? ", kept in the fast cache" : ", so in glibc's tcache or fastbins"));
        } else if (side.start === c.address) {
          lines.push("the stand-in for a fresh program's tcache (glibc's first chunk)");
        } else {
          lines.push("no block of the trace holds it");
        }
      }
    }
    return lines.join("\n");
  }
  var detail = document.getElementById("detail");
  document.addEventListener("click", function (e) {
    var t = e.target.closest ? e.target.closest(".chunk") : null;
    if (!t) { if (!e.target.closest || !e.target.closest("#detail")) { detail.style.display = "none"; } return; }
    var i = Array.prototype.indexOf.call(sideEls, t.closest(".side"));
    var side = D.sides[i], c = side.chunks[Number(t.getAttribute("data-i"))];
    D.sides.forEach(function (s) { s.picked = undefined; });
    side.picked = c.index;
    detail.innerHTML = describe(side, c, current);
    detail.style.display = "block";
    go(current);
  });

  // ------------------------------------------------------------------ the chart
  (function () {
    var chart = document.getElementById("chart"), lines = [D.chart.live].concat(D.chart.sides);
    var top = 1;
    lines.forEach(function (l) { l.forEach(function (v) { if (v > top) { top = v; } }); });
    var colours = ["#555", "#4e79a7", "#e15759", "#59a14f"], widths = ["1.5", "1.5", "3.5", "3.5"];
    var svg = "";
    // Later allocators first, wider and paler: where the footprints agree, ours shows on top of theirs.
    lines.map(function (l, i) { return i; }).reverse().forEach(function (i) {
      var l = lines[i], pts = l.map(function (v, j) {
        return (l.length > 1 ? 1000 * j / (l.length - 1) : 0).toFixed(1) + "," + (100 - 96 * v / top).toFixed(2);
      });
      svg += '<polyline points="' + pts.join(" ") + '" stroke="' + colours[i] + '" stroke-width="' + widths[i] +
             '"' + (i === 0 ? ' stroke-dasharray="4 3"' : i > 1 ? ' stroke-opacity=".55"' : "") + "></polyline>";
    });
    svg += '<line id="cursor" class="cursor" x1="0" x2="0" y1="0" y2="100"></line>';
    chart.innerHTML = svg;
    document.getElementById("chartkey").textContent = "dashed: live bytes; " + D.sides.map(function (s, i) {
      return s.name + " footprint (" + ["blue", "red", "green"][i] + ")";
    }).join(", ") + "; peak " + approx(top);
    chart.addEventListener("click", function (e) {
      var r = chart.getBoundingClientRect();
      go(Math.round((e.clientX - r.left) / r.width * (N - 1)));
    });
  })();

  var start = /op=(\d+)/.exec(location.hash);
  go(start ? Number(start[1]) - 1 : 0);
  window.timeline = {go: function (k) { go(k - 1); }, sides: D.sides, chunksOf: chunksOf};
  document.body.setAttribute("data-ready", "1");
})();
"""


def render_page(trace: Trace, live: Sequence[int], sides: Sequence[Side], title: str = "") -> str:
    """The page for `trace` (its live bytes per operation, `live`) and the recordings in `sides`."""
    if not trace.num_ops:
        raise ValueError(f"trace {trace.name!r} has no operations: no timeline to draw")
    title = title or f"Timeline of {trace.name}"
    data = json.dumps(page_data(trace, live, sides), separators=(",", ":")).replace("</", "<\\/")
    n = trace.num_ops
    legend = ["<table><tr><th>state</th><th>what it is</th></tr>"]
    for state, style in heapmap.STYLES.items():
        legend.append(f'<tr><td><span class="swatch" style="background:{style.colour}"></span>{state}</td>'
                      f"<td>{html.escape(style.meaning)}</td></tr>")
    legend.append("</table>")
    columns = []
    for side in sides:
        columns.append(
            f'<section class="side"><h2>{html.escape(side.name)}<span class="facts footprint"></span></h2>'
            f'<p class="note">{html.escape(side.note)}</p>'
            '<h3>system calls of this operation</h3><div class="calls"></div>'
            '<div class="heap"></div><h3>cache and bins</h3><div class="lists"></div></section>')
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<script>{heapmap._ERROR_HOOK}</script>",
        f"<style>{heapmap._CSS}{_CSS}</style></head>",
        "<body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{n:,} operations, each allocator replaying them in a fresh process. The heap after '
        "the chosen operation: its block outlined in red, the chunks the operation changed (split, merged, "
        "grown) dashed. Click a chunk for what it holds.</p>",
        '<div id="controls">'
        '<button data-act="first" title="Home">first</button>'
        '<button data-act="prev" title="left arrow or p">&#9664; prev</button>'
        '<button data-act="next" title="right arrow or n">next &#9654;</button>'
        f'<input id="slider" type="range" min="1" max="{n}" value="1" aria-label="operation">'
        f'<label>operation <input id="jump" type="number" min="1" max="{n}" value="1"></label>'
        '<button data-act="prevcall" title="S">&#9664; system call</button>'
        '<button data-act="call" title="s">next system call &#9654;</button>'
        '<button data-act="prevgrow" title="G">&#9664; growth</button>'
        '<button data-act="grow" title="g">next growth &#9654;</button>'
        '<button data-act="last" title="End">last</button></div>',
        '<p class="keys">keys: &#8592; &#8594; (or p n) one operation, PageUp PageDown 100, Home End, '
        "s / S next / previous system call, g / G next / previous footprint growth, j jump to a number</p>",
        '<div id="opline"></div><div id="readout"></div>',
        '<svg id="chart" viewBox="0 0 1000 100" preserveAspectRatio="none" role="img" '
        'aria-label="live bytes and footprints"></svg><p class="keys" id="chartkey"></p>',
        '<div id="sides">', *columns, "</div>",
        "<h2>Legend</h2>", *legend,
        "<footer>Chunks are drawn as <code>malloc heap --html</code> draws them: a chunk's width is "
        f"proportional to its size, at least {heapmap.MIN_WIDTH} units, each segment's rows reading left to "
        "right. glibc's heap is read by walking its chunk headers: a chunk in glibc's tcache or fastbins reads "
        "as in use to such a walk, and a free chunk's bin is the one its size maps to (glibc may still hold it "
        "in its unsorted bin).</footer>",
        '</main><div id="detail"></div>',
        f'<script id="data" type="application/json">{data}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def glibc_note() -> str:
    """The line under glibc's column."""
    return ("glibc's main heap from the replay's first chunk, walked by its chunk headers after every operation, "
            "and its mapped chunks; chunks in glibc's tcache or fastbins read as in use to such a walk. System "
            "calls from strace, their reasons inferred.")


def ours_note() -> str:
    """The line under our column."""
    return "This allocator's heaps from its own walk() after every operation; system calls from its log."

