"""Reading one pinned store version: document listing, texts, K/V range reads, bulk router keys.

Shape legend: R routing layers, C chunks (of one document or, summed, of a set), Hkv kv heads,
D head dim, N documents.
"""

from __future__ import annotations

import enum
import mmap
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import torch

from msa_cluster.storage_adapters import _directory
from msa_cluster.storage_adapters._checksums import ALGORITHMS, crc_of
from msa_cluster.storage_adapters._format import (
    DocRow,
    RouterFile,
    SegmentDocs,
    TensorLayout,
    decode_content_range,
    decode_docs,
    decode_kv,
    decode_text_range,
    layer_ranges,
    router_layer_bytes,
)
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.storage_adapters.manifest import FileRef, IdAllocation, Manifest, SegmentRef
from msa_cluster.types import EncodedDocument, ModelFingerprint, SnapshotGoneError, UnknownDocumentError, check_tenant

__all__ = ["StoreSnapshot", "DocInfo", "RouterKeys", "ALL_TENANTS", "TenantScope", "check_scope", "unknown_documents"]


class _Scope(enum.Enum):
    ALL_TENANTS = "ALL_TENANTS"

    def __repr__(self) -> str:
        return self.value


ALL_TENANTS: Final = _Scope.ALL_TENANTS
"""Pass as `tenant` for an operator's or the cluster's own read across every tenant (shard
loads, compaction, verification). Never derive it from a request: requests name one tenant."""

TenantScope = str | Literal[_Scope.ALL_TENANTS]  # a tenant name, or ALL_TENANTS


def check_scope(tenant: object) -> TenantScope:
    """`tenant` if it is ALL_TENANTS or a valid tenant name, else ValueError naming it."""
    return ALL_TENANTS if tenant is ALL_TENANTS else check_tenant(tenant)


def unknown_documents(doc_ids: Sequence[int], tenant: TenantScope) -> UnknownDocumentError:
    """The one error for ids that `tenant` does not hold: its text is the same whether an id is
    another tenant's, deleted, or was never allocated, so it tells nothing about other tenants."""
    ids = list(doc_ids)
    owner = "the store" if tenant is ALL_TENANTS else f"tenant {tenant!r}"
    if len(ids) == 1:
        return UnknownDocumentError(f"document {ids[0]} is not a document of {owner}")
    return UnknownDocumentError(f"documents {ids} are not documents of {owner}")


@dataclass(frozen=True)
class DocInfo:
    """What the store knows about one live document, without reading its tensors."""

    doc_id: int
    tenant: str
    source: str
    metadata: dict[str, str]
    num_tokens: int
    num_chunks: int
    segment_id: str
    has_text: bool
    client_id: str | None = None


@dataclass(frozen=True)
class RouterKeys:
    """Router keys of a set of documents, contiguous by document in ascending doc id order.

    keys: [R, C, Hkv, D] in the store dtype (row r is routing layer `routing_layers[r]`);
    doc_offsets: [N + 1] int64, document i owns chunks [doc_offsets[i], doc_offsets[i + 1]);
    doc_ids: [N] int64 ascending; tenants: N tenant names, aligned with doc_ids.
    """

    keys: torch.Tensor
    doc_offsets: torch.Tensor
    doc_ids: torch.Tensor
    tenants: tuple[str, ...]
    routing_layers: tuple[int, ...]

    def layer(self, layer: int) -> torch.Tensor:
        """[C, Hkv, D] router keys at one routing layer (a view)."""
        try:
            return self.keys[self.routing_layers.index(layer)]
        except ValueError:
            raise ValueError(f"layer {layer} is not a routing layer; routing layers: {self.routing_layers}") from None

    def tenant_mask(self, tenant: str) -> torch.Tensor:
        """[N] bool, True where the document belongs to `tenant`."""
        return torch.tensor([t == tenant for t in self.tenants], dtype=torch.bool)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def __len__(self) -> int:
        return len(self.tenants)


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    """[C, Hkv, D] tensor -> [C, Hkv * D * itemsize] uint8 numpy view of the same memory."""
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)


PAGE = mmap.PAGESIZE


