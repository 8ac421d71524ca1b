"""Segment files: Arrow IPC encoding and decoding of encoded documents, with checksums.

Shape legend: R routing layers, C chunks of one document, Cs chunks of a whole segment,
Hkv kv heads, D head dim, N documents in a segment.

A segment is three immutable Arrow IPC files (uncompressed, so they memory-map):
  <id>.docs.arrow     one row per document: id, tenant, source, metadata (JSON), token and
                      chunk counts, where its content lies in the content file, CRC32s. Small.
  <id>.router.arrow   doc_id and one large_binary column `rk_<layer>` per routing layer; row i is
                      that document's router keys [C, Hkv, D]. Arrow stores a column's values back
                      to back, so a layer's column is one [Cs, Hkv, D] tensor: a bulk load maps it.
  <id>.content.arrow  doc_id, `kv` (row i: K [R, C, Hkv, D] then V [R, C, Hkv, D], raw bytes) and
                      `text`. A document's K/V of every layer is one contiguous byte range, so a
                      cold fetch is one range read; its absolute offset is in the docs table.

Tensors are stored as raw little-endian bytes of the store's dtype (Arrow has no bfloat16) and
viewed back with `torch.frombuffer`: bit-exact, no pickle. Per-document CRC32s cover K||V, the
router keys (layer after layer) and the text; they are checked on every read.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.types import EncodedDocument, ModelFingerprint

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "TensorLayout",
    "DocRow",
    "SegmentDocs",
    "RouterFile",
    "encode_segment",
    "decode_docs",
    "decode_content_range",
    "decode_text_range",
    "doc_checksums",
    "metadata_json",
    "crc32",
]

FORMAT_VERSION = 2  # 2: manifests allocate document ids per tenant; docs tables carry client ids
READABLE_FORMAT_VERSIONS = (1, 2)  # version 1 stores open, and are upgraded by their next commit
_META_KEY = b"msa.segment"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

if sys.byteorder != "little":  # raw tensor bytes are little-endian on every supported host
    raise ImportError("msa_cluster.storage_adapters needs a little-endian host")


def crc32(data: Any, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorLayout:
    """What every document of a store looks like, derived from its model fingerprint."""

    routing_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    chunk_size: int

    @classmethod
    def from_fingerprint(cls, fp: ModelFingerprint) -> TensorLayout:
        name = _dtype_name(fp.dtype)
        if name not in _DTYPES:
            raise ValueError(f"fingerprint dtype {fp.dtype!r} is not storable; allowed: {sorted(_DTYPES)}")
        if not fp.routing_layers or fp.num_kv_heads < 1 or fp.head_dim < 1 or fp.chunk_size < 1:
            raise ValueError(f"fingerprint has an empty or non-positive shape: {fp}")
        return cls(tuple(fp.routing_layers), fp.num_kv_heads, fp.head_dim, _DTYPES[name], fp.chunk_size)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk of one tensor at one layer: Hkv * D * itemsize."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    def check(self, doc: EncodedDocument) -> None:
        """Raise ValueError naming the document if it does not fit this store."""
        if not isinstance(doc, EncodedDocument):
            raise TypeError(f"expected EncodedDocument, got {type(doc).__name__}")
        where = f"document {doc.doc_id}"
        if tuple(doc.routing_layers) != self.routing_layers:
            raise ValueError(f"{where}: routing layers {doc.routing_layers} != store's {self.routing_layers}")
        for name in ("keys", "values", "router_keys"):
            t = getattr(doc, name)
            if t.dtype != self.dtype:
                raise ValueError(f"{where}: {name} dtype {t.dtype} != store dtype {self.dtype}")
            if t.device.type != "cpu":
                raise ValueError(f"{where}: {name} is on {t.device}; move documents to the CPU before storing")
        if tuple(doc.keys.shape[2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"{where}: [Hkv, D] = {tuple(doc.keys.shape[2:])} != store's ({self.num_kv_heads}, {self.head_dim})"
            )
        want = math.ceil(doc.num_tokens / self.chunk_size)
        if doc.num_chunks != want:
            raise ValueError(f"{where}: {doc.num_chunks} chunks for {doc.num_tokens} tokens, expected {want}")
        if not isinstance(doc.tenant, str) or not doc.tenant:
            raise ValueError(f"{where}: tenant must be a non-empty string, got {doc.tenant!r}")
        if not isinstance(doc.source, str):
            raise TypeError(f"{where}: source must be a string, got {type(doc.source).__name__}")
        if doc.text is not None and not isinstance(doc.text, str):
            raise TypeError(f"{where}: text must be a string or None, got {type(doc.text).__name__}")
        for k, v in doc.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"{where}: metadata must map str to str, got {k!r}: {v!r}")

    def segment_meta(self, segment_id: str, kind: str) -> dict[bytes, bytes]:
        meta = {
            "format": FORMAT_VERSION,
            "segment_id": segment_id,
            "kind": kind,
            "dtype": _dtype_name(self.dtype),
            "routing_layers": list(self.routing_layers),
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "byte_order": "little",
        }
        return {_META_KEY: json.dumps(meta, sort_keys=True).encode()}


@dataclass(frozen=True)
class DocRow:
    """One document's row in a segment's docs table. Offsets are absolute in the content file."""

    doc_id: int
    tenant: str
    source: str
    metadata: str  # canonical JSON of a str -> str mapping
    num_tokens: int
    num_chunks: int
    content_offset: int
    content_length: int
    content_crc: int
    router_crc: int
    text_offset: int
    text_length: int  # -1: the document has no text
    text_crc: int
    client_id: str | None = None  # the tenant's alias of the document (absent in format 1 segments)

    def digest(self) -> tuple:
        """What makes two stored documents the same content (for idempotent re-inserts)."""
        return (
            self.tenant, self.source, self.metadata, self.num_tokens, self.num_chunks,
            self.content_crc, self.router_crc, self.text_length, self.text_crc, self.client_id,
        )  # fmt: skip

    @property
    def metadata_dict(self) -> dict[str, str]:
        return json.loads(self.metadata)


_DOCS_FIELDS = [
    ("doc_id", pa.int64()),
    ("tenant", pa.string()),
    ("source", pa.string()),
    ("metadata", pa.string()),
    ("num_tokens", pa.int64()),
    ("num_chunks", pa.int64()),
    ("content_offset", pa.int64()),
    ("content_length", pa.int64()),
    ("content_crc", pa.uint32()),
    ("router_crc", pa.uint32()),
    ("text_offset", pa.int64()),
    ("text_length", pa.int64()),
    ("text_crc", pa.uint32()),
    ("client_id", pa.string()),  # nullable; not in the docs tables of format 1
]
_NULLABLE = {"client_id"}
_V1_DOCS_FIELDS = _DOCS_FIELDS[:-1]


# ------------------------------------------------------------------------------------ writing
def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes as a 1-D uint8 tensor (a view when already contiguous)."""
    return t.contiguous().view(-1).view(torch.uint8)


