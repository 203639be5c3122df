"""Recording a real program's allocations with glibc's own tracing (mtrace).

glibc logs every malloc, free and realloc once `mtrace()` has been called inside the process with
`MALLOC_TRACE` naming the log; since glibc 2.34 the tracing lives in `libc_malloc_debug.so.0`, which must
be preloaded. Nothing in an ordinary program calls `mtrace()`, so a tiny shared object (the "shim", C source
below) is preloaded with it: its constructor calls `mtrace()` before `main`, in any dynamically linked
program, with no change to the program, and its `_exit` ends the trace so that a program leaving that way
(skipping the flush of stdio buffers at exit) keeps the end of its log.

The shim is compiled from the source below with the machine's C compiler, once, into a cache directory.
Shipping a prebuilt binary would tie the package to one architecture and put machine code in a Python
package; writing the ELF file by hand would too, and would be far more code than the shim's C. So
recording needs a C compiler and the C library's headers (Debian: `apt-get install gcc libc6-dev`), or a
shim built elsewhere from `SHIM_SOURCE` and given as `shim=`.

Every process of the recorded program writes its own log (`PID.mtrace` in a private directory), so a
program that starts others does not have them write over its log; the log kept is the one of the process
started, in its final image if it exec'd (a wrapper such as `env` or `sh -c 'exec ...'` is replaced by the
program it runs), and on request the other processes' logs too, beside it. A child forked without exec
stops writing to the log it shares with its parent and starts one of its own; frees there of blocks the
parent allocated are counted as from before the log began.

Calls that do not go through the program's links to malloc are not logged: glibc's debug library replaces
malloc only for them, so a `dlsym("malloc")` lookup (ctypes does one) reaches the untraced libc malloc.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..inspect.maps import read_maps
from .model import ALLOC, Trace
from .mtrace import parse_mtrace

DEBUG_LIBRARY = "libc_malloc_debug.so.0"
DEBUG_LIBRARY_SINCE = (2, 34)  # glibc before this has mtrace in libc itself and no debug library
DIR_VARIABLE = "MALLOC_RECORD_DIR"  # where the shim has each process write PID.mtrace

SHIM_SOURCE = r"""/* Built by `malloc record`: starts glibc's mtrace in each process, and ends it in _exit.
   Each process logs to $MALLOC_RECORD_DIR/PID.mtrace. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <mcheck.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static int trace_fd = -1;
static pid_t traced_pid;

/* Start tracing this process into $MALLOC_RECORD_DIR/PID.mtrace, and find the log's descriptor. */
static void start_trace(void)
{
    const char *dir = getenv("MALLOC_RECORD_DIR");
    char path[4096];
    struct stat want, have;
    if (dir == NULL || snprintf(path, sizeof path, "%s/%ld.mtrace", dir, (long)getpid()) >= (int)sizeof path)
        return;
    setenv("MALLOC_TRACE", path, 1);
    mtrace();
    unsetenv("MALLOC_TRACE");
    if (stat(path, &want) != 0)
        return;
    for (int fd = 0; fd < 1024; fd++) {
        if (fstat(fd, &have) == 0 && have.st_dev == want.st_dev && have.st_ino == want.st_ino) {
            trace_fd = fd;
            traced_pid = getpid();
            return;
        }
    }
}

/* A child forked without exec shares the log's file offset and holds a copy of its unwritten buffer:
   point its descriptor at /dev/null, so that the parent's log gets nothing from it, end that copy of
   the trace there, and start a log of the child's own. */
static void restart_in_child(void)
{
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0) {
        dup3(null, trace_fd, O_CLOEXEC);
        close(null);
    }
    muntrace();
    trace_fd = -1;
    start_trace();
}

__attribute__((constructor)) static void malloc_record_start(void)
{
    start_trace();
    if (trace_fd >= 0)
        pthread_atfork(NULL, NULL, restart_in_child);
}

/* A program that ends with _exit (shells, Python's os._exit) skips the flush of stdio buffers, and with it
   the end of the log: end the trace first. Only in the traced process itself: a child forked or vforked
   from it has another pid, and shares or copies the tracer's state. */
void _exit(int status)
{
    if (trace_fd >= 0 && getpid() == traced_pid)
        muntrace();
    for (;;)
        syscall(SYS_exit_group, status);
}

void _Exit(int status)
{
    _exit(status);
}
"""

_INSTALL_COMPILER = (
    "install a C compiler and the C library headers (Debian/Ubuntu: apt-get install gcc libc6-dev; "
    "Fedora: dnf install gcc glibc-devel), or build the shim elsewhere (the C source is "
    "malloc.traces.record.SHIM_SOURCE: cc -shared -fPIC -o mtrace-start.so mtrace-start.c) and pass it with --shim"
)


class RecordError(Exception):
    """Recording cannot be done or did not work; the message says why and what is needed."""


@dataclass(frozen=True)
class Recording:
    """A finished recording: the log written, the command's exit status, the log parsed, how many other
    processes the command started, and the logs kept of those (with `children`; in order of process id)."""

    path: Path
    returncode: int
    trace: Trace
    other_processes: int
    children: tuple[Path, ...] = ()

    @property
    def blocks(self) -> int:
        """Distinct blocks allocated while tracing."""
        return sum(1 for op in self.trace.ops if op[0] == ALLOC)


def glibc_version() -> tuple[int, int] | None:
    """The running C library's version if it is glibc, else None."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    found = re.fullmatch(r"glibc (\d+)\.(\d+).*", text)
    return (int(found[1]), int(found[2])) if found else None


