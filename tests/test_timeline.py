"""`malloc replay --timeline`: the recording (keyframes and splices), and the page in a real headless chromium,
stepped to operations whose chunks are checked against the engine's own walk (ours) and against the trace's
live blocks and the heap's extent (glibc)."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procfs import child_env
from test_heapmap import chunk_elements, dump_dom

import malloc
from malloc.inspect import heapmap
from malloc.inspect.timeline_page import op_links
from malloc.traces.chunklist import ChunkList
from malloc.traces.formats import ALLOC, FREE, REALLOC, Op, Trace, save
from malloc.traces.lab import Plan, run_worker
from malloc.traces.model import churn
from malloc.traces.opsfile import write_ops
from malloc.traces.timeline import Chunk4, decode, encode
from malloc.traces.timeline import write_timeline as write_page
from malloc.traces.worker import RESERVE

# ----------------------------------------------------------------------------- traces made here


def mixed_trace(n: int = 1000, seed: int = 13) -> Trace:
    """About `n` operations: small blocks (for the fast cache), medium ones (for the bins), a few large enough
    to be mapped, reallocs growing and shrinking, and frees in random order, so the heap grows and shrinks."""
    rng = random.Random(seed)
    ops: list[Op] = []
    live: list[int] = []
    ids = 0
    while len(ops) < n:
        roll = rng.random()
        if live and (roll < 0.38 or len(live) > 120):
            ops.append((FREE, live.pop(rng.randrange(len(live))), 0))
        elif live and roll < 0.48:
            ops.append((REALLOC, rng.choice(live), rng.choice((24, 100, 700, 3000, 9000))))
        else:
            size = rng.choice((rng.randint(1, 120), rng.randint(200, 4000), rng.randint(5000, 40000)))
            if rng.random() < 0.02:
                size = rng.randint(140_000, 400_000)
            ops.append((ALLOC, ids, size))
            live.append(ids)
            ids += 1
    ops.append((FREE, -1, 0))  # free(NULL)
    return Trace("mixed", ids, tuple(ops))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Trace, Path, str]]:
    """The mixed trace, its file, and its page made by the command (ours and glibc)."""
    tmp = tmp_path_factory.mktemp("timeline")
    trace = mixed_trace()
    path = tmp / "mixed.rep"
    save(trace, path)
    page = tmp / "mixed.html"
    proc = subprocess.run([sys.executable, "-m", "malloc", "replay", str(path), "--against", "glibc",
                           "--repeats", "1", "--timeline", str(page)],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"timeline: {page}" in proc.stdout
    yield trace, path, page.read_text(encoding="utf-8")


def page_data(page: str) -> dict[str, object]:
    start = page.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    data: dict[str, object] = json.loads(page[start:page.index("</script>", start)].replace("<\\/", "</"))
    return data


# Run after the page's own script: step to each of STEPS in turn and keep every side's chunk elements.
VISIT = """<script>
var found = {};
STEPS.forEach(function (k) {
  timeline.go(k);
  found[k] = Array.prototype.map.call(document.querySelectorAll(".side"), function (side) {
    return Array.prototype.map.call(side.querySelectorAll(".chunk"), function (e) {
      return [e.getAttribute("data-address"), Number(e.getAttribute("data-size")), e.getAttribute("data-state"),
              Number(e.getAttribute("data-bin")), Number(e.getAttribute("data-request")), e.getAttribute("d")];
    });
  });
});
document.body.setAttribute("data-found", JSON.stringify(found));
</script>
</body>"""


def visit(page: str, steps: list[int], extra: str = "") -> tuple[dict[int, list[list[list[object]]]], dict[str, str]]:
    """Open the page in chromium, step to each of `steps` (numbered from 1) in that order; the chunks each
    side showed at each, and the attributes of <html> and <body> at the end (after `extra`, a script)."""
    script = VISIT.replace("STEPS", json.dumps(steps)).replace("</body>", extra + "</body>")
    dom = chunk_elements(dump_dom(page.replace("</body>", script)))
    assert "data-script-errors" not in dom.roots["html"], dom.roots["html"]["data-script-errors"]
    body = dom.roots["body"]
    assert body.get("data-ready") == "1"
    return {int(k): v for k, v in json.loads(body["data-found"]).items()}, body


def truth_walks(path: Path, steps: list[int]) -> dict[int, list[list[int | str]]]:
    """The engine's own walk() after each of `steps` (numbered from 1), each replayed as a prefix of the trace
    in a fresh interpreter started as the lab starts its workers."""
    script = RESERVE + f"""
