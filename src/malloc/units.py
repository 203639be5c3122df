"""Sizes as people read them: exact binary units where they fit, bytes otherwise."""

from __future__ import annotations

_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
_LARGE_UNITS = ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), *_UNITS)  # address-space gaps need these


def size_text(n: int) -> str:
    """`n` bytes in the largest binary unit that divides it exactly ("128 KiB", "1 MiB"), else "200 bytes"."""
    for scale, unit in _UNITS:
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"


def size_approx(n: int) -> str:
    """`n` bytes rounded for reading ("1.5 MiB", "300 KiB", "200 B", "16 EiB")."""
    for scale, unit in _LARGE_UNITS:
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def scale_for(n: int) -> tuple[int, str]:
    """The binary unit to show sizes up to `n` in, as (bytes per unit, its name): the largest unit not above
    `n`, so that the top of a plot's axis reads from 1 to 1023 ((1 << 20, "MiB") for 5,000,000)."""
    for scale, unit in _UNITS:
        if n >= scale:
            return scale, unit
    return 1, "bytes"
