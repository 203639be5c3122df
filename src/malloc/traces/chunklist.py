"""The chunk list a timeline recording keeps between steps, changed in place by re-walking only what changed.

A chunk is a row of four integers (see `malloc.traces.timeline`): its gap (its address minus where the row
before it ended), its size, its state code, and its bin or request. Beside each row the list keeps the chunk's
address, so that the chunk holding an address is found by bisection. After an operation the recorder re-walks
the run of chunks it may have changed, `add`s the rows it finds, and `replace`s the old run with them; the
result is the splice a page applies to go from one step to the next.

Everything lives in memory made up front: glibc's recording must not allocate from the C library while its
replay runs, and none of these methods does (they make only small objects, which the interpreter keeps apart).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

KEY_EVERY = 1000  # the most splices a page applies to reach a step from its keyframe


def words(n: int) -> memoryview:
    """`n` zeroed signed 64-bit words."""
    return memoryview(bytearray(8 * max(1, n))).cast("q")


class ChunkList:
    """The chunks after the last step, rows in address order: those of the heap (the first `heap_rows`),
    then the mapped chunks. Holds at most `capacity` chunks (RuntimeError beyond, unless `grow` is set: then
    the memory is made larger)."""

    def __init__(self, capacity: int, grow: bool = False) -> None:
        self.capacity = max(1, capacity)
        self.grow = grow
        self.n = 0  # rows
        self.heap_rows = 0  # rows of heap chunks, before the mapped ones
        self.addr = words(self.capacity)
        self.rows = words(4 * self.capacity)
        # The rows of a re-walk, before `replace` puts them in; and the rows they replaced.
        self.new_addr = words(self.capacity)
        self.new_rows = words(4 * self.capacity)
        self.m = 0
        self.end = 0  # where the last added row ends
        self.saved = words(4 * self.capacity)
        self.since = 0  # rows inserted since the last keyframe, one more per step
        self.last_key = 0

    # ------------------------------------------------------------ looking up

    def index(self, address: int) -> int:
        """The heap row of the chunk holding `address` (its first row if it lies before them all)."""
        return max(0, bisect_right(self.addr, address, 0, self.heap_rows) - 1)

    def span(self, chunks: Iterable[int], top_moved: bool) -> tuple[int, int]:
        """The heap rows an operation may have changed: from the row before the first of `chunks` (chunk
        addresses) to the row after the last, and to the top's row when the top moved; (heap rows, -1) when
        there is none."""
        h = self.heap_rows
        lo, hi = h, -1
        for c in chunks:
            i = self.index(c)
            lo, hi = min(lo, i), max(hi, i)
        if top_moved:
            lo, hi = min(lo, h - 1), h - 1
        if hi >= 0:
            lo, hi = max(0, lo - 1), min(h - 1, hi + 1)
        return lo, hi

    def end_of(self, i: int) -> int:
        """Where the chunk of row i ends (0 for i = -1, where the first row's gap counts from)."""
        return self.addr[i] + self.rows[4 * i + 1] if i >= 0 else 0

    # ------------------------------------------------------------ changing

    def begin(self, s: int) -> None:
        """Start the rows that will replace a run beginning at row `s`."""
        self.m = 0
        self.end = self.end_of(s - 1)

    def add(self, address: int, size: int, state: int, extra: int) -> None:
        """The next row of the re-walk begun by `begin`."""
        m = self.m
        if m >= self.capacity:
            self._more()
        x = 4 * m
        rows = self.new_rows
        rows[x] = address - self.end
        rows[x + 1] = size
        rows[x + 2] = state
        rows[x + 3] = extra
        self.new_addr[m] = address
        self.m = m + 1
        self.end = address + size

    def replace(self, s: int, e: int, heap_rows: int) -> tuple[int, int, int]:
        """Put the rows added since `begin(s)` in place of rows [s, e), the heap then holding `heap_rows` rows;
        returns the splice (start, rows removed, rows inserted) that turns the old list into the new, the rows
        it inserts being rows[4 * start:4 * (start + inserted)]."""
        n = self.n
        if e < n and self.end != self.end_of(e - 1):
            # The row after the run counts its gap from where the run ends, which moved: it changes too.
            self.add(self.addr[e], self.rows[4 * e + 1], self.rows[4 * e + 2], self.rows[4 * e + 3])
            e += 1  # (removed and put back: the heap's count stays)
        m = self.m
        removed = e - s
        new_n = n - removed + m
        while new_n > self.capacity:
            self._more()
        rows, addr, saved = self.rows, self.addr, self.saved
        saved[:4 * removed] = rows[4 * s:4 * e]
        if m != removed:
            rows[4 * (s + m):4 * new_n] = rows[4 * e:4 * n]
            addr[s + m:new_n] = addr[e:n]
        rows[4 * s:4 * (s + m)] = self.new_rows[:4 * m]
        addr[s:s + m] = self.new_addr[:m]
        self.n = new_n
        self.heap_rows = heap_rows
        # Trim the rows the run left as they were, at both ends.
        both = min(m, removed)
        i = 0
        while i < both and _same(saved, 4 * i, rows, 4 * (s + i)):
            i += 1
        t = 0
        while t < both - i and _same(saved, 4 * (removed - 1 - t), rows, 4 * (s + m - 1 - t)):
            t += 1
        return s + i, removed - i - t, m - i - t

    def key_due(self, k: int, inserted: int) -> bool:
        """Whether step k, which inserted `inserted` rows, takes a keyframe: the first step, and then whenever
        the splices since the last keyframe hold as many rows as the list (so keyframes at most double the
        size) or KEY_EVERY steps have passed (so a page never applies more than that many splices)."""
        self.since += inserted + 1
        if k == 0 or self.since >= self.n or k - self.last_key >= KEY_EVERY:
            self.since = 0
            self.last_key = k
            return True
        return False

    def _more(self) -> None:
        if not self.grow:
            raise RuntimeError(f"{self.capacity} chunks do not fit the timeline's buffer")
        self.capacity *= 2
        for name in ("addr", "new_addr"):
            setattr(self, name, _larger(getattr(self, name), self.capacity))
        for name in ("rows", "new_rows", "saved"):
            setattr(self, name, _larger(getattr(self, name), 4 * self.capacity))


def _larger(old: memoryview, n: int) -> memoryview:
    new = words(n)
    new[:len(old)] = old
    return new


def _same(a: memoryview, x: int, b: memoryview, y: int) -> bool:
    """Whether the row at word x of `a` equals the one at word y of `b` (no slice objects: no copies)."""
    return a[x] == b[y] and a[x + 1] == b[y + 1] and a[x + 2] == b[y + 2] and a[x + 3] == b[y + 3]
