"""ctypes bindings to the C library's memory system calls, and raw memory access.

Every function that changes the address space records an event (see `events`) with the reason the caller
gives. Failures become exceptions here, in one place: ENOMEM is `MemoryError`, anything else `OSError`.

A signal handler can raise right after a C function returns, before its result is stored anywhere. So the
calls whose result the allocator must not lose (sbrk, mmap, munmap, mremap) take `out`, a list that receives the raw
result by a slice assignment that runs the call inside it: the result is in `out` before anything can
interrupt, and whoever owns `out` can finish the bookkeeping later.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
from typing import Any

from . import events

PAGE_SIZE = _mmap.PAGESIZE

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE = 1
MADV_DONTNEED = 4
MADV_REMOVE = 9
MS_SYNC = 4

_MAP_FAILED = (1 << 64) - 1
_BRK_FAILED = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)


def bind(name: str, restype: Any, argtypes: list[Any] | None) -> Any:
    """The C library's function `name`, as a function object of its own (another binding's types never reach
    it), returning `restype`. `argtypes` None: no argument conversion, for a caller that passes prebuilt
    ctypes objects as they are (a declared type costs a conversion per call). For the os/ package only."""
    fn = _libc[name]
    fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


_vp, _size, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_sbrk = bind("sbrk", ctypes.c_void_p, [ctypes.c_ssize_t])
_mmap_fn = bind("mmap", ctypes.c_void_p, [_vp, _size, _int, _int, _int, ctypes.c_long])
_munmap = bind("munmap", _int, [_vp, _size])
_mremap = bind("mremap", ctypes.c_void_p, [_vp, _size, _size, _int])
_mprotect = bind("mprotect", _int, [_vp, _size, _int])
_madvise = bind("madvise", _int, [_vp, _size, _int])
_msync = bind("msync", _int, [_vp, _size, _int])

_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.restype = ctypes.py_object
_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PyBUF_WRITE = 0x200

memmove = ctypes.memmove
memset = ctypes.memset


_SSIZE_MAX = (1 << 63) - 1
_ADDRESS_LIMIT = 1 << 64


def _length(size: int, call: str) -> int:
    """`size` as a length for `call`: ctypes would wrap a value outside the C type silently."""
    if not 0 <= size <= _SSIZE_MAX:
        raise ValueError(f"{call}: length {size:#x} out of range")
    return size


def _address(address: int, call: str) -> int:
    if not 0 <= address < _ADDRESS_LIMIT:
        raise ValueError(f"{call}: address {address:#x} out of range")
    return address


def _fail(call: str) -> Exception:
    err = ctypes.get_errno()
    if err == errno.ENOMEM:
        return MemoryError(f"{call}: {os.strerror(err)}")
    return OSError(err, f"{call}: {os.strerror(err)}")


def _call(out: list[int] | None, fn: Any, *args: Any) -> Any:
    """`fn(*args)`; with `out`, run inside a slice assignment to `out`, so that the result is stored there
    before a signal handler can run (see the module's docstring)."""
    if out is None:
        return fn(*args)
    out[:] = map(fn, *((a,) for a in args))
    return out[0]


def current_break() -> int:
    """The program break now (sbrk(0); not a system call in glibc, so not recorded)."""
    return int(_sbrk(0) or 0)


def sbrk(increment: int, reason: str, out: list[int] | None = None) -> int:
    """Move the program break by `increment` bytes; return the old break (see `out` above)."""
    if not -_SSIZE_MAX <= increment <= _SSIZE_MAX:
        raise ValueError(f"sbrk: increment {increment:#x} out of range")
    result = _call(out, _sbrk, increment)
    if result is None or result == _BRK_FAILED:
        events.record("sbrk", (increment,), -1, reason)
        raise _fail(f"sbrk({increment})")
    events.record("sbrk", (increment,), result, reason)
    return int(result)


def mmap_anonymous(size: int, reason: str, *, prot: int = PROT_READ | PROT_WRITE, flags: int = 0,
                   address: int = 0, out: list[int] | None = None) -> int:
    """Map `size` bytes of private anonymous memory; return its address (see `out` above)."""
    flags |= MAP_PRIVATE | MAP_ANONYMOUS
    address = _address(address, "mmap")
    size = _length(size, "mmap")
    result = _call(out, _mmap_fn, address or None, size, prot, flags, -1, 0)
    if result is None or result == _MAP_FAILED:
        events.record("mmap", (address, size, prot, flags), -1, reason)
        raise _fail(f"mmap({size})")
    events.record("mmap", (address, size, prot, flags), result, reason)
    return int(result)


def mmap_file(address: int, size: int, fd: int, offset: int, reason: str) -> None:
    """Map `size` bytes of the file `fd` from `offset`, shared (MAP_SHARED|MAP_FIXED), at `address`: over
    address space the caller reserved, which it replaces."""
    address = _address(address, "mmap")
    size = _length(size, "mmap")
    prot = PROT_READ | PROT_WRITE
    flags = MAP_SHARED | MAP_FIXED
    result = _mmap_fn(address, size, prot, flags, fd, _length(offset, "mmap"))
    if result is None or result == _MAP_FAILED:
        events.record("mmap", (address, size, prot, flags), -1, reason)
        raise _fail(f"mmap({address:#x}, {size}, fd {fd}, offset {offset})")
    events.record("mmap", (address, size, prot, flags), result, reason)


def msync(address: int, size: int) -> None:
    """Write the shared mapping's dirty pages in `size` bytes at `address` to its file, and wait."""
    rc = _msync(_address(address, "msync"), _length(size, "msync"), MS_SYNC)
    if rc != 0:
        raise _fail(f"msync({address:#x}, {size})")


madvise_fast = _madvise
"""`madvise(address, size, advice)` itself: 0 or -1. For a caller that runs it inside a slice assignment or a
chain of C calls, so that no signal handler runs between it and what follows (shared/heap.py); not recorded."""


def munmap(address: int, size: int, reason: str, out: list[int] | None = None) -> None:
    """Unmap `size` bytes at `address` (see `out` above)."""
    address = _address(address, "munmap")
    size = _length(size, "munmap")
    rc = _call(out, _munmap, address, size)
    events.record("munmap", (address, size), rc, reason)
    if rc != 0:
        raise _fail(f"munmap({address:#x}, {size})")


def mremap(address: int, old_size: int, new_size: int, reason: str, *, may_move: bool = True,
           out: list[int] | None = None) -> int:
    """Resize the mapping at `address`; return its (possibly new) address (see `out` above)."""
    flags = MREMAP_MAYMOVE if may_move else 0
    address = _address(address, "mremap")
    old_size = _length(old_size, "mremap")
    new_size = _length(new_size, "mremap")
    result = _call(out, _mremap, address, old_size, new_size, flags)
    if result is None or result == _MAP_FAILED:
        events.record("mremap", (address, old_size, new_size), -1, reason)
        raise _fail(f"mremap({address:#x}, {old_size}, {new_size})")
    events.record("mremap", (address, old_size, new_size), result, reason)
    return int(result)


def mprotect(address: int, size: int, prot: int, reason: str) -> None:
    """Change the protection of `size` bytes at `address`."""
    rc = _mprotect(_address(address, "mprotect"), _length(size, "mprotect"), prot)
    events.record("mprotect", (address, size, prot), rc, reason)
    if rc != 0:
        raise _fail(f"mprotect({address:#x}, {size})")


def madvise_dontneed(address: int, size: int, reason: str) -> None:
    """Give the pages of `size` bytes at `address` back; they read as zero afterwards."""
    rc = _madvise(_address(address, "madvise"), _length(size, "madvise"), MADV_DONTNEED)
    events.record("madvise", (address, size, MADV_DONTNEED), rc, reason)
    if rc != 0:
        raise _fail(f"madvise({address:#x}, {size})")


def memory_view(address: int, size: int) -> memoryview:
    """A writable byte view of `size` bytes at `address` (the caller vouches the range is mapped)."""
    view: memoryview = _from_memory(address, size, _PyBUF_WRITE)
    return view


def memory_exporter(address: int, size: int) -> ctypes.Array[ctypes.c_char]:
    """A ctypes array over `size` bytes at `address` (the caller vouches the range is mapped): an object
    that exports them. A memoryview made from it, and every slice, cast or numpy array made from that view,
    keeps it referenced until the last of them is gone."""
    return (ctypes.c_char * size).from_address(address)


def thread_count() -> int:
    """Threads in this process, C threads included.

    procfs gives /proc/self/task a link count of 2 plus the number of threads; reading it with stat
    allocates nothing from the C library, where listing the directory would ask it for a 32 KiB buffer,
    which can move the program break at the very moment the caller wants to lower it.
    """
    try:
        links = os.stat("/proc/self/task").st_nlink
    except OSError:
        return 2  # unknown: assume the unsafe case
    return links - 2 if links > 2 else 2
