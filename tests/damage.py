"""What both fuzzers (test_fuzz.py, test_shared_fuzz.py) share: the damage they make to one word (what a stray
write might leave), and running a case under a time limit, a failure printed with where it was raised."""

from __future__ import annotations

import random
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

T = TypeVar("T")


class Hang(Exception):
    """A case ran past its time limit."""


def _hang(signum: int, frame: FrameType | None) -> None:
    raise Hang


def arm() -> None:
    """Make the interval timer's SIGALRM end the running case (`timed_case`)."""
    signal.signal(signal.SIGALRM, _hang)


def timed_case(label: str, seconds: float, case: Callable[[], T]) -> tuple[bool, T | None]:
    """`case()` with at most `seconds` to run (after `arm`): (True, its result), or (False, None) once a line
    `FAIL label: ...` is printed for a hang or for any exception (everything but the outcomes a case allows
    itself is a finding), with the file and line that raised it."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return True, case()
    except Hang:
        print(f"FAIL {label}: still running after {seconds} s", flush=True)
    except Exception as exc:
        at = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"FAIL {label}: {type(exc).__name__}: {exc} ({Path(at.filename).name}:{at.lineno})", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return False, None


def damaged(old: int, rng: random.Random, span: int) -> int:
    """A new value for a word that held `old`: a high or a low bit flipped, random bits, a size nudged by a
    chunk's step or a page, an offset below `span` (in the caller's unit: words or bytes, as the word it replaces
    counts), or a run of 0x00, 0x41 or 0xFF bytes, as a string overflow writes."""
    how = rng.randrange(6)
    if how == 0:
        return old ^ (1 << rng.randrange(64))
    if how == 1:
        return old ^ (1 << rng.randrange(16))
    if how == 2:
        return rng.getrandbits(64)
    if how == 3:
        return (old + rng.choice((-32, -16, -8, 8, 16, 32, 4096, -4096))) % (1 << 64)
    if how == 4:
        return rng.randrange(span)
    return int.from_bytes(bytes([rng.choice((0x00, 0x41, 0xFF))]) * rng.randrange(1, 9), "little")
