"""Workers for the shared heap's process tests: verified mixed operations whose every block is accounted for.

A *lane* is one worker's share of a heap: a table block (named "table<i>" in roots) whose words hold the offsets
of the lane's blocks, changed only by `malloc_at`, `realloc_at` and `free_at`, so a block and the word naming it
come and go in one operation; and the values put under the names "L<i>.v<k>" (a put is one operation too). A
worker may be killed at any instant, and another worker takes its lane over.

Every block carries its own description: a header word (a magic number, a pattern seed and the number n of
checked bytes) and then n - 8 bytes of a pattern that a realloc keeps as a prefix. Before an operation on a slot,
the worker notes it in the table's first words (slot, operation, size): the one block whose bytes a kill may
leave unfinished. `Lane.resolve` settles such a note and checks every other block of the lane whole.

`python tests/shared_work.py MODE ...` runs one scenario and prints one JSON line of counts (the tests run it in
a child process, so that a crash fails a test instead of killing pytest):

    kill NAME SEED KILLS ROUNDS LANES   workers forked and killed with SIGKILL at random instants, replaced
    lane NAME LANE SEED [file]          one worker on an existing heap until SIGTERM (file: NAME is a path)
    settle NAME [file]                  take every lane over, check it, then exact accounting and check()
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
import traceback
from typing import Any

import malloc
from malloc.shared.names import T_ENTRIES, TOMBSTONE
from malloc.shared.segment import J_START, S_EXTENT, S_JOURNAL, S_ROOTS, SEG_HEADER

MAGIC = 0x5EED
GROW_LIMIT = 32 << 20  # the heap size up to which a worker makes allocations that grow the heap
MAX_FILL = 1 << 17  # the checked bytes of a block: a growing allocation is larger, and only its start is filled
PAT = bytes(range(256)) * (MAX_FILL // 256 + 2)
T_PENDING, T_OP, T_SIZE, T_DONE, T_SLOTS = range(5)
SLOTS = 40
ALLOC, FREE, REALLOC, GROW = 1, 2, 3, 4
VALUES = 6  # value names per lane
ROOTS = 4  # root names per lane


class Damaged(AssertionError):
    """A block or value whose bytes are not what its owner wrote."""


def fill(v: memoryview, n: int, seed: int) -> None:
    """Write n checked bytes at the start of `v`: the pattern, then the header (last: until it is written, an
    interrupted fill is the one the lane's note names)."""
    v[8:n] = PAT[seed:seed + n - 8]
    v[:8] = ((MAGIC << 48) | (seed << 40) | n).to_bytes(8, "little")


def checked(v: memoryview, usable: int, where: str, prefix: int | None = None) -> tuple[int, int]:
    """(n, seed) of the block whose usable bytes `v` holds, after checking its header and its first `prefix`
    checked bytes (all n by default: with a prefix, n may exceed the block, as after a shrinking realloc);
    Damaged otherwise."""
    word = int.from_bytes(v[:8], "little")
    magic, seed, n = word >> 48, (word >> 40) & 0xFF, word & ((1 << 40) - 1)
    if magic != MAGIC or not 8 <= n <= MAX_FILL or (prefix is None and n > usable):
        raise Damaged(f"{where}: bad header {word:#x} (usable {usable})")
    k = n if prefix is None else min(n, prefix, usable)
    if v[8:k] != PAT[seed:seed + k - 8]:
        raise Damaged(f"{where}: the pattern of {n} bytes is damaged")
    return n, seed


def size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.80:
        return rng.randint(8, 512)
    if r < 0.95:
        return rng.randint(513, 8192)
    if r < 0.99:
        return rng.randint(8193, 100_000)
    return rng.randint(1 << 20, 3 << 20)  # freed at the top, it crosses the trim threshold


def value_for(rng: random.Random) -> object:
    """A self-describing value: pattern bytes with their header, or a numpy arange."""
    if rng.random() < 0.3:
        import numpy as np

        start = rng.randrange(1 << 30)
        return np.arange(start, start + rng.randrange(1, 3000), dtype=rng.choice(("<i8", ">i8")))
    n = rng.randint(8, 4000) if rng.random() < 0.97 else rng.randint(60_000, MAX_FILL)
    buf = bytearray(n)
    fill(memoryview(buf), n, rng.randrange(256))
    return bytes(buf)


def check_value(h: malloc.SharedHeap, name: str) -> None:
    """The value under `name` is one a worker put, whole; KeyError when there is none."""
    x = h.get(name)
    if isinstance(x, memoryview):
        try:
            n, _ = checked(x, len(x), f"value {name!r}")
            if n != len(x):
                raise Damaged(f"value {name!r}: {len(x)} bytes, its header says {n}")
        finally:
            x.release()
        return
    import numpy as np

    if x.ndim != 1 or not len(x) or not np.array_equal(x, np.arange(x[0], x[0] + len(x))):
        raise Damaged(f"value {name!r}: the array is damaged")


class Lane:
    """A worker's lane of heap `h`: its table, slots and values (see the module docstring)."""

    def __init__(self, h: malloc.SharedHeap, lane: int, rng: random.Random) -> None:
        self.h = h
        self.lane = lane
        self.rng = rng
        self.table = h.roots[f"table{lane}"]
        self.tv = h.view(self.table, (T_SLOTS + SLOTS) * 8).cast("Q")

    def block(self, s: int) -> memoryview:
        """A view of the block in slot `s` (which must hold one)."""
        return self.h.view(self.tv[T_SLOTS + s])

    def resolve(self) -> dict[str, int]:
        """Take the lane over (its last worker may have been killed): settle the noted operation, check every
        block. Counts of what the note showed."""
        tv = self.tv
        self.h.usable_size(self.table)  # an operation first: the lock repairs what a killed holder left
        out = {"pending": 0, "pending_grow": 0}
        if tv[T_PENDING]:
            out["pending"] = 1
            s, op, m = tv[T_PENDING] - 1, tv[T_OP], tv[T_SIZE]
            out["pending_grow"] = int(op == GROW)
            where = f"lane {self.lane} slot {s} (noted op {op})"
            if tv[T_SLOTS + s]:  # else: an allocation that did not happen, or a free that did
                v = self.block(s)
                if op in (ALLOC, GROW):  # made, perhaps not filled
                    fill(v, min(len(v), m, MAX_FILL), self.rng.randrange(256))
                elif op == REALLOC:  # the old block, or the new one with the old bytes as a prefix
                    n, seed = checked(v, len(v), where, prefix=m)
                    fill(v, min(n, m, len(v)), seed)
                else:  # a free that did not happen
                    checked(v, len(v), where)
                v.release()
            tv[T_PENDING] = 0
        for s in range(SLOTS):
            if tv[T_SLOTS + s]:
                v = self.block(s)
                checked(v, len(v), f"lane {self.lane} slot {s}")
                v.release()
        return out

    def note(self, s: int, op: int, m: int = 0) -> None:
        self.tv[T_OP] = op
        self.tv[T_SIZE] = m
        self.tv[T_PENDING] = s + 1

    def step(self) -> None:
        """One random operation, its effect checked."""
        h, rng, tv = self.h, self.rng, self.tv
        r = rng.random()
        full = [s for s in range(SLOTS) if tv[T_SLOTS + s]]
        empty = [s for s in range(SLOTS) if not tv[T_SLOTS + s]]
        try:
            if not full or (r < 0.30 and empty):
                s = rng.choice(empty)
                m = size(rng)
                self.note(s, ALLOC, m)
                off = h.malloc_at(self.table, T_SLOTS + s, m)
                with h.view(off) as v:
                    fill(v, min(m, MAX_FILL), rng.randrange(256))
            elif r < 0.32 and empty and h.size * 2 < min(h.max_size, GROW_LIMIT):  # one it cannot hold unless grown
                s = rng.choice(empty)
                m = h.size + rng.randrange(1 << 16)
                self.note(s, GROW, m)
                off = h.malloc_at(self.table, T_SLOTS + s, m)
                tv[T_OP] = ALLOC  # grown: what is left is the fill
                with h.view(off) as v:
                    fill(v, min(m, MAX_FILL), rng.randrange(256))
            elif r < 0.50:
                s = rng.choice(full)
                v = self.block(s)
                checked(v, len(v), f"lane {self.lane} slot {s}")
                v.release()
                self.note(s, FREE)
                h.free_at(self.table, T_SLOTS + s)
            elif r < 0.64:
                s = rng.choice(full)
                v = self.block(s)
                n, seed = checked(v, len(v), f"lane {self.lane} slot {s}")
                v.release()
                m = size(rng)
                self.note(s, REALLOC, m)
                off = h.realloc_at(self.table, T_SLOTS + s, m)
                with h.view(off) as v:
                    checked(v, len(v), f"lane {self.lane} slot {s} after realloc", prefix=m)
                    fill(v, min(n, m, len(v)), seed)
                    k = min(m, MAX_FILL, len(v))
                    if k > n:
                        fill(v, k, seed)
            elif r < 0.78:
                name = f"L{self.lane}.v{rng.randrange(VALUES)}"
                h.put(name, value_for(rng))
                check_value(h, name)
            elif r < 0.84:
                with contextlib.suppress(KeyError):
                    h.delete(f"L{self.lane}.v{rng.randrange(VALUES)}")
            elif r < 0.90:
                h.roots[f"L{self.lane}.r{rng.randrange(ROOTS)}"] = tv[T_SLOTS + rng.choice(full)] if full \
                    else self.table
            elif r < 0.94:
                with contextlib.suppress(KeyError):
                    del h.roots[f"L{self.lane}.r{rng.randrange(ROOTS)}"]
            else:
                with contextlib.suppress(KeyError):
                    check_value(h, f"L{self.lane}.v{rng.randrange(VALUES)}")
        except MemoryError:
            pass  # the heap is at its limit: the operation did nothing
        tv[T_PENDING] = 0
        tv[T_DONE] += 1


def names_blocks(h: malloc.SharedHeap) -> set[int]:
    """The blocks of the names table: the table and each name's key block (names.py's layout), read from the
    segment's header in its file and the table block's words."""
    with open(h.path, "rb") as f:
        header = f.read(64)
    t = int.from_bytes(header[S_ROOTS * 8:S_ROOTS * 8 + 8], "little")
    if not t:
        return set()
    with h.view(t) as v:
        words = v.cast("Q")
        cap = words[1]
        keys = {words[T_ENTRIES + 3 * i + 1] for i in range(cap)}
        words.release()
    return {t} | {k for k in keys if k > TOMBSTONE}


def settle(h: malloc.SharedHeap, rng: random.Random) -> dict[str, Any]:
    """Take every lane over and check it, check every value, then compare the blocks in use with those
    accounted for, and run check(). Counts; Damaged on a damaged block."""
    lanes = sorted(int(n[5:]) for n in h.roots if n.startswith("table"))
    owned: set[int] = set()
    out = {"lanes": len(lanes), "blocks": 0, "values": 0, "pending": 0}
    for i in lanes:
        lane = Lane(h, i, rng)
        out["pending"] += lane.resolve()["pending"]
        owned.add(lane.table)
        owned.update(off for off in lane.tv[T_SLOTS:T_SLOTS + SLOTS] if off)
        lane.tv.release()
    out["blocks"] = len(owned)
    for name, off in list(h.roots.items()):
        if ".v" in name:
            check_value(h, name)
            owned.add(off)
            out["values"] += 1
    owned |= names_blocks(h)
    in_use = {c.address + 16 for c in h.walk() if c.state == "in use"}
    out["leaked"] = len(in_use - owned)
    out["lost"] = len(owned - in_use)
    h.check()
    out["size"] = h.size
    return out


def work(h: malloc.SharedHeap, lane: int, seed: int, stop: list[int]) -> int:
    """A worker: take the lane over, then operate until `stop` is set; the operations done."""
    w = Lane(h, lane, random.Random(seed))
    w.resolve()
    done = 0
    while not stop:
        w.step()
        done += 1
    w.tv.release()
    return done


def _forked_worker(h: malloc.SharedHeap, lane: int, seed: int) -> int:
    """Fork a worker on lane `lane`; its pid. It stops at SIGTERM (after its current operation) and always
    leaves with os._exit: 0 stopped, 3 on an exception (its traceback on stderr)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the child's handler is in place
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return pid
    code = 3
    try:
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.nice(5)  # the orchestrator, which kills, runs first
        work(h, lane, seed, stop)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _reap(pid: int, deadline: float) -> int:
    """Wait for `pid` until `deadline` (monotonic); its wait status, or -1 if it is still running (then killed)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


def _await_growth(h: malloc.SharedHeap, lanes: int, deadline: float) -> int | None:
    """A lane whose worker has noted a growing allocation not yet returned, polled until `deadline`; or None."""
    tables = [h.view(h.roots[f"table{i}"], 16) for i in range(lanes)]
    notes = [t.cast("Q") for t in tables]
    try:
        while time.monotonic() < deadline:
            for i, words in enumerate(notes):
                if words[T_PENDING] and words[T_OP] == GROW:
                    return i
            time.sleep(0.0002)
        return None
    finally:
        for view in notes + tables:
            view.release()


def _growth_cut(path: str) -> bool:
    """Whether the segment shows a growth under way: its file longer than its extent, or the extent's word in
    the journal. Read without the lock, just after a kill (before the next holder repairs, most times): a lower
    bound of the kills that landed inside a growth."""
    with open(path, "rb") as f:
        header = f.read(SEG_HEADER)
        length = os.fstat(f.fileno()).st_size
    words = memoryview(header).cast("Q")
    n = words[S_JOURNAL]
    cut = length > words[S_EXTENT] or (J_START <= n <= len(words) and S_EXTENT in words[J_START:n:2])
    words.release()
    return cut


def kill_rounds(name: str, seed: int, kills: int, rounds: int, lanes: int) -> dict[str, Any]:
    """The kill test (see the module docstring): `rounds` heaps, each starting small, with `lanes` workers
    killed `kills` times in all at random instants while the others work; every round ends with the survivors
    stopped and `settle`. Counts."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"kills": 0, "kills_in_growth": 0, "kills_in_grow_op": 0, "kills_noted": 0,
                           "ops": 0, "failures": [], "rounds": 0, "max_size": 0, "leaked": 0, "lost": 0}
    started = time.monotonic()
    for rnd in range(rounds):
        h = malloc.SharedHeap.create(name, 1 << 16, max_size=32 << 20)
        pids: dict[int, int] = {}
        try:
            for i in range(lanes):
                h.roots[f"table{i}"] = h.calloc(T_SLOTS + SLOTS, 8)
            for i in range(lanes):
                pids[i] = _forked_worker(h, i, rng.getrandbits(32))
            target = kills * (rnd + 1) // rounds
            while out["kills"] < target and not out["failures"]:
                time.sleep(rng.uniform(0.0, 0.01))
                victims = rng.sample(range(lanes), rng.randint(1, max(1, lanes // 2)))  # the others work on
                if rng.random() < 0.25:  # wait for a growing allocation, and kill inside it
                    growing = _await_growth(h, lanes, time.monotonic() + 0.05)
                    if growing is not None:
                        time.sleep(rng.uniform(0.0, 0.002))
                        victims = [growing]
                for i in victims:
                    os.kill(pids[i], signal.SIGKILL)
                for i in victims:
                    _, status = os.waitpid(pids.pop(i), 0)
                    out["kills_in_growth"] += _growth_cut(h.path)
                    if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGKILL:
                        out["failures"].append(f"round {rnd} lane {i}: worker ended by itself (status {status})")
                    out["kills"] += 1
                    with h.view(h.roots[f"table{i}"], 16) as note:
                        words = note.cast("Q")
                        if words[T_PENDING]:
                            out["kills_noted"] += 1
                            out["kills_in_grow_op"] += words[T_OP] == GROW
                        words.release()
                for i in victims:
                    pids[i] = _forked_worker(h, i, rng.getrandbits(32))
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            for i, pid in list(pids.items()):
                status = _reap(pid, deadline)
                del pids[i]
                if status != 0:
                    out["failures"].append(f"round {rnd} lane {i}: stopped worker status {status}")
            facts = settle(h, rng)
            out["leaked"] += facts["leaked"]
            out["lost"] += facts["lost"]
            out["max_size"] = max(out["max_size"], facts["size"])
            for i in range(lanes):
                with h.view(h.roots[f"table{i}"], 32) as note:
                    words = note.cast("Q")
                    out["ops"] += words[T_DONE]
                    words.release()
            out["rounds"] += 1
        finally:
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            h.unlink()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "kill":
        name, seed, kills, rounds, lanes = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
        print(json.dumps(kill_rounds(name, seed, kills, rounds, lanes)), flush=True)
        return 0
    attach = malloc.SharedHeap.open if argv[-1] == "file" else malloc.SharedHeap.attach
    h = attach(argv[1])
    if mode == "lane":
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        print(json.dumps({"ops": work(h, int(argv[2]), int(argv[3]), stop)}), flush=True)
        return 0
    if mode == "settle":
        print(json.dumps(settle(h, random.Random(0))), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
