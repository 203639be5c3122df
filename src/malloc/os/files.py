"""The files behind shared heaps: POSIX shared memory (a file in /dev/shm, as shm_open makes it) and regular files.

A segment is published under its name only once it is whole: it is made under a temporary name and then hard
linked to the final one, which fails with FileExistsError if the name is taken, so no process can attach to a
half-made heap. Every process that has a heap open holds a shared flock on its file (`lock_user`), which the
kernel drops when the process closes it or dies: an opener that can take it exclusively (`lock_alone`) knows
that no process is using the heap. Growing a file allocates its blocks (posix_fallocate), so a full /dev/shm or
disk is a MemoryError at the growth, never a SIGBUS when a page is first touched.
"""

from __future__ import annotations

import errno
import fcntl
import os

SHM_DIR = "/dev/shm"


def shm_path(name: str) -> str:
    """The path of the shared-memory segment `name` (one leading "/" allowed, as shm_open takes it)."""
    if not isinstance(name, str):
        raise TypeError(f"a shared heap's name must be a str, not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or bare in (".", "..") or "\0" in bare or len(bare.encode()) > 255:
        raise ValueError(f"invalid shared heap name {name!r}: one path component of 1 to 255 bytes, no '/'")
    return os.path.join(SHM_DIR, bare)


def make_temporary(path: str, mode: int) -> tuple[int, str]:
    """A new, empty file beside `path` under a temporary name: (descriptor, its path)."""
    directory, base = os.path.split(path)
    for attempt in range(100):
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{attempt}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        os.fchmod(fd, mode)  # the umask must not narrow what the caller asked for
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


def publish(tmp: str, path: str) -> None:
    """Give the file made at `tmp` its final name `path` (FileExistsError if taken) and drop `tmp`."""
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def open_existing(path: str) -> int:
    """A read-write descriptor of the file at `path` (FileNotFoundError if there is none)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def lock_alone(fd: int) -> bool:
    """Try, without waiting, to hold the file's flock exclusively: True when no other process (or other open of
    the file) holds it, that is when no one else has the heap open."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_user(fd: int) -> None:
    """Hold the file's flock shared, as every user of the heap does until it closes the file (an exclusive hold
    by this descriptor becomes shared); waits while a lone opener holds it exclusively."""
    fcntl.flock(fd, fcntl.LOCK_SH)


def read_start(fd: int, nbytes: int) -> bytes:
    """The file's first `nbytes` bytes (fewer if it is shorter), read without mapping it."""
    return os.pread(fd, nbytes, 0)


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def identity(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file: what names the same heap in every process."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def allocate(fd: int, size: int) -> None:
    """Make the file at least `size` bytes, its blocks allocated: MemoryError when the file system is full."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise MemoryError(f"cannot grow the heap's file to {size} bytes: {os.strerror(exc.errno)}") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)


def sync(fd: int) -> None:
    """Make the file's data and size durable."""
    os.fsync(fd)


def close(fd: int) -> None:
    os.close(fd)


def unlink(path: str) -> None:
    os.unlink(path)