import json, malloc
from malloc.traces.formats import load
from malloc.traces.replay import replay
ctypes.CDLL(None).malloc_trim(0)
malloc.remember_requests()
trace = load({str(path)!r})
table = [0] * (trace.num_ids + 1)
steps = {steps!r}
out = {{}}
done = 0
for k in steps:
    replay(trace.ops[done:k], table, malloc.malloc, malloc.free, malloc.realloc)
    done = k
    out[k] = [[c.address, c.size, c.state, c.bin, c.request] for c in malloc.walk()]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


def comparable(chunks: list[list[object]]) -> list[tuple[object, ...]]:
    """Heap chunks by their offset from the first chunk (where the break starts differs between processes),
    mapped chunks by their size alone (where a mapping lands does too)."""
    base = int(str(chunks[0][0]), 0)
    return [(c[2], c[1], c[3], c[4]) if c[2] == "mapped" else (int(str(c[0]), 0) - base, c[1], c[2], c[3], c[4])
            for c in chunks]


# ----------------------------------------------------------------------------- recording


def rebuilt(before: list[Chunk4], spliced: tuple[int, int, int], chunks: ChunkList) -> list[Chunk4]:
    """`before` with a splice from `ChunkList.replace` applied, as the page applies it."""
    start, removed, inserted = spliced
    words = chunks.rows[4 * start:4 * (start + inserted)].tolist()
    rows = [(words[x], words[x + 1], words[x + 2], words[x + 3]) for x in range(0, len(words), 4)]
    return before[:start] + rows + before[start + removed:]


def listed(chunks: ChunkList) -> list[Chunk4]:
    words = chunks.rows[:4 * chunks.n].tolist()
    return [(words[x], words[x + 1], words[x + 2], words[x + 3]) for x in range(0, len(words), 4)]


def test_a_replaced_run_makes_the_smallest_splice_that_rebuilds_the_list() -> None:
    a = [malloc.Chunk(0x1000, 32, "in use", -1, 20), malloc.Chunk(0x1020, 64, "free", 4),
         malloc.Chunk(0x1060, 4000, "top", -1), malloc.Chunk(0x9000, 8192, "mapped", -1, 8000)]
    chunks = ChunkList(2, grow=True)  # grows as rows come
    chunks.begin(0)
    for row, c in zip(encode(a), a, strict=True):
        chunks.add(c.address, c.size, row[2], row[3])
    assert chunks.replace(0, 0, 3) == (0, 0, 4) and decode(listed(chunks)) == a
    assert chunks.index(0x1030) == 1 and chunks.index(0x500) == 0 and chunks.index(0x9010) == 2  # heap rows only
    # The free chunk is split and the top grows, re-walked from the first chunk: the first row stays, and the
    # mapped chunk's gap, counted from the top's new end, changes with it.
    b = [a[0], malloc.Chunk(0x1020, 48, "in use", -1, 40), malloc.Chunk(0x1050, 16 + 8000, "top", -1),
         malloc.Chunk(0x9000, 8192, "mapped", -1, 8000)]
    before = listed(chunks)
    chunks.begin(0)
    for c in b[:3]:
        chunks.add(c.address, c.size, encode([c])[0][2], c.request)
    spliced = chunks.replace(0, 3, 3)
    assert spliced == (1, 3, 3) and chunks.heap_rows == 3
    assert decode(rebuilt(before, spliced, chunks)) == decode(listed(chunks)) == b
    # A run walked again and found as it was: nothing to splice.
    chunks.begin(1)
    chunks.add(0x1020, 48, 0, 40)
    assert chunks.replace(1, 2, 3)[1:] == (0, 0)
    fixed = ChunkList(1)
    fixed.add(0x1000, 32, 0, -1)
    with pytest.raises(RuntimeError, match="do not fit"):
        fixed.add(0x1020, 32, 0, -1)


