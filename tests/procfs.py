"""Helpers for the OS-level tests: a /proc/self/maps reader and a runner for fresh child processes.

The OS facts are observed in a fresh interpreter (`run_child`), where nothing else has touched the
allocator. Two things there could move the break or the address space behind a test's back, and both are
pinned down before anything is measured:

* the C library's own malloc, which the interpreter uses and which shares the program break with us:
  `pin_libc_heap` gives it a 64 MiB top up front (M_TOP_PAD) and stops it from trimming, so it does not
  call sbrk again while the child runs;
* reading /proc/self/maps itself: `MapsReader` reads into a buffer allocated once, through a descriptor
  opened once, so taking a snapshot allocates only the returned copy.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import malloc

TESTS_DIR = Path(__file__).resolve().parent
# Where the `malloc` the tests import comes from (the checkout's src, or a compiled build put first on the
# path), so that children run the same build.
SRC_DIR = Path(malloc.__file__).resolve().parent.parent

# glibc's mallopt parameters (the same numbers as malloc.M_*; repeated so this module stands alone).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def anonymous(self) -> bool:
        """A private anonymous mapping: no file, no special name such as [heap] or [stack]."""
        return self.inode == 0 and self.path == ""

    def covers(self, address: int, size: int = 1) -> bool:
        return self.start <= address and address + size <= self.end


def parse(raw: bytes) -> list[Mapping]:
    """The lines of a /proc/self/maps snapshot."""
    out: list[Mapping] = []
    for line in raw.decode().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = fields[0].split("-")
        out.append(Mapping(int(lo, 16), int(hi, 16), fields[1], int(fields[2], 16), int(fields[4]),
                           fields[5].strip() if len(fields) > 5 else ""))
    return out


def covering(maps: list[Mapping], address: int, size: int = 1) -> Mapping | None:
    """The line whose range holds `[address, address + size)`, if one does."""
    for m in maps:
        if m.covers(address, size):
            return m
    return None


def describe(maps: list[Mapping], address: int, size: int = 1) -> dict[str, object] | None:
    """The line covering `[address, address + size)` as a JSON-ready dict (None if no line does)."""
    m = covering(maps, address, size)
    return None if m is None else dataclasses.asdict(m)


def heap_line(maps: list[Mapping]) -> Mapping | None:
    """The `[heap]` line (the program break's range), if there is one."""
    for m in maps:
        if m.path == "[heap]":
            return m
    return None


class MapsReader:
    """Snapshots of /proc/self/maps taken with a buffer and a descriptor allocated up front."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self._buffer = bytearray(capacity)
        self._view = memoryview(self._buffer)
        self._fd = os.open("/proc/self/maps", os.O_RDONLY)

    def raw(self) -> bytes:
        """The whole file now, as bytes (the kernel regenerates it on every read from offset 0)."""
        os.lseek(self._fd, 0, os.SEEK_SET)
        n = 0
        while True:
            k = os.readv(self._fd, [self._view[n:]])
            if k == 0:
                break
            n += k
            if n == len(self._buffer):
                raise RuntimeError("/proc/self/maps does not fit the snapshot buffer")
        return bytes(self._view[:n])

    def snapshot(self) -> list[Mapping]:
        return parse(self.raw())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def pin_libc_heap(pad: int = 64 << 20) -> int:
    """Make the C library's malloc take `pad` bytes of break now and keep them (no trimming), so the
    interpreter's own allocations stop moving the break. Returns the break afterwards."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    if libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) != 1 or libc.mallopt(_M_TOP_PAD, pad) != 1:
        raise RuntimeError("the C library refused mallopt")
    start = libc.sbrk(0)
    blocks = []
    # Blocks below glibc's mmap threshold come from its heap; the first one its top cannot serve makes
    # it grow the break, by the block plus the new pad.
    for _ in range(4096):
        blocks.append(libc.malloc(64 << 10))
        if libc.sbrk(0) != start:
            break
    else:
        raise RuntimeError("the C library's malloc never moved the break")
    for b in blocks:
        libc.free(b)
    return int(libc.sbrk(0))


PRELUDE = """\
import json, os, sys
import procfs
import malloc
from malloc.os import libc, events
MAPS = procfs.MapsReader()
PAGE = libc.PAGE_SIZE
if PIN:
    procfs.pin_libc_heap(PIN)

def report(**facts):
    print(json.dumps(facts))

"""


def child_env() -> dict[str, str]:
    """The environment for a child: this package and the tests importable, no malloc settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PYTHONMALLOC"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), str(TESTS_DIR)])
    return env


def run_child(body: str, *, pin: int = 64 << 20, timeout: float = 60) -> dict[str, Any]:
    """Run `body` in a fresh interpreter after PRELUDE; return the JSON object it reports (its last line
    of output). A non-zero exit fails with the child's standard error."""
    script = f"PIN = {pin}\n" + PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=str(TESTS_DIR))
    if proc.returncode != 0:
        raise AssertionError(f"child exited with {proc.returncode}:\n{proc.stderr}\n{proc.stdout}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(f"child reported nothing:\n{proc.stderr}")
    facts: dict[str, Any] = json.loads(lines[-1])
    return facts
