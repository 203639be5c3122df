"""One replay in this (fresh) process: `python -m malloc.traces.worker ALLOC MODE TRACE [options]`.

TRACE is a trace file, or the lab's binary form of one (`malloc.traces.opsfile`, which a worker reads
without disturbing glibc's heap). ALLOC is ours, glibc or mpheap; MODE is time (the timed loop),
footprint (sampled after every operation; --series keeps every sample), verify or timeline (the heap after
every operation, ours or glibc: see `malloc.traces.timeline`; timeline-check also compares the recorded chunks
with a whole walk after every operation, slowly, for the tests).
The result is one line of JSON on standard output, also when the replay fails (then with "error" and
"traceback"); the exit status is 1 then. The lab (`malloc.traces.lab`) starts these; they are not meant to
be run by hand, except to debug one.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import sys
import traceback
from typing import Any

from . import timeline
from .baselines import (
    SelfTrace,
    from_foreign_call,
    from_mmap_module,
    glibc,
    measure_glibc,
    measure_mpheap,
    plug_glibc,
    tcache_chunk,
)
from .formats import load
from .opsfile import is_ops_file, read_ops
from .replay import Json, Window, measure_ours
from .settings import parse_setting

ALLOCATORS = ("ours", "glibc", "mpheap")
MODES = ("time", "footprint", "verify", "timeline", "timeline-check")

# How the lab starts a worker: `python -c START ALLOC MODE TRACE [options]`. Before anything else is
# imported it gives glibc 4 MiB of free heap (64 blocks of 64 KiB, under the mmap threshold, freed behind a
# 65th that keeps them off the top). The interpreter then reads the larger modules (typing, 157 KiB
# compiled; inspect, 139 KiB) into that free chunk instead of into mappings of their own, and frees no
# mapping, which would raise glibc's dynamic mmap threshold: glibc replays with the threshold a fresh C
# program has, 128 KiB, and its dynamic rule still on. The plug fills the free chunk like any other hole.
RESERVE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(65536) for _ in range(65)]
for block in blocks[:-1]:
    libc.free(block)
del blocks, block, libc
"""
START = RESERVE + """
from malloc.traces.worker import main
sys.exit(main(sys.argv[1:]))
"""


def work(alloc: str, mode: str, path: str, settings: list[str], strace_log: str | None, series: bool) -> Json:
    """Load the trace, prepare the C library's heap, replay, and return the figures."""
    if alloc not in ALLOCATORS:
        raise ValueError(f"unknown allocator {alloc!r}")
    trace = read_ops(path) if is_ops_file(path) else load(path)
    pairs = [(s.param, s.value) for s in map(parse_setting, settings)]
    # before the plug: starting strace allocates
    timeline_mode = mode.startswith("timeline")
    tracer = SelfTrace(strace_log, timestamps=timeline_mode) if strace_log else None
    window: Window = tracer.window if tracer else contextlib.nullcontext
    result: Json = {"alloc": alloc, "mode": mode}
    # Whatever the replay needs is made now, before the C library's heap is prepared: glibc allocating
    # after the plug would grow its heap by a top pad that the replay then gets for free.
    libc = glibc()
    tcache = tcache_chunk() if alloc == "glibc" else 0
    table: list[Any] = [None if alloc == "mpheap" else 0] * (trace.num_ids + 1)
    samples = [0] * trace.num_ops if series or (alloc == "ours" and mode == "footprint") else None
    buffers = timeline.Buffers(trace) if timeline_mode and alloc == "glibc" else None
    gc.collect()  # garbage freed after the plug would leave holes in glibc's heap again
    gc.disable()  # no collector pauses inside the loop, for every allocator
    # glibc replays on a heap without free space, so that its break growth counts what the trace needs,
    # not the holes the interpreter left; the others only need the C library's free top given back.
    if alloc == "glibc":
        result["plugged"] = plug_glibc(libc)
    else:
        libc.malloc_trim(0)
    if timeline_mode:
        check = mode == "timeline-check"
        if alloc == "ours":
            result.update(timeline.record_ours(trace, pairs, table, check))
        elif buffers is not None:
            result.update(timeline.record_glibc(libc, trace, pairs, table, tcache, buffers, window, check))
        else:
            raise ValueError(f"no timeline for {alloc}")
    elif alloc == "ours":
        result.update(measure_ours(trace, mode, pairs, table, samples, window))
    elif alloc == "glibc":
        result.update(measure_glibc(libc, trace, mode, pairs, table, tcache, samples, window))
    else:
        result.update(measure_mpheap(trace, mode, table, samples, window))
    gc.enable()
    if series and samples is not None and mode == "footprint":
        result["series"] = samples
    if tracer is not None:
        origin = from_mmap_module if alloc == "mpheap" else from_foreign_call
        result["strace"], result["strace_other"] = tracer.stop(origin)
        if timeline_mode and "timeline" in result:
            timeline.add_strace(result, tracer.log)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one replay from the command line; prints its JSON line and returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m malloc.traces.worker", description=__doc__)
    parser.add_argument("alloc", choices=ALLOCATORS)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("trace")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings")
    parser.add_argument("--strace", metavar="LOG", help="count system calls with strace, logging to LOG")
    parser.add_argument("--series", action="store_true", help="keep the footprint after every operation")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash inside an allocator still leaves a Python traceback on stderr
    try:
        result = work(args.alloc, args.mode, args.trace, args.settings, args.strace, args.series)
    except BaseException as exc:  # anything, allocator bugs included, goes to the parent as data
        result = {"alloc": args.alloc, "mode": args.mode, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
