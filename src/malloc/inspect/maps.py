"""The address space of a process, from /proc/PID/maps: parsed, classified, drawn and exported as JSON.

    from malloc.inspect import maps
    amap = maps.address_map(owned=maps.owned_ranges())  # this process, its allocator's ranges marked
    print(maps.render_text(amap))               # top-down: the stack at the top, the program text at the bottom
    maps.to_json(amap)                          # the same as a JSON-ready dict
    maps.address_map(1234)                      # another process (yours, or any as root)

Every line of the maps file is a `Mapping`. `classify` gives each one a kind (see KINDS), `address_map` adds the
program break (from /proc/PID/stat), the shared heaps the process maps (in any process: `shared_heap.find`) and,
optionally, the ranges this allocator owns (`owned_ranges`).
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..os import libc
from ..process import ProcessAllocator
from ..units import size_approx
from . import shared_heap

# The kinds of region, roughly from the bottom of the address space to the top.
KINDS = ("text", "rodata", "data", "bss", "heap", "anonymous", "library", "file", "shm", "stack", "vvar", "vdso",
         "vsyscall", "other")

DELETED = " (deleted)"

# start-end perms offset dev inode [pathname]; the kernel pads before the pathname, which may hold spaces.
_LINE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ([r-][w-][x-][ps]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) ([0-9]+)(?: +(.*))?")
# A shared library's file name: libc.so.6, _ctypes.cpython-311-x86_64-linux-gnu.so, ld-linux-x86-64.so.2.
_SHARED_OBJECT = re.compile(r"\.so(\.[0-9.]+)?$")
_SPECIAL = {"[heap]": "heap", "[stack]": "stack", "[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar",
            "[vsyscall]": "vsyscall"}
_SHM_PREFIXES = ("/memfd:", "/dev/shm/", "/SYSV", "/dev/zero")
# An ELF64 program header: type, flags, offset, vaddr, paddr, filesz, memsz, align; type 1 is a loadable segment.
_PHDR = struct.Struct("<IIQQQQQQ")


@dataclass(frozen=True)
class Mapping:
    """One line of a maps file: the range [start, end) and the fields proc(5) describes.

    `pathname` is the text as the kernel printed it after the padding ("" when there is none), including a
    trailing " (deleted)" for a file that was removed after it was mapped.
    """

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    pathname: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def deleted(self) -> bool:
        """The mapped file was deleted (or is an unlinked object such as a memfd)."""
        return self.pathname.endswith(DELETED)

    @property
    def path(self) -> str:
        """The pathname without the " (deleted)" suffix."""
        return self.pathname[: -len(DELETED)] if self.deleted else self.pathname

    @property
    def anonymous(self) -> bool:
        """No file and no special name: a plain anonymous mapping."""
        return self.inode == 0 and self.pathname == ""


@dataclass(frozen=True)
class Owned:
    """A range this allocator holds, and what lives in it."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Area:
    """A mapping with its kind (one of KINDS), a short name to show, and the allocator's ranges inside it."""

    mapping: Mapping
    kind: str
    name: str
    owned: tuple[Owned, ...] = ()

    @property
    def start(self) -> int:
        return self.mapping.start

    @property
    def end(self) -> int:
        return self.mapping.end

    @property
    def size(self) -> int:
        return self.mapping.size


