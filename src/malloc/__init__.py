"""A real memory allocator: raw memory from the program break and mmap, reused when freed.

The module-level functions work on this process's own heap, under glibc's names. Addresses are plain
integers usable with ctypes, memoryview (`view`) and numpy.

    >>> import malloc
    >>> p = malloc.malloc(100)
    >>> malloc.view(p)[:5] = b"hello"
    >>> bytes(malloc.view(p, 5))
    b'hello'
    >>> malloc.free(p)
"""

# Helpers are imported under private names, and `from __future__ import annotations` is not used (it would
# leave a module attribute `annotations`): `dir(malloc)` shows the API only (see `__dir__` below).
import os as _os
import sys as _sys
from typing import TextIO as _TextIO

from .calls import install as _install_block_calls
from .errors import DoubleFree, HeapCorruption, HeapError, InvalidPointer
from .heap import Chunk, Heap
from .heap import size_arg as _size_arg
from .info import MallInfo
from .info import format_stats as _format_stats
from .options import M_MMAP_MAX, M_MMAP_THRESHOLD, M_PERTURB, M_TOP_PAD, M_TRIM_THRESHOLD, Options
from .os.events import Event
from .os.events import Recorder as _Recorder
from .os.libc import PAGE_SIZE as _PAGE
from .process import ProcessAllocator
from .region import BreakRegion, BufferRegion, MapRegion, Region
from .shared import SharedHeap

__all__ = [
    "M_MMAP_MAX",
    "M_MMAP_THRESHOLD",
    "M_PERTURB",
    "M_TOP_PAD",
    "M_TRIM_THRESHOLD",
    "BreakRegion",
    "BufferRegion",
    "Chunk",
    "DoubleFree",
    "Event",
    "Heap",
    "HeapCorruption",
    "HeapError",
    "InvalidPointer",
    "MallInfo",
    "MapRegion",
    "Options",
    "ProcessAllocator",
    "Region",
    "SharedHeap",
    "aligned_alloc",
    "allocator",
    "calloc",
    "check",
    "free",
    "mallinfo",
    "malloc",
    "malloc_info",
    "malloc_stats",
    "malloc_trim",
    "malloc_usable_size",
    "mallopt",
    "memalign",
    "posix_memalign",
    "pvalloc",
    "realloc",
    "reallocarray",
    "remember_requests",
    "stats",
    "trace",
    "trim",
    "usable_size",
    "valloc",
    "view",
    "walk",
]

# The calls that hand out a block return it with no check for signal handlers before the caller's store, in
# the compiled build too (calls.py).
_install_block_calls()
allocator = ProcessAllocator()
"""The process's allocator, behind every module-level function."""

_os.register_at_fork(before=allocator.before_fork, after_in_parent=allocator.after_fork_parent,
                     after_in_child=allocator.after_fork_child)

malloc = allocator.malloc
free = allocator.free
calloc = allocator.calloc
realloc = allocator.realloc
memalign = allocator.memalign
usable_size = allocator.usable_size
malloc_usable_size = allocator.usable_size
view = allocator.view
mallopt = allocator.mallopt
mallinfo = allocator.mallinfo
check = allocator.check
walk = allocator.walk
remember_requests = allocator.remember_requests


def malloc_info() -> str:
    """glibc's malloc_info for this process's allocator: free chunks per bin, totals and system bytes, as XML
    (see `malloc.inspect.malloc_info`, imported on first use so that `import malloc` stays light)."""
    from .inspect.malloc_info import malloc_info as report

    return report(allocator)


def trace() -> _Recorder:
    """`with malloc.trace() as calls:` collects into the list `calls` an `Event` for every system call the
    allocator makes inside the block (name, args, result, reason, time). Costs nothing when none is active."""
    return _Recorder()


trim = allocator.trim


def aligned_alloc(alignment: int, size: int) -> int:
    """C11's aligned_alloc: `memalign` for a power-of-two `alignment`."""
    return memalign(alignment, size)


def posix_memalign(alignment: int, size: int) -> int:
    """`memalign` that also requires `alignment` to be a multiple of the pointer size, as POSIX does."""
    if _size_arg(alignment, "alignment") % 8:
        raise ValueError(f"alignment must be a multiple of 8, not {alignment}")
    return memalign(alignment, size)


def valloc(size: int) -> int:
    """A block aligned to the page size."""
    return memalign(_PAGE, size)


def pvalloc(size: int) -> int:
    """A page-aligned block whose size is rounded up to whole pages (at least one)."""
    n = _size_arg(size)
    return memalign(_PAGE, max(_PAGE, (n + _PAGE - 1) & ~(_PAGE - 1)))


def reallocarray(p: int, count: int, size: int) -> int:
    """`realloc(p, count * size)`, with a MemoryError instead of an overflowing product."""
    total = _size_arg(count, "count") * _size_arg(size)
    if total >= 1 << 63:
        raise MemoryError(f"reallocarray: {count} * {size} overflows")
    return realloc(p, total)


def malloc_trim(pad: int = 0) -> int:
    """glibc's malloc_trim: 1 if memory was released, else 0."""
    return int(allocator.trim(pad))


def stats(file: _TextIO | None = None) -> None:
    """Print a malloc_stats-like report: per heap, then totals with the mapped chunks and the fast cache.

    It goes to `file`, by default standard output.
    """
    info = allocator.mallinfo()
    heaps = [(h.region.kind, h.held, h.in_use, h.held - h.in_use) for h in allocator.heaps]
    print(_format_stats(info, heaps), file=_sys.stdout if file is None else file)


def malloc_stats() -> None:
    """glibc's malloc_stats: the same report, on standard error."""
    stats(_sys.stderr)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), or "0+unknown" when the package runs from a
    source tree that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("malloc")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> str:
    """`malloc.__version__`, read on first use: importing importlib.metadata costs about as much as importing
    malloc itself, so `import malloc` does not pay for it."""
    if name == "__version__":
        version = globals()["__version__"] = _version()
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API, `__version__` and the module's own dunders; not the submodules or helpers imported."""
    dunders = [name for name in globals() if name.startswith("__") and name.endswith("__")]
    return sorted({*__all__, *dunders, "__version__"})
