"""The system-call log: every call the allocator makes to the OS, with its reason.

Counting is always on (a dict increment per call; system calls are rare next to allocations).
Full events are kept only while a recorder is attached, so an idle log costs one truthiness test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CALL_NAMES = ("brk", "sbrk", "mmap", "munmap", "mremap", "mprotect", "madvise")


@dataclass(frozen=True)
class Event:
    """One system call: its name, arguments, result, why it was made and when (perf_counter seconds)."""

    name: str
    args: tuple[int, ...]
    result: int
    reason: str
    time: float = field(default_factory=time.perf_counter)


# Calls made by this process since start-up, by name.
counts: dict[str, int] = dict.fromkeys(CALL_NAMES, 0)
# Lists currently collecting events (one per active recorder).
_sinks: list[list[Event]] = []


def record(name: str, args: tuple[int, ...], result: int, reason: str) -> None:
    """Count a call and hand it to every active recorder."""
    counts[name] += 1
    if _sinks:
        event = Event(name, args, result, reason)
        for sink in _sinks:
            sink.append(event)


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
        detach(self.calls)
