"""Byte sizes as users write them: "5GB", "512MiB", "1.5 GB", "1000000"."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# The largest size: an int64 byte count, beyond any disk or memory (and what
# file offsets and torch's sizes can hold).
MAX_SIZE = 2**63 - 1
_MAX_DIGITS = 60  # digits of a number, whole and fraction: more say nothing about bytes


def parse_size(text: str | int) -> int:
    """Bytes in `text`; decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, ...) of 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return _at_most_max(text, text)
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GB, 512MiB or 1000000")
    whole, _, fraction = match.group(1).partition(".")
    if len(whole.lstrip("0")) > _MAX_DIGITS:
        return _at_most_max(text, MAX_SIZE + 1)  # without converting it (Python refuses over 4300 digits)
    # Exact decimal arithmetic: no float rounding ("4.35KB" is 4350 bytes) and no overflow to inf.
    size = int(Fraction(f"{whole or 0}.{fraction[:_MAX_DIGITS] or 0}") * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return _at_most_max(text, size)


def _at_most_max(text: str | int, size: int) -> int:
    if size > MAX_SIZE:
        shown = text if len(str(text)) <= 24 else f"{str(text)[:20]}... ({len(str(text))} characters)"
        raise ValueError(f"size {shown!r} is too large (the most is 2**63 - 1 bytes, about 9.2 EB)")
    return size


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
