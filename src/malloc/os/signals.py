"""Signals held back while a step too long for one run of stores must not be cut short.

A Python signal handler runs where the interpreter checks for pending calls; a step that makes an object
with a system call and then records it (a new heap: its region, then the allocator's lists) has such checks
in between, and a handler's exception there would leave the region made and recorded nowhere. With every
blockable signal blocked, the kernel holds the signals back (their C-level handlers do not run, so no
Python handler is pending) until the mask is restored; then they arrive, and their handlers run after the
step. Exceptions that do not come from signals are not held back.
"""

from __future__ import annotations

import signal

Saved = list[set[int | signal.Signals]]  # where `block` keeps the mask it replaced
_ALL: set[int] = {int(s) for s in signal.valid_signals()}  # the kernel leaves SIGKILL and SIGSTOP out


def block(saved: Saved) -> None:
    """Block every signal in this thread; the mask before lands in `saved` in the same step as the call, so
    no handler can run between them. `saved` must be empty."""
    saved[:] = map(signal.pthread_sigmask, (int(signal.SIG_BLOCK),), (_ALL,))


def restore(saved: Saved) -> None:
    """Put back the mask that `block` saved (nothing if it never ran); the signals held back arrive now."""
    if saved:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved[0])
        del saved[:]
