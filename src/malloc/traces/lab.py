"""The replay lab: each trace replayed through this allocator and its baselines, every run in a fresh process.

`replay_trace` measures one trace under a `Plan` and returns a `TraceResult`. Per allocator it runs, each
in a new interpreter (`malloc.traces.worker`), so that no run can disturb another:

- `repeats` timed replays, interleaved across allocators so that drift in machine speed hits all alike
  (ops/s is the best of them). Ours reports its footprint and system calls from these runs: they come
  from the allocator's own bookkeeping and log, which cost nothing extra.
- for glibc and mpheap, one untimed replay sampling the footprint after every operation; their system
  calls are counted there with strace, when it is installed. With `series` (for plots) ours gets such a
  run too, and every run keeps its samples.
- with `verify`, a replay of each allocator checking every block's contents; under strace, our
  system-call log is then checked against the kernel's view.

The trace is parsed once, here, and every worker reads its binary form (`opsfile`): a worker that parsed
it would free buffers that move glibc's dynamic mmap threshold by its own history, and glibc's figures
with it.

Throughput is only meaningful as a ratio between allocators measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import malloc

from .formats import Trace, load, peak_live
from .opsfile import write_ops
from .replay import SYSCALL_KINDS, Json
from .settings import Setting
from .worker import START

BASELINES = ("glibc", "mpheap")
PLUGGED_FREE = 64  # free bytes glibc may hold when a replay begins: its top, taken down to the minimum
WORKER_TIMEOUT = 600.0  # seconds for one replay; the slowest trace in traces/ takes a few
# The package's parent directory: workers import this very copy of malloc, installed or not.
_PACKAGE_ROOT = str(Path(malloc.__file__).resolve().parent.parent)

Progress = Callable[[str], None]  # told what is about to run, once per worker


class WorkerError(RuntimeError):
    """A worker process that died or gave no result."""


@dataclass(frozen=True)
class Plan:
    """What to measure for every trace."""

    against: tuple[str, ...] = ()  # baselines, in BASELINES
    settings: tuple[Setting, ...] = ()  # mallopt settings for ours and glibc
    repeats: int = 3  # timed replays per allocator; the best counts
    verify: bool = False
    series: bool = False  # keep the footprint after every operation (for plots)
    strace: bool = True  # count the baselines' system calls (and cross-check ours under --verify), if strace exists

    @property
    def allocators(self) -> tuple[str, ...]:
        return ("ours", *self.against)

    @property
    def use_strace(self) -> bool:
        return self.strace and shutil.which("strace") is not None

    def runs_per_trace(self) -> int:
        """Workers started for each trace (for a progress display)."""
        sampled = sum(1 for a in self.allocators if a != "ours" or self.series)
        verified = len(self.allocators) if self.verify else 0
        return self.repeats * len(self.allocators) + sampled + verified


@dataclass
class AllocatorResult:
    """One allocator's figures on one trace; None where not measured."""

    footprint: int | None = None  # peak bytes held from the OS
    seconds: list[float] = field(default_factory=list)  # of each timed replay
    syscalls: dict[str, int] | None = None  # by the kernel's names, zeros left out
    verified: bool | None = None
    series: list[int] | None = None  # footprint after each operation

    @property
    def best_seconds(self) -> float | None:
        return min(self.seconds) if self.seconds else None

    @property
    def syscall_total(self) -> int | None:
        """brk + mmap + munmap + mremap + madvise."""
        return None if self.syscalls is None else sum(self.syscalls.get(k, 0) for k in SYSCALL_KINDS)