def _u8np(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bytes as a 1-D uint8 numpy array (numpy copies run at memcpy speed)."""
    return _flat_bytes(t).numpy()


# Arrays are built from and read through their buffers: pyarrow's Python-object and numpy
# conversions import pandas (a second of start-up on a small machine) and are not needed here.
_NP = {pa.int64(): np.int64, pa.uint32(): np.uint32}


def _fixed_array(values: Sequence[int], type_: pa.DataType) -> pa.Array:
    arr = np.asarray(values, dtype=_NP[type_])
    return pa.Array.from_buffers(type_, len(arr), [None, pa.py_buffer(arr)])


def _string_array(values: Sequence[str | None], type_: pa.DataType | None = None) -> pa.Array:
    """string (int32 offsets) or large_string (int64) array; None becomes null."""
    type_ = pa.string() if type_ is None else type_
    encoded = [v.encode("utf-8") if v is not None else b"" for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int64 if type_ == pa.large_string() else np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    validity = None
    if any(v is None for v in values):
        validity = pa.py_buffer(np.packbits(np.array([v is not None for v in values]), bitorder="little"))
    nulls = sum(v is None for v in values)
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))], nulls)


def _read_fixed(arr: pa.Array) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], dtype=_NP[arr.type])[arr.offset : arr.offset + len(arr)]


def _read_strings(arr: pa.Array, nullable: bool = False) -> list[str | None]:
    if arr.null_count and not nullable:
        raise ValueError(f"unexpected nulls in a {arr.type} column")
    width = np.int64 if arr.type == pa.large_string() else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    raw = data.to_pybytes() if data is not None else b""
    out: list[str | None] = [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    if arr.null_count:
        valid = np.unpackbits(np.frombuffer(arr.buffers()[0], dtype=np.uint8), bitorder="little")
        valid = valid[arr.offset : arr.offset + len(arr)]
        out = [v if ok else None for v, ok in zip(out, valid.tolist())]
    return out


def _binary_column(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    n = len(offsets) - 1
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _offsets(arr: pa.Array) -> np.ndarray:
    """[len + 1] int64 value offsets of a large_binary / large_string array."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]


def _open_batch(buf: Any, name: str) -> tuple[pa.RecordBatch, int]:
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


def _encode_content(segment_id, docs, layout: TensorLayout, kv_lens: np.ndarray, known, write):
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(kv_lens, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    crcs = []
    for i, d in enumerate(docs):
        o, half = int(offsets[i]), int(kv_lens[i]) // 2
        np.copyto(data[o : o + half], _u8np(d.keys))
        np.copyto(data[o + half : o + 2 * half], _u8np(d.values))
        crcs.append(known[i] if known[i] is not None else crc32(data[o : o + 2 * half]))
    texts = _string_array([d.text for d in docs], pa.large_string())
    ids = _fixed_array([d.doc_id for d in docs], pa.int64())
    batch = pa.record_batch([ids, _binary_column(data, offsets), texts], names=["doc_id", "kv", "text"])
    batch = batch.replace_schema_metadata(layout.segment_meta(segment_id, "content"))
    buf = write("content", batch)
    parsed, base = _open_batch(buf, f"{segment_id}.content.arrow")
    kv_start = parsed.column("kv").buffers()[2].address - base
    text_col = parsed.column("text")
    text_offsets = _offsets(text_col)
    text_data = text_col.buffers()[2]
    text_start = (text_data.address - base) if text_data is not None else 0
    return offsets[:-1] + kv_start, crcs, text_start + text_offsets[:-1], np.diff(text_offsets)


def _encode_router(segment_id, docs, layout: TensorLayout, chunks: np.ndarray, known, write):
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(chunks * layout.chunk_bytes, out=offsets[1:])
    crcs = [0] * len(docs)
    columns, names = [_fixed_array([d.doc_id for d in docs], pa.int64())], ["doc_id"]
    for r, layer in enumerate(layout.routing_layers):
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, d in enumerate(docs):
            a, b = int(offsets[i]), int(offsets[i + 1])
            np.copyto(data[a:b], _u8np(d.router_keys[r]))
            if known[i] is None:
                crcs[i] = crc32(data[a:b], crcs[i])
        columns.append(_binary_column(data, offsets))
        names.append(f"rk_{layer}")
    batch = pa.record_batch(columns, names=names).replace_schema_metadata(layout.segment_meta(segment_id, "router"))
    write("router", batch)
    return [c if k is None else k for c, k in zip(crcs, known)]


def doc_checksums(doc: EncodedDocument) -> tuple[int, int]:
    """(CRC32 of K||V bytes, CRC32 of router-key bytes layer after layer): what the files will hold."""
    kv = crc32(_flat_bytes(doc.values).numpy(), crc32(_flat_bytes(doc.keys).numpy()))
    rk = 0
    for r in range(doc.router_keys.shape[0]):
        rk = crc32(_flat_bytes(doc.router_keys[r]).numpy(), rk)
    return kv, rk


def encode_segment(
    segment_id: str,
    docs: Sequence[EncodedDocument],
    layout: TensorLayout,
    write: Callable[[str, pa.RecordBatch], Any],
    checksums: Sequence[tuple[int, int] | None] | None = None,
) -> list[DocRow]:
    """Encode documents (already checked with `layout.check`) into one segment's three files.

    write(kind, batch) stores `batch` as the one-batch IPC file of `kind` ("content", "router",
    "docs", in that order) and returns the file's bytes as stored (the content file's are parsed
    to find where each document landed). checksums: each document's `doc_checksums`, or None
    where not computed yet (then they are computed from the assembled bytes).
    """
    if not docs:
        raise ValueError("a segment needs at least one document")
    chunks = np.array([d.num_chunks for d in docs], dtype=np.int64)
    kv_lens = 2 * len(layout.routing_layers) * chunks * layout.chunk_bytes
    checksums = list(checksums) if checksums is not None else [None] * len(docs)
    kv_known = [c[0] if c is not None else None for c in checksums]
    rk_known = [c[1] if c is not None else None for c in checksums]
    kv_offsets, kv_crcs, text_offsets, text_lens = _encode_content(segment_id, docs, layout, kv_lens, kv_known, write)
    rk_crcs = _encode_router(segment_id, docs, layout, chunks, rk_known, write)
    rows = []
    for i, d in enumerate(docs):
        has_text = d.text is not None
        text_bytes = d.text.encode("utf-8") if d.text is not None else b""
        rows.append(
            DocRow(
                doc_id=d.doc_id,
                tenant=d.tenant,
                source=d.source,
                metadata=metadata_json(d.metadata),
                num_tokens=int(d.num_tokens),
                num_chunks=int(chunks[i]),
                content_offset=int(kv_offsets[i]),
                content_length=int(kv_lens[i]),
                content_crc=kv_crcs[i],
                router_crc=rk_crcs[i],
                text_offset=int(text_offsets[i]) if has_text else -1,
                text_length=int(text_lens[i]) if has_text else -1,
                text_crc=crc32(text_bytes) if has_text else 0,
                client_id=d.client_id,
            )
        )
    cols = {name: [getattr(r, name) for r in rows] for name, _ in _DOCS_FIELDS}
    arrays = [_string_array(cols[n]) if t == pa.string() else _fixed_array(cols[n], t) for n, t in _DOCS_FIELDS]
    table = pa.record_batch(arrays, names=[n for n, _ in _DOCS_FIELDS])
    write("docs", table.replace_schema_metadata(layout.segment_meta(segment_id, "docs")))
    return rows


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class SegmentDocs:
    """A decoded docs table: rows in file order, and each row's first chunk in the router file."""

    segment_id: str
    rows: tuple[DocRow, ...]
    chunk_offsets: np.ndarray  # [N + 1] int64

    def __len__(self) -> int:
        return len(self.rows)


def decode_docs(segment_id: str, buf: Any, name: str) -> SegmentDocs:
    batch, _ = _open_batch(buf, name)
    fields = _V1_DOCS_FIELDS if len(batch.schema.names) == len(_V1_DOCS_FIELDS) else _DOCS_FIELDS
    want = [n for n, _ in fields]
    if batch.schema.names != want:
        raise CorruptStoreError(f"segment file {name} has columns {batch.schema.names}, expected {want}", (name,))
    if [f.type for f in batch.schema] != [t for _, t in fields]:
        raise CorruptStoreError(f"segment file {name} has column types {batch.schema.types}", (name,))
    try:
        cols = [
            _read_strings(batch.column(n), n in _NULLABLE) if t == pa.string() else _read_fixed(batch.column(n)).tolist()
            for n, t in fields
        ]
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptStoreError(f"segment file {name} has an unreadable column: {e}", (name,)) from e
    rows = tuple(DocRow(*values) for values in zip(*cols))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.array([r.num_chunks for r in rows], dtype=np.int64), out=offsets[1:])
    return SegmentDocs(segment_id, rows, offsets)


def _check_meta(batch: pa.RecordBatch, layout: TensorLayout, name: str, kind: str) -> None:
    raw = (batch.schema.metadata or {}).get(_META_KEY)
    try:
        meta = json.loads(raw or b"")
    except (TypeError, ValueError) as e:
        raise CorruptStoreError(f"segment file {name} has no readable segment metadata", (name,)) from e
    want = json.loads(layout.segment_meta("", kind)[_META_KEY])
    for key in ("format", "kind", "dtype", "routing_layers", "num_kv_heads", "head_dim", "byte_order"):
        if meta.get(key) != want[key]:
            raise CorruptStoreError(f"segment file {name}: {key}={meta.get(key)!r}, expected {want[key]!r}", (name,))


def _frombuffer(buf: Any, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


class RouterFile:
    """A parsed router file: per routing layer a [Cs, Hkv, D] view into `buf` (zero-copy)."""

    def __init__(self, docs: SegmentDocs, buf: Any, layout: TensorLayout, name: str):
        batch, base = _open_batch(buf, name)
        _check_meta(batch, layout, name, "router")
        self.name, self.docs, self.layout = name, docs, layout
        ids = _read_fixed(batch.column("doc_id"))
        if len(ids) != len(docs) or any(int(a) != r.doc_id for a, r in zip(ids, docs.rows)):
            raise CorruptStoreError(f"segment file {name}: document ids differ from the docs table", (name,))
        total = int(docs.chunk_offsets[-1])
        per = layout.num_kv_heads * layout.head_dim
        self.layers: list[torch.Tensor] = []
        for layer in layout.routing_layers:
            col = batch.column(f"rk_{layer}")
            expect = docs.chunk_offsets * layout.chunk_bytes
            if not np.array_equal(_offsets(col), expect):
                raise CorruptStoreError(f"segment file {name}: layer {layer} offsets disagree with chunk counts", (name,))
            data = col.buffers()[2]
            start = (data.address - base) if data is not None else 0
            self.layers.append(_frombuffer(buf, layout.dtype, start, total * per).view(total, *layout_shape(layout)))

    def check(self, i: int) -> None:
        """Verify the router CRC of row i; raises CorruptStoreError naming the file."""
        a, b = int(self.docs.chunk_offsets[i]), int(self.docs.chunk_offsets[i + 1])
        crc = 0
        for t in self.layers:
            crc = crc32(_u8(t[a:b]), crc)
        row = self.docs.rows[i]
        if crc != row.router_crc:
            raise CorruptStoreError(
                f"segment file {self.name}: router keys of document {row.doc_id} fail their checksum", (self.name,)
            )

    def doc(self, i: int) -> torch.Tensor:
        """Router keys of row i: [R, C, Hkv, D] (a copy), checksum-verified."""
        self.check(i)
        a, b = int(self.docs.chunk_offsets[i]), int(self.docs.chunk_offsets[i + 1])
        return torch.stack([t[a:b] for t in self.layers])


def layout_shape(layout: TensorLayout) -> tuple[int, int]:
    return (layout.num_kv_heads, layout.head_dim)


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def decode_content_range(row: DocRow, buf: Any, offset: int, layout: TensorLayout, name: str):
    """K, V [R, C, Hkv, D] of one document from `buf`, whose byte `offset` is its first K/V byte.

    Views into `buf` (zero-copy); raises CorruptStoreError naming the file on a short read or a
    checksum mismatch.
    """
    if len(buf) - offset < row.content_length:
        raise CorruptStoreError(
            f"segment file {name} is truncated: document {row.doc_id} needs bytes "
            f"[{row.content_offset}, {row.content_offset + row.content_length})",
            (name,),
        )
    view = memoryview(buf)[offset : offset + row.content_length]
    try:
        ok = crc32(view) == row.content_crc
    finally:
        view.release()
    if not ok:
        raise CorruptStoreError(f"segment file {name}: K/V of document {row.doc_id} fail their checksum", (name,))
    shape = (len(layout.routing_layers), row.num_chunks, *layout_shape(layout))
    count = math.prod(shape)
    k = _frombuffer(buf, layout.dtype, offset, count).view(shape)
    v = _frombuffer(buf, layout.dtype, offset + count * layout.itemsize, count).view(shape)
    return k, v


def decode_text_range(row: DocRow, data: bytes | bytearray, name: str) -> str | None:
    if row.text_length < 0:
        return None
    if len(data) != row.text_length or crc32(data) != row.text_crc:
        raise CorruptStoreError(f"segment file {name}: text of document {row.doc_id} fails its checksum", (name,))
    return bytes(data).decode("utf-8")


def metadata_json(metadata: Mapping[str, str]) -> str:
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)
