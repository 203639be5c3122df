"""Shared heaps between real processes: values read by name elsewhere, many processes and threads at once, growth
under other processes' views, a file heap whose writer died, and the lock and the journal at the instants where a
signal or a kill can land (issue 12, "Many processes, and processes that die" and "Tests").

Every scene runs in a child process (tests/shared_scenes.py, tests/shared_work.py: a crash fails a test instead of
killing pytest) in a session of its own, with a timeout; whatever it started is stopped by its process group's id,
and its segments and files are removed, even when the test fails. `MALLOC_SHARED_LONG=1` runs the long versions
(4 processes x 10^5 operations x 4 threads, 10^5 interrupted operations, 20 file kills).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_run import HERE, LONG, SRC, run


def test_values_put_by_one_process_are_read_intact_by_name_in_others(shm_name: str) -> None:
    """Arrays of many dtypes and layouts (records, big-endian, Fortran order, 0-d, empty, 3 MB) and bytes, read
    by name in three other processes and in a spawn pool that got the heap pickled; the readers' own puts are
    read back; the readers' exits leave the segment alone."""
    facts = run("shared_scenes.py", "values", shm_name, "5")
    assert facts == {"readers": 3, "values": 12, "all_matched": True, "replies_seen": True, "pool_ok": True,
                     "segment_kept": True}


