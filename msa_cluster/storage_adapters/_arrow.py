"""Arrow arrays built from and read through their buffers (for the segment format).

pyarrow's Python-object and numpy conversions import pandas (a second of start-up on a small
machine) and are not needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from msa_cluster.storage_adapters.errors import CorruptStoreError

__all__ = ["fixed_array", "bytes_array", "read_fixed", "read_bytes", "value_offsets", "open_batch"]

_NP = {pa.int64(): np.int64, pa.uint32(): np.uint32}


def fixed_array(values: Sequence[int], type_: pa.DataType) -> pa.Array:
    arr = np.asarray(values, dtype=_NP[type_])
    return pa.Array.from_buffers(type_, len(arr), [None, pa.py_buffer(arr)])


def bytes_array(values: Sequence[str | bytes | None], type_: pa.DataType) -> pa.Array:
    """string / binary (int32 offsets) or large_string (int64) array; None becomes null."""
    encoded = [v.encode("utf-8") if isinstance(v, str) else (v or b"") for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int64 if type_ == pa.large_string() else np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    validity = None
    if any(v is None for v in values):
        validity = pa.py_buffer(np.packbits(np.array([v is not None for v in values]), bitorder="little"))
    nulls = sum(v is None for v in values)
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))], nulls)


def read_fixed(arr: pa.Array) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], dtype=_NP[arr.type])[arr.offset : arr.offset + len(arr)]


def read_bytes(arr: pa.Array, nullable: bool = False) -> list[Any]:
    """Values of a string (decoded) or binary (bytes) array; nulls are None where `nullable`."""
    if arr.null_count and not nullable:
        raise ValueError(f"unexpected nulls in a {arr.type} column")
    width = np.int64 if arr.type in (pa.large_string(), pa.large_binary()) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    raw = data.to_pybytes() if data is not None else b""
    text = arr.type in (pa.string(), pa.large_string())
    out: list[Any] = [raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    if text:
        out = [v.decode("utf-8") for v in out]
    if arr.null_count:
        valid = np.unpackbits(np.frombuffer(arr.buffers()[0], dtype=np.uint8), bitorder="little")
        valid = valid[arr.offset : arr.offset + len(arr)]
        out = [v if ok else None for v, ok in zip(out, valid.tolist())]
    return out


def value_offsets(arr: pa.Array) -> np.ndarray:
    """[len + 1] int64 value offsets of a large_binary / large_string array."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]


def open_batch(buf: Any, name: str) -> tuple[pa.RecordBatch, int]:
    """Parse a one-batch IPC file; returns the batch and the base address of `buf`."""
    pbuf = buf if isinstance(buf, pa.Buffer) else pa.py_buffer(buf)
    try:
        reader = pa.ipc.open_file(pa.BufferReader(pbuf))
        if reader.num_record_batches != 1:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        batch.validate(full=True)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise CorruptStoreError(f"segment file {name} does not parse as Arrow IPC: {e}", (name,)) from e
    return batch, pbuf.address
