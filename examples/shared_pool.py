"""A pool of worker processes sharing numpy arrays through one shared heap, found by name.

The parent builds its input inside the heap (`h.ndarray`: the array is made there, never copied), copies in a
small array of weights (`h.put`), and hands the heap to the pool: a heap pickles as its name, so each worker
attaches to it once, in the pool's initializer. A task reads its rows of the input zero-copy, writes its result
into a new array under a name of its own, and returns only that name. The parent reads the results by name,
checks them against numpy working on its own, and removes the heap at the end.

    python examples/shared_pool.py [--workers N] [--rows N] [--cols N]

From any other process, `malloc heap --shared NAME` draws such a heap and its names (NAME is printed first).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from typing import Any

import numpy as np

from malloc import SharedHeap

_heap: SharedHeap | None = None  # in a worker: the heap, attached by the pool's initializer


def attach(heap: SharedHeap) -> None:
    """The pool's initializer: `heap` arrived as its name and is attached in this worker, for every task."""
    global _heap
    _heap = heap


def weighted_norms(task: tuple[int, int, int]) -> tuple[str, int]:
    """One task: the weighted norms of rows lo to hi of the input, written under the name "norms/INDEX";
    returns that name and this worker's process id."""
    index, lo, hi = task
    h = _heap
    assert h is not None, "the pool's initializer attaches the heap"
    data = h.get("data")  # zero-copy views of the parent's arrays, in this process's mapping of the heap
    weights = h.get("weights")
    name = f"norms/{index}"
    out = h.ndarray(name, (hi - lo,), np.float64)  # the result, made in the heap and filled in place
    np.sqrt((data[lo:hi] ** 2 * weights).sum(axis=1), out=out)
    return name, os.getpid()


def compute(h: SharedHeap, workers: int, rows: int, cols: int) -> dict[str, Any]:
    """Fill the input, run the pool over it, check and free the results; what happened, for the report."""
    rng = np.random.default_rng(2026)
    data = h.ndarray("data", (rows, cols), np.float64)
    data[:] = rng.standard_normal((rows, cols))
    h.put("weights", rng.random(cols))
    step = -(-rows // (4 * workers))  # a few tasks per worker, so that they share the work out
    tasks = [(i, lo, min(rows, lo + step)) for i, lo in enumerate(range(0, rows, step))]
    # "spawn": every worker is a fresh interpreter that attaches by name (a forked one would inherit the mapping).
    with multiprocessing.get_context("spawn").Pool(workers, initializer=attach, initargs=(h,)) as pool:
        done = pool.map(weighted_norms, tasks)
        pool.close()
        pool.join()
    names = [name for name, _ in done]
    norms = np.concatenate([h.get(name) for name in names])
    expected = np.sqrt((data ** 2 * h.get("weights")).sum(axis=1))
    report = {"tasks": len(tasks), "workers": len({pid for _, pid in done}), "names": len(h.roots),
              "segment": h.size, "in_use": h.mallinfo().uordblks, "match": bool(np.allclose(norms, expected))}
    for name in [*names, "data", "weights"]:
        h.delete(name)
    h.check()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="processes in the pool (default 4)")
    parser.add_argument("--rows", type=int, default=4000, help="rows of the input (default 4000)")
    parser.add_argument("--cols", type=int, default=500, help="columns of the input (default 500)")
    args = parser.parse_args(argv)
    if min(args.workers, args.rows, args.cols) < 1:
        parser.error("--workers, --rows and --cols must be at least 1")
    name = f"shared-pool-{os.getpid()}"
    print(f"shared heap {name!r}: {args.rows} x {args.cols} float64 input, {args.workers} workers")
    h = SharedHeap.create(name, 1 << 20)  # it grows on demand, in place
    try:
        report = compute(h, args.workers, args.rows, args.cols)
    finally:
        h.unlink()  # the name goes at once; this process's mapping lasts until close()
    h.close()  # every array over the heap is gone with compute()'s frame
    print(f"{report['tasks']} tasks ran in {report['workers']} worker processes, each writing its result under "
          f"a name: {report['names']} names with the input's, {report['in_use'] / 2**20:.1f} MiB in use, "
          f"the segment grown to {report['segment'] / 2**20:.1f} MiB")
    print(f"results {'match' if report['match'] else 'DO NOT MATCH'} numpy's; all freed, the heap checked, "
          f"closed and unlinked")
    return 0 if report["match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
