"""Whether a process is alive, told apart from a later process that reuses its id.

A process is named by its id and its start time (field 22 of /proc/PID/stat, in clock ticks since boot):
the kernel reuses ids, never the pair.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when there is no such
    process. Any other failure to read (too many open files, say) raises OSError."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    return stat[stat.rfind(b")") + 2:].split()


def start_time(pid: int) -> int:
    """The start time of process `pid`, or 0 when there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else 0


def alive(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` still runs (a zombie counts as dead). When /proc
    cannot be read for another reason it answers True: taking a live process for dead would free memory it
    holds, taking a dead one for alive only keeps its memory a while longer."""
    if pid <= 0:
        return False
    try:
        fields = _stat_fields(pid)
    except OSError:
        return True
    return fields is not None and len(fields) > 19 and fields[0] != b"Z" and fields[19] == str(started).encode()


def this_process() -> tuple[int, int]:
    """(id, start time) of this process."""
    pid = os.getpid()
    return pid, start_time(pid)


def thread_exists(tid: int) -> bool:
    """Whether a thread (of any process) has the id `tid`: /proc lists every thread by its id, though `ls`
    shows only processes. Unreadable for another reason: True."""
    try:
        os.stat(f"/proc/{tid}")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return True

