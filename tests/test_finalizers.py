"""A free reached from a finalizer while this thread is inside the allocator is deferred, not deadlocked."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap


def test_free_from_a_finalizer_inside_the_allocator_is_deferred() -> None:
    code = textwrap.dedent("""
        import gc, malloc
        a = malloc.allocator
        class Block:
            def __init__(self, n):
                self.p = malloc.malloc(n)
                self.cycle = self  # only the cyclic collector can reclaim it
            def __del__(self):
                malloc.free(self.p)
        blocks = [Block(5000) for _ in range(50)]
        ps = [b.p for b in blocks]
        del blocks
        # Collect while holding the allocator's lock, as a collection triggered inside malloc would.
        with a._lock:
            gc.collect()
            held = len(a._deferred)
        assert held == 50, held
        q = malloc.malloc(5000)  # the next call into the allocator carries out the deferred frees
        assert not a._deferred
        assert q in ps  # and their memory is reused
        malloc.check()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
    assert gc.isenabled()
