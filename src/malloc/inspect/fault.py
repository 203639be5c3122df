"""A fault, seen: a fresh child process reads an address its own maps show unmapped, and dies of SIGSEGV.

    >>> import signal
    >>> from malloc.inspect import fault
    >>> report = fault.touch_unmapped()
    >>> report.returncode == -signal.SIGSEGV
    True

The child reports its /proc/self/maps; the address is chosen here from that map, in the middle of its largest
gap below the stack, and sent back; the child then reads it with ctypes. The child turns its faulthandler and
core dumps off first, so that it dies without a word. Given one of this process's addresses (`ours`), the child
also reports what it finds at the same number in its own address space, before the fault.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass

from ..os import libc
from .maps import Gap, Mapping, parse_maps

TIMEOUT = 30  # seconds the child may take to start, report and die

# Runs in the child. Non-dumpable (prctl PR_SET_DUMPABLE 0) as well as a zero core limit: a core_pattern that
# pipes to a program ignores the limit.
_CHILD = """\
import ctypes, faulthandler, json, os, resource, sys
faulthandler.disable()
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
with open("/proc/self/maps") as f: maps = f.read()
print(json.dumps({"pid": os.getpid(), "maps": maps}), flush=True)
ours, length, target = (int(x, 16) for x in sys.stdin.readline().split())
print(ctypes.string_at(ours, length).hex() if length else "", flush=True)
ctypes.string_at(target, 1)
print("read it", flush=True)
"""


@dataclass(frozen=True)
class FaultReport:
    """What the child did: its pid, the gap of its own map the address lay in, the address, what it found at
    `ours` (None when its map had nothing readable there), its exit status (-N: killed by signal N) and what it
    printed after the address was sent (empty when it died reading)."""

    pid: int
    gap: Gap
    address: int
    ours: int
    ours_mapping: Mapping | None
    ours_bytes: bytes | None
    returncode: int
    stdout: str
    stderr: str


def _largest_gap_below_the_stack(mappings: list[Mapping]) -> Gap:
    stack = next((m.start for m in mappings if m.pathname == "[stack]"), 1 << 47)
    gaps = [Gap(a.end, b.start) for a, b in itertools.pairwise(mappings) if b.start > a.end and b.start <= stack]
    if not gaps:
        raise RuntimeError("the child's map has no unmapped gap below its stack")
    return max(gaps, key=lambda g: g.size)


def touch_unmapped(ours: int = 0, length: int = 0) -> FaultReport:
    """Start a child that reads an unmapped address of its own (after reading `length` bytes at `ours`, when
    its map has them readable); wait for it and return what happened."""
    if length < 0 or ours < 0:
        raise ValueError(f"ours and length must not be negative: {ours:#x}, {length}")
    with subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            if not first:
                out, err = child.communicate(timeout=TIMEOUT)
                raise RuntimeError(f"the child {child.pid} reported no map (exit status {child.returncode}): {err}")
            report = json.loads(first)
            mappings = parse_maps(report["maps"])
            gap = _largest_gap_below_the_stack(mappings)
            target = (gap.start + gap.size // 2) & ~(libc.PAGE_SIZE - 1)
            there = next((m for m in mappings if m.start <= ours < m.end), None) if length else None
            readable = there is not None and "r" in there.perms and ours + length <= there.end
            out, err = child.communicate(f"{ours:x} {length if readable else 0:x} {target:x}\n", timeout=TIMEOUT)
        except BaseException:
            child.kill()
            child.wait()
            raise
    lines = out.splitlines()
    ours_bytes = bytes.fromhex(lines[0]) if readable and lines and lines[0] else None
    return FaultReport(int(report["pid"]), gap, target, ours, there, ours_bytes, child.returncode,
                       "\n".join(lines[1:]), err)
