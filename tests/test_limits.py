"""Values at the edges of the C types, and requests beyond what the machine can give.

No setting or size may wrap on its way to a system call (sbrk takes a signed size, mmap an unsigned one), and
a request the kernel cannot back must be a MemoryError at once, as glibc's malloc returns NULL, not memory that
the OOM killer collects when it is touched. Everything here runs in a child process: today's failure modes are
a segfault, a break lowered under live blocks, or memory the machine does not have.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import malloc

SRC = Path(malloc.__file__).resolve().parent.parent


def child(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it prints one JSON line last. A crash fails the test."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", **(env or {})})
    assert proc.returncode == 0, (f"the child died with code {proc.returncode} (-11 is a segfault)\n"
                                  f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


OUTCOME = """
def outcome(f):
    try:
        f()
        return "returned"
    except Exception as e:
        return type(e).__name__
"""

# ----------------------------------------------------------------------------- settings


def test_mallopt_values_beyond_a_c_int_are_refused_and_malloc_still_works() -> None:
    report = child(OUTCOME + """
import json, malloc
r = {}
for v in (2**64 - 2**22, 2**64, 2**31):
    r[str(v)] = outcome(lambda: malloc.mallopt(malloc.M_TOP_PAD, v))
r["pad"] = malloc.allocator.options.top_pad
p = malloc.malloc(10)
malloc.free(p)
r["int max"] = outcome(lambda: malloc.mallopt(malloc.M_TRIM_THRESHOLD, 2**31 - 1))
malloc.check()
print(json.dumps(r))
""")
    assert report == {str(2**64 - 2**22): "ValueError", str(2**64): "ValueError", str(2**31): "ValueError",
                      "pad": 128 * 1024, "int max": "returned"}


def test_a_top_pad_beyond_size_t_from_the_environment_is_clamped_and_growth_still_works() -> None:
    """glibc 2.36 saturates the variable at 2**64-1; the heap then grows by what each request needs, and the
    region's idea of its size stays the break's."""
    report = child("""
import json, malloc
from malloc.os import libc
h_pad = malloc.allocator.options.top_pad
blocks = [malloc.malloc(1000) for _ in range(600)]
h = malloc.allocator.heaps[0]
at_break = h.region.base + h.region.size == libc.current_break()
for p in blocks:
    malloc.free(p)
malloc.check()
print(json.dumps({"pad": h_pad, "at_break": at_break, "held": h.held, "heaps": len(malloc.allocator.heaps)}))
""", env={"MALLOC_TOP_PAD_": "18446744073709551616"})
    assert report["pad"] == 2**64 - 1
    assert report["at_break"] is True
    assert report["heaps"] == 1
    assert 600_000 <= report["held"] < 2_000_000


def test_a_heap_checks_its_settings_and_grows_by_what_it_needs_without_a_pad_it_cannot_have() -> None:
    region = malloc.MapRegion(64 << 10, "test", reserve=4 << 20)
    try:
        with pytest.raises(ValueError, match="top_pad"):
            malloc.Heap(region, top_pad=-1)
        with pytest.raises(TypeError, match="trim_threshold"):
            malloc.Heap(region, trim_threshold=1.5)  # type: ignore[arg-type]
        heap = malloc.Heap(region, top_pad=2**64)
        p = heap.malloc(200_000)
        assert 200_000 < region.size < 300_000
        heap.free(p)
        heap.check()
    finally:
        region.close()


# ----------------------------------------------------------------------------- regions and system calls


def test_region_sizes_that_would_wrap_are_refused_and_change_nothing() -> None:
    report = child(OUTCOME + """
import json, malloc
from malloc.os import libc
brk = libc.current_break()
r = {
    "map reserve 2**64+2**20": outcome(lambda: malloc.MapRegion(1 << 20, "x", reserve=2**64 + 2**20)),
    "map initial 2**64": outcome(lambda: malloc.MapRegion(2**64, "x")),
    "map initial -1": outcome(lambda: malloc.MapRegion(-1, "x")),
    "map initial str": outcome(lambda: malloc.MapRegion("1", "x")),
    "break 2**64-2**22": outcome(lambda: malloc.BreakRegion(2**64 - 2**22, "x")),
    "break -4096": outcome(lambda: malloc.BreakRegion(-4096, "x")),
    "sbrk 2**63": outcome(lambda: libc.sbrk(2**63, "x")),
    "sbrk -2**64": outcome(lambda: libc.sbrk(-2**64, "x")),
    "mmap 2**64+4096": outcome(lambda: libc.mmap_anonymous(2**64 + 4096, "x")),
    "madvise -1": outcome(lambda: libc.madvise_dontneed(4096, -1, "x")),
}
r["break unchanged"] = libc.current_break() == brk
region = malloc.MapRegion(1 << 20, "x", reserve=2 << 20)
r["grow 2**64"] = outcome(lambda: region.grow(2**64, "x"))
r["grow past reserve"] = outcome(lambda: region.grow(2 << 20, "x"))
r["shrink past base"] = outcome(lambda: region.shrink(2 << 20, "x"))
r["release outside"] = outcome(lambda: region.release(1 << 20, 4096, "x"))
r["size unchanged"] = region.size == 1 << 20
region.close()
print(json.dumps(r))
""")
    assert report == {
        "map reserve 2**64+2**20": "MemoryError", "map initial 2**64": "MemoryError", "map initial -1": "ValueError",
        "map initial str": "TypeError", "break 2**64-2**22": "MemoryError", "break -4096": "ValueError",
        "sbrk 2**63": "ValueError", "sbrk -2**64": "ValueError", "mmap 2**64+4096": "ValueError",
        "madvise -1": "ValueError", "break unchanged": True, "grow 2**64": "MemoryError",
        "grow past reserve": "MemoryError", "shrink past base": "ValueError", "release outside": "ValueError",
        "size unchanged": True,
    }


# ----------------------------------------------------------------------------- requests beyond the machine

BEYOND = OUTCOME + """
import ctypes, json, malloc
from malloc.os import libc
glibc = ctypes.CDLL(None)
for name, n in (("malloc", 1), ("calloc", 2), ("memalign", 2)):
    getattr(glibc, name).restype = ctypes.c_void_p
    getattr(glibc, name).argtypes = [ctypes.c_size_t] * n
