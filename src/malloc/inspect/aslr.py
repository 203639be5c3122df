"""Address-space layout randomisation, seen: where fresh processes put their text, heap, mmap area and stack.

    >>> from malloc.inspect import aslr
    >>> runs = aslr.sample(3)                   # three fresh interpreters, each reports its bases
    >>> print(aslr.render_text(runs, aslr.randomize_va_space()))

With randomisation on, every base moves from run to run; with it off (randomize_va_space 0, or a process run
under `setarch -R`) they repeat exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .maps import Area, classify, parse_maps, parse_start_brk

SETTING_FILE = "/proc/sys/kernel/randomize_va_space"
SETTINGS = {0: "off: nothing is randomised",
            1: "conservative: stack, mmap area, vdso and shared libraries are randomised, the heap (brk) is not",
            2: "full: stack, mmap area, vdso, shared libraries and the heap (brk) are randomised"}
TIMEOUT = 30  # seconds a child may take to start and report

# Runs in each child: its maps, its start_brk and the address of a fresh anonymous mapping, as JSON.
_CHILD = """\
import ctypes, json, mmap, os, sys
m = mmap.mmap(-1, mmap.PAGESIZE)
address = ctypes.addressof(ctypes.c_char.from_buffer(m))
with open("/proc/self/maps") as f: maps = f.read()
with open("/proc/self/stat") as f: stat = f.read()
sys.stdout.write(json.dumps({"pid": os.getpid(), "exe": os.readlink("/proc/self/exe"), "mmap": address,
                             "maps": maps, "stat": stat}))
"""


@dataclass(frozen=True)
class Bases:
    """Where one process's parts of the address space begin (None when it has no such part).

    text: the executable's load address; heap: start_brk, where the program break starts; mmap: a fresh
    anonymous mapping (the kernel places it just below the lowest mapping of the mmap area); libc: the C
    library's load address; stack: the top of [stack]; vdso: the vdso's address.
    """

    pid: int
    text: int | None
    heap: int | None
    mmap: int | None
    libc: int | None
    stack: int | None
    vdso: int | None


BASE_NAMES = tuple(f.name for f in fields(Bases) if f.name != "pid")


def randomize_va_space() -> int:
    """The kernel's setting: 0 off, 1 conservative (no heap randomisation), 2 full (see SETTINGS)."""
    with open(SETTING_FILE) as f:
        return int(f.read())


def bases_of(report: dict[str, Any]) -> Bases:
    """The bases in one child's report (its maps text, stat line, executable and fresh mapping)."""
    areas = classify(parse_maps(report["maps"]), report["exe"])
    exe = report["exe"]

    def first(test: Callable[[Area], bool]) -> int | None:
        return next((a.start for a in areas if test(a)), None)

    stack = next((a.end for a in areas if a.kind == "stack"), None)
    return Bases(pid=int(report["pid"]),
                 text=first(lambda a: a.mapping.pathname == exe),
                 heap=parse_start_brk(report["stat"]),
                 mmap=int(report["mmap"]),
                 libc=first(lambda a: a.kind == "library" and a.name.startswith("libc.so")),
                 stack=stack,
                 vdso=first(lambda a: a.kind == "vdso"))


def sample(runs: int = 5) -> list[Bases]:
    """Start `runs` fresh Python processes one after another, each reporting its bases, and wait for each
    to exit (a child that does not report within TIMEOUT seconds is killed). RuntimeError if a child fails."""
    if isinstance(runs, bool) or not isinstance(runs, int):
        raise TypeError(f"runs must be an integer, not {type(runs).__name__}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    out: list[Bases] = []
    for _ in range(runs):
        # -I -S: no site packages, no environment, so that the child starts the same way every time.
        with subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as child:
            try:
                stdout, stderr = child.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise RuntimeError(f"child process {child.pid} did not report within {TIMEOUT} s") from None
        if child.returncode != 0:
            raise RuntimeError(f"child process {child.pid} exited with {child.returncode}: {stderr.strip()}")
        out.append(bases_of(json.loads(stdout)))
    return out


def moved(runs: Sequence[Bases]) -> dict[str, bool]:
    """For each base, whether it differed between any two runs."""
    return {name: len({getattr(b, name) for b in runs}) > 1 for name in BASE_NAMES}


def render_text(runs: Sequence[Bases], setting: int | None = None) -> str:
    """A table of the bases, one row per run, and a last row saying which moved; `setting` is the kernel's
    randomize_va_space, stated above the table when given."""
    def cell(value: int | None) -> str:
        return "-" if value is None else f"{value:#x}"

    rows = [["run", "pid", *BASE_NAMES]]
    rows += [[str(i), str(b.pid), *(cell(getattr(b, name)) for name in BASE_NAMES)] for i, b in enumerate(runs, 1)]
    changed = moved(runs)
    rows.append(["moved", "", *("yes" if changed[name] else "no" for name in BASE_NAMES)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    if setting is not None:
        lines.append(f"randomize_va_space = {setting} ({SETTINGS.get(setting, 'unknown setting')})")
    lines += ["  ".join(text.rjust(w) for text, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def to_json(runs: Sequence[Bases], setting: int | None = None) -> dict[str, Any]:
    """The runs as a JSON-serialisable dict: randomize_va_space, runs (addresses as hex strings, or null)
    and moved (base name -> bool)."""
    return {"randomize_va_space": setting,
            "runs": [{k: (v if k == "pid" or v is None else f"{v:#x}") for k, v in asdict(b).items()} for b in runs],
            "moved": moved(runs)}
