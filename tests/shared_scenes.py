"""Scenes for the shared heap's process tests, each run as a program in a child process (a crash fails a test
instead of killing pytest): `python tests/shared_scenes.py SCENE ARGS...` prints one JSON line of facts.

    values NAME SEED             one process puts arrays and bytes; three others and a spawn pool read them
    mixed NAME SEED PROCS OPS THREADS   PROCS processes x THREADS threads of verified mixed operations
    growth NAME STEPS            the heap grows while three processes hold views of a value in it
    filekill PATH SEED ITERS     a file heap's writer killed (or stopped and copied) at random instants, then
                                 the file (or the copy) opened by a new process and settled
    interrupts NAME SEED OPS US  a timer's handler raises KeyboardInterrupt every US µs around operations
    takeover NAME                an exception as the lock is taken over from a dead owner
    trimkill NAME HOW            a free whose trim gave pages back, cut short by a kill or an exception

Every process a scene starts is stopped by its pid in a `finally`, and every scene has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shared_work import MAX_FILL, SLOTS, T_SLOTS, Damaged, check_value, checked, fill, names_blocks, size, value_for

import malloc
from malloc.heap import Heap
from malloc.shared.heap import SharedHeap

HERE = Path(__file__).resolve().parent
DEADLINE = 120.0  # seconds any wait of a scene may last before it counts as a hang


def child(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """A fresh interpreter running this file (or shared_work.py, when args[0] ends in .py) with `args`."""
    script = args[0] if args[0].endswith(".py") else str(HERE / "shared_scenes.py")
    rest = args[1:] if args[0].endswith(".py") else args
    return subprocess.Popen([sys.executable, script, *rest], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.PIPE if stdin else None, cwd=str(HERE))


def finish(proc: subprocess.Popen[str], timeout: float = DEADLINE) -> dict[str, Any]:
    """The JSON line `proc` prints, once it exits 0 (AssertionError otherwise, and on a hang)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.pid} ({proc.args}) still running after {timeout} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"process {proc.pid} ({proc.args}) exited with {proc.returncode}")
    facts: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return facts


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- values across processes