def test_op_links_pair_each_block_with_the_operations_that_make_and_end_it() -> None:
    trace = Trace("t", 3, ((ALLOC, 0, 10), (ALLOC, 1, 20), (REALLOC, 0, 30), (FREE, 1, 0), (FREE, 0, 0),
                           (FREE, -1, 0), (ALLOC, 2, 5)))
    made_by, ended_by = op_links(trace)
    assert made_by == [-1, -1, 0, 1, 2, -1, -1]
    assert ended_by == [2, 3, 4, -1, -1, -1, -1]


@pytest.mark.parametrize("alloc", ["ours", "glibc"])
def test_the_chunks_walked_in_parts_are_a_whole_walks_after_every_operation(alloc: str, tmp_path: Path) -> None:
    """The recording walks again only around what each operation changed; in the worker's check mode it also
    walks the whole heap after every operation and fails at the first difference. Most steps are walked in
    parts (the point of it), and the splices still rebuild every step's list from the keyframes."""
    # A mapped block resized within its mapping keeps its address and mapping: only its request changes.
    resized = Trace("resized", 2, ((ALLOC, 0, 200_000), (ALLOC, 1, 100), (REALLOC, 0, 199_999),
                                   (REALLOC, 0, 200_005), (FREE, 1, 0), (FREE, 0, 0)))
    write_ops(resized, tmp_path / "resized.ops")
    result = run_worker(alloc, "timeline-check", tmp_path / "resized.ops")
    assert "error" not in result, result.get("traceback")
    assert len(set(result["timeline"]["addr"][i] for i in (0, 2, 3))) == 1  # resized in place
    trace = mixed_trace()
    write_ops(trace, tmp_path / "mixed.ops")
    result = run_worker(alloc, "timeline-check", tmp_path / "mixed.ops")
    assert "error" not in result, result.get("traceback")
    recording = result["timeline"]
    if alloc == "glibc":
        assert 0 < recording["whole"] < trace.num_ops // 10, recording["whole"]
    keys = dict((k, rows) for k, rows in recording["keys"])
    rows: list[int] = []
    for k, (start, removed, *inserted) in enumerate(recording["splices"]):
        rows[4 * start:4 * (start + removed)] = inserted
        if k in keys:
            assert rows == keys[k], f"step {k}"
    assert len(keys) > 1


# ----------------------------------------------------------------------------- the page, ours


def test_the_page_shows_ours_as_walk_shows_it_at_every_visited_step(mixed: tuple[Trace, Path, str]) -> None:
    trace, path, page = mixed
    data = page_data(page)
    sides = data["sides"]
    assert isinstance(sides, list) and [s["name"] for s in sides] == ["ours", "glibc"]
    n = trace.num_ops
    # Forward one by one, back to an earlier step (from its keyframe), far ahead, and the last.
    steps = [1, 2, 3, 400, 401, 250, 777, n - 1, n]
    found, _ = visit(page, steps)
    truth = truth_walks(path, sorted(set(steps)))
    for k in steps:
        ours = found[k][0]
        assert comparable(ours) == comparable(truth[k]), f"step {k}"
    states = {c[2] for k in steps for c in found[k][0]}
    assert {"in use", "cached", "free", "top", "mapped"} <= states


