"""The system-call log: every call the allocator makes to the OS, with its reason.

Counting is always on (a dict increment per call; system calls are rare next to allocations).
Full events are kept only while a recorder is attached, so an idle log costs one truthiness test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

CALL_NAMES = ("brk", "sbrk", "mmap", "munmap", "mremap", "mprotect", "madvise")


@dataclass(frozen=True)
class Event:
    """One system call: its name, arguments, result, why it was made and when (perf_counter seconds)."""

    name: str
    args: tuple[int, ...]
    result: int
    reason: str
    time: float = field(default_factory=time.perf_counter)

    def text(self) -> str:
        """The call as strace would show it, flags by name: `mmap(NULL, 1052672, PROT_READ|PROT_WRITE,
        MAP_PRIVATE|MAP_ANONYMOUS) = 0x7f...`."""
        from . import libc  # libc records into this module, so it is imported on use, not at load

        a = self.args
        prot_names = (("PROT_READ", libc.PROT_READ), ("PROT_WRITE", libc.PROT_WRITE))
        if self.name == "mmap":
            prot = _flags(a[2], prot_names, "PROT_NONE")
            flags = _flags(a[3], (("MAP_SHARED", libc.MAP_SHARED), ("MAP_PRIVATE", libc.MAP_PRIVATE),
                                  ("MAP_ANONYMOUS", libc.MAP_ANONYMOUS),
                                  ("MAP_FIXED", libc.MAP_FIXED), ("MAP_NORESERVE", libc.MAP_NORESERVE),
                                  ("MAP_FIXED_NOREPLACE", libc.MAP_FIXED_NOREPLACE)), "0")
            shown = [f"{a[0]:#x}" if a[0] else "NULL", str(a[1]), prot, flags]
        elif self.name == "mprotect":
            shown = [f"{a[0]:#x}", str(a[1]), _flags(a[2], prot_names, "PROT_NONE")]
        elif self.name == "madvise":
            advice = {libc.MADV_DONTNEED: "MADV_DONTNEED", libc.MADV_REMOVE: "MADV_REMOVE"}
            shown = [f"{a[0]:#x}", str(a[1]), advice.get(a[2], str(a[2]))]
        elif self.name in ("sbrk", "brk"):
            shown = [f"{a[0]:+d}" if self.name == "sbrk" else f"{a[0]:#x}"]
        else:  # munmap, mremap: an address, then sizes
            shown = [f"{a[0]:#x}", *(str(x) for x in a[1:])]
        result = "-1" if self.result == -1 else f"{self.result:#x}" if self.result > 0xFFFF else str(self.result)
        return f"{self.name}({', '.join(shown)}) = {result}"


def _flags(value: int, names: tuple[tuple[str, int], ...], zero: str) -> str:
    parts = [name for name, bit in names if value & bit]
    rest = value & ~sum(bit for _, bit in names)
    if rest:
        parts.append(f"{rest:#x}")
    return "|".join(parts) or zero


# Calls made by this process since start-up, by name.
counts: dict[str, int] = dict.fromkeys(CALL_NAMES, 0)
# Lists currently collecting events (one per active recorder).
_sinks: list[list[Event]] = []


# Calls owed to the log: made inside a chain of C calls, where recording them (Python code) would let a signal
# handler in (shared/heap.py). Each is (name, args, results, index, reason, time): `results[index]` is the
# call's result once the chain has run; a chain that never ran leaves `results` shorter, and its call is
# dropped. They are recorded at the next safe point: the next record, or a recorder's exit.
owed: list[tuple[str, tuple[int, ...], list[object], int, str, float]] = []


def record(name: str, args: tuple[int, ...], result: int, reason: str, when: float | None = None) -> None:
    """Count a call and hand it to every active recorder (made at perf_counter time `when`, by default now)."""
    if owed:
        settle_owed()
    counts[name] += 1
    if _sinks:
        event = Event(name, args, result, reason, time.perf_counter() if when is None else when)
        for sink in _sinks:
            sink.append(event)


def owe(name: str, args: tuple[int, ...], results: list[object], index: int, reason: str) -> None:
    """Owe the record of a call about to run in a chain of C calls that puts its result at `results[index]`.
    Earlier owed calls are settled first, so that a process that never records anything else owes one at most."""
    if owed:
        settle_owed()
    owed.append((name, args, results, index, reason, time.perf_counter()))


def settle_owed() -> None:
    """Record the owed calls that ran; drop those that did not."""
    due = owed[:]
    del owed[:len(due)]
    for name, args, results, index, reason, when in due:
        if len(results) > index:
            record(name, args, cast(int, results[index]), reason, when)


def attach(sink: list[Event]) -> None:
    """Start collecting events into `sink`."""
    _sinks.append(sink)


def detach(sink: list[Event]) -> None:
    """Stop collecting into `sink` (no error if it was not attached)."""
    for i, s in enumerate(_sinks):
        if s is sink:
            del _sinks[i]
            return


class Recorder:
    """`with Recorder() as calls:` collects the events made inside the block into the list `calls`."""

    def __init__(self) -> None:
        self.calls: list[Event] = []

    def __enter__(self) -> list[Event]:
        attach(self.calls)
        return self.calls

    def __exit__(self, *exc: object) -> None:
        if owed:
            settle_owed()
        detach(self.calls)