def _prefaulted(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose pages are already mapped: one byte written per page.

    Faulting fresh pages in from user space before a read fills them is cheaper than taking the
    faults inside the kernel's copy (measured 25% on a KVM guest). Not `torch.zeros`: its fill
    runs on torch's thread pool, which on a loaded 2-core machine took 100x longer than the
    read itself (the pool waits for a descheduled thread).
    """
    t = torch.empty(*shape, dtype=dtype)
    if t.numel():
        t.view(-1).view(torch.uint8).numpy()[::PAGE] = 0
    return t


def _coalesce(spans: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(source chunk, destination chunk, chunks) spans with adjacent ones (on both sides) merged."""
    runs: list[list[int]] = []
    for a, b, n in spans:
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1][2] += n
        else:
            runs.append([a, b, n])
    return [(a, b, n) for a, b, n in runs]


class SegmentCache:
    """Immutable segment data shared by the snapshots of one store object (thread-safe).

    Holds decoded docs tables and, for local stores, copy-on-write mmaps of content files.
    """

    def __init__(self, fs: StoreFS, layout: TensorLayout, max_docs_tables: int = 4096, max_maps: int = 64):
        self.fs, self.layout = fs, layout
        self._lock = threading.Lock()
        self._docs: OrderedDict[str, SegmentDocs] = OrderedDict()
        self._maps: OrderedDict[str, Any] = OrderedDict()
        self._max_docs, self._max_maps = max_docs_tables, max_maps

    def _lru_get(self, table: OrderedDict, key: str) -> Any:
        with self._lock:
            value = table.get(key)
            if value is not None:
                table.move_to_end(key)
            return value

    def _lru_put(self, table: OrderedDict, key: str, value: Any, limit: int) -> None:
        with self._lock:
            table[key] = value
            table.move_to_end(key)
            while len(table) > limit:
                table.popitem(last=False)

    def read_verified(self, ref: FileRef) -> Any:
        """A whole file, checked against its size and checksum (a writable buffer)."""
        buf = self.fs.map(ref.path, whole=True)
        name = self.fs.display(ref.path)
        if len(buf) != ref.size:
            raise CorruptStoreError(f"file {name} has {len(buf)} bytes, the manifest says {ref.size}", (name,))
        if ALGORITHMS[ref.algorithm](buf, 0) != ref.crc:
            raise CorruptStoreError(f"file {name} fails its checksum", (name,))
        return buf

    def docs(self, seg: SegmentRef) -> SegmentDocs:
        cached = self._lru_get(self._docs, seg.id)
        if cached is not None:
            return cached
        ref = seg.files["docs"]
        decoded = decode_docs(seg.id, self.read_verified(ref), self.fs.display(ref.path))
        if len(decoded) != seg.num_docs:
            name = self.fs.display(ref.path)
            raise CorruptStoreError(f"file {name} holds {len(decoded)} documents, the manifest says {seg.num_docs}", (name,))
        self._lru_put(self._docs, seg.id, decoded, self._max_docs)
        return decoded

    def mapped(self, ref: FileRef) -> Any:
        """A local file as a copy-on-write mmap (cached), checked against its recorded size."""
        buf = self._lru_get(self._maps, ref.path)
        if buf is None:
            buf = self.fs.map(ref.path)
            if len(buf) != ref.size:
                name = self.fs.display(ref.path)
                raise CorruptStoreError(f"file {name} has {len(buf)} bytes, the manifest says {ref.size}", (name,))
            self._lru_put(self._maps, ref.path, buf, self._max_maps)
        return buf

    def router(self, seg: SegmentRef) -> RouterFile:
        ref = seg.files["router"]
        buf = self.fs.map(ref.path, whole=True)
        name = self.fs.display(ref.path)
        if len(buf) != ref.size:
            raise CorruptStoreError(f"file {name} has {len(buf)} bytes, the manifest says {ref.size}", (name,))
        return RouterFile(self.docs(seg), buf, self.layout, name)

    def forget(self, paths: Iterable[str]) -> None:
        """Drop cached mmaps of deleted files, so their disk space is freed."""
        with self._lock:
            for p in paths:
                self._maps.pop(p, None)

    def range(self, ref: FileRef, start: int, length: int) -> tuple[Any, int]:
        """(buffer, offset of `start` in it): a slice of the mmap locally, a range read elsewhere."""
        if self.fs.kind == "local":
            buf = self.mapped(ref)
            if isinstance(buf, mmap.mmap) and length > 0:
                # one readahead of the whole range instead of a page fault at a time when cold
                lo = start - start % mmap.PAGESIZE
                buf.madvise(mmap.MADV_WILLNEED, lo, min(len(buf), start + length) - lo)
            return buf, start
        return self.fs.read_range(ref.path, start, length), 0