glibc.free.argtypes = [ctypes.c_void_p]
a = malloc.allocator
malloc.free(malloc.malloc(10))  # the main heap exists
if FALLBACK:
    # The break cannot grow and no request gets a mapping of its own: every request that does not fit
    # goes to a heap over a mapping, the path that served 32 TiB.
    malloc.mallopt(malloc.M_MMAP_MAX, 0)
    def refuse(min_bytes, reason):
        raise MemoryError("test: the break cannot grow")
    a.heaps[0].region.grow = refuse
before = (len(a.heaps), a.system_current)
r = {}
for name, args in (("malloc", (2**45,)), ("calloc", (2**30, 64)), ("memalign", (2**45, 10))):
    q = getattr(glibc, name)(*args)
    if q:
        glibc.free(q)
        r[name] = "glibc served it"
        continue
    r[name] = outcome(lambda: getattr(malloc, name)(*args))
r["unchanged"] = (len(a.heaps), a.system_current) == before
malloc.check()
print(json.dumps(r))
"""


def test_requests_glibc_cannot_serve_are_memory_errors() -> None:
    report = child("FALLBACK = False\n" + BEYOND)
    assert report == {"malloc": "MemoryError", "calloc": "MemoryError", "memalign": "MemoryError",
                      "unchanged": True}


def test_requests_glibc_cannot_serve_are_memory_errors_when_the_break_cannot_grow() -> None:
    report = child("FALLBACK = True\n" + BEYOND)
    assert report == {"malloc": "MemoryError", "calloc": "MemoryError", "memalign": "MemoryError",
                      "unchanged": True}


def test_a_large_fallback_heap_goes_back_to_the_os_when_freed() -> None:
    report = child("""
import json, malloc
a = malloc.allocator
malloc.free(malloc.malloc(10))
malloc.mallopt(malloc.M_MMAP_MAX, 0)
def refuse(min_bytes, reason):
    raise MemoryError("test: the break cannot grow")
a.heaps[0].region.grow = refuse
held = a.system_current
r = {}
for name, make in (("malloc", lambda: malloc.malloc(100 << 20)), ("memalign", lambda: malloc.memalign(1 << 26, 10))):
    p = make()
    fallback = a.heaps[-1]
    base, reserved = fallback.region.base, fallback.region.reserved
    r[name + " heaps"] = len(a.heaps)
    malloc.free(p)
    maps = open("/proc/self/maps").read()
    r[name + " after free"] = [len(a.heaps), a.system_current == held, f"{base:x}-" in maps]
malloc.check()
print(json.dumps(r))
""")
    assert report == {"malloc heaps": 2, "malloc after free": [1, True, False],
                      "memalign heaps": 2, "memalign after free": [1, True, False]}


def test_options_hold_only_values_their_c_types_can() -> None:
    for fields, error in (({"top_pad": 2**64}, ValueError), ({"perturb": 256}, ValueError),
                          ({"mmap_max": 2**31}, ValueError), ({"trim_threshold": -1}, ValueError),
                          ({"mmap_threshold": 1.5}, TypeError)):
        with pytest.raises(error):
            malloc.Options(**fields)  # type: ignore[arg-type]
    options = malloc.Options.from_environment({"MALLOC_TRIM_THRESHOLD_": str(10**30), "MALLOC_TOP_PAD_": "4096"})
    assert (options.trim_threshold, options.top_pad) == (2**64 - 1, 4096)
    with pytest.warns(RuntimeWarning, match="MALLOC_MMAP_MAX_"):
        options = malloc.Options.from_environment({"MALLOC_MMAP_MAX_": str(2**40)})
    assert options.mmap_max == malloc.Options().mmap_max
