"""Shared heaps seen from outside: what their names lead to, and where they lie in a process's address space.

    from malloc.inspect import shared_heap
    chunks = h.walk()
    shared_heap.describe_names(h, chunks)          # heapmap.Name for each of h.roots, with what its block holds
    shared_heap.find(maps.read_maps(1234), 1234)   # the shared heaps process 1234 maps

A shared heap is a file (in /dev/shm, or a regular one) that each process maps MAP_SHARED from offset 0, inside
a PROT_NONE reservation of the heap's size limit (malloc/shared/segment.py). `find` recognises one by that
shape and by the file's first words (the segment's magic number, version, extent and limit), read from the file
itself. The process that made a heap maps it under a temporary name it has since removed (the heap is
published whole by a hard link), so a deleted file mapping is looked up by its inode in its directory; failing
that, through /proc/PID/map_files (which the kernel opens only for a privileged reader).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import HeapCorruption, InvalidPointer
from ..heap import Chunk
from ..layout import HEADER, OVERHEAD
from ..shared import SharedHeap
from ..shared.segment import HEADER_START, read_header
from ..shared.values import ARRAY, VALUE_MAGIC, dtype_of, read_layout
from ..units import size_approx
from .heapmap import Name

if TYPE_CHECKING:
    from .maps import Mapping

SHM_DIR = "/dev/shm/"


# ------------------------------------------------------------------------------------------------ names

def describe_names(h: SharedHeap, chunks: Sequence[Chunk]) -> list[Name]:
    """Every name in `h.roots`, sorted, with what it leads to: a value stored by put or ndarray (its kind,
    shape, dtype and size), another live block, or an offset that is not the start of one. `chunks` is
    `h.walk()`. A snapshot: other processes may change the heap meanwhile."""
    blocks = {c.address + HEADER: c for c in chunks if c.state == "in use"}
    return [Name(name, off, _what(h, off, blocks.get(off))) for name, off in sorted(h.roots.items())]


def _what(h: SharedHeap, off: int, chunk: Chunk | None) -> str:
    if chunk is None:
        return "not the start of a block in use"
    usable = chunk.size - OVERHEAD
    try:
        block = h.view(off)
    except InvalidPointer:
        return "a block another process freed while this one looked"
    with block, block[:usable & ~7].cast("Q") as words:
        if not len(words) or words[0] != VALUE_MAGIC:
            return f"a block of {usable} usable bytes"
        try:
            layout = read_layout(words, 0, usable, off)
        except (HeapCorruption, IndexError):
            return f"a value whose header is damaged ({usable} usable bytes)"
    if layout.kind != ARRAY:
        return f"bytes, {size_approx(layout.nbytes)}"
    return f"array {_dtype_text(layout.descr)} {layout.shape}, {size_approx(layout.nbytes)}"


def _dtype_text(descr: bytes) -> str:
    """A stored dtype description as numpy names it ("float64"), or as stored when numpy cannot read it
    (or is not installed)."""
    try:
        return str(dtype_of(descr))
    except (ImportError, ValueError):
        return descr.decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------------------- in the maps

@dataclass(frozen=True)
class Found:
    """A shared heap in a process's address space: its mapping [start, mapped_end), the reservation it may
    grow into up to `end` (start + its limit), the file behind it ("" when it cannot be told), and the extent
    its header gave when read."""

    start: int
    mapped_end: int
    end: int
    path: str
    extent: int

    @property
    def name(self) -> str:
        """How the heap is opened: its shared-memory name, its file's path, or "unlinked"."""
        if not self.path:
            return "unlinked"
        if self.path.startswith(SHM_DIR):
            return f"shared memory {self.path[len(SHM_DIR):]!r}"
        return f"file {self.path}"

    def ranges(self) -> list[tuple[int, int, str]]:
        """(start, end, label) of the mapping and of the reservation beyond it (when there is one)."""
        out = [(self.start, self.mapped_end,
                f"malloc shared heap, {self.name}: {size_approx(self.extent)} in use, "
                f"may grow to {size_approx(self.end - self.start)}")]
        if self.end > self.mapped_end:
            out.append((self.mapped_end, self.end, "malloc shared heap reserve: room to grow in place (no access)"))
        return out


def find(mappings: Sequence[Mapping], pid: int | str = "self") -> list[Found]:
    """The shared heaps among `mappings` (process `pid`'s, ascending): each a file mapped shared, read-write,
    from offset 0, whose first words are a shared heap's header whose limit covers the mapping. Files that
    cannot be read are passed over."""
    out: list[Found] = []
    i = 0
    while i < len(mappings):
        m = mappings[i]
        i += 1
        if m.perms != "rw-s" or m.offset or not m.inode or not m.pathname.startswith("/"):
            continue
        end = m.end
        while i < len(mappings) and _continues(mappings[i], m, end):
            end = mappings[i].end
            i += 1
        found = _read_header(m, pid)
        if found is None:
            continue
        path, extent, limit = found
        if end - m.start <= limit:
            out.append(Found(m.start, end, m.start + limit, path, extent))
    return out


def _continues(n: Mapping, first: Mapping, end: int) -> bool:
    """Whether `n` carries on the file mapping `first` that so far ends at `end` (the kernel may split it)."""
    return (n.start == end and n.perms == first.perms and n.inode == first.inode and n.dev == first.dev
            and n.offset == end - first.start)


def _read_header(m: Mapping, pid: int | str) -> tuple[str, int, int] | None:
    """(the file's path or "", extent, limit) when the file mapped at `m` starts with a shared heap's header."""
    for path in _candidates(m):
        start = _read_start(path, m, follow=False)
        if start is not None:
            header = _header(start)
            return None if header is None else (path, *header)
    proc = "/proc/self" if pid == "self" else f"/proc/{int(pid)}"
    start = _read_start(f"{proc}/map_files/{m.start:x}-{m.end:x}", m, follow=True)
    header = None if start is None else _header(start)
    return None if header is None else ("", *header)


def _read_start(path: str, m: Mapping, *, follow: bool) -> bytes | None:
    """The first bytes of the file at `path` when it is the regular file mapped at `m`, else None. Nothing
    else is opened (opening a device can act on it), and a FIFO put there meanwhile cannot block."""
    def same(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and st.st_ino == m.inode and _dev_text(st.st_dev) == m.dev

    try:
        if not same(os.stat(path, follow_symlinks=follow)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except OSError:
        return None
    try:
        return os.pread(fd, HEADER_START, 0) if same(os.fstat(fd)) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _candidates(m: Mapping) -> Iterable[str]:
    """The paths that may name the file mapped at `m`: its own, or for a deleted one, the files of its
    directory (the creator's temporary name was replaced by a hard link beside it)."""
    if not m.deleted:
        yield m.path
        return
    directory = os.path.dirname(m.path)
    if not os.path.isabs(directory) or directory == "/":
        return
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.inode() == m.inode and entry.is_file(follow_symlinks=False):
                        yield entry.path
                except OSError:
                    continue
    except OSError:
        return


def _dev_text(dev: int) -> str:
    """A device number as /proc/PID/maps prints it ("00:1b")."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


def _header(start: bytes) -> tuple[int, int] | None:
    """(extent, limit) from a file's first bytes when they are a whole shared heap header of this version."""
    try:
        return read_header(start, "")
    except HeapCorruption:
        return None