class StoreSnapshot:
    """One committed version of a store, pinned: every read sees exactly this version.

    Safe to share between threads. Reads never return a deleted (tombstoned) document. Every
    read names its tenant (or ALL_TENANTS, for the cluster's own reads) and never returns another
    tenant's document: to a tenant, another tenant's id is an id that does not exist. Every
    tensor read is checksum-verified.
    """

    def __init__(self, manifest: Manifest, fs: StoreFS, cache: SegmentCache, base: StoreSnapshot | None = None):
        self.manifest = manifest
        self._base = base  # an earlier version whose directory this one may extend instead of rebuilding
        self.version: int = manifest.version
        self.fingerprint: ModelFingerprint = manifest.fingerprint
        self._fs, self._cache, self._layout = fs, cache, cache.layout
        self._segments = {s.id: s for s in manifest.segments}
        self._dir: dict[int, tuple[SegmentRef, int]] | None = None
        self._aliases: dict[tuple[str, str], int] = {}  # (tenant, client id) -> live doc id
        self._ids: IdAllocation | None = manifest.ids
        self._usage: dict[str, tuple[int, int]] | None = None
        self._dir_lock = threading.Lock()

    # ------------------------------------------------------------------ directory
    def _guard(self, fn, *args):
        """Run a read; a vanished file means the version was garbage-collected (or is corrupt)."""
        try:
            return fn(*args)
        except FileNotFoundError as e:
            if not self._fs.exists(self.manifest.path):
                raise SnapshotGoneError(
                    f"store version {self.version} of {self._fs.url} was garbage-collected; open a new snapshot"
                ) from e
            raise CorruptStoreError(f"a file of store version {self.version} is missing: {e.filename or e}") from e

    def _directory(self) -> dict[int, tuple[SegmentRef, int]]:
        with self._dir_lock:
            if self._dir is None:
                self._dir = self._guard(self._build_directory)
            return self._dir

    def _build_directory(self) -> dict[int, tuple[SegmentRef, int]]:
        base, self._base = self._base, None
        where = self._fs.display(self.manifest.path)
        found = None
        if base is not None and base._dir is not None:
            old = _directory.Directory(base._dir, base._aliases)
            found = _directory.grow(base.manifest, old, self.manifest, self._docs, where)
        if found is None:
            found = _directory.build(self.manifest, self._docs, where)
        self._aliases = found.aliases
        return found.rows

    @property
    def ids(self) -> IdAllocation:
        """The document ids allocated up to this version (derived from the documents for a
        version written by format 1: each live id is its tenant's, every id ever stored is spent)."""
        if self._ids is None:
            owners = {doc_id: self._docs(seg).rows[i].tenant for doc_id, (seg, i) in self._directory().items()}
            highest = max((r.doc_id for seg in self.manifest.segments for r in self._docs(seg).rows), default=-1)
            self._ids = IdAllocation.derive(owners, highest)
        return self._ids

    def _docs(self, seg: SegmentRef) -> SegmentDocs:
        return self._guard(self._cache.docs, seg)

    def _find(self, doc_id: int, tenant: TenantScope) -> tuple[SegmentRef, int, DocRow] | None:
        """The live row of `doc_id` if `tenant` holds it, else None (`tenant` already checked)."""
        hit = self._directory().get(doc_id)
        if hit is None:
            return None
        seg, i = hit
        row = self._docs(seg).rows[i]
        return (seg, i, row) if tenant is ALL_TENANTS or row.tenant == tenant else None

    def _row(self, doc_id: int, tenant: TenantScope) -> tuple[SegmentRef, int, DocRow]:
        found = self._find(doc_id, check_scope(tenant))
        if found is None:
            raise unknown_documents([doc_id], tenant)
        return found

    def holds(self, doc_id: int, tenant: TenantScope) -> bool:
        """True if `doc_id` is live at this version and is `tenant`'s."""
        return self._find(doc_id, check_scope(tenant)) is not None

    def __len__(self) -> int:
        return len(self._directory())

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._directory()

    def doc_ids(self, tenant: TenantScope) -> list[int]:
        """Live document ids of `tenant` (every tenant's with ALL_TENANTS), ascending."""
        tenant = check_scope(tenant)
        d = self._directory()
        if tenant is ALL_TENANTS:
            return sorted(d)
        return sorted(i for i, (seg, r) in d.items() if self._docs(seg).rows[r].tenant == tenant)

    def tenants(self) -> list[str]:
        return sorted({self._docs(seg).rows[r].tenant for seg, r in self._directory().values()})

    def resolve(self, client_ids: Sequence[str], tenant: str) -> dict[str, int]:
        """{client id: doc id} of the client ids live for `tenant`; the others are left out."""
        check_tenant(tenant)
        self._directory()
        found = ((c, self._aliases.get((tenant, c))) for c in client_ids)
        return {c: doc_id for c, doc_id in found if doc_id is not None}

    def usage(self) -> dict[str, tuple[int, int]]:
        """{tenant: (live documents, their tokens)} at this version (computed once per snapshot)."""
        with self._dir_lock:
            cached = self._usage
        if cached is None:
            out: dict[str, tuple[int, int]] = {}
            for seg, r in self._directory().values():
                row = self._docs(seg).rows[r]
                docs, tokens = out.get(row.tenant, (0, 0))
                out[row.tenant] = (docs + 1, tokens + row.num_tokens)
            with self._dir_lock:
                self._usage = cached = out
        return dict(cached)

    def tenant_of(self, doc_id: int) -> str:
        """The tenant of a live document (UnknownDocumentError if none): `info(...).tenant` without building the info."""
        return self._row(doc_id, ALL_TENANTS)[2].tenant

    def info(self, doc_id: int, tenant: TenantScope) -> DocInfo:
        seg, _, row = self._row(doc_id, tenant)
        return DocInfo(
            row.doc_id, row.tenant, row.source, row.metadata_dict, row.num_tokens, row.num_chunks, seg.id,
            row.text_length >= 0, row.client_id,
        )  # fmt: skip

    # ------------------------------------------------------------------ content
    def read_kv(self, doc_id: int, tenant: TenantScope, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one document: each [R, C, Hkv, D] in the store dtype, checksum-verified.

        The tensors are the caller's own (fresh memory, never a view of a file or a cache). A
        format-3 document is one read of its K/V range straight into them (one `preadv` locally,
        one ranged GET elsewhere); an older segment is read through the segment's memory map
        and copied out.

        layer: one routing layer only: K, V [C, Hkv, D], read as the two ranges K[r], V[r] and
        nothing else of the file (segments of format 3, which checksum each layer; an older
        segment can only be verified whole, so it is read whole).
        """
        seg, _, row = self._row(doc_id, tenant)
        ref = seg.files["content"]
        name = self._fs.display(ref.path)
        rows = range(len(self._layout.routing_layers)) if layer is None else [self._layout.layer_row(layer)]
        if row.format >= 3:
            k, v = self._guard(self._read_kv_raw, ref, row, rows, name)
            return (k, v) if layer is None else (k[0], v[0])
        buf, offset = self._guard(self._cache.range, ref, row.content_offset, row.content_length)
        k, v = decode_content_range(row, buf, offset, self._layout, name)
        if layer is not None:
            return k[rows[0]].clone(), v[rows[0]].clone()
        return (k.clone(), v.clone()) if isinstance(buf, mmap.mmap) else (k, v)

    def _read_kv_raw(self, ref: FileRef, row: DocRow, rows: Sequence[int], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [len(rows), C, Hkv, D] of layer rows `rows` (all, or one) of a format-3 document."""
        lay = self._layout
        kv = _prefaulted(2, len(rows), row.num_chunks, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
        u8 = kv.view(torch.uint8).view(2, len(rows) * row.num_chunks * lay.chunk_bytes).numpy()  # [2, len(rows) * L]
        if len(rows) == len(lay.routing_layers):  # K then V: one range
            ranges = [(row.content_offset, u8)]
        else:
            k_at, v_at, _ = layer_ranges(row, rows[0], lay)
            ranges = [(k_at, u8[0]), (v_at, u8[1])]
        got = self._fs.read_into(ref.path, ranges)
        return decode_kv(row, rows, kv, got, name)

    def kv_nbytes(self, doc_id: int, tenant: TenantScope) -> int:
        """Bytes of K and V of one document (what `read_kv` brings into memory)."""
        return self._row(doc_id, tenant)[2].content_length

    def content_id(self, doc_id: int, tenant: TenantScope) -> tuple[int, int, int]:
        """Identity of a document's K/V bytes (id, length, CRC32): equal ids across versions
        (e.g. before and after compaction) mean the cached tensors are still valid."""
        row = self._row(doc_id, tenant)[2]
        return (row.doc_id, row.content_length, row.content_crc)

    def router_nbytes(self, doc_ids: Iterable[int], tenant: TenantScope) -> int:
        """Bytes `router_keys(doc_ids)` will return, without reading any router file."""
        lay = self._layout
        return sum(self._row(i, tenant)[2].num_chunks for i in set(doc_ids)) * len(lay.routing_layers) * lay.chunk_bytes

    def texts(self, doc_ids: Iterable[int], tenant: TenantScope) -> dict[int, str]:
        """Raw texts; ids that are not live (or not `tenant`'s, or have no text) are left out."""
        tenant = check_scope(tenant)
        out = {}
        for doc_id in doc_ids:
            found = self._find(doc_id, tenant)
            if found is None or found[2].text_length < 0:
                continue
            seg, _, row = found
            ref = seg.files["content"]
            buf, offset = self._guard(self._cache.range, ref, row.text_offset, row.text_length)
            text = decode_text_range(row, buf[offset : offset + row.text_length], self._fs.display(ref.path))
            assert text is not None  # text_length >= 0
            out[doc_id] = text
        return out

    def documents(self, doc_ids: Sequence[int] | None = None, *, tenant: TenantScope) -> list[EncodedDocument]:
        """Full documents (K, V, router K, text, metadata), ascending id unless `doc_ids` orders them."""
        ids = self.doc_ids(tenant) if doc_ids is None else list(doc_ids)
        rows = [self._row(i, tenant) for i in ids]
        routers: dict[str, RouterFile] = {}
        texts = self.texts(ids, tenant)
        out = []
        for seg, i, row in rows:
            if seg.id not in routers:
                routers[seg.id] = self._guard(self._cache.router, seg)
            k, v = self.read_kv(row.doc_id, ALL_TENANTS)  # rows already checked against `tenant`
            out.append(
                EncodedDocument(
                    doc_id=row.doc_id,
                    keys=k,
                    values=v,
                    router_keys=routers[seg.id].doc(i),
                    num_tokens=row.num_tokens,
                    routing_layers=self._layout.routing_layers,
                    text=texts.get(row.doc_id),
                    tenant=row.tenant,
                    source=row.source,
                    metadata=row.metadata_dict,
                    client_id=row.client_id,
                )
            )
        return out

    def document(self, doc_id: int, tenant: TenantScope) -> EncodedDocument:
        return self.documents([doc_id], tenant=tenant)[0]

    # ------------------------------------------------------------------ router keys
    def router_keys(self, doc_ids: Iterable[int] | None = None, *, tenant: TenantScope) -> RouterKeys:
        """Router keys of many documents in bulk (a shard's load), checksum-verified: per segment
        one sequential scan of its router file, read straight into the result (format 3; older
        segments are copied out of a memory map).

        doc_ids None: every live document of `tenant`. Ids `tenant` does not hold are an error.
        """
        ids = sorted(set(self.doc_ids(tenant) if doc_ids is None else doc_ids))
        picked = [self._row(i, tenant) for i in ids]
        chunks = np.array([row.num_chunks for _, _, row in picked], dtype=np.int64)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(chunks, out=offsets[1:])
        lay = self._layout
        keys = _prefaulted(len(lay.routing_layers), int(offsets[-1]), lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
        by_segment: dict[str, list[tuple[int, int]]] = {}  # segment id -> (row in it, first chunk in keys)
        for j, (seg, i, _) in enumerate(picked):
            by_segment.setdefault(seg.id, []).append((i, int(offsets[j])))
        for seg_id, docs in by_segment.items():
            seg = self._segments[seg_id]
            if self._docs(seg).format >= 3:
                self._guard(self._read_router_raw, seg, docs, keys)
            else:
                self._guard(self._copy_router_arrow, seg, docs, keys)
        return RouterKeys(
            keys=keys,
            doc_offsets=torch.from_numpy(offsets),
            doc_ids=torch.tensor(ids, dtype=torch.int64),
            tenants=tuple(row.tenant for _, _, row in picked),
            routing_layers=lay.routing_layers,
        )

    def _read_router_raw(self, seg: SegmentRef, docs: Sequence[tuple[int, int]], keys: torch.Tensor) -> None:
        """Read the router keys of `docs` ((row, first chunk in keys)) of a format-3 segment straight
        into `keys` [R, C, Hkv, D]: per layer one read of each run of adjacent documents, in file
        order through one open file (so the kernel's readahead sees one sequential scan), then
        each document's checksum chained over its layers."""
        sdocs, lay = self._docs(seg), self._layout
        ref = seg.files["router"]
        name = self._fs.display(ref.path)
        stride, cb = router_layer_bytes(sdocs, lay), lay.chunk_bytes
        if ref.size != stride * len(lay.routing_layers):
            raise CorruptStoreError(f"segment file {name}: the manifest says {ref.size} bytes, its docs table needs "
                                    f"{stride * len(lay.routing_layers)}", (name,))  # fmt: skip
        spans = [(int(sdocs.chunk_offsets[i]), dst, sdocs.rows[i].num_chunks) for i, dst in docs]
        runs = _coalesce(spans)
        dst = [_bytes_view(keys[r]) for r in range(len(lay.routing_layers))]  # R x [C, chunk bytes]
        ranges = [(r * stride + a * cb, dst[r][b : b + n]) for r in range(len(dst)) for a, b, n in runs]
        if sum(self._fs.read_into(ref.path, ranges)) != sum(n for _, _, n in runs) * cb * len(dst):
            raise CorruptStoreError(f"segment file {name} is truncated: it ends inside its router keys", (name,))
        crc = crc_of(sdocs.format)
        crcs = [0] * len(spans)
        for layer in dst:
            for j, (_, b, n) in enumerate(spans):
                crcs[j] = crc(layer[b : b + n], crcs[j])
        for (i, _), value in zip(docs, crcs):
            if value != sdocs.rows[i].router_crc:
                raise CorruptStoreError(
                    f"segment file {name}: router keys of document {sdocs.rows[i].doc_id} fail their checksum", (name,)
                )

    def _copy_router_arrow(self, seg: SegmentRef, docs: Sequence[tuple[int, int]], keys: torch.Tensor) -> None:
        """Copy the router keys of `docs` out of an older segment's mapped router file into `keys`."""
        rf = self._cache.router(seg)
        spans = []
        for i, first in docs:
            rf.check(i)
            spans.append((int(rf.docs.chunk_offsets[i]), first, rf.docs.rows[i].num_chunks))
        runs = _coalesce(spans)
        for r, layer_keys in enumerate(rf.layers):
            src, dst = _bytes_view(layer_keys), _bytes_view(keys[r])
            for a, b, n in runs:  # numpy copies run at memcpy speed
                np.copyto(dst[b : b + n], src[a : a + n])

    # ------------------------------------------------------------------ artifacts
    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A named tensor artifact (e.g. the template-head K/V), read as safetensors."""
        from safetensors.torch import load as load_safetensors

        ref = self.manifest.artifacts.get(name)
        if ref is None:
            raise KeyError(f"store version {self.version} has no artifact {name!r}; it has {sorted(self.manifest.artifacts)}")
        buf = self._guard(self._cache.read_verified, ref)
        return load_safetensors(bytes(buf))

    def stats(self) -> dict[str, int]:
        d = self._directory()
        rows = [self._docs(seg).rows[i] for seg, i in d.values()]
        return {
            "version": self.version,
            "documents": len(rows),
            "chunks": sum(r.num_chunks for r in rows),
            "tokens": sum(r.num_tokens for r in rows),
            "segments": len(self.manifest.segments),
            "tombstones": sum(len(v) for v in self.manifest.tombstones.values()),
            "bytes": sum(s.nbytes for s in self.manifest.segments),
        }

    def __repr__(self) -> str:
        return f"StoreSnapshot(url={self._fs.url!r}, version={self.version}, segments={len(self.manifest.segments)})"
