"""Named values in a shared heap: bytes and numpy arrays in one block each, with what it takes to read them back.

A value block starts with a small header, then the data:

    0 magic   1 kind (1 bytes, 2 array)   2 data offset (bytes from the block's start)   3 data bytes
    4 dimensions   5 dtype description bytes   6.. shape, one word a dimension, then the description

The dtype is kept as numpy's own portable description (`numpy.lib.format.dtype_to_descr`), so an array reads
back with its byte order, fields and shape in any process. numpy is imported only when an array is stored or
read.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import HeapCorruption

VALUE_MAGIC = int.from_bytes(b"pyMvalue", "little")
BYTES, ARRAY = 1, 2
V_MAGIC, V_KIND, V_DATA, V_NBYTES, V_NDIM, V_DESCR, V_SHAPE = range(7)
DATA_ALIGN = 64  # data starts on a cache line of the block (numpy's own alignment)
MAX_HEADER = 4096


@dataclass(frozen=True)
class Layout:
    """What a value block holds: its kind, data size, and for an array its dtype description and shape."""

    kind: int
    nbytes: int
    descr: bytes = b""
    shape: tuple[int, ...] = ()

    @property
    def header_words(self) -> list[int]:
        """The header's words, the description's bytes packed into the last ones (zero-padded)."""
        descr = self.descr + b"\0" * (-len(self.descr) % 8)
        packed = [int.from_bytes(descr[i:i + 8], "little") for i in range(0, len(descr), 8)]
        return [VALUE_MAGIC, self.kind, self.data_offset, self.nbytes, len(self.shape), len(self.descr),
                *self.shape, *packed]

    @property
    def data_offset(self) -> int:
        """Bytes from the block's start to the data: the header rounded up to DATA_ALIGN (the block itself is
        16-byte aligned, so the data is too)."""
        header = (V_SHAPE + len(self.shape)) * 8 + len(self.descr)
        return -(-header // DATA_ALIGN) * DATA_ALIGN

    @property
    def block_size(self) -> int:
        return self.data_offset + self.nbytes


def layout_of(value: object) -> tuple[Layout, memoryview]:
    """The layout for storing `value` (a numpy array, or any bytes-like object) and its bytes;
    TypeError for anything else or an array of Python objects."""
    if hasattr(value, "__array_interface__") and hasattr(value, "dtype"):
        np, fmt = _numpy()
        arr = np.asarray(value, order="C")  # not ascontiguousarray, which makes a 0-d array 1-d
        if arr.dtype.hasobject:
            raise TypeError("an array of Python objects cannot live in shared memory")
        descr = repr(fmt.dtype_to_descr(arr.dtype)).encode()
        if len(descr) + (V_SHAPE + arr.ndim) * 8 > MAX_HEADER:
            raise ValueError("the array's dtype or shape is too large to describe")
        return Layout(ARRAY, arr.nbytes, descr, tuple(arr.shape)), memoryview(arr.reshape(-1).view(np.uint8))
    try:
        data = memoryview(value).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"put takes a numpy array or a bytes-like object, not {type(value).__name__}") from None
    return Layout(BYTES, data.nbytes), data


def array_layout(shape: object, dtype: object) -> Layout:
    """The layout of a new array of `shape` and `dtype` (numpy's rules for both)."""
    np, fmt = _numpy()
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError("an array of Python objects cannot live in shared memory")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)  # type: ignore[arg-type]
    dims = tuple(int(np.int64(d)) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    nbytes = dt.itemsize
    for d in dims:
        nbytes *= d
    descr = repr(fmt.dtype_to_descr(dt)).encode()
    return Layout(ARRAY, nbytes, descr, dims)


def read_layout(words: Any, w: int, usable: int, where: int) -> Layout:
    """The layout of the value block at word `w` (in `words`, `usable` bytes); HeapCorruption when its header
    is damaged or the block is not a value."""
    def bad(why: str) -> HeapCorruption:
        return HeapCorruption(f"shared heap: the value at {where:#x} {why}", where)

    if usable < V_SHAPE * 8 or words[w + V_MAGIC] != VALUE_MAGIC:
        raise bad("is not a value stored by put or ndarray (no value header)")
    kind, data, nbytes, ndim, dlen = (words[w + V_KIND], words[w + V_DATA], words[w + V_NBYTES],
                                      words[w + V_NDIM], words[w + V_DESCR])
    if kind not in (BYTES, ARRAY) or ndim > 64 or dlen > MAX_HEADER:
        raise bad("has a damaged header")
    shape = tuple(words[w + V_SHAPE + i] for i in range(ndim))
    packed = b"".join(words[w + V_SHAPE + ndim + i].to_bytes(8, "little") for i in range(-(-dlen // 8)))
    layout = Layout(kind, nbytes, packed[:dlen], shape)
    if layout.data_offset != data or data + nbytes > usable:
        raise bad("has a damaged header (its data would leave the block)")
    return layout


def as_value(layout: Layout, view: memoryview) -> Any:
    """The value a layout describes, over `view` (its data bytes): the view itself for bytes, a numpy array
    over it for an array (zero-copy; it keeps the view, and so the mapping, referenced)."""
    if layout.kind == BYTES:
        return view
    np, _ = _numpy()
    try:
        dt = dtype_of(layout.descr)
    except ValueError:
        raise HeapCorruption("shared heap: a value's dtype description is damaged") from None
    count = 1
    for d in layout.shape:
        count *= d
    if count * dt.itemsize != layout.nbytes:
        raise HeapCorruption("shared heap: a value's shape and dtype disagree with its size")
    return np.frombuffer(view, dtype=dt, count=count).reshape(layout.shape)


def dtype_of(descr: bytes) -> Any:
    """The numpy dtype a stored description names; ValueError when it names none (a damaged or crafted one)."""
    _, fmt = _numpy()
    try:
        return fmt.descr_to_dtype(ast.literal_eval(descr.decode()))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a dtype description: {descr[:80]!r}") from exc


def _numpy() -> tuple[Any, Any]:
    """numpy and numpy.lib.format, imported on first use. Typed as Any: numpy is optional, and the package
    must type-check (and the compiled build compile) where it is not installed."""
    return importlib.import_module("numpy"), importlib.import_module("numpy.lib.format")

