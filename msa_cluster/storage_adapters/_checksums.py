"""The store's checksums: zlib CRC32 (formats 1 and 2, manifests) and CRC32C (format 3 segments).

CRC32C runs on the CPU's CRC instruction through the `crc32c` package (about 14 GB/s here, ten
times zlib's CRC32) and releases the GIL for large buffers, so parallel segment writes checksum in
parallel. Every file reference names the algorithm of its checksum, so stores written by either
format verify with the one their files were written with.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any, Protocol

from crc32c import crc32c as _crc32c

__all__ = ["Checksum", "crc32", "crc32c", "crc_of", "chained", "ALGORITHMS"]


class Checksum(Protocol):
    def __call__(self, data: Any, value: int = 0) -> int: ...


def crc32(data: Any, value: int = 0) -> int:
    """zlib CRC32 of a bytes-like object, continuing from `value`."""
    return zlib.crc32(data, value) & 0xFFFFFFFF


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli, hardware-accelerated) of a bytes-like object, continuing from `value`."""
    return _crc32c(data, value)


ALGORITHMS: dict[str, Checksum] = {"crc32": crc32, "crc32c": crc32c}


def crc_of(segment_format: int) -> Checksum:
    """The per-document checksum of a segment format: CRC32 up to format 2, CRC32C from format 3."""
    return crc32c if segment_format >= 3 else crc32


def chained(fn: Checksum, buffers: Iterable[Any]) -> int:
    """The checksum of the buffers' bytes one after another, without joining them."""
    value = 0
    for b in buffers:
        value = fn(b, value)
    return value
