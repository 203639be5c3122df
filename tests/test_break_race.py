"""Lowering the break never cuts off memory the C library took meanwhile (a regression found by the bench)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_trim_does_not_lower_the_break_through_the_c_librarys_new_memory() -> None:
    # Fill glibc's heap so that its next request (the DIR buffer that listing /proc/self/task needs while
    # trimming) must move the break above our heap; our trim must then leave the break alone.
    code = textwrap.dedent("""
        import ctypes, malloc
        from malloc.os import events
        libc = ctypes.CDLL(None)
        libc.sbrk.restype = ctypes.c_void_p
        libc.sbrk.argtypes = [ctypes.c_ssize_t]
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
        start = libc.sbrk(0)
        while libc.sbrk(0) == start:
            libc.malloc(16)
        libc.malloc_trim(0)
        blocks = [malloc.malloc(100_000) for _ in range(4)]
        region = malloc.allocator.heaps[0].region
        end = region.base + region.size
        with events.Recorder() as log:
            for p in blocks:
                malloc.free(p)
        for e in log:
            if e.name == "sbrk" and e.args[0] < 0:
                assert e.result == end, f"break lowered from {e.result:#x}, our heap ended at {end:#x}"
        junk = [libc.malloc(1000) for _ in range(200)]  # would touch unmapped memory if it had been cut off
        malloc.check()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stdout, out.stderr)
