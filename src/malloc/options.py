"""Allocator settings under glibc's names, defaults and rules (mallopt and MALLOC_*_ variables).

The mmap threshold is dynamic as in glibc: it starts at 128 KiB, and when a mapped chunk larger than it
is freed (up to 32 MiB), the threshold rises to that chunk's size and the trim threshold to twice that,
until the user sets any of the thresholds, the top pad or the mmap maximum.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import SupportsIndex

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_PERTURB = -6

DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # 4 MiB * sizeof(long) on 64-bit
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_TOP_PAD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
HEAP_MAX_SIZE = 2 * DEFAULT_MMAP_THRESHOLD_MAX  # mallopt refuses thresholds above half of it
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1  # mallopt's value is a C int
SIZE_MAX = (1 << 64) - 1
SIZE_SETTINGS = {"MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"}  # size_t in glibc

PARAM_NAMES = {
    M_TRIM_THRESHOLD: "M_TRIM_THRESHOLD",
    M_TOP_PAD: "M_TOP_PAD",
    M_MMAP_THRESHOLD: "M_MMAP_THRESHOLD",
    M_MMAP_MAX: "M_MMAP_MAX",
    M_PERTURB: "M_PERTURB",
}
ENVIRONMENT = {
    "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD,
    "MALLOC_TOP_PAD_": M_TOP_PAD,
    "MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD,
    "MALLOC_MMAP_MAX_": M_MMAP_MAX,
    "MALLOC_PERTURB_": M_PERTURB,
}


@dataclass
class Options:
    """The settings in force; `mallopt` changes them under glibc's rules."""

    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD
    top_pad: int = DEFAULT_TOP_PAD
    mmap_max: int = DEFAULT_MMAP_MAX
    perturb: int = 0  # byte written over freed blocks (and its complement over new ones); 0 is off
    dynamic: bool = True  # the mmap threshold still follows freed mapped chunks

    def __post_init__(self) -> None:
        # The same ranges glibc's own types give the settings: no value built here can wrap on its way to C.
        limits = {"mmap_threshold": SIZE_MAX, "trim_threshold": SIZE_MAX, "top_pad": SIZE_MAX,
                  "mmap_max": INT_MAX, "perturb": 0xFF}
        for name, limit in limits.items():
            value = getattr(self, name)
            if type(value) is not int:
                raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
            if not 0 <= value <= limit:
                raise ValueError(f"{name} must be between 0 and {limit}, not {value}")

    def mallopt(self, param: SupportsIndex, value: SupportsIndex) -> int:
        """Set `param` (M_MMAP_THRESHOLD, ...) to `value`; returns 1 as glibc does on success.

        Unknown parameters and values glibc would refuse raise ValueError and change nothing. glibc's
        mallopt takes the value as a C int, so a value outside int's range, which could not reach it, is a
        ValueError too.
        """
        if type(param) is not int or type(value) is not int:
            raise TypeError("mallopt takes two integers")
        if param not in PARAM_NAMES:
            raise ValueError(f"unknown mallopt parameter {param}")
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError(f"{PARAM_NAMES[param]} must fit in a C int, not {value}")
        return self._set(param, value)

    def _set(self, param: int, value: int) -> int:
        if param == M_PERTURB:
            self.perturb = value & 0xFF
            return 1
        name = PARAM_NAMES[param]
        if value < 0:
            raise ValueError(f"{name} must not be negative: {value}")
        if param == M_MMAP_THRESHOLD:
            if value > HEAP_MAX_SIZE // 2:
                raise ValueError(f"{name} may be at most {HEAP_MAX_SIZE // 2}, not {value}")
            self.mmap_threshold = value
        elif param == M_TRIM_THRESHOLD:
            self.trim_threshold = value
        elif param == M_TOP_PAD:
            self.top_pad = value
        else:
            self.mmap_max = value
        self.dynamic = False
        return 1

    def freed_mapped_chunk(self, size: int) -> bool:
        """The dynamic threshold's rule, applied when a mapped chunk of `size` bytes is freed;
        True if the thresholds moved."""
        if self.dynamic and self.mmap_threshold < size <= DEFAULT_MMAP_THRESHOLD_MAX:
            self.mmap_threshold = size
            self.trim_threshold = 2 * size
            return True
        return False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Options:
        """Defaults, then glibc's MALLOC_*_ variables; a value that is not a valid setting is ignored
        with a warning, as glibc ignores it.

        glibc 2.36 reads the size settings (top pad, trim and mmap thresholds) as size_t with strtoul, which
        saturates: a larger number counts as 2**64 - 1 (under strace, MALLOC_TOP_PAD_=2**64 and =10**23 make
        the break grow exactly as MALLOC_TOP_PAD_=2**64-1 does). The same clamp applies here; the allocator
        then grows without a pad it cannot have, as glibc's wrapped arithmetic does in effect.
        """
        env = os.environ if environ is None else environ
        options = cls()
        for var, param in ENVIRONMENT.items():
            text = env.get(var)
            if text is None:
                continue
            try:
                value = int(text, 0)
                if var in SIZE_SETTINGS:
                    if value < 0:
                        raise ValueError(f"{PARAM_NAMES[param]} must not be negative: {value}")
                    options._set(param, min(value, SIZE_MAX))
                elif not INT_MIN <= value <= INT_MAX:
                    raise ValueError(f"{PARAM_NAMES[param]} must fit in a C int, not {value}")
                else:
                    options._set(param, value)
            except ValueError as exc:
                warnings.warn(f"{var}={text!r} ignored: {exc}", RuntimeWarning, stacklevel=2)
        return options