def test_a_step_is_drawn_as_the_heap_map_draws_the_same_chunks(mixed: tuple[Trace, Path, str]) -> None:
    _, _, page = mixed
    found, _ = visit(page, [600])
    shown = found[600][0]
    chunks = [malloc.Chunk(int(str(c[0]), 0), int(str(c[1])), str(c[2]), int(str(c[3])), int(str(c[4])))
              for c in shown]
    drawn = chunk_elements(heapmap.render_html(heapmap.segments(chunks))).chunks
    assert [e["d"] for e in drawn] == [c[5] for c in shown]


def test_keys_buttons_and_a_click_step_and_explain(mixed: tuple[Trace, Path, str]) -> None:
    trace, _, page = mixed
    data = page_data(page)
    calls = data["callSteps"]
    assert isinstance(calls, list) and len(calls) > 2
    script = """<script>
function key(k) { document.dispatchEvent(new KeyboardEvent("keydown", {key: k, bubbles: true})); }
var log = [];
timeline.go(1);
key("ArrowRight"); log.push(document.body.getAttribute("data-step"));
key("s"); log.push(document.body.getAttribute("data-step"));
key("s"); log.push(document.body.getAttribute("data-step"));
key("S"); log.push(document.body.getAttribute("data-step"));
document.querySelector('button[data-act="grow"]').click(); log.push(document.body.getAttribute("data-step"));
key("End"); log.push(document.body.getAttribute("data-step"));
timeline.go(300);
var held = document.querySelector('.side .chunk[data-state="in use"][data-request]:not([data-request="-1"])');
held.dispatchEvent(new MouseEvent("click", {bubbles: true}));
document.body.setAttribute("data-log", log.join(","));
document.body.setAttribute("data-detail", document.getElementById("detail").textContent);
document.body.setAttribute("data-picked", held.getAttribute("data-address"));
</script>"""
    _, body = visit(page, [1], script)
    growth = data["growth"]
    assert isinstance(growth, list)
    expected_first_call = next(k for k in calls if k > 1) + 1  # callSteps count from 0, the page from 1
    second_call = next(k for k in calls if k + 1 > expected_first_call) + 1
    assert body["data-log"].split(",") == [
        "2", str(expected_first_call), str(second_call), str(expected_first_call),
        str(next(k for k in growth if k + 1 > expected_first_call) + 1), str(trace.num_ops)]
    detail = body["data-detail"]
    assert detail.startswith("ours: in use") and f"chunk {body['data-picked']}" in detail
    assert "holds trace id" in detail and "made by operation" in detail and "asked for" in detail


# ----------------------------------------------------------------------------- the page, glibc


def glibc_chunk(n: int) -> int:
    """glibc's chunk size for a request of n bytes (request2size on 64-bit)."""
    return max(32, (n + 8 + 15) & ~15)


