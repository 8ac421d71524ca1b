"""Segment files: encoding and decoding of encoded documents, with checksums.

Shape legend: R routing layers, C chunks of one document, Cs chunks of a whole segment,
Hkv kv heads, D head dim, N documents in a segment, L = C * Hkv * D * itemsize (one layer of one
tensor of one document, in bytes).

A segment of format 3 (what this code writes) is three immutable files:
  <id>.docs.arrow     Arrow IPC, one row per document: id, tenant, source, metadata (JSON), token
                      and chunk counts, where its content lies in the content file, CRC32Cs (one
                      per routing layer of K/V). Small.
  <id>.router.bin     raw router keys, layer after layer: layer r is one [Cs, Hkv, D] tensor (all
                      documents' keys back to back), each layer starting 64-byte aligned, so a
                      bulk load reads each run of documents straight into place.
  <id>.content.bin    per document, 64-byte aligned: K [R, C, Hkv, D], then V [R, C, Hkv, D],
                      then the UTF-8 text. A document's K/V is one range (one cold read), and its
                      layer r is the two ranges K[r], V[r] of L bytes each (a one-layer cold read).
The tensor files are raw rather than Arrow IPC because an Arrow array holds one contiguous
buffer: writing a segment through Arrow costs a copy of every byte to assemble it, while raw
files are written straight from the tensors' memory (writev) and read straight into the
reader's tensors (preadv).

Formats 1 and 2 (read only) store router keys and K/V in Arrow IPC files (`.router.arrow`: one
large_binary column per layer; `.content.arrow`: doc_id, kv, text) and checksum with zlib's CRC32,
one CRC per document over K||V. Each segment's docs table says its format, so a store can hold
segments of several formats: new writes and compaction produce format 3.

Tensors are stored as raw little-endian bytes of the store's dtype (Arrow has no bfloat16) and
viewed back with `torch.frombuffer`: bit-exact, no pickle. Checksums (`crc_of(format)`) cover
K||V (format 3: each layer's K[r]||V[r]), the router keys (layer after layer) and the text; they
are checked on every read.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from msa_cluster.storage_adapters._arrow import bytes_array, fixed_array, open_batch, read_bytes, read_fixed, value_offsets
from msa_cluster.storage_adapters._checksums import chained, crc_of
from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.types import EncodedDocument, ModelFingerprint

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "TensorLayout",
    "DocRow",
    "Checksums",
    "SegmentDocs",
    "RouterFile",
    "encode_segment",
    "segment_file_name",
    "decode_docs",
    "decode_content_range",
    "decode_kv",
    "decode_text_range",
    "doc_checksums",
    "metadata_json",
]

# 3: CRC32C checksums (one per layer of K/V), raw tensor files; 2: manifests allocate document ids
# per tenant, docs tables carry client ids
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # older stores open; their next commit writes a format-3 manifest
ALIGN = 64  # every document's K/V and every router layer starts 64-byte aligned in its file
_ZEROS = bytes(ALIGN)
_META_KEY = b"msa.segment"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

if sys.byteorder != "little":  # raw tensor bytes are little-endian on every supported host
    raise ImportError("msa_cluster.storage_adapters needs a little-endian host")


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def segment_file_name(segment_id: str, kind: str) -> str:
    """The file name of a format-3 segment's `kind` file ("docs", "router", "content")."""
    return f"{segment_id}.{kind}.{'arrow' if kind == 'docs' else 'bin'}"


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

    def layer_row(self, layer: int) -> int:
        """The row of routing layer `layer` in R-shaped tensors; ValueError if it is not one."""
        if layer not in self.routing_layers:
            raise ValueError(f"layer {layer!r} is not a routing layer; routing layers: {self.routing_layers}")
        return self.routing_layers.index(layer)

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