def expected_values(seed: int) -> dict[str, Any]:
    """The values the writer puts, made again from the seed by each reader."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "floats": rng.standard_normal((300, 70)),
        "ints": rng.integers(-1 << 40, 1 << 40, 5000, dtype=np.int64),
        "big-endian": rng.integers(0, 1000, (20, 30, 4)).astype(">u4"),
        "complex": rng.standard_normal(999) + 1j * rng.standard_normal(999),
        "records": np.array([(i, i * 0.5, b"r%d" % i) for i in range(777)],
                            dtype=[("k", "<i4"), ("x", "<f8"), ("tag", "S6")]),
        "fortran": np.asfortranarray(rng.standard_normal((64, 33))),
        "empty": np.zeros((0, 5)),
        "scalar": np.array(3.25),
        "megabytes": rng.integers(0, 255, 3 << 20, dtype=np.uint8),
        "bytes": bytes(rng.integers(0, 255, 10_000, dtype=np.uint8)),
        "bytearray": bytearray(b"shared " * 1000),
        "nothing": b"",
    }


def same(got: Any, want: Any) -> bool:
    import numpy as np

    if isinstance(want, (bytes, bytearray)):
        return isinstance(got, memoryview) and bytes(got) == bytes(want)
    return bool(got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want))


def scene_values(name: str, seed: int) -> dict[str, Any]:
    import multiprocessing

    want = expected_values(seed)
    procs: list[subprocess.Popen[str]] = []
    h = SharedHeap.create(name, 1 << 16)
    try:
        for key, value in want.items():
            h.put(key, value)
        procs = [child("read", name, str(seed), str(i)) for i in range(3)]
        replies = [finish(p) for p in procs]
        ok = all(r["matched"] == len(want) for r in replies)
        # Each reader put a reply of its own; a heap and its handles travel through a spawn pool by name.
        echoed = all(int(h.get(f"reply{i}")[0]) == r["pid"] for i, r in enumerate(replies))
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            sums = pool.starmap(pool_sum, [(h, key) for key in ("ints", "megabytes")])
        import numpy as np

        pool_ok = sums == [int(np.sum(want["ints"])), int(np.sum(want["megabytes"]))]
        h.check()
        still_there = os.path.exists(h.path)  # no reader's exit unlinked it (no resource tracker)
        return {"readers": len(replies), "values": len(want), "all_matched": ok, "replies_seen": echoed,
                "pool_ok": pool_ok, "segment_kept": still_there}
    finally:
        stop_all(procs)
        h.unlink()


def pool_sum(h: SharedHeap, key: str) -> int:
    import numpy as np

    return int(np.sum(h.get(key)))


def scene_read(name: str, seed: int, i: int) -> dict[str, Any]:
    import numpy as np

    h = SharedHeap.attach(name)
    want = expected_values(seed)
    matched = sum(same(h.get(key), value) for key, value in want.items())
    h.put(f"reply{i}", np.full(10, os.getpid(), dtype=np.int64))
    return {"matched": matched, "pid": os.getpid()}


# ---------------------------------------------------------------- many processes, threads inside each

def scene_mixed(name: str, seed: int, procs_n: int, ops: int, threads: int) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    h = SharedHeap.create(name, 1 << 20)
    try:
        procs = [child("mixed-worker", name, str(seed * 100 + i), str(ops), str(threads)) for i in range(procs_n)]
        reports = [finish(p, timeout=3600) for p in procs]
        owned: set[int] = set()
        damaged = 0
        for r in reports:
            for off, _n, _seed in r["held"]:
                with h.view(off) as v:
                    try:
                        checked(v, len(v), f"block {off:#x}")
                    except Damaged:
                        damaged += 1
                owned.add(off)
            for key in r["values"]:
                check_value(h, key)
                owned.add(h.roots[key])
        owned |= names_blocks(h)
        in_use = {c.address + 16 for c in h.walk() if c.state == "in use"}
        h.check()
        return {"processes": procs_n, "threads": threads, "ops": sum(r["ops"] for r in reports),
                "worker_damaged": sum(r["damaged"] for r in reports), "damaged": damaged,
                "held": len(owned), "leaked": len(in_use - owned), "lost": len(owned - in_use),
                "seconds": round(time.monotonic() - started, 1), "size": h.size}
    finally:
        stop_all(procs)
        h.unlink()


def scene_mixed_worker(name: str, seed: int, ops: int, threads: int) -> dict[str, Any]:
    h = SharedHeap.attach(name)
    results: list[tuple[dict[int, tuple[int, int]], set[str], int, int]] = []
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            results.append(thread_ops(h, random.Random(seed * 1000 + t), f"P{os.getpid()}.T{t}", ops // threads))
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    held = [[off, n, s] for r in results for off, (n, s) in r[0].items()]
    return {"held": held, "values": [k for r in results for k in r[1]], "ops": sum(r[2] for r in results),
            "damaged": sum(r[3] for r in results)}


def thread_ops(h: SharedHeap, rng: random.Random, me: str, ops: int) -> tuple[dict[int, tuple[int, int]], set[str],
                                                                              int, int]:
    """`ops` mixed operations of one thread, every block's bytes checked before it is freed or resized and every
    value read back; (blocks held, value names held, operations, damaged blocks found)."""
    held: dict[int, tuple[int, int]] = {}
    names: set[str] = set()
    damaged = 0

    def intact(off: int, prefix: int | None = None) -> tuple[int, int]:
        nonlocal damaged
        with h.view(off) as v:
            try:
                return checked(v, len(v), f"{me} block {off:#x}", prefix)
            except Damaged:
                damaged += 1
                return held[off]

    for _ in range(ops):
        r = rng.random()
        if r < 0.35 or not held:
            m = size(rng) if rng.random() < 0.98 else rng.randint(8, 1 << 16)
            off = h.calloc(m, 1) if r < 0.05 else h.malloc(m)
            with h.view(off) as v:
                if r < 0.05 and v[:m].tobytes().count(0) != m:
                    damaged += 1
                n = min(m, MAX_FILL)
                seed = rng.randrange(256)
                fill(v, n, seed)
            held[off] = (n, seed)
        elif r < 0.65:
            off = rng.choice(list(held))
            intact(off)
            h.free(off)
            del held[off]
        elif r < 0.80:
            off = rng.choice(list(held))
            n, seed = intact(off)
            m = size(rng)
            new = h.realloc(off, m)
            del held[off]
            with h.view(new) as v:
                try:
                    checked(v, len(v), f"{me} realloc {off:#x} -> {new:#x}", prefix=m)
                except Damaged:
                    damaged += 1
                k = min(n, m, len(v))
                fill(v, k, seed)
            held[new] = (k, seed)
        elif r < 0.90:
            key = f"{me}.v{rng.randrange(4)}"
            h.put(key, value_for(rng))
            names.add(key)
            check_value(h, key)
        elif r < 0.93 and names:
            key = rng.choice(sorted(names))
            h.delete(key)
            names.discard(key)
        elif r < 0.97:
            if held:
                h.roots[f"{me}.r"] = rng.choice(list(held))
        elif names:
            check_value(h, rng.choice(sorted(names)))
    for off in held:
        intact(off)
    return held, names, ops, damaged


# ---------------------------------------------------------------- growth under other processes' views

def scene_growth(name: str, steps: int) -> dict[str, Any]:
    import numpy as np

    procs: list[subprocess.Popen[str]] = []
    h = SharedHeap.create(name, 1 << 16)
    try:
        a = h.ndarray("a", 8, np.int64)
        first_size = h.size
        procs = [child("viewer", name, str(i), str(steps), stdin=True) for i in range(3)]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        big: list[int] = []
        for k in range(1, steps + 1):
            big.append(h.malloc(h.size))  # never fits: the heap grows by at least its size
            h.put(f"g{k}", np.full(1000, k, dtype=np.int64))  # in the new part
            a[0] = k
            until = time.monotonic() + DEADLINE
            while not all(a[1:4] == k):  # every viewer saw step k through the view it held from the start
                if time.monotonic() > until:
                    raise AssertionError(f"viewers did not see growth step {k}: {a[1:4]}")
                time.sleep(0.001)
        reports = [finish(p) for p in procs]
        for off in big:
            h.free(off)
        h.check()
        del a
        return {"steps": steps, "first_size": first_size, "last_size": h.size,
                "viewers_ok": all(r["stable"] and r["seen"] == steps for r in reports)}
    finally:
        stop_all(procs)
        h.unlink()


def scene_viewer(name: str, i: int, steps: int) -> dict[str, Any]:
    import numpy as np

    h = SharedHeap.attach(name)
    a = h.get("a")
    addr = a.ctypes.data
    off = h.roots["a"]
    base = h.base
    print("ready", flush=True)
    seen = 0
    stable = True
    until = time.monotonic() + DEADLINE
    while seen < steps and time.monotonic() < until:
        k = int(a[0])
        if k > seen:
            g = h.get(f"g{k}")  # in a part of the heap this process had not mapped
            stable &= bool(np.array_equal(g, np.full(1000, k))) and a.ctypes.data == addr and h.base == base \
                and h.roots["a"] == off and h.address(off) + 64 == addr
            del g
            seen = k
            a[1 + i] = k  # a store through the old view, which the grower reads
        time.sleep(0.0005)
    return {"seen": seen, "stable": stable}


# ---------------------------------------------------------------- a file heap's writer killed

def scene_filekill(path: str, seed: int, iters: int) -> dict[str, Any]:
    rng = random.Random(seed)
    work = str(HERE / "shared_work.py")
    copy = path + ".copy"
    procs: list[subprocess.Popen[str]] = []
    out: dict[str, Any] = {"killed": 0, "copied_stopped": 0, "settled": 0, "pending_seen": 0, "leaked": 0,
                           "lost": 0, "ops": 0}
    h = SharedHeap.open(path, 1 << 16)
    h.roots["table0"] = h.calloc(T_SLOTS + SLOTS, 8)
    h.close()
    try:
        for it in range(iters):
            writer = child(work, "lane", path, "0", str(rng.getrandbits(32)), "file")
            procs = [writer]
            time.sleep(rng.uniform(0.3, 0.8))  # the interpreter starts, then it works
            target = path
            if it % 2:  # stop it at an instant and copy the file as it is then: a power cut's image
                os.kill(writer.pid, signal.SIGSTOP)
                shutil.copyfile(path, copy)
                target = copy
                out["copied_stopped"] += 1
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
            out["killed"] += 1
            facts = finish(child(work, "settle", target, "file"))
            out["settled"] += 1
            out["pending_seen"] += facts["pending"]
            out["leaked"] += facts["leaked"]
            out["lost"] += facts["lost"]
            if target == copy:
                os.unlink(copy)
        facts = finish(child(work, "settle", path, "file"))  # the original too, after its last writer's death
        out["settled"] += 1
        out["leaked"] += facts["leaked"]
        out["lost"] += facts["lost"]
        return out
    finally:
        stop_all(procs)
        if os.path.exists(copy):
            os.unlink(copy)


# ---------------------------------------------------------------- KeyboardInterrupt around operations

def scene_interrupts(name: str, seed: int, ops: int, interval_us: int) -> dict[str, Any]:
    rng = random.Random(seed)
    h = SharedHeap.create(name, 1 << 16)
    counts = {"ops": 0, "interrupted": 0, "damaged": 0}
    held: dict[int, tuple[int, int]] = {}
    armed = [False]

    def tick(signum: int, frame: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    table = h.calloc(T_SLOTS + SLOTS, 8)
    tv = h.view(table, (T_SLOTS + SLOTS) * 8).cast("Q")

    def intact(off: int) -> None:
        with h.view(off) as v:
            try:
                checked(v, len(v), f"block {off:#x}")
            except Damaged:
                counts["damaged"] += 1

    def live(off: int) -> bool:
        try:
            h.usable_size(off)
        except (malloc.InvalidPointer, malloc.DoubleFree):
            return False
        return True

    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, interval_us * 1e-6, interval_us * 1e-6)
    try:
        done = 0
        while done < ops:
            op, victim, filling = "", 0, 0
            try:
                armed[0] = True
                while done < ops:
                    op, victim, filling = "", 0, 0
                    counts["ops"] += 1
                    r = rng.random()
                    m = size(rng) if rng.random() < 0.97 else rng.randint(1 << 20, 3 << 20)
                    seed8 = rng.randrange(256)
                    # Between a call that returns a block and the store that records it, no call: a handler
                    # runs only after a call (or at a loop's jump), so the block is never lost in between.
                    if r < 0.30 or not held:
                        entry = (min(m, MAX_FILL), seed8)
                        off = h.malloc(m) if r < 0.25 else h.calloc(m, 1)
                        held[off] = entry
                        filling = off
                        with h.view(off) as v:
                            fill(v, *held[off])
                        filling = 0
                    elif r < 0.55:
                        victim = rng.choice(list(held))
                        intact(victim)
                        op = "free"
                        h.free(victim)
                        del held[victim]
                        op = ""
                    elif r < 0.70:
                        victim = rng.choice(list(held))
                        intact(victim)
                        n, s = held[victim]
                        entry = (min(n, m), s)
                        op = "realloc"
                        new = h.realloc(victim, m)
                        del held[victim]
                        held[new] = entry
                        op = ""
                        filling = new
                        with h.view(new) as v:
                            fill(v, *held[new])
                        filling = 0
                    elif r < 0.80:
                        h.put(f"v{rng.randrange(6)}", value_for(rng))
                    elif r < 0.85:
                        with contextlib.suppress(KeyError):
                            h.delete(f"v{rng.randrange(6)}")
                    elif r < 0.90:
                        s = rng.randrange(SLOTS)
                        if tv[T_SLOTS + s]:
                            h.free_at(table, T_SLOTS + s)
                        else:
                            h.malloc_at(table, T_SLOTS + s, m)
                    elif r < 0.95:
                        h.roots[f"r{rng.randrange(4)}"] = rng.choice(list(held))
                    else:
                        with contextlib.suppress(KeyError):
                            del h.roots[f"r{rng.randrange(4)}"]
                    done += 1
                armed[0] = False
            except KeyboardInterrupt:
                armed[0] = False
                done += 1
                counts["interrupted"] += 1
                if op == "free" and not live(victim):  # a free that happened
                    del held[victim]
                elif op == "realloc":  # it raised: the old block is live and intact, as it was
                    if live(victim):
                        intact(victim)
                    else:
                        counts["damaged"] += 1
                        del held[victim]
                if filling in held:
                    with h.view(filling) as v:
                        fill(v, *held[filling])
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        for off in held:
            intact(off)
        for key in list(h.roots):
            if key.startswith("v"):
                check_value(h, key)
        owned = set(held) | {table} | {off for off in tv[T_SLOTS:T_SLOTS + SLOTS] if off}
        owned |= {off for key, off in h.roots.items() if key.startswith("v")} | names_blocks(h)
        in_use = {c.address + 16 for c in h.walk() if c.state == "in use"}
        h.check()
        counts.update(leaked=len(in_use - owned), lost=len(owned - in_use))
        return counts
    finally:
        tv.release()
        h.unlink()


# ---------------------------------------------------------------- the lock taken over from a dead owner

def die_inside(h: SharedHeap, op: Any) -> None:
    """Fork a process that SIGKILLs itself in the middle of `op(h)`, after its first claimed block (the journal
    holds the operation's stores, the lock is held); reap it."""
    pid = os.fork()
    if pid == 0:
        Heap.claimed = lambda self, c: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
        try:
            op(h)
        finally:
            os._exit(1)  # not reached: killed inside op
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def scene_takeover(name: str) -> dict[str, Any]:
    h = SharedHeap.create(name, 1 << 16)
    try:
        keep = h.malloc(100)
        before = [c for c in h.walk()]
        die_inside(h, lambda g: g.calloc(500, 1))
        acquire = SharedHeap._acquire

        def interrupted(self: SharedHeap, got: list[int]) -> None:
            raise KeyboardInterrupt  # as a handler would, at the call's first line, the lock just taken

        SharedHeap._acquire = interrupted  # type: ignore[method-assign]
        try:
            h.malloc(10)  # the first try finds the owner dead: this thread holds the lock when the exception comes
            raised = False
        except KeyboardInterrupt:
            raised = True
        finally:
            SharedHeap._acquire = acquire  # type: ignore[method-assign]
        undone = [c for c in h.walk()] == before
        other = finish(child("probe", name), timeout=20)  # another process gets the lock, no wait
        after = h.malloc(10)
        h.free(after)
        h.free(keep)
        h.check()
        return {"raised": raised, "undone": undone, "other_process": other["ok"]}
    finally:
        h.unlink()


def scene_probe(name: str) -> dict[str, Any]:
    h = SharedHeap.attach(name)
    off = h.malloc(10)
    h.free(off)
    h.check()
    return {"ok": True}


# ---------------------------------------------------------------- a trim cut short

def scene_trimkill(name: str, how: str) -> dict[str, Any]:
    h = SharedHeap.create(name, 1 << 16)
    try:
        small = h.malloc(100)
        big = h.malloc(3 << 20)  # at the top: its free leaves more than the trim threshold there
        with h.view(big) as v:
            fill(v, MAX_FILL, 7)
            v[MAX_FILL:] = b"\xa5" * (len(v) - MAX_FILL)
        trim = Heap.trim
        if how == "kill":
            def trim_then_die(self: Heap, *args: Any, **kwargs: Any) -> bool:
                trim(self, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
                return False

            pid = os.fork()
            if pid == 0:
                Heap.trim = trim_then_die  # type: ignore[method-assign]
                h.free(big)
                os._exit(1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status), status
        else:
            def trim_then_raise(self: Heap, *args: Any, **kwargs: Any) -> bool:
                trim(self, *args, **kwargs)
                raise KeyboardInterrupt

            Heap.trim = trim_then_raise  # type: ignore[method-assign]
            try:
                h.free(big)
            except KeyboardInterrupt:
                pass
            finally:
                Heap.trim = trim  # type: ignore[method-assign]
        with h.view(big) as v:
            checked(v, len(v), "the block whose free was undone")
            tail = v[MAX_FILL:].tobytes().count(0xA5) == len(v) - MAX_FILL
        h.check()
        held_before = os.stat(h.path).st_blocks * 512
        h.free(big)  # now it happens: the top's pages go back
        held_after = os.stat(h.path).st_blocks * 512
        again = h.calloc(3 << 20, 1)
        with h.view(again) as v:
            zero = v.tobytes().count(0) == len(v)
        h.free(again)
        h.free(small)
        h.check()
        return {"intact": tail, "file_bytes_before": held_before, "file_bytes_after": held_after,
                "calloc_zero": zero}
    finally:
        h.unlink()


SCENES = {
    "values": lambda a: scene_values(a[0], int(a[1])),
    "read": lambda a: scene_read(a[0], int(a[1]), int(a[2])),
    "mixed": lambda a: scene_mixed(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4])),
    "mixed-worker": lambda a: scene_mixed_worker(a[0], int(a[1]), int(a[2]), int(a[3])),
    "growth": lambda a: scene_growth(a[0], int(a[1])),
    "viewer": lambda a: scene_viewer(a[0], int(a[1]), int(a[2])),
    "filekill": lambda a: scene_filekill(a[0], int(a[1]), int(a[2])),
    "interrupts": lambda a: scene_interrupts(a[0], int(a[1]), int(a[2]), int(a[3])),
    "takeover": lambda a: scene_takeover(a[0]),
    "probe": lambda a: scene_probe(a[0]),
    "trimkill": lambda a: scene_trimkill(a[0], a[1]),
}

if __name__ == "__main__":
    print(json.dumps(SCENES[sys.argv[1]](sys.argv[2:])), flush=True)