@dataclass
class TraceResult:
    """Everything measured on one trace."""

    trace: str
    path: str
    ops: int
    peak_live: int
    skipped_frees: int
    allocators: dict[str, AllocatorResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def utilization(self, alloc: str) -> float | None:
        """Peak live bytes over peak footprint."""
        footprint = self.allocators[alloc].footprint
        return self.peak_live / footprint if footprint else None

    def ops_per_s(self, alloc: str) -> float | None:
        best = self.allocators[alloc].best_seconds
        return self.ops / best if best else None

    def to_json(self) -> Json:
        """The figures as plain data (the samples of a series are left out)."""
        out: Json = {"trace": self.trace, "path": self.path, "ops": self.ops, "peak_live": self.peak_live,
                     "skipped_frees": self.skipped_frees, "allocators": {}, "errors": self.errors}
        for name, r in self.allocators.items():
            out["allocators"][name] = {
                "footprint": r.footprint, "utilization": self.utilization(name), "syscalls": r.syscalls,
                "syscall_total": r.syscall_total, "seconds": r.best_seconds, "all_seconds": r.seconds,
                "ops_per_s": self.ops_per_s(name), "verified": r.verified}
        return out


@dataclass(frozen=True)
class Job:
    """One replay for a worker: the allocator, the mode, the trace file, and the worker's options."""

    alloc: str
    mode: str
    path: str | os.PathLike[str]
    settings: tuple[Setting, ...] = ()
    strace: bool = False
    series: bool = False


def run_worker(alloc: str, mode: str, path: str | os.PathLike[str], settings: Sequence[Setting] = (),
               strace: bool = False, series: bool = False) -> Json:
    """One replay in a fresh interpreter; its JSON result (with "error" if the replay failed).

    WorkerError if the worker died without a result. If this call is interrupted (Ctrl-C), the worker is
    killed by its pid before the exception goes on.
    """
    return run_workers([Job(alloc, mode, path, tuple(settings), strace, series)])[0]


def run_workers(jobs: Sequence[Job]) -> list[Json]:
    """`run_worker` for several jobs at once, each worker a fresh interpreter of its own; their results in
    order. WorkerError if any died without a result; if this call is interrupted (Ctrl-C), every worker
    still running is killed by its pid before the exception goes on."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="malloc-replay-") as tmp:
        try:
            for n, job in enumerate(jobs):
                cmd = [sys.executable, "-c", START, job.alloc, job.mode, os.fspath(job.path)]
                cmd += [f"--set={s}" for s in job.settings]
                if job.series:
                    cmd.append("--series")
                if job.strace:
                    cmd.append("--strace=" + str(Path(tmp) / f"strace-{n}.log"))
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env))
            outputs = [proc.communicate(timeout=WORKER_TIMEOUT) for proc in procs]
        except BaseException:  # Ctrl-C or the timeout: no worker may outlive this call
            for proc in procs:
                proc.kill()
                proc.wait()
            raise
    results: list[Json] = []
    for job, proc, (out, err) in zip(jobs, procs, outputs, strict=True):
        lines = out.strip().splitlines()
        try:
            results.append(json.loads(lines[-1]))
        except (IndexError, json.JSONDecodeError):
            rc = proc.returncode
            raise WorkerError(f"{job.alloc} {job.mode} worker died (exit status {rc}): {err.strip()}") from None
    return results


def replay_trace(path: str | os.PathLike[str], plan: Plan, progress: Progress | None = None,
                 trace: Trace | None = None) -> TraceResult:
    """Measure the trace at `path` under `plan` (`trace`: the file already loaded, else it is loaded here)."""
    trace = trace if trace is not None else load(path)
    with tempfile.TemporaryDirectory(prefix="malloc-replay-") as tmp:
        ops = Path(tmp) / "trace.ops"
        write_ops(trace, ops)  # parsed once, here: a worker parsing it would disturb glibc's heap
        return _measure(trace, path, ops, plan, progress)


def _measure(trace: Trace, path: str | os.PathLike[str], ops: Path, plan: Plan,
             progress: Progress | None) -> TraceResult:
    """`replay_trace`'s runs, every worker reading the trace from the ops file `ops`."""
    result = TraceResult(trace.name, os.fspath(path), trace.num_ops, peak_live(trace), trace.skipped_frees)
    result.allocators = {a: AllocatorResult() for a in plan.allocators}
    settings = plan.settings

    def run(alloc: str, mode: str, strace: bool = False) -> Json | None:
        if progress is not None:
            progress(f"{trace.name}: {alloc} {mode}")
        try:
            r = run_worker(alloc, mode, ops, settings if alloc != "mpheap" else (), strace,
                           plan.series and mode == "footprint")
        except WorkerError as exc:
            result.errors.append(str(exc))
            return None
        if "error" in r:
            result.errors.append(f"{alloc} {mode}: {r['error']}\n{r.get('traceback', '')}".rstrip())
            return None
        if r.get("free_before", 0) > PLUGGED_FREE:
            result.errors.append(f"{alloc} {mode}: glibc held {r['free_before']} free bytes when the replay began")
        return r

    ours = result.allocators["ours"]
    for _ in range(plan.repeats):
        for alloc in plan.allocators:
            r = run(alloc, "time")
            if r is None:
                continue
            figures = result.allocators[alloc]
            figures.seconds.append(r["seconds"])
            if alloc == "ours":
                if ours.footprint not in (None, r["footprint"]) or ours.syscalls not in (None, r["syscalls"]):
                    result.errors.append(f"ours: footprint or system calls differ between runs: "
                                         f"{r['footprint']} {r['syscalls']}")
                ours.footprint, ours.syscalls = r["footprint"], r["syscalls"]
    for alloc in plan.allocators:
        if alloc == "ours" and not plan.series:
            continue
        r = run(alloc, "footprint", plan.use_strace and alloc != "ours")
        if r is None:
            continue
        figures = result.allocators[alloc]
        figures.series = r.get("series")
        if alloc == "ours":
            figures.footprint, figures.syscalls = r["footprint"], r["syscalls"]
            continue
        figures.footprint = r["footprint"]
        if r.get("foreign_brk_moves"):
            result.errors.append(f"glibc: the break moved {r['foreign_brk_moves']} times outside its calls")
        if "strace" in r:
            figures.syscalls = {k: v for k, v in r["strace"].items() if v}
    if plan.verify:
        for alloc in plan.allocators:
            r = run(alloc, "verify", plan.use_strace and alloc == "ours")
            result.allocators[alloc].verified = r is not None
            if r is not None and "strace" in r:
                # our own log against the kernel's view: a difference is an unlogged (or phantom) call
                kernel = {k: v for k, v in r["strace"].items() if v}
                if kernel != r["syscalls"]:
                    result.errors.append(f"ours: system calls logged {r['syscalls']} but strace saw {kernel}")
    return result


def replay_traces(paths: Sequence[str | os.PathLike[str]], traces: Sequence[Trace], plan: Plan,
                  progress: Progress | None = None,
                  done: Callable[[int, TraceResult], None] | None = None) -> tuple[list[TraceResult], bool]:
    """`replay_trace` for each (path, loaded trace) in turn, calling `done(i, result)` after each; returns the
    results and whether Ctrl-C stopped the run (the results then hold the traces finished before it)."""
    results: list[TraceResult] = []
    try:
        for i, (path, trace) in enumerate(zip(paths, traces, strict=True)):
            results.append(replay_trace(path, plan, progress, trace))
            if done is not None:
                done(i, results[-1])
    except KeyboardInterrupt:
        return results, True
    return results, False


def self_check(directory: str | os.PathLike[str]) -> list[str]:
    """Problems with the glibc harness, if any: an empty trace and 10,000 free(NULL)s (the whole loop,
    ctypes call included) must leave glibc's break where it was and its footprint 0. Writes two small
    traces into `directory`."""
    problems = []
    for name, body in (("empty", []), ("free-null", ["f -1"] * 10_000)):
        path = Path(directory) / f"{name}.rep"
        path.write_text("\n".join(["0", "0", str(len(body)), "0", *body]) + "\n")
        for mode in ("footprint", "time"):
            try:
                r = run_worker("glibc", mode, path)
            except WorkerError as exc:
                problems.append(f"{name} {mode}: {exc}")
                continue
            if "error" in r:
                problems.append(f"{name} {mode}: {r['error']}")
            elif r.get("footprint", 0) or r["brk_growth"]:
                problems.append(f"{name} {mode}: footprint {r.get('footprint')}, break moved {r['brk_growth']}")
    return problems


def report_json(results: Sequence[TraceResult], plan: Plan, elapsed: float, interrupted: bool) -> dict[str, Any]:
    """The JSON document of a lab run: the plan, and every trace's figures."""
    return {"repeats": plan.repeats, "against": list(plan.against), "settings": [str(s) for s in plan.settings],
            "strace": plan.use_strace, "elapsed_s": elapsed, "interrupted": interrupted,
            "traces": [r.to_json() for r in results]}
