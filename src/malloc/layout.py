"""The chunk format: constants, flag bits, size rounding and bin indices.

A chunk at offset c (from the heap's base, always a multiple of 16) is handled inside the engine by its
word index w = c / 8, so that a header field is one index away (`W[w + 1]`):

    w+0   prev_size   size in bytes of the previous chunk, valid only while that chunk is free
    w+1   size word   size in bytes | flags in the low 4 bits | in-use tag in the top 16 bits
    w+2   user data   (the address handed out); a free chunk keeps its bin links here:
    w+2   next        word index of the next free chunk in its bin (0 = none)
    w+3   prev        word index of the previous one (0 = it is the bin's first)

A free chunk repeats its size in the next chunk's prev_size word (the boundary tag), so the neighbour
below a freed chunk is found in O(1). An in-use chunk may use the next chunk's prev_size word as data,
so its usable size is its size less 8.

The in-use tag holds bits 1-15 of the chunk's word index (and a 1), written when a chunk is handed out
and cleared when it is freed. It lets `free` tell a real block from an address inside one (less than
256 KiB in), or from an overwritten header, before it changes anything; free chunks and the top carry
no tag.
"""

from __future__ import annotations

WORD = 8
ALIGNMENT = 16
HEADER = 16  # prev_size + size word
MIN_CHUNK = 32
OVERHEAD = 8  # bytes of an in-use chunk not usable (its size word)

PREV_INUSE = 1
IS_MMAPPED = 2
FOREIGN = 4  # a span of the C library's own memory, covered so the range stays walkable
FLAG_BITS = 0xF
SIZE_MASK = 0x0000_FFFF_FFFF_FFF0
TAG_SHIFT = 48
TAG_MASK = 0xFFFF << TAG_SHIFT
MAX_REQUEST = 1 << 46  # larger requests cannot be met on any x86-64/aarch64 machine

# Small bins hold one exact chunk size each (32 .. 1008); large bins hold size ranges, kept sorted.
SMALL_LIMIT = 1024
N_BINS = 128


TAG_BITS = 0xFFFF  # the tag's width, unshifted


def tag(w: int) -> int:
    """The in-use tag for the chunk at word index `w`: never zero, already shifted into place.

    heap.py's hot paths write this expression out rather than call it: a call costs more than the tag.
    They also compare tags unshifted (`h >> TAG_SHIFT != (w | 1) & TAG_BITS`): the header word is beyond
    the interpreter's fast small-int range, and the shifted form takes three operations on such ints where
    the unshifted one takes one.
    """
    return ((w | 1) & TAG_BITS) << TAG_SHIFT


def check_request(n: int) -> None:
    """MemoryError for a request of `n` bytes that no machine could serve (and that would wrap in C types)."""
    if n > MAX_REQUEST:
        raise MemoryError(f"cannot allocate {n} bytes")


def request_to_size(n: int) -> int:
    """Chunk size for a request of `n` bytes (glibc's request2size)."""
    size = (n + OVERHEAD + 15) & ~15
    return size if size > MIN_CHUNK else MIN_CHUNK


def bin_index(size: int) -> int:
    """The bin of a free chunk of `size` bytes: 2..63 exact small sizes, 64..127 size ranges.

    The large ranges widen geometrically, as glibc's do: 64-byte steps up to 3 KiB, then 512-byte,
    4 KiB, 32 KiB and 256 KiB steps; the last bin takes everything from 512 KiB up.
    """
    if size < SMALL_LIMIT:
        return size >> 4
    if size < 3072:
        return 48 + (size >> 6)  # 64 .. 95
    if size < 12288:
        return 90 + (size >> 9)  # 96 .. 113
    if size < 40960:
        return 111 + (size >> 12)  # 114 .. 120
    if size < 163840:
        return 120 + (size >> 15)  # 121 .. 124
    if size < 524288:
        return 125 + (size >> 18)  # 125 .. 126
    return 127


TABLE_LIMIT = 524288
# bin_index(size) == BIN[size >> 4] for size < TABLE_LIMIT, and 127 from there up: the hot paths' one lookup
# (`BIN[size >> 4] if size < TABLE_LIMIT else 127`), where a call would cost more than the whole index.
BIN = bytes(bin_index(size) for size in range(0, TABLE_LIMIT, 16))


def page_align_up(n: int, page: int) -> int:
    """`n` rounded up to a multiple of `page` (a power of two)."""
    return (n + page - 1) & ~(page - 1)
