"""Compaction, garbage collection and verification of a `MemoryStore` (called through its methods)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msa_cluster.storage_adapters._format import DocRow, RouterFile, decode_content_range, decode_docs, decode_text_range
from msa_cluster.storage_adapters._writes import CommitResult, _Restart
from msa_cluster.storage_adapters.errors import CommitConflictError, CorruptStoreError
from msa_cluster.storage_adapters.manifest import MANIFEST_DIR, Manifest, SegmentRef, manifest_path
from msa_cluster.storage_adapters.snapshot import ALL_TENANTS
from msa_cluster.types import EncodedDocument, SnapshotGoneError

if TYPE_CHECKING:
    from msa_cluster.storage_adapters.store import MemoryStore

__all__ = ["GCReport", "VerifyReport", "compact", "collect_garbage", "verify"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GCReport:
    kept_versions: tuple[int, ...]
    deleted_versions: tuple[int, ...]
    deleted_files: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReport:
    version: int
    files: int
    documents: int  # rows checked, tombstoned ones included
    bytes: int


# -------------------------------------------------------------------------------- compaction
def _pick(m: Manifest, small: int) -> list[SegmentRef]:
    dirty = [s for s in m.segments if m.tombstones.get(s.id)]
    smalls = [s for s in m.segments if not m.tombstones.get(s.id) and s.nbytes < small]
    if not dirty and len(smalls) < 2:
        return []
    picked = {s.id for s in dirty + smalls}
    return [s for s in m.segments if s.id in picked]


def _segment_docs(store: MemoryStore, seg: SegmentRef, bufs: dict, dead: frozenset = frozenset()):
    """Yield (document, its Checksums) of a segment's rows not in `dead`, checksum-verified,
    decoded from the bytes of its three files."""
    names = {k: store._fs.display(ref.path) for k, ref in seg.files.items()}
    docs = decode_docs(seg.id, bufs["docs"], names["docs"])
    router = RouterFile(docs, bufs["router"], store.layout, names["router"])
    for i, row in enumerate(docs.rows):
        if row.doc_id in dead:
            continue
        k, v = decode_content_range(row, bufs["content"], row.content_offset, store.layout, names["content"])
        text = None
        if row.text_length >= 0:
            raw = bufs["content"][row.text_offset : row.text_offset + row.text_length]
            text = decode_text_range(row, raw, names["content"])
        doc = EncodedDocument(
            doc_id=row.doc_id,
            keys=k,
            values=v,
            router_keys=router.doc(i),
            num_tokens=row.num_tokens,
            routing_layers=store.layout.routing_layers,
            text=text,
            tenant=row.tenant,
            source=row.source,
            metadata=row.metadata_dict,
            client_id=row.client_id,
        )
        yield doc, row.checksums()


def _rewrite(store: MemoryStore, cands: list[SegmentRef], m: Manifest):
    """Stream the live rows of `cands` into new segments; memory holds about one segment of each."""
    written, pending, crcs, size = [], [], [], 0
    try:
        for seg in cands:
            # every file is checked whole first: a corrupt file is never copied into a new segment
            bufs = {kind: store._cache.read_verified(ref) for kind, ref in seg.files.items()}
            for doc, crc in _segment_docs(store, seg, bufs, m.tombstones.get(seg.id, frozenset())):
                pending.append(doc)
                crcs.append(crc)
                size += 3 * doc.keys.numel() * doc.keys.element_size()
                if size >= store.config.max_segment_bytes:
                    written += store._write_segments(pending, crcs)
                    pending, crcs, size = [], [], 0
        if pending:
            written += store._write_segments(pending, crcs)
    except BaseException:
        store._discard(seg for seg, _ in written)
        raise
    return written


def compact(store: MemoryStore, small_segment_bytes: int | None) -> CommitResult:
    small = store.config.max_segment_bytes // 4 if small_segment_bytes is None else small_segment_bytes
    for _ in range(3):
        snap = store.snapshot()
        m = snap.manifest
        cands = _pick(m, small)
        if not cands:
            return CommitResult(version=m.version)
        cand_ids = {s.id for s in cands}
        written = _rewrite(store, cands, m)
        try:
            return store._commit("compact", _compaction_plan(store, cand_ids, written), m)
        except _Restart:
            log.info("store %s: compaction inputs changed under it; starting over", store.url)
            store._discard(seg for seg, _ in written)
        except BaseException:
            store._discard(seg for seg, _ in written)
            raise
    raise CommitConflictError(f"store {store.url}: compaction kept racing other compactions; gave up")


def _compaction_plan(store: MemoryStore, cand_ids: set[str], written: list[tuple[SegmentRef, list[DocRow]]]) -> Any:
    """The commit's build: swap the rewritten segments `cand_ids` for `written` on any base."""

    def build(base: Manifest):
        if not cand_ids <= {s.id for s in base.segments}:
            raise _Restart
        now = store.snapshot(base.version)
        tombs = {k: set(v) for k, v in base.tombstones.items() if k not in cand_ids}
        segments = [s for s in base.segments if s.id not in cand_ids]
        for seg, new_rows in written:
            # rows deleted or replaced since this compaction started stay dead in the new segment
            dead = {
                r.doc_id for r in new_rows if r.doc_id not in now or now.info(r.doc_id, ALL_TENANTS).segment_id not in cand_ids
            }
            if len(dead) < len(new_rows):
                segments.append(seg)
                if dead:
                    tombs[seg.id] = dead
        result = CommitResult(0, rewritten_segments=tuple(sorted(cand_ids)))
        return {"segments": tuple(segments), "tombstones": tombs}, result

    return build


