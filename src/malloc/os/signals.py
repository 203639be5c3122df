"""Signals held back while a step too long for one run of stores must not be cut short.

A Python signal handler runs where the interpreter checks for pending calls; a step that makes an object
with a system call and then records it (a new heap: its region, then the allocator's lists) has such checks
in between, and a handler's exception there would leave the region made and recorded nowhere. With every
blockable signal blocked, the kernel holds the signals back (their C-level handlers do not run, so no
Python handler is pending) until the mask is restored; then they arrive, and their handlers run after the
step. Exceptions that do not come from signals are not held back.

pthread_sigmask is called through ctypes with a prepared full set: the `signal` module's version converts
sets of signal numbers both ways, about 35 µs a call, which a program whose first request makes a heap
would feel.
"""

from __future__ import annotations

import ctypes
from typing import Any

from .libc import bind

_Sigset = ctypes.c_ubyte * 128  # the C library's sigset_t: 1,024 bits
_FULL = _Sigset()
_FULL_ADDRESS = ctypes.addressof(_FULL)
# Every signal; the kernel leaves SIGKILL and SIGSTOP out when blocking.
bind("sigfillset", ctypes.c_int, [ctypes.c_void_p])(_FULL_ADDRESS)
_pthread_sigmask = bind("pthread_sigmask", ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p])
_SIG_BLOCK, _SIG_SETMASK = 0, 2

Saved = list[Any]  # after `block`: [its call's result, the mask it replaced]


def block(saved: Saved) -> None:
    """Block every signal in this thread. The call's result and the mask before it land in `saved` with no
    point between the call and them where a handler could run. `saved` must be empty."""
    old = _Sigset()
    saved += map(_pthread_sigmask, (_SIG_BLOCK,), (_FULL_ADDRESS,), (ctypes.addressof(old),))
    saved += (old,)


def restore(saved: Saved) -> None:
    """Put back the mask that `block` replaced (nothing if it did not run); the signals held back arrive now."""
    if len(saved) == 2:
        rc, old = saved
        del saved[:]
        if rc == 0:
            _pthread_sigmask(_SIG_SETMASK, ctypes.addressof(old), None)