@dataclass(frozen=True)
class Gap:
    """Unmapped address space between two areas."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class AddressMap:
    """A process's classified mappings (ascending), its program break, and the gaps between mappings.

    `start_brk` is where the heap segment begins and `brk` the program break: exact for this process
    (`brk_exact`), otherwise the end of [heap], rounded up to a page as the kernel maps it. They are None
    when the kernel would not tell (another user's process).
    """

    pid: int
    exe: str
    areas: tuple[Area, ...]
    start_brk: int | None = None
    brk: int | None = None
    brk_exact: bool = True
    gaps: tuple[Gap, ...] = field(init=False)

    def __post_init__(self) -> None:
        gaps = tuple(Gap(a.end, b.start) for a, b in itertools.pairwise(self.areas) if b.start > a.end)
        object.__setattr__(self, "gaps", gaps)

    def area_of(self, address: int) -> Area | None:
        """The area holding `address`, if one does."""
        for area in self.areas:
            if area.start <= address < area.end:
                return area
        return None


# ------------------------------------------------------------------------------------------------- reading

def parse_line(line: str) -> Mapping:
    """One maps line as a Mapping; ValueError naming the line when it is not one."""
    m = _LINE.fullmatch(line.rstrip("\n"))
    if m is None:
        raise ValueError(f"not a /proc/PID/maps line: {line!r}")
    start, end = int(m[1], 16), int(m[2], 16)
    if start >= end:
        raise ValueError(f"a maps line whose start is not below its end: {line!r}")
    return Mapping(start, end, m[3], int(m[4], 16), m[5], int(m[6]), m[7] or "")


def parse_maps(text: str) -> list[Mapping]:
    """Every line of a maps file, in order; ValueError naming the line number and text of a bad one."""
    out: list[Mapping] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            out.append(parse_line(line))
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return out


def _proc(pid: int | str) -> str:
    """The /proc directory of `pid` ("self" or a positive process id)."""
    if pid == "self":
        return "/proc/self"
    if isinstance(pid, bool) or not isinstance(pid, int | str):
        raise TypeError(f"pid must be an int or 'self', not {type(pid).__name__}")
    text = str(pid)
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"pid must be a positive integer or 'self', not {pid!r}")
    return f"/proc/{int(text)}"


def _read(path: str, pid: int | str) -> str:
    try:
        with open(path, "rb") as f:
            # Paths are bytes to the kernel; an undecodable one is kept readable, not dropped.
            return f.read().decode("utf-8", "backslashreplace")
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}: {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"may not read {path} (process {pid} belongs to another user, or is protected)") \
            from None


def read_maps(pid: int | str = "self") -> list[Mapping]:
    """The mappings of process `pid` (default: this one), ascending. ProcessLookupError if there is no such
    process; PermissionError if its maps may not be read."""
    return parse_maps(_read(_proc(pid) + "/maps", pid))


def read_start_brk(pid: int | str = "self") -> int | None:
    """Where the heap segment of process `pid` starts (start_brk, field 47 of /proc/PID/stat in proc(5));
    None when the kernel hides it (it reads as 0). The kernel reports no other process's current break."""
    return parse_start_brk(_read(_proc(pid) + "/stat", pid))


def parse_start_brk(stat: str) -> int | None:
    """start_brk from the text of a /proc/PID/stat file (None when it reads as 0)."""
    # The command name, field 2, is in parentheses and may hold spaces and parentheses itself.
    fields = stat[stat.rindex(")") + 2:].split()
    if len(fields) < 47 - 2:
        raise ValueError(f"a /proc/PID/stat line with too few fields: {stat!r}")
    return int(fields[47 - 3]) or None


def read_exe(pid: int | str = "self") -> str:
    """The path of the program process `pid` runs ("" when it may not be read, or for a kernel thread)."""
    try:
        return os.readlink(_proc(pid) + "/exe")
    except FileNotFoundError:
        if not os.path.exists(_proc(pid)):
            raise ProcessLookupError(f"no process {pid}") from None
        return ""
    except PermissionError:
        return ""


def read_touched(start: int, end: int, pid: int | str = "self") -> list[bool]:
    """For each page of [start, end) in process `pid`: True when the process has touched it since it was
    mapped (the page is in memory or swapped out: bits 63 and 62 of /proc/PID/pagemap, see proc(5)). An
    untouched page of anonymous memory has no memory behind it yet and reads as zero."""
    page = libc.PAGE_SIZE
    if start < 0 or end < start or start % page:
        raise ValueError(f"not a page-aligned range: {start:#x}-{end:#x}")
    count = (end - start + page - 1) // page
    path = _proc(pid) + "/pagemap"
    try:
        with open(path, "rb") as f:
            f.seek(start // page * 8)
            raw = f.read(8 * count)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}: {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"may not read {path}") from None
    if len(raw) != 8 * count:
        raise ValueError(f"{path} ended before {end:#x}")
    return [bool(entry >> 62 & 3) for entry in struct.unpack(f"<{count}Q", raw)]


# ------------------------------------------------------------------------------------------ classifying

def classify(mappings: Sequence[Mapping], exe: str = "") -> list[Area]:
    """Each mapping with its kind and a short name.

    The executable (`exe`, as /proc/PID/exe names it; when empty, the file of the lowest file mapping) gives
    "text" (executable), "data" (writable) and "rodata" (read-only: headers, constants, relocated tables).
    The bss is the anonymous writable mapping that begins exactly where a file's writable mapping ends, when
    the file's ELF program headers say its memory image goes on beyond the file (or when the file cannot be
    read to check): kind "bss" for the executable, "library" for a shared object. The kernel merges it with
    an anonymous neighbour of the same permissions; the name then says how much more there is.
    The kernel's own names give "heap", "stack", "vvar", "vdso" and "vsyscall"; shared objects (a ".so"
    name, or any file mapped executable) are "library", shared memory (memfd, /dev/shm, System V, shared
    /dev/zero) "shm", other files "file", plain anonymous mappings "anonymous", and anything else (such as
    anon_inode:...) "other".
    """
    if not exe:
        exe = next((m.pathname for m in mappings if m.pathname.startswith("/")), "")
    executable = {m.pathname for m in mappings if "x" in m.perms and m.pathname.startswith("/")}
    ending_at = {m.end: m for m in mappings if m.inode}  # file mappings by end address, to find a bss
    areas: list[Area] = []
    for m in mappings:
        kind, name = _kind(m, exe, executable)
        owner = ending_at.get(m.start) if m.anonymous and m.perms == "rw-p" else None
        if owner is not None and owner.perms == "rw-p":
            bss_end = _bss_end(owner, mappings)
            if bss_end is None or bss_end > m.start:
                kind = "bss" if owner.pathname == exe else "library"
                name = f"{_base(owner.pathname)} (bss)"
                if bss_end is not None and m.end > bss_end:
                    name += f" + {size_approx(m.end - bss_end)} anonymous"
        areas.append(Area(m, kind, name))
    return areas


def _bss_end(data: Mapping, mappings: Sequence[Mapping]) -> int | None:
    """Where the zero-filled end (bss) of the file mapped writable at `data` ends in memory, rounded up to a
    page; None when it cannot be told (see `bss_of`)."""
    bss = bss_of(data, mappings)
    page = libc.PAGE_SIZE
    return None if bss is None else (bss.end + page - 1) & ~(page - 1)


@dataclass(frozen=True)
class Bss:
    """The zero-initialised end of a file's last loadable segment, from its ELF program headers: memory
    [start, end) has no bytes in the file (the segment's memory size beyond its file size). `offset` is
    where the file's part of the segment ends in the file, the file offset that `start` would have had."""

    path: str
    start: int
    end: int
    offset: int

    @property
    def size(self) -> int:
        return self.end - self.start


def bss_of(data: Mapping, mappings: Sequence[Mapping]) -> Bss | None:
    """The bss of the file mapped writable at `data` (one of `mappings`, the process's maps), from the file's
    ELF program headers: its last loadable segment's memory beyond its file size. None when the file cannot
    be read or is not the mapped one (a 64-bit little-endian ELF file)."""
    try:
        if os.stat(data.path).st_ino != data.inode:
            return None
        with open(data.path, "rb") as f:
            header = f.read(64)
            if header[:6] != b"\x7fELF\x02\x01":
                return None
            phoff = int.from_bytes(header[32:40], "little")
            entry, count = int.from_bytes(header[54:56], "little"), int.from_bytes(header[56:58], "little")
            f.seek(phoff)
            table = f.read(entry * count)
    except OSError:
        return None
    if entry < _PHDR.size:
        return None
    headers = [_PHDR.unpack_from(table, i * entry) for i in range(count) if len(table) >= i * entry + _PHDR.size]
    loads = [(int(h[3]), int(h[2]), int(h[5]), int(h[6])) for h in headers if h[0] == 1]  # vaddr offset filesz memsz
    first = next((m for m in mappings if m.inode == data.inode and m.dev == data.dev and m.offset == 0), None)
    if not loads or first is None:
        return None
    bias = first.start - (min(vaddr for vaddr, *_ in loads) & ~(libc.PAGE_SIZE - 1))
    vaddr, offset, filesz, memsz = max(loads)
    return Bss(data.path, bias + vaddr + filesz, bias + vaddr + max(memsz, filesz), offset + filesz)


def _base(pathname: str) -> str:
    return pathname.rsplit("/", 1)[-1] if pathname.startswith("/") else pathname


def _kind(m: Mapping, exe: str, executable: set[str]) -> tuple[str, str]:
    path = m.pathname
    special = _SPECIAL.get(path)
    if special is not None:
        return special, path
    if path.startswith("[stack:"):
        return "stack", path
    if path == "":
        # No access: a guard page, or address space reserved and not yet committed.
        return "anonymous", "(no access)" if m.perms == "---p" else ""
    if path.startswith("[anon"):  # [anon:name] and [anon_shmem:name], named with prctl(PR_SET_VMA_ANON_NAME)
        return "anonymous", path
    name = _base(path)
    if path == exe:
        if "x" in m.perms:
            return "text", name
        return ("data" if "w" in m.perms else "rodata"), name
    if path.startswith(_SHM_PREFIXES):
        return "shm", name
    if not path.startswith("/"):
        return "other", path
    if path in executable or _SHARED_OBJECT.search(m.path):
        return "library", name
    return "file", name


# ----------------------------------------------------------------------------------------- ownership

def owned_ranges(allocator: ProcessAllocator | None = None) -> list[Owned]:
    """The ranges `allocator` (default: this process's, `malloc.allocator`) holds from the OS, ascending:
    its heaps (on the break, or over a mapping, whose reserved but uncommitted tail is listed apart) and its
    mapped chunks."""
    if allocator is None:
        from .. import allocator as process_allocator

        allocator = process_allocator
    out: list[Owned] = []
    for heap in allocator.heaps:
        kind = heap.region.kind
        out.append(Owned(heap.base, heap.end, f"malloc heap ({'break' if kind == 'brk' else kind})"))
        reserved = getattr(heap.region, "reserved", 0)
        if heap.base + reserved > heap.end:
            out.append(Owned(heap.end, heap.base + reserved, "malloc heap reserve (not yet committed)"))
    for block, (start, length) in allocator.mappings().items():
        # The block runs to the end of its mapping, which may start before its header (alignment).
        out.append(Owned(start, start + length,
                         f"malloc mapped chunk: a block of {size_approx(start + length - block)} at {block:#x}"))
    return sorted(out, key=lambda o: o.start)


def shared_heap_ranges(mappings: Sequence[Mapping], pid: int | str = "self") -> list[Owned]:
    """The ranges of the shared heaps among `mappings` (process `pid`'s): each one's mapping of its file, and
    the address space reserved beyond it for growth."""
    return [Owned(start, end, label) for found in shared_heap.find(mappings, pid)
            for start, end, label in found.ranges()]


def _attach(areas: Iterable[Area], owned: Sequence[Owned]) -> list[Area]:
    out: list[Area] = []
    for area in areas:
        inside = tuple(o for o in owned if o.start < area.end and area.start < o.end)
        out.append(Area(area.mapping, area.kind, area.name, inside) if inside else area)
    return out


def address_map(pid: int | str = "self", owned: Sequence[Owned] = ()) -> AddressMap:
    """The classified map of process `pid` (default: this one) with its program break, marking the
    `owned` ranges (for this process, pass `owned_ranges()`) and every shared heap's mapping and reservation
    (`shared_heap_ranges`). Errors as `read_maps`."""
    number = os.getpid() if pid == "self" else int(pid)
    mappings = read_maps(pid)
    start_brk = read_start_brk(pid)
    exe = read_exe(pid)
    owned = sorted([*owned, *shared_heap_ranges(mappings, pid)], key=lambda o: o.start)
    areas = _attach(classify(mappings, exe), owned)
    brk: int | None
    if number == os.getpid():
        brk, exact = libc.current_break(), True
    else:
        # Another process's break is known only to the page: the kernel maps [heap] up to it, rounded up.
        heap = next((a for a in areas if a.kind == "heap"), None)
        brk, exact = (heap.end if heap is not None else start_brk), False
    return AddressMap(number, exe, tuple(areas), start_brk, brk, exact)


# ------------------------------------------------------------------------------------------ rendering

# ANSI colours per kind: code (red/green/...) and read-only parts dimmer than writable ones.
_COLOURS = {"text": "31", "rodata": "35", "data": "33", "bss": "33;2", "heap": "32;1", "anonymous": "36",
            "library": "34", "file": "37", "shm": "35;1", "stack": "31;1", "vvar": "90", "vdso": "90",
            "vsyscall": "90", "other": "37;2"}
_RESET = "\033[0m"
_OWNED_COLOUR = "32"


def render_text(amap: AddressMap, *, color: bool = False) -> str:
    """The map drawn top-down, highest addresses first (the stack near the top, the program text at the
    bottom): one line per mapping with its range, size, permissions, kind and name; one line per unmapped
    gap with its size; the allocator's ranges and the program break under the region holding them.
    `color` adds ANSI colours per kind."""
    width = max((len(f"{a.end:x}") for a in amap.areas), default=12)

    def paint(code: str, text: str) -> str:
        return f"\033[{code}m{text}{_RESET}" if color else text

    def span(start: int, end: int) -> str:
        return f"{start:0{width}x}-{end:0{width}x}"

    brk = "unknown" if amap.brk is None else (f"{amap.brk:#x}{'' if amap.brk_exact else ' (to the page)'}"
                                              f", heap segment from {amap.start_brk or 0:#x}")
    lines = [f"process {amap.pid}  {amap.exe or '(executable unknown)'}", f"program break {brk}",
             f"{'range':<{2 * width + 1}}  {'size':>9}  perm  {'kind':<9}  name"]
    gaps = {g.end: g for g in amap.gaps}
    for area in reversed(amap.areas):
        m = area.mapping
        # The full path once per file, on its first mapping (the others repeat it).
        name = f"{area.name}  ({m.pathname})" if m.offset == 0 and m.pathname.startswith("/") else area.name
        text = f"{span(m.start, m.end)}  {size_approx(m.size):>9}  {m.perms}  {area.kind:<9}  {name}".rstrip()
        lines.append(paint(_COLOURS.get(area.kind, "0"), text))
        lines.extend(_inside(area, amap, span, paint, width))
        gap = gaps.get(m.start)
        if gap is not None:
            lines.append(paint("2", f"{'':{width}}~ {size_approx(gap.size)} unmapped ~"))
    return "\n".join(lines) + "\n"


def _inside(area: Area, amap: AddressMap, span: Callable[[int, int], str], paint: Callable[[str, str], str],
            width: int) -> list[str]:
    """The lines under an area: the allocator's ranges in it and the program break, highest first."""
    marks: list[tuple[int, str]] = []
    if amap.brk is not None and area.kind == "heap":
        marks.append((amap.brk, f"  {amap.brk:0{width}x}{'':{width + 1}}  {'':>9}  ◂ program break"))
    for o in area.owned:
        start, end = max(o.start, area.start), min(o.end, area.end)
        marks.append((end, paint(_OWNED_COLOUR, f"  {span(start, end)}  {size_approx(end - start):>9}  ▸ {o.label}")))
    return [text for _, text in sorted(marks, key=lambda t: -t[0])]  # stable: the break first on a tie


def to_json(amap: AddressMap) -> dict[str, Any]:
    """The map as a JSON-serialisable dict: pid, exe, break ({"start", "current", "exact"} or null), regions
    (ascending, each with the maps fields, kind, name and owned ranges) and gaps. Addresses are hex strings
    ("0x55d0c3a4e000"), exact in any JSON reader; sizes are integers."""
    def hexed(start: int, end: int) -> dict[str, Any]:
        return {"start": f"{start:#x}", "end": f"{end:#x}", "size": end - start}

    regions = [{**hexed(a.start, a.end), "perms": a.mapping.perms, "offset": a.mapping.offset,
                "dev": a.mapping.dev, "inode": a.mapping.inode, "pathname": a.mapping.pathname,
                "deleted": a.mapping.deleted, "kind": a.kind, "name": a.name,
                "owned": [{**hexed(o.start, o.end), "label": o.label} for o in a.owned]}
               for a in amap.areas]
    brk = None if amap.brk is None else {"start": f"{amap.start_brk or 0:#x}", "current": f"{amap.brk:#x}",
                                         "exact": amap.brk_exact}
    return {"pid": amap.pid, "exe": amap.exe, "break": brk, "regions": regions,
            "gaps": [hexed(g.start, g.end) for g in amap.gaps]}