def _libc_directory() -> str | None:
    """The directory of the libc.so.6 this process runs with: the native architecture's library directory."""
    try:
        mappings = read_maps()
    except OSError:
        return None
    for m in mappings:
        if os.path.basename(m.pathname).startswith("libc.so"):
            return os.path.dirname(m.pathname)
    return None


def _ldconfig_paths(name: str) -> list[str]:
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None
    )
    if ldconfig is None:
        return []
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    entries = (line.strip().partition(" => ") for line in listing.splitlines())
    return [path for soname, _, path in entries if soname.startswith(f"{name} ") and path]


def find_debug_library() -> str | None:
    """The path of glibc's `libc_malloc_debug.so.0`; None if this glibc predates it (mtrace is in libc).

    Looked for beside the running libc, then in `ldconfig -p`, then in the usual library directories.
    RecordError if the C library is not glibc, or the library is missing.
    """
    version = glibc_version()
    if version is None:
        raise RecordError("recording needs glibc's mtrace, and this C library is not glibc")
    if version < DEBUG_LIBRARY_SINCE:
        return None
    libc_directory = _libc_directory()
    beside_libc = [os.path.join(libc_directory, DEBUG_LIBRARY)] if libc_directory else []
    multiarch = f"{platform.machine()}-linux-gnu"
    usual_directories = (f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/usr/lib64")
    usual = [os.path.join(d, DEBUG_LIBRARY) for d in usual_directories]
    candidates = [*beside_libc, *_ldconfig_paths(DEBUG_LIBRARY), *usual]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise RecordError(
        f"{DEBUG_LIBRARY} not found: glibc {version[0]}.{version[1]} keeps its malloc tracing there; install it "
        "with the C library (Debian/Ubuntu: apt-get install libc6; Fedora: dnf install glibc)"
    )


def find_compiler() -> list[str]:
    """The C compiler command: `$CC` if set, else cc, gcc or clang from PATH; RecordError if there is none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise RecordError(f"recording needs a C compiler to build its start-up shim; none found: {_INSTALL_COMPILER}")


def default_cache_dir() -> Path:
    """Where built shims are kept: `$XDG_CACHE_HOME/malloc`, or `~/.cache/malloc`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "malloc"


def build_shim(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Compile the start-up shim (once: it is cached by source, compiler and architecture); its path.

    RecordError if there is no compiler or the build fails (most often for want of the C headers).
    """
    compiler = find_compiler()
    key = hashlib.sha256("\0".join([SHIM_SOURCE, *compiler, platform.machine()]).encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    shim = directory / f"mtrace-start-{key}.so"
    if shim.is_file():
        return shim
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source = Path(work, "mtrace-start.c")
        source.write_text(SHIM_SOURCE)
        built = Path(work, "mtrace-start.so")
        try:
            result = subprocess.run(
                [*compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except OSError as e:
            raise RecordError(f"cannot run the C compiler {compiler[0]!r} ({e}): {_INSTALL_COMPILER}") from None
        if result.returncode != 0 or not built.is_file():
            raise RecordError(
                f"building the start-up shim with {shlex.join(compiler)} failed:\n{result.stderr.strip()}\n"
                f"{_INSTALL_COMPILER}"
            )
        os.replace(built, shim)  # atomic: a concurrent recorder sees the whole file or none
    return shim


def record(
    command: Sequence[str],
    output: str | os.PathLike[str],
    *,
    shim: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    children: bool = False,
) -> Recording:
    """Run `command` with glibc's malloc tracing on, write its mtrace log to `output`, and parse it.

    With `children`, the log of every other process the command started (exec'd or only forked) is
    kept too, beside `output` and named after it and the process id: `app.mtrace` gives `app.PID.mtrace`.
    These are not parsed. The command's standard streams are this process's. It runs to the end whatever
    its exit status (see `Recording.returncode`). RecordError if tracing cannot be set up (with what to
    install), if the command cannot be started, or if it wrote no log (a statically linked or set-user-ID
    program ignores LD_PRELOAD); OSError if the log cannot be written to `output`; TraceError if the log is
    malformed (it is still written to `output`, to look at).
    """
    if not command:
        raise RecordError("no command to record")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise RecordError(f"{output}: cannot write the log there: no directory {directory}")
    debug_library = find_debug_library()
    shim_path = Path(shim) if shim is not None else build_shim(cache_dir)
    if not shim_path.is_file():
        raise RecordError(f"{shim_path}: no such shim file")
    preload = [p for p in (debug_library, str(shim_path.resolve()), os.environ.get("LD_PRELOAD")) if p]
    with tempfile.TemporaryDirectory(prefix="malloc-record-") as logs:
        env = dict(os.environ, LD_PRELOAD=":".join(preload), **{DIR_VARIABLE: logs})
        env.pop("MALLOC_TRACE", None)
        try:
            process = subprocess.Popen(list(command), env=env)
        except OSError as e:
            raise RecordError(f"cannot run {command[0]!r}: {e.strerror or e}") from None
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            process.wait()  # the command got the same Ctrl-C; let it finish writing its log
            raise
        log = Path(logs, f"{process.pid}.mtrace")
        if not log.is_file():
            raise RecordError(
                f"{command[0]} wrote no malloc trace: it must be a dynamically linked program using glibc "
                "(statically linked and set-user-ID programs ignore LD_PRELOAD)"
            )
        others = sorted((p for p in Path(logs).glob("*.mtrace") if p != log), key=lambda p: int(p.stem))
        shutil.move(log, output)
        kept = []
        if children:
            target = Path(output)
            for child in others:
                kept.append(target.with_name(f"{target.stem}.{child.stem}{target.suffix or '.mtrace'}"))
                shutil.move(child, kept[-1])
    return Recording(Path(output), returncode, parse_mtrace(output), len(others), tuple(kept))