def test_glibcs_walk_tiles_its_heap_and_holds_every_live_block(mixed: tuple[Trace, Path, str]) -> None:
    trace, _, page = mixed
    data = page_data(page)
    glibc = data["sides"][1]  # type: ignore[index]
    steps = [1, 150, 500, 501, 900, trace.num_ops]
    found, _ = visit(page, steps)
    sizes: dict[int, int] = {}  # id -> bytes asked for, of the blocks held
    held: dict[int, int] = {}  # id -> block address in glibc's replay
    done = 0
    for k in steps:
        for j in range(done, k):
            code, i, n = trace.ops[j]
            if code == FREE or (code == REALLOC and n == 0):
                held.pop(i, None)
            else:
                held[i], sizes[i] = glibc["addr"][j], n
        done = k
        chunks = {int(c[0], 0): c for c in found[k][1]}
        heap = [c for c in found[k][1] if c[2] != "mapped"]
        mapped = [c for c in found[k][1] if c[2] == "mapped"]
        start = int(heap[0][0], 0)
        assert start == glibc["start"] and heap[-1][2] == "top"
        for x, y in itertools.pairwise(heap):
            assert int(x[0], 0) + x[1] == int(y[0], 0), f"step {k}: a gap after {x[0]}"
        # The chunks add up to the heap's extent: the break (from the footprint, less the mapped bytes).
        extent = glibc["footprint"][k - 1] - sum(c[1] for c in mapped) + glibc["brk0"] - start
        assert sum(c[1] for c in heap) == extent, f"step {k}"
        for i, block in held.items():
            chunk = chunks.get(block - 16)
            assert chunk is not None, f"step {k}: block {i} at {block:#x} is in no chunk"
            nb = glibc_chunk(sizes[i])
            if chunk[2] == "mapped":
                assert chunk[1] == (nb + 8 + 4095) & ~4095, f"step {k}: mapped block {i}"
            else:
                assert chunk[2] == "in use" and nb <= chunk[1] < nb + 32, f"step {k}: block {i}: {chunk}"
    assert any(c[2] == "free" for k in steps for c in found[k][1])
    calls = [text for _, step_calls in glibc["calls"] for text, _ in step_calls]
    assert any(t.startswith("brk(") for t in calls) and any(t.startswith("mmap(") for t in calls)


def test_system_calls_go_to_the_operations_that_made_them(mixed: tuple[Trace, Path, str]) -> None:
    """Every operation after which an allocator held a different number of bytes from the OS made a system
    call, and it is listed at that operation (ours from its log, glibc's from strace's timestamps)."""
    _, _, page = mixed
    for side in page_data(page)["sides"]:  # type: ignore[attr-defined]
        footprint = side["footprint"]
        changed = {k for k in range(1, len(footprint)) if footprint[k] != footprint[k - 1]}
        listed = {k for k, _ in side["calls"]}
        assert changed and changed <= listed, (side["name"], sorted(changed - listed))
        for k, calls in side["calls"]:
            assert calls and all(text and reason for text, reason in calls), (side["name"], k)


def test_glibcs_recorded_footprint_is_the_labs(mixed: tuple[Trace, Path, str], tmp_path: Path) -> None:
    """The walk allocates nothing from glibc: its footprint after every operation is the one the lab samples
    in a replay that does nothing else."""
    trace, _, page = mixed
    glibc = page_data(page)["sides"][1]  # type: ignore[index]
    write_ops(trace, tmp_path / "mixed.ops")
    sampled = run_worker("glibc", "footprint", tmp_path / "mixed.ops", series=True)
    assert sampled["series"] == glibc["footprint"]


# ----------------------------------------------------------------------------- long traces and misuse


def test_a_100000_operation_trace_makes_a_page_under_25_mb_that_loads(tmp_path: Path) -> None:
    trace = churn()
    page = tmp_path / "long.html"
    written = write_page(trace, page, Plan(against=("glibc",)))
    assert not written["errors"]
    size = page.stat().st_size
    assert written["bytes"] == size and size <= 25 * 10**6, size
    found, _ = visit(page.read_text(encoding="utf-8"), [100_000, 54_321])
    for k in (100_000, 54_321):
        assert [c[2] for c in found[k][0]][-1] == "top" and len(found[k][1]) > 2


def test_timeline_misuse_is_refused(tmp_path: Path) -> None:
    trace = tmp_path / "t.rep"
    save(mixed_trace(40), trace)
    empty = tmp_path / "empty.rep"
    save(Trace("empty", 0, ()), empty)
    for args, message in (([str(trace), str(trace)], "--timeline draws one trace, not 2"),
                          ([str(empty)], "no operations, so no timeline")):
        proc = subprocess.run([sys.executable, "-m", "malloc", "replay", *args, "--repeats", "1",
                               "--timeline", str(tmp_path / "out.html")],
                              capture_output=True, text=True, timeout=120, env=child_env())
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr
        assert not (tmp_path / "out.html").exists()