# -------------------------------------------------------------------------------- garbage collection
def collect_garbage(store: MemoryStore, grace_s: float, uncommitted_grace_s: float) -> GCReport:
    fs, now = store._fs, time.time()
    manifests: dict[int, Manifest] = {}
    for v in store.versions():
        try:
            manifests[v] = store._manifest(v)
        except SnapshotGoneError:  # another gc took it
            continue
    versions = sorted(manifests)
    if not versions:
        return GCReport((), (), ())
    keep = {versions[-1]}
    for older, newer in zip(versions, versions[1:]):
        if now - manifests[newer].created_at < grace_s:
            keep.add(older)
    dropped = [v for v in versions if v not in keep]
    referenced = set().union(*(manifests[v].files() for v in keep))
    once_used = set().union(set(), *(manifests[v].files() for v in dropped)) - referenced
    for v in dropped:  # oldest first: a crash here leaves a consistent suffix of versions
        fs.delete(manifest_path(v))
        with store._lock:
            store._snapshots.pop(v, None)
    deleted = []
    for directory in ("segments", "artifacts"):
        for f in fs.list(directory):
            rel = f"{directory}/{f.name}"
            if rel in referenced:
                continue
            if rel in once_used or now - f.mtime >= uncommitted_grace_s:
                if fs.delete(rel):
                    deleted.append(rel)
    store._cache.forget(deleted)
    for f in fs.list(MANIFEST_DIR):  # temp files of local commits that crashed
        if f.name.startswith(".tmp-") and now - f.mtime >= uncommitted_grace_s:
            fs.delete(f"{MANIFEST_DIR}/{f.name}")
    log.info(
        "store %s: gc kept versions %s, deleted %d versions and %d files", store.url, sorted(keep), len(dropped), len(deleted)
    )
    return GCReport(tuple(sorted(keep)), tuple(dropped), tuple(sorted(deleted)))


# -------------------------------------------------------------------------------- verification
def _verify_segment(store: MemoryStore, seg: SegmentRef, bufs: dict) -> int:
    return sum(1 for _ in _segment_docs(store, seg, bufs))


def verify(store: MemoryStore, version: int) -> VerifyReport:
    m = store._manifest(version)
    problems: list[tuple[str, str]] = []
    files = documents = nbytes = 0
    for seg in m.segments:  # one segment in memory at a time
        bufs = {}
        for kind, ref in seg.files.items():
            try:
                bufs[kind] = store._cache.read_verified(ref)
                files += 1
                nbytes += ref.size
            except FileNotFoundError:
                problems.append((store._fs.display(ref.path), "missing"))
            except CorruptStoreError as e:
                problems.append((store._fs.display(ref.path), str(e)))
        if len(bufs) == 3:
            try:
                documents += _verify_segment(store, seg, bufs)
            except CorruptStoreError as e:
                problems.extend((p, str(e)) for p in e.paths)
    for name, ref in m.artifacts.items():
        try:
            store._cache.read_verified(ref)
            files += 1
            nbytes += ref.size
        except (FileNotFoundError, CorruptStoreError) as e:
            problems.append((store._fs.display(ref.path), f"artifact {name}: {e}"))
    if problems:
        detail = "; ".join(f"{p}: {msg}" for p, msg in problems)
        raise CorruptStoreError(f"store {store.url} version {version} has bad files: {detail}", tuple(p for p, _ in problems))
    return VerifyReport(version, files, documents, nbytes)
