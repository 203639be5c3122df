"""Whether a process is alive, told apart from a later process that reuses its id.

A process is named by its id and its start time (field 22 of /proc/PID/stat, in clock ticks since boot):
the kernel reuses ids, never the pair.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> int:
    """The start time of process `pid`, or 0 when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def alive(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` still runs (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    rest = stat[stat.rfind(b")") + 2:].split()
    return len(rest) > 19 and rest[0] != b"Z" and rest[19] == str(started).encode()


def this_process() -> tuple[int, int]:
    """(id, start time) of this process."""
    pid = os.getpid()
    return pid, start_time(pid)
