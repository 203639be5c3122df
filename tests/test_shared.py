"""SharedHeap in one process and its children: the API, misuse, names, values, the cache and its reclaim."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import malloc
from malloc import DoubleFree, HeapCorruption, InvalidPointer, SharedHeap
from malloc.os import libc
from malloc.shared.segment import OWNERS, SEG_HEADER

np = pytest.importorskip("numpy")


def _name() -> str:
    return f"malloc-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def heap() -> Iterator[SharedHeap]:
    h = SharedHeap.create(_name(), 1 << 20)
    try:
        yield h
    finally:
        h.unlink()
        h.close()


def _segment(h: SharedHeap) -> Path:
    return Path("/dev/shm") / h.name


def test_create_makes_a_segment_in_dev_shm_and_a_shared_mapping(heap: SharedHeap) -> None:
    assert _segment(heap).stat().st_size == heap.size >= SEG_HEADER + (1 << 20)
    maps = Path("/proc/self/maps").read_text()
    assert f"/dev/shm/{heap.name}" in maps
    line = next(ln for ln in maps.splitlines() if ln.endswith(f"/dev/shm/{heap.name}"))
    assert line.split()[1] == "rw-s"


def test_blocks_are_offsets_and_bytes_survive(heap: SharedHeap) -> None:
    p = heap.malloc(100)
    assert p % 16 == 0 and heap.usable_size(p) >= 100
    heap.view(p)[:5] = b"hello"
    assert heap.address(p) == heap.base + p and heap.offset(heap.address(p)) == p
    import ctypes

    assert ctypes.string_at(heap.address(p), 5) == b"hello"
    q = heap.realloc(p, 5000)
    assert bytes(heap.view(q, 5)) == b"hello"
    z = heap.calloc(10, 100)
    assert bytes(heap.view(z)) == bytes(heap.usable_size(z))
    heap.free(q)
    heap.free(z)
    heap.check()


def test_misuse_raises_and_changes_nothing(heap: SharedHeap) -> None:
    p = heap.malloc(64)
    before = heap.walk()
    with pytest.raises(InvalidPointer):
        heap.free(p + 16)
    with pytest.raises(InvalidPointer):
        heap.free(1 << 50)
    with pytest.raises(TypeError):
        heap.malloc("10")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        heap.malloc(-1)
    with pytest.raises(MemoryError):
        heap.malloc(1 << 47)
    with pytest.raises(InvalidPointer):
        heap.free(-16)
    assert heap.walk() == before
    heap.free(p)
    with pytest.raises(DoubleFree):
        heap.free(p)  # in this process's cache
    big = heap.malloc(100_000)
    heap.free(big)
    with pytest.raises(DoubleFree):
        heap.free(big)  # in the heap's bins or top
    heap.check()


def test_a_claim_of_a_cache_slot_cut_short_is_tried_again(heap: SharedHeap, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (a handler's) while a process takes its cache slot: that call raises, changing nothing,
    and the next one takes the slot, so the process's small frees are cached again."""
    claim = SharedHeap._claim_slot
    calls = [0]

    def interrupted(self: SharedHeap, me: tuple[int, int]) -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt
        return claim(self, me)

    monkeypatch.setattr(SharedHeap, "_claim_slot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heap.malloc(48)
    assert [c.state for c in heap.walk()] == ["top"]
    p = heap.malloc(48)
    heap.free(p)
    assert calls[0] == 2 and [c.state for c in heap.walk()].count("cached") == 1
    heap.check()


def test_the_cache_serves_small_blocks_again_and_a_flush_gives_them_back(heap: SharedHeap) -> None:
    ps = [heap.malloc(48) for _ in range(5)]
    for p in ps:
        heap.free(p)
    assert [c.state for c in heap.walk()].count("cached") == 5
    assert heap.mallinfo().smblks == 5
    assert sorted(heap.malloc(48) for _ in range(5)) == sorted(ps)
    heap.free(ps[0])
    with pytest.raises(DoubleFree):
        heap.usable_size(ps[0])
    with pytest.raises(DoubleFree):
        heap.realloc(ps[0], 10)
    with pytest.raises(DoubleFree):
        heap.view(ps[0])


def test_growth_keeps_the_base_and_a_full_heap_raises_memory_error() -> None:
    h = SharedHeap.create(_name(), 1 << 16, max_size=1 << 22)
    try:
        base = h.base
        p = h.malloc(100)
        v = h.view(p)
        v[:3] = b"abc"
        q = h.malloc(1 << 20)
        assert h.base == base and h.size > 1 << 20 and bytes(v[:3]) == b"abc"
        with pytest.raises(MemoryError):
            h.malloc(1 << 22)
        h.free(q)
        h.check()
        del v
    finally:
        h.unlink()
        h.close()


def test_roots_map_names_to_offsets_in_the_heap(heap: SharedHeap) -> None:
    p = heap.malloc(10)
    heap.roots["table"] = p
    assert heap.roots["table"] == p and "table" in heap.roots and len(heap.roots) == 1
    for i in range(300):
        heap.roots[f"n{i}"] = i
    assert len(heap.roots) == 301 and heap.roots["n299"] == 299
    del heap.roots["n7"]
    assert "n7" not in heap.roots and len(heap.roots) == 300
    assert set(heap.roots) == {"table"} | {f"n{i}" for i in range(300) if i != 7}
    with pytest.raises(KeyError):
        heap.roots["missing"]
    with pytest.raises(KeyError):
        del heap.roots["missing"]
    with pytest.raises(TypeError):
        heap.roots[3] = 4  # type: ignore[index]
    with pytest.raises(ValueError):
        heap.roots[""] = 4
    heap.check()


def test_put_get_ndarray_delete(heap: SharedHeap) -> None:
    a = np.arange(1000, dtype=">i4").reshape(10, 100)
    heap.put("a", a)
    got = heap.get("a")
    assert got.dtype == a.dtype and got.shape == a.shape and (got == a).all()
    rec = np.zeros(3, dtype=[("x", "<f8"), ("name", "S5")])
    rec["name"] = [b"one", b"two", b"three"]
    heap.put("rec", rec)
    assert heap.get("rec")["name"].tolist() == [b"one", b"two", b"three"]
    heap.put("b", b"bytes here")
    assert bytes(heap.get("b")) == b"bytes here"
    z = heap.ndarray("z", (4, 5), np.float32)
    assert z.shape == (4, 5) and not z.any()
    z[2, 3] = 7.5
    assert heap.get("z")[2, 3] == 7.5
    heap.put("a", b"replaced")  # the array's block goes back
    assert bytes(heap.get("a")) == b"replaced"
    heap.delete("a")
    with pytest.raises(KeyError):
        heap.get("a")
    with pytest.raises(KeyError):
        heap.delete("a")
    with pytest.raises(TypeError):
        heap.put("o", np.array([object()]))
    with pytest.raises(TypeError):
        heap.put("n", 3)
    heap.roots["raw"] = heap.malloc(100)
    with pytest.raises(HeapCorruption):
        heap.get("raw")  # a name made by roots, not put: no value header
    del got, z
    heap.check()


def test_close_refuses_while_views_or_arrays_are_alive() -> None:
    h = SharedHeap.create(_name(), 1 << 16)
    try:
        h.put("x", np.arange(4))
        arr = h.get("x")
        with pytest.raises(BufferError):
            h.close()
        assert not h.closed and int(arr.sum()) == 6
        del arr
        v = h.view(h.malloc(10))[2:4]
        with pytest.raises(BufferError):
            h.close()
        del v
    finally:
        h.unlink()
        h.close()
    assert h.closed
    with pytest.raises(ValueError):
        h.malloc(1)
    h.close()


def test_create_attach_and_unlink_by_name() -> None:
    name = _name()
    h = SharedHeap.create(name, 1 << 16)
    try:
        with pytest.raises(FileExistsError):
            SharedHeap.create(name, 1 << 16)
        assert SharedHeap.attach(name) is h  # one mapping per process
        with pytest.raises(ValueError):
            SharedHeap.create("a/b", 10)
        with pytest.raises(FileNotFoundError):
            SharedHeap.attach(name + "-none")
    finally:
        h.unlink()
    assert not (Path("/dev/shm") / name).exists()
    h.free(h.malloc(10))  # still mapped here
    h.close()


def test_attach_refuses_what_is_not_a_heap(tmp_path: Path) -> None:
    name = _name()
    path = Path("/dev/shm") / name
    try:
        path.write_bytes(b"\0" * 65536)
        with pytest.raises(HeapCorruption, match="not a shared heap"):
            SharedHeap.attach(name)
        path.write_bytes(b"x")
        with pytest.raises(HeapCorruption, match="too short"):
            SharedHeap.attach(name)
    finally:
        path.unlink()


def test_a_file_heap_keeps_its_contents_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "heap.bin"
    with SharedHeap.open(path, 1 << 16) as h:
        h.put("greeting", b"hello from the first run")
        h.flush()
    code = ("import sys, malloc\n"
            "h = malloc.SharedHeap.open(sys.argv[1])\n"
            "print(bytes(h.get('greeting')).decode()); h.check()\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from the first run"


def test_a_heap_pickles_as_its_name(heap: SharedHeap) -> None:
    heap.put("v", b"pickled")
    assert pickle.loads(pickle.dumps(heap)) is heap
    code = ("import pickle, sys\n"
            "h = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
            "print(bytes(h.get('v')).decode())\n")
    out = subprocess.run([sys.executable, "-c", code, pickle.dumps(heap).hex()], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pickled"


def test_a_killed_processs_cache_is_reclaimed(heap: SharedHeap) -> None:
    pid = os.fork()
    if pid == 0:  # the child caches blocks of its own, then dies without closing
        try:
            ps = [heap.malloc(64) for _ in range(20)]
            for p in ps:
                heap.free(p)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    slots = [heap._log[OWNERS + 2 * k] for k in range(8)]
    assert pid in slots  # its slot is still taken
    heap.check()  # reclaims
    assert pid not in [heap._log[OWNERS + 2 * k] for k in range(8)]
    assert "cached" not in {c.state for c in heap.walk()}
    assert heap.mallinfo().uordblks == 0


def test_a_call_from_a_signal_handler_inside_an_operation_is_refused(heap: SharedHeap) -> None:
    seen: list[BaseException] = []

    def nested() -> int:
        try:
            return heap.malloc(10_000)
        except RuntimeError as exc:
            seen.append(exc)
            raise

    with pytest.raises(RuntimeError, match="already inside"):
        heap._run(nested)
    assert seen and heap.walk()[0].state == "top"
    heap.check()


OPS = st.lists(st.tuples(st.sampled_from(["malloc", "free", "realloc", "calloc", "put"]),
                         st.integers(0, 3000), st.integers(0, 1 << 16)), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_random_operations_keep_every_invariant_and_every_byte(heap: SharedHeap,
                                                               ops: list[tuple[str, int, int]]) -> None:
    live: dict[int, bytes] = {}
    for i, (op, n, pick) in enumerate(ops):
        fill = bytes([i % 251 + 1]) * min(n, 64)
        if op in ("malloc", "calloc") or not live:
            p = heap.malloc(n) if op != "calloc" else heap.calloc(1, n)
            heap.view(p, len(fill))[:] = fill
            live[p] = fill
        elif op == "free":
            p = sorted(live)[pick % len(live)]
            heap.free(p)
            del live[p]
        elif op == "realloc":
            p = sorted(live)[pick % len(live)]
            q = heap.realloc(p, n)
            data = live.pop(p)[:n]
            if q:
                assert bytes(heap.view(q, len(data))) == data
                live[q] = data
        else:
            heap.put(f"v{pick % 4}", fill)
    for p, data in live.items():
        assert bytes(heap.view(p, len(data))) == data
    heap.check()
    in_use = sorted(c.address + 16 for c in heap.walk() if c.state == "in use")
    named = {heap.roots[k] for k in heap.roots}
    table_and_keys = len(in_use) - len(live) - len(named)
    assert set(live) <= set(in_use) and table_and_keys >= 0
    for p in list(live):
        heap.free(p)
    for k in list(heap.roots):
        heap.delete(k)


def test_module_exports_shared_heap() -> None:
    assert malloc.SharedHeap is SharedHeap and "SharedHeap" in dir(malloc)


def test_a_lock_that_names_a_thread_that_does_not_exist_is_reported_not_waited_on(heap: SharedHeap) -> None:
    import ctypes

    futex = ctypes.c_uint32.from_address(heap._region.lock_address())
    futex.value = 0x3FFF_FFFF  # above the largest pid_max (2**22): no thread has this id
    try:
        with pytest.raises(HeapCorruption, match="no such thread"):
            heap.malloc(5000)  # the slow path takes the lock (about 5 s of waiting first)
    finally:
        futex.value = 0
    heap.free(heap.malloc(5000))
    heap.check()


def test_the_pages_a_free_gives_back_are_in_the_system_call_log(heap: SharedHeap) -> None:
    p = heap.malloc(3 << 20)  # the segment grows; its free leaves more than the trim threshold (1 MiB) at the top
    heap.view(p)[:] = b"\xab" * heap.usable_size(p)  # every page of the block now holds memory in /dev/shm
    held = _segment(heap).stat().st_blocks * 512
    with malloc.trace() as calls:
        heap.free(p)
    (given,) = [e for e in calls if e.name == "madvise"]
    start, length, advice = given.args
    assert (advice, given.result) == (libc.MADV_REMOVE, 0) and "after the commit" in given.reason
    assert heap.address(p) < start and start + length <= heap.address(0) + heap.size
    assert held - _segment(heap).stat().st_blocks * 512 >= 3 << 20  # those pages went back, as logged