class Checksums(NamedTuple):
    """A document's checksums as segment format `format` computes them (see `crc_of`)."""

    content: int  # format 3: CRC32C of `layers`; before: CRC32 of K||V
    router: int  # router keys, layer after layer
    layers: bytes  # format 3: R little-endian uint32 CRC32Cs, layer r's of K[r]||V[r]; before: b""
    format: int


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
    layer_crcs: bytes = b""  # format 3: see Checksums.layers
    format: int = 2  # of the segment (not a column): which checksum and layout the row's bytes use

    def digest(self) -> tuple:
        """What makes two stored documents of one format the same content (for idempotent re-inserts)."""
        return (
            self.tenant, self.source, self.metadata, self.num_tokens, self.num_chunks,
            self.content_crc, self.router_crc, self.text_length, self.text_crc, self.client_id,
        )  # fmt: skip

    def checksums(self) -> Checksums:
        return Checksums(self.content_crc, self.router_crc, self.layer_crcs, self.format)

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
    ("layer_crcs", pa.binary()),  # format 3 only
]
_NULLABLE = {"client_id"}
_FIELDS_BY_FORMAT = {1: _DOCS_FIELDS[:-2], 2: _DOCS_FIELDS[:-1], 3: _DOCS_FIELDS}


# ------------------------------------------------------------------------------------ writing
def _u8np(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bytes as a 1-D uint8 numpy array (a view when already contiguous)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def _layer_bytes(t: torch.Tensor) -> np.ndarray:
    """[R, ...] tensor -> [R, L] uint8 numpy view: row r is layer r's bytes (numpy rows are far
    cheaper to slice than torch views, which matters at two checksum calls per layer)."""
    return _u8np(t).reshape(t.shape[0], -1)


def layer_checksums(k: np.ndarray, v: np.ndarray, fmt: int) -> bytes:
    """Format 3's per-layer checksums of K, V given as [R, L] bytes: R little-endian uint32s."""
    crc = crc_of(fmt)
    return np.array([crc(v[r], crc(k[r])) for r in range(k.shape[0])], dtype="<u4").tobytes()


def doc_checksums(doc: EncodedDocument, fmt: int = FORMAT_VERSION) -> Checksums:
    """The checksums `doc` has when stored in a segment of format `fmt`."""
    crc = crc_of(fmt)
    router = chained(crc, _layer_bytes(doc.router_keys))
    if fmt < 3:
        return Checksums(crc(_u8np(doc.values), crc(_u8np(doc.keys))), router, b"", fmt)
    layers = layer_checksums(_layer_bytes(doc.keys), _layer_bytes(doc.values), fmt)
    return Checksums(crc(layers), router, layers, fmt)


def text_checksum(text: str | None, fmt: int = FORMAT_VERSION) -> tuple[int, int]:
    """(UTF-8 length, checksum) of a document's text as format `fmt` stores it; (-1, 0) for none."""
    if text is None:
        return -1, 0
    data = text.encode("utf-8")
    return len(data), crc_of(fmt)(data)


def _content_views(docs: Sequence[EncodedDocument], texts: Sequence[bytes | None]):
    """The content file as buffers in order, and each document's K/V and text offsets in it."""
    views: list[Any] = []
    kv_offsets, text_offsets, pos = [], [], 0
    for d, text in zip(docs, texts):
        pad = -pos % ALIGN
        if pad:
            views.append(_ZEROS[:pad])
            pos += pad
        kv_offsets.append(pos)
        for t in (d.keys, d.values):
            views.append(_u8np(t))
            pos += views[-1].nbytes
        text_offsets.append(pos)
        if text:
            views.append(text)
            pos += len(text)
    return views, kv_offsets, text_offsets


def _router_views(docs: Sequence[EncodedDocument], layout: TensorLayout) -> list[Any]:
    """The router file as buffers in order: layer after layer, each padded to ALIGN bytes."""
    views: list[Any] = []
    layer_bytes = sum(d.num_chunks for d in docs) * layout.chunk_bytes
    for r in range(len(layout.routing_layers)):
        views.extend(_u8np(d.router_keys[r]) for d in docs)
        if layer_bytes % ALIGN:
            views.append(_ZEROS[: -layer_bytes % ALIGN])
    return views


def encode_segment(
    segment_id: str,
    docs: Sequence[EncodedDocument],
    layout: TensorLayout,
    write_file: Callable[[str, list[Any]], Any],
    write_table: Callable[[str, pa.RecordBatch], Any],
    checksums: Sequence[Checksums | None] | None = None,
) -> list[DocRow]:
    """Encode documents (already checked with `layout.check`) into one format-3 segment's three files.

    write_file(kind, buffers) stores the raw file of `kind` ("content", then "router") as the
    concatenation of `buffers` (views of the documents' tensors: nothing is assembled here); it
    may return before the file is written (the caller then waits for it), so the documents'
    checksums are computed while the bytes go out. write_table("docs", batch) then stores the
    docs table as a one-batch Arrow IPC file.
    checksums: each document's `doc_checksums` where already computed (others are computed here;
    ones of another format are ignored).
    """
    if not docs:
        raise ValueError("a segment needs at least one document")
    texts = [d.text.encode("utf-8") if d.text is not None else None for d in docs]
    views, kv_offsets, text_offsets = _content_views(docs, texts)
    write_file("content", views)
    write_file("router", _router_views(docs, layout))
    # after starting the writes: the checksums are computed while the files go to storage
    known = list(checksums) if checksums is not None else [None] * len(docs)
    sums = [c if c is not None and c.format == FORMAT_VERSION else doc_checksums(d) for d, c in zip(docs, known)]
    crc = crc_of(FORMAT_VERSION)
    rows = []
    for i, d in enumerate(docs):
        text = texts[i]
        rows.append(
            DocRow(
                doc_id=d.doc_id,
                tenant=d.tenant,
                source=d.source,
                metadata=metadata_json(d.metadata),
                num_tokens=int(d.num_tokens),
                num_chunks=int(d.num_chunks),
                content_offset=kv_offsets[i],
                content_length=2 * len(layout.routing_layers) * d.num_chunks * layout.chunk_bytes,
                content_crc=sums[i].content,
                router_crc=sums[i].router,
                text_offset=text_offsets[i] if text is not None else -1,
                text_length=len(text) if text is not None else -1,
                text_crc=crc(text) if text is not None else 0,
                client_id=d.client_id,
                layer_crcs=sums[i].layers,
                format=FORMAT_VERSION,
            )
        )
    cols = {name: [getattr(r, name) for r in rows] for name, _ in _DOCS_FIELDS}
    arrays = [bytes_array(cols[n], t) if t in (pa.string(), pa.binary()) else fixed_array(cols[n], t) for n, t in _DOCS_FIELDS]
    table = pa.record_batch(arrays, names=[n for n, _ in _DOCS_FIELDS])
    write_table("docs", table.replace_schema_metadata(layout.segment_meta(segment_id, "docs")))
    return rows


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class SegmentDocs:
    """A decoded docs table: rows in file order, and each row's first chunk in the router file."""

    segment_id: str
    rows: tuple[DocRow, ...]
    chunk_offsets: np.ndarray  # [N + 1] int64
    format: int = 2

    def __len__(self) -> int:
        return len(self.rows)


def _segment_meta(batch: pa.RecordBatch, name: str) -> dict:
    raw = (batch.schema.metadata or {}).get(_META_KEY)
    try:
        return json.loads(raw or b"")
    except (TypeError, ValueError) as e:
        raise CorruptStoreError(f"segment file {name} has no readable segment metadata", (name,)) from e


def decode_docs(segment_id: str, buf: Any, name: str) -> SegmentDocs:
    batch, _ = open_batch(buf, name)
    fmt = {len(f): v for v, f in _FIELDS_BY_FORMAT.items()}.get(len(batch.schema.names), FORMAT_VERSION)
    fields = _FIELDS_BY_FORMAT[fmt]
    want = [n for n, _ in fields]
    if batch.schema.names != want:
        raise CorruptStoreError(f"segment file {name} has columns {batch.schema.names}, expected {want}", (name,))
    if [f.type for f in batch.schema] != [t for _, t in fields]:
        raise CorruptStoreError(f"segment file {name} has column types {batch.schema.types}", (name,))
    if fmt >= 3 and _segment_meta(batch, name).get("format") != fmt:
        raise CorruptStoreError(f"segment file {name} has format-{fmt} columns but says otherwise", (name,))
    try:
        cols = [
            read_bytes(batch.column(n), n in _NULLABLE)
            if t in (pa.string(), pa.binary())
            else read_fixed(batch.column(n)).tolist()
            for n, t in fields
        ]
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptStoreError(f"segment file {name} has an unreadable column: {e}", (name,)) from e
    rows = tuple(DocRow(**dict(zip(want, values)), format=max(fmt, 2)) for values in zip(*cols))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.array([r.num_chunks for r in rows], dtype=np.int64), out=offsets[1:])
    return SegmentDocs(segment_id, rows, offsets, max(fmt, 2))


