"""A robust, process-shared, error-checking pthread mutex living in shared memory.

The mutex is 40 bytes (glibc's `pthread_mutex_t` on x86-64 and aarch64) at an address the caller gives, inside
a mapping that every process using it has MAP_SHARED. Robust: when its owner dies, the kernel hands it to the
next waiter with EOWNERDEAD, who repairs the data it guards and calls `consistent_fast`. Error-checking: a thread
that locks it twice gets EDEADLK instead of hanging, and an unlock by a thread that does not own it returns
EPERM (which is what lets a caller unlock "if it still holds it" after an interruption). Uncontended, locking
and unlocking make no system call (futex fast path); ctypes releases the GIL around every call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Any

from .libc import bind

MUTEX_SIZE = 40
_ATTR_SIZE = 8  # pthread_mutexattr_t is 4 bytes; rounded up
_PTHREAD_MUTEX_ERRORCHECK = 2
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

OWNER_DEAD = errno.EOWNERDEAD
"""`lock`'s result when the previous owner died holding the mutex: the caller now owns it and must repair."""

_vp, _int = ctypes.c_void_p, ctypes.c_int
_attr_init = bind("pthread_mutexattr_init", _int, [_vp])
_attr_settype = bind("pthread_mutexattr_settype", _int, [_vp, _int])
_attr_setpshared = bind("pthread_mutexattr_setpshared", _int, [_vp, _int])
_attr_setrobust = bind("pthread_mutexattr_setrobust", _int, [_vp, _int])
_attr_destroy = bind("pthread_mutexattr_destroy", _int, [_vp])
_init = bind("pthread_mutex_init", _int, [_vp, _vp])


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(rc: int, call: str) -> None:
    if rc:
        raise OSError(rc, f"{call}: {os.strerror(rc)}")


def init(address: int) -> None:
    """Make the 40 bytes at `address` a new robust, process-shared, error-checking mutex, unlocked."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _check(_attr_init(attr), "pthread_mutexattr_init")
    try:
        _check(_attr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK), "pthread_mutexattr_settype")
        _check(_attr_setpshared(attr, _PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared")
        _check(_attr_setrobust(attr, _PTHREAD_MUTEX_ROBUST), "pthread_mutexattr_setrobust")
        _check(_init(address, attr), "pthread_mutex_init")
    finally:
        _attr_destroy(attr)


def deadline(seconds: float) -> Any:
    """The absolute time `seconds` from now, as `timed_lock_fast` takes it."""
    end = time.clock_gettime(time.CLOCK_REALTIME) + seconds
    return ctypes.byref(_Timespec(int(end), int((end - int(end)) * 1e9)))


_FUTEX_TID_MASK = 0x3FFFFFFF


def owner(address: int) -> int:
    """The thread id the mutex's futex word names as its holder, 0 when free. A robust mutex keeps its
    holder's id in its first four bytes (the futex word), which is what the kernel reads when a thread dies."""
    return ctypes.c_uint32.from_address(address).value & _FUTEX_TID_MASK


def handle(address: int) -> ctypes.c_void_p:
    """The mutex at `address` as the fast calls take it."""
    return ctypes.c_void_p(address)


# The raw calls, each returning an errno value: the shared heap runs them inside a slice assignment, so that
# their result is stored before a signal handler can run (see shared/heap.py). No argument types: the fast
# path passes a prebuilt `ctypes.c_void_p` (`handle`), which ctypes passes as is.
try_lock_fast = bind("pthread_mutex_trylock", _int, None)
"""`pthread_mutex_trylock(address)`: 0, OWNER_DEAD, EBUSY, EDEADLK (this thread holds it)."""
timed_lock_fast = bind("pthread_mutex_timedlock", _int, None)
"""`pthread_mutex_timedlock(address, deadline)`: as `try_lock_fast`, ETIMEDOUT when the deadline passed."""
unlock_fast = bind("pthread_mutex_unlock", _int, None)
"""`pthread_mutex_unlock(address)`: 0, or EPERM when this thread does not hold it (nothing changes)."""
consistent_fast = bind("pthread_mutex_consistent", _int, None)
"""`pthread_mutex_consistent(address)`: 0 once a mutex taken with OWNER_DEAD is marked repaired."""