def test_processes_with_threads_doing_verified_mixed_operations_at_once(shm_name: str) -> None:
    """4 processes x 2 threads (long: x 4 threads, 10^5 operations a process) of malloc, calloc, realloc, free,
    put, delete and roots, every block's bytes checked by its thread and then by another process; afterwards
    the blocks in use are exactly those the threads hold."""
    ops, threads = (100_000, 4) if LONG else (3000, 2)
    facts = run("shared_scenes.py", "mixed", shm_name, "1", "4", str(ops), str(threads), timeout=3600)
    assert facts["ops"] == 4 * (ops // threads) * threads
    assert (facts["worker_damaged"], facts["damaged"], facts["leaked"], facts["lost"]) == (0, 0, 0, 0), facts
    assert facts["held"] > 100


def test_growth_keeps_the_views_and_addresses_of_three_other_processes(shm_name: str) -> None:
    """The heap grows from 80 KiB to about 24 MB in 8 steps while three processes hold a numpy view of a value in
    it: each sees every step's new value (in the part it had not mapped) and answers through its old view, whose
    address never moved."""
    facts = run("shared_scenes.py", "growth", shm_name, "8")
    assert facts["viewers_ok"], facts
    assert facts["last_size"] >= 256 * facts["first_size"]


def test_a_file_heap_whose_writer_died_mid_operation_reopens_consistent(tmp_path: Path) -> None:
    """A worker on a file heap is killed at a random instant, or stopped and its file copied then (what a power
    cut leaves: the lock shown held by no one, a journal not empty); a new process opens the file (or the copy),
    finds every block whole, and the blocks in use are exactly those accounted for."""
    iters = 20 if LONG else 4
    facts = run("shared_scenes.py", "filekill", str(tmp_path / "heap"), "3", str(iters), timeout=600)
    assert facts["killed"] == iters and facts["copied_stopped"] == iters // 2 and facts["settled"] == iters + 1
    assert (facts["leaked"], facts["lost"]) == (0, 0), facts


@pytest.mark.parametrize("seed", [1, 2])
def test_keyboard_interrupts_around_operations_leave_the_heap_whole_and_accounted(shm_name: str, seed: int) -> None:
    """A timer's handler raises KeyboardInterrupt every 300 µs around malloc, calloc, realloc, free, put, delete,
    roots and malloc_at/free_at: a call that raised did nothing (a free may have happened), every block is intact,
    check() passes and the blocks in use are exactly those held."""
    ops = 100_000 if LONG else 12_000
    facts = run("shared_scenes.py", "interrupts", shm_name, str(seed), str(ops), "300", timeout=900)
    assert facts["interrupted"] > 300, facts
    assert (facts["damaged"], facts["leaked"], facts["lost"]) == (0, 0, 0), facts


def test_an_exception_as_the_lock_is_taken_over_from_a_dead_owner_leaves_it_usable(shm_name: str) -> None:
    """A process dies holding the lock in the middle of a calloc; the next caller is interrupted (as by a signal
    handler) just after taking the lock over: the dead operation is undone, and this process and another one take
    the lock at once (before the fix: held for good, or ENOTRECOVERABLE)."""
    assert run("shared_scenes.py", "takeover", shm_name, timeout=60) == {
        "raised": True, "undone": True, "other_process": True}


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_free_cut_short_after_its_trim_keeps_its_block_and_later_gives_the_pages_back(shm_name: str,
                                                                                       how: str) -> None:
    """A 3 MB block at the top is freed, and the free is cut short after its trim (its process killed, or an
    exception): the block is live and every byte intact. Freed for good, its pages leave the file, and a calloc
    over them reads zeroes."""
    facts = run("shared_scenes.py", "trimkill", shm_name, how, timeout=60)
    assert facts["intact"] and facts["calloc_zero"], facts
    assert facts["file_bytes_before"] > 3 << 20 > (1 << 20) > facts["file_bytes_after"], facts


def child(code: str, timeout: float = 60) -> list[str]:
    """Run `code` in a fresh interpreter (a crash or a hang fails the test); its output lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout.split()


def test_a_file_copied_while_its_lock_was_held_opens_at_once(tmp_path: Path) -> None:
    """The copy shows the lock held by a thread that no longer holds anything (no kernel will hand it on): opened
    with no other process using it, the lock is made anew instead of waited for."""
    out = child(f"""if True:
        import os, shutil, signal, threading, malloc
        from malloc.os import mutex
        path, copy = {str(tmp_path / "heap")!r}, {str(tmp_path / "copy")!r}
        h = malloc.SharedHeap.open(path, 1 << 16)
        h.put("x", b"hello")
        pid = os.fork()
        if pid == 0:
            mutex.try_lock_fast(mutex.handle(h.base + 64))
            shutil.copyfile(path, copy)
            mutex.unlock_fast(mutex.handle(h.base + 64))
            os._exit(0)
        os.waitpid(pid, 0)
        h.close()
        signal.alarm(20)  # a wait for the lock would hang: end with SIGALRM instead
        g = malloc.SharedHeap.open(copy)
        print(bytes(g.get("x")).decode(), g.malloc(10) > 0)
        g.check()
        """)
    assert out == ["hello", "True"]


def test_malloc_at_realloc_at_free_at_keep_the_offset_in_the_table_and_refuse_misuse(shm_name: str) -> None:
    out = child(f"""if True:
        import malloc
        h = malloc.SharedHeap.create({shm_name!r}, 1 << 16)
        try:
            t = h.calloc(4, 8)
            word = h.view(t, 32).cast("Q")
            a = h.malloc_at(t, 1, 100)
            print(word[1] == a, h.usable_size(a) >= 100)
            b = h.realloc_at(t, 1, 5000)
            print(word[1] == b, h.usable_size(b) >= 5000)
            h.free_at(t, 1)
            print(word[1] == 0)
            h.free_at(t, 1)  # the word holds 0: nothing to free
            word[2] = t
            before = h.walk()
            for args, error in [((t, 9, 1), IndexError), ((t + 16, 0, 1), malloc.InvalidPointer),
                                ((-1, 0, 1), malloc.InvalidPointer), ((t, -1, 1), ValueError)]:
                try:
                    h.malloc_at(*args)
                    print("no-error")
                except error:
                    pass
            for fn in (lambda: h.free_at(t, 2), lambda: h.realloc_at(t, 2, 10)):
                try:
                    fn()
                    print("no-error")
                except ValueError:  # the word names the table itself
                    pass
            print(h.walk() == before, word[2] == t)
            h.check()
            word.release()
        finally:
            h.unlink()
        """)
    assert out == ["True"] * 7