def _check_meta(batch: pa.RecordBatch, layout: TensorLayout, name: str, kind: str) -> None:
    """An Arrow router file (formats 1, 2) matches the store's layout."""
    meta = _segment_meta(batch, name)
    want = json.loads(layout.segment_meta("", kind)[_META_KEY])
    if meta.get("format") not in (1, 2):
        raise CorruptStoreError(f"segment file {name}: format={meta.get('format')!r}, expected 1 or 2", (name,))
    for key in ("kind", "dtype", "routing_layers", "num_kv_heads", "head_dim", "byte_order"):
        if meta.get(key) != want[key]:
            raise CorruptStoreError(f"segment file {name}: {key}={meta.get(key)!r}, expected {want[key]!r}", (name,))


def _frombuffer(buf: Any, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def router_layer_bytes(docs: SegmentDocs, layout: TensorLayout) -> int:
    """Bytes from one layer's start to the next in a format-3 router file."""
    n = int(docs.chunk_offsets[-1]) * layout.chunk_bytes
    return n + (-n % ALIGN)


class RouterFile:
    """A parsed router file: per routing layer a [Cs, Hkv, D] view into `buf` (zero-copy)."""

    def __init__(self, docs: SegmentDocs, buf: Any, layout: TensorLayout, name: str):
        self.name, self.docs, self.layout = name, docs, layout
        self._crc = crc_of(docs.format)
        total = int(docs.chunk_offsets[-1])
        starts = self._arrow_starts(buf) if docs.format < 3 else self._raw_starts(buf)
        count = total * layout.num_kv_heads * layout.head_dim
        self.layers = [_frombuffer(buf, layout.dtype, s, count).view(total, *layout_shape(layout)) for s in starts]

    def _raw_starts(self, buf: Any) -> list[int]:
        stride = router_layer_bytes(self.docs, self.layout)
        want = stride * len(self.layout.routing_layers)
        if len(buf) != want:
            raise CorruptStoreError(f"segment file {self.name} has {len(buf)} bytes, its docs table needs {want}", (self.name,))
        return [r * stride for r in range(len(self.layout.routing_layers))]

    def _arrow_starts(self, buf: Any) -> list[int]:
        name, docs, layout = self.name, self.docs, self.layout
        batch, base = open_batch(buf, name)
        _check_meta(batch, layout, name, "router")
        ids = read_fixed(batch.column("doc_id"))
        if len(ids) != len(docs) or any(int(a) != r.doc_id for a, r in zip(ids, docs.rows)):
            raise CorruptStoreError(f"segment file {name}: document ids differ from the docs table", (name,))
        starts = []
        for layer in layout.routing_layers:
            col = batch.column(f"rk_{layer}")
            if not np.array_equal(value_offsets(col), docs.chunk_offsets * layout.chunk_bytes):
                raise CorruptStoreError(f"segment file {name}: layer {layer} offsets disagree with chunk counts", (name,))
            data = col.buffers()[2]
            starts.append((data.address - base) if data is not None else 0)
        return starts

    def check(self, i: int) -> None:
        """Verify the router checksum of row i; raises CorruptStoreError naming the file."""
        a, b = int(self.docs.chunk_offsets[i]), int(self.docs.chunk_offsets[i + 1])
        row = self.docs.rows[i]
        if chained(self._crc, (_u8np(t[a:b]) for t in self.layers)) != row.router_crc:
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


def _truncated(row: DocRow, name: str) -> CorruptStoreError:
    return CorruptStoreError(
        f"segment file {name} is truncated: document {row.doc_id} needs bytes "
        f"[{row.content_offset}, {row.content_offset + row.content_length})",
        (name,),
    )


def _kv_checksum_fails(row: DocRow, name: str) -> CorruptStoreError:
    return CorruptStoreError(f"segment file {name}: K/V of document {row.doc_id} fail their checksum", (name,))


def decode_content_range(row: DocRow, buf: Any, offset: int, layout: TensorLayout, name: str):
    """K, V [R, C, Hkv, D] of one document from `buf`, whose byte `offset` is its first K/V byte.

    Views into `buf` (zero-copy); raises CorruptStoreError naming the file on a short read or a
    checksum mismatch.
    """
    if len(buf) - offset < row.content_length:
        raise _truncated(row, name)
    shape = (len(layout.routing_layers), row.num_chunks, *layout_shape(layout))
    count = math.prod(shape)
    k = _frombuffer(buf, layout.dtype, offset, count).view(shape)
    v = _frombuffer(buf, layout.dtype, offset + count * layout.itemsize, count).view(shape)
    crc = crc_of(row.format)
    if row.format >= 3:
        ok = layer_checksums(_layer_bytes(k), _layer_bytes(v), row.format) == row.layer_crcs
    else:
        view = memoryview(buf)[offset : offset + row.content_length]
        try:
            ok = crc(view) == row.content_crc
        finally:
            view.release()
    if not ok:
        raise _kv_checksum_fails(row, name)
    return k, v


def layer_ranges(row: DocRow, r: int, layout: TensorLayout) -> tuple[int, int, int]:
    """(K[r] offset, V[r] offset, L): where layer row r of a document's K and V lie in the content file."""
    n = row.num_chunks * layout.chunk_bytes
    return row.content_offset + r * n, row.content_offset + (len(layout.routing_layers) + r) * n, n


def decode_kv(
    row: DocRow, layer_rows: Sequence[int], kv: torch.Tensor, got: Sequence[int], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the K, V of layer rows `layer_rows` of a format-3 row, read into `kv`
    [2, len(layer_rows), C, Hkv, D] (`got`: bytes read of each range); returns (K, V), each
    [len(layer_rows), C, Hkv, D], views of `kv`. CorruptStoreError naming the file on a short
    read or a checksum mismatch."""
    if sum(got) != kv.numel() * kv.element_size():
        raise _truncated(row, name)
    u8 = kv.view(torch.uint8).numpy().reshape(2, len(layer_rows), -1)  # [2, R', L]
    want = b"".join(row.layer_crcs[4 * r : 4 * r + 4] for r in layer_rows)
    if layer_checksums(u8[0], u8[1], row.format) != want:
        raise _kv_checksum_fails(row, name)
    return kv[0], kv[1]


def decode_text_range(row: DocRow, data: Any, name: str) -> str | None:
    if row.text_length < 0:
        return None
    if len(data) != row.text_length or crc_of(row.format)(data) != row.text_crc:
        raise CorruptStoreError(f"segment file {name}: text of document {row.doc_id} fails its checksum", (name,))
    return bytes(data).decode("utf-8")


def metadata_json(metadata: Mapping[str, str]) -> str:
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)
