"""Allocator settings for a replay, written as glibc's mallopt names: `M_MMAP_THRESHOLD=65536`.

A setting is checked against glibc's rules (`Options.mallopt`) when it is parsed, so a bad one is refused
before anything runs; the same (parameter, value) pairs then go to this allocator's `mallopt` and to
glibc's, whose parameter numbers are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import PARAM_NAMES, Options

_BY_NAME = {name: param for param, name in PARAM_NAMES.items()}
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1  # mallopt(int param, int value)


class SettingError(ValueError):
    """A setting that is not `NAME=VALUE` with a known name and a value glibc accepts."""


@dataclass(frozen=True)
class Setting:
    """One mallopt call: `param` (M_MMAP_THRESHOLD, ...) set to `value`."""

    name: str
    param: int
    value: int

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


def parse_setting(text: str) -> Setting:
    """`NAME=VALUE` (VALUE decimal, or 0x hexadecimal) as a Setting; SettingError says what is wrong."""
    name, sep, value_text = text.partition("=")
    name = name.strip().upper()
    if not sep:
        raise SettingError(f"setting {text!r}: expected NAME=VALUE, e.g. M_MMAP_THRESHOLD=65536")
    param = _BY_NAME.get(name)
    if param is None:
        raise SettingError(f"setting {text!r}: unknown name {name!r} (known: {', '.join(sorted(_BY_NAME))})")
    try:
        value = int(value_text.strip(), 0)
    except ValueError:
        raise SettingError(f"setting {text!r}: value {value_text!r} is not an integer") from None
    if not _INT_MIN <= value <= _INT_MAX:
        raise SettingError(f"setting {text!r}: {value} does not fit mallopt's int argument")
    try:
        Options().mallopt(param, value)
    except ValueError as exc:
        raise SettingError(f"setting {text!r}: {exc}") from None
    return Setting(name, param, value)
