"""The replay lab's binary form of a parsed trace, which a worker reads without disturbing glibc's heap.

glibc raises its dynamic mmap threshold whenever a mapped chunk larger than it is freed. Parsing a large
trace grows lists and dicts, and every buffer one of them outgrows is freed; whether that buffer was mapped
depends on whether the previous one could grow in place, that is on the worker's history before it. So a
worker that parsed the trace itself started its glibc replay with a threshold of 164 to 299 KiB on
python-json, depending on its command line. Instead the lab parses the trace once, writes it in this form,
and the worker reads it through one buffer of a fixed size (below any threshold, so never mapped) into the
ops tuple made at its final size: nothing it frees is ever mapped.

Layout: the magic, then four 64-bit words (ids, operations, skipped frees, the name's length in bytes),
the name in UTF-8 padded with zeros to a multiple of 8 bytes, then one (op, id, size) triple of 64-bit words
per operation; in the machine's byte order, since the file is made for a worker on the same machine.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
from io import BufferedReader

from .model import Op, Trace, TraceError

MAGIC = b"MALLOPS1"
_HEADER = struct.Struct("=4q")
_CHUNK = 4096  # operations per read: 96 KiB, under glibc's smallest mmap threshold
if array("q").itemsize != 8:
    raise ImportError("the ops file needs 64-bit array items")


def write_ops(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write `trace` to `path` in the binary form."""
    name = trace.name.encode()
    words = array("q")
    for op in trace.ops:
        words.extend(op)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(_HEADER.pack(trace.num_ids, trace.num_ops, trace.skipped_frees, len(name)))
        f.write(name + bytes(-len(name) % 8))
        words.tofile(f)


def is_ops_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` starts with this form's magic."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class _Ops:
    """The operations of an open ops file, one triple at a time, with their count as a length hint (so that
    `tuple()` makes its result at once, at its final size)."""

    def __init__(self, f: BufferedReader, count: int, where: str) -> None:
        self.f = f
        self.left = count
        self.where = where
        self.buffer = array("q", bytes(8 * 3 * min(count, _CHUNK)))
        self.chunk: Iterator[int] = iter(())

    def __iter__(self) -> _Ops:
        return self

    def __length_hint__(self) -> int:
        return self.left

    def __next__(self) -> Op:
        if not self.left:
            raise StopIteration
        try:
            op = (next(self.chunk), next(self.chunk), next(self.chunk))
        except StopIteration:
            self._refill()
            op = (next(self.chunk), next(self.chunk), next(self.chunk))
        self.left -= 1
        return op

    def _refill(self) -> None:
        n = min(self.left, _CHUNK) * 3
        view = memoryview(self.buffer)[:n]
        got = self.f.readinto(view.cast("B"))
        if got != 8 * n:
            raise TraceError(f"{self.where}: the ops file ends early")
        self.chunk = iter(view.tolist())


def read_ops(path: str | os.PathLike[str]) -> Trace:
    """The trace written by `write_ops` at `path`; TraceError if the file is not one, or is cut short."""
    where = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise TraceError(f"{where}: not an ops file")
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise TraceError(f"{where}: the ops file ends early")
        num_ids, count, skipped, name_length = _HEADER.unpack(head)
        if min(num_ids, count, skipped, name_length) < 0:
            raise TraceError(f"{where}: a negative count in the ops file's header")
        name = f.read(name_length + -name_length % 8)[:name_length].decode()
        ops = tuple(_Ops(f, count, where))
    return Trace(name, num_ids, ops, skipped)
