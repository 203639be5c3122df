"""The kill test (issue 12): workers doing verified mixed operations on one shared heap are killed with SIGKILL at
random instants, some inside a growth of the segment, while the others keep working.

The workers are forked by an orchestrator (tests/shared_work.py, run in a child process) over heaps that start at
64 KiB; every block a worker owns is named in the heap itself, by an operation that makes or frees the block and
its name together (`malloc_at`, `realloc_at`, `free_at`, `put`, `delete`). A killed worker's lane is taken over by
a new worker that checks every block of it first. Each round ends with the survivors stopped (SIGTERM, with a
deadline: no process may wait forever), every lane and value checked, `check()`, and the blocks in use compared
with those accounted for, exactly. `MALLOC_SHARED_LONG=1` runs 5000 kills over 100 heaps.
"""

from __future__ import annotations

from shared_run import LONG, run


def test_workers_killed_at_random_instants_leave_every_owned_block_intact_and_accounted(shm_name: str) -> None:
    kills, rounds = (5000, 100) if LONG else (500, 20)
    facts = run("shared_work.py", "kill", shm_name, "20261130", str(kills), str(rounds), "4", timeout=3600)
    assert facts["failures"] == [], facts
    assert facts["kills"] >= kills and facts["rounds"] == rounds, facts
    assert (facts["leaked"], facts["lost"]) == (0, 0), facts
    assert facts["kills_in_grow_op"] + facts["kills_in_growth"] > 0, facts  # some landed inside a growth
    assert facts["kills_noted"] > kills // 10, facts  # many inside an operation on a block
