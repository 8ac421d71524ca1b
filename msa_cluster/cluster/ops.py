"""Operating a memory store and a running memory cluster: backup, restore, tenant purge,
re-encoding with another model, status, verify, scale, compact, delete.

Every function takes the store by URL and reads the model fingerprint from the store itself, so
operating a store never loads a model (except `reencode`, which encodes).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import ClusterStatus
from msa_cluster.cluster.ingest import (
    EncoderPool,
    IngestOptions,
    IngestProgress,
    IngestSummary,
    SourceRow,
    StoreWriter,
    run_ingest,
)
from msa_cluster.storage_adapters import ALL_TENANTS, CommitResult, GCReport, MemoryStore, StoreNotFoundError, VerifyReport
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.storage_adapters.manifest import MANIFEST_DIR, Manifest, manifest_path, parse_manifest_name
from msa_cluster.types import ModelFingerprint, check_tenant

__all__ = ["open_store", "store_fingerprint", "copy_version", "CopyReport", "purge_tenant", "PurgeReport", "reencode",
           "store_status", "StoreStatus", "cluster_status", "verify_cluster", "ShardCheck"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- opening
def _latest_manifest(fs: StoreFS, version: int | None = None) -> Manifest:
    versions = sorted(v for v in (parse_manifest_name(f.name) for f in fs.list(MANIFEST_DIR)) if v is not None)
    if not versions:
        raise StoreNotFoundError(f"no memory store at {fs.url} (no {MANIFEST_DIR}/)")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ValueError(f"store {fs.url} has no version {version}; versions kept: {versions[0]}..{versions[-1]}")
    return Manifest.from_json(fs.read(manifest_path(version)), fs.display(manifest_path(version)))


def store_fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> ModelFingerprint:
    """The fingerprint of the model that encoded the store at `url` (StoreNotFoundError if none)."""
    return _latest_manifest(StoreFS(url, storage_options)).fingerprint


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> MemoryStore:
    """Open an existing store without knowing its model."""
    return MemoryStore.open(url, store_fingerprint(url, storage_options), storage_options=storage_options)


# ---------------------------------------------------------------------------------------------- backup / restore
@dataclass(frozen=True)
class CopyReport:
    version: int
    files: int
    bytes: int
    verified: VerifyReport


def copy_version(src_url: str, dst_url: str, version: int | None = None, *, src_options: dict[str, Any] | None = None,
                 dst_options: dict[str, Any] | None = None) -> CopyReport:
    """Copy one committed version (the latest by default) of a store to an empty location.

    The data files go first, the manifest last (a create-if-absent), so an interrupted copy is
    not a store; the copy is then opened and verified (CorruptStoreError naming bad files).
    `msa backup` and `msa restore` are both this copy. ValueError if `dst_url` holds a store.
    """
    src, dst = StoreFS(src_url, src_options), StoreFS(dst_url, dst_options)
    if dst.list(MANIFEST_DIR):
        raise ValueError(f"{dst_url} already holds a memory store; back up or restore into an empty location")
    m = _latest_manifest(src, version)
    total = 0
    for rel in sorted(m.files()):
        data = src.read(rel)
        dst.write(rel, data)
        total += len(data)
    for folder in sorted({rel.rsplit("/", 1)[0] for rel in m.files()}):
        dst.sync_dir(folder)
    body = src.read(m.path)
    if not dst.create_exclusive(m.path, body):
        raise ValueError(f"{dst_url} gained a store while copying; nothing of it was overwritten")
    report = MemoryStore.open(dst_url, m.fingerprint, storage_options=dst_options).verify(m.version)
    log.info("copied version %d of %s to %s: %d files, %d bytes", m.version, src_url, dst_url, len(m.files()) + 1, total)
    return CopyReport(m.version, len(m.files()) + 1, total + len(body), report)


# ---------------------------------------------------------------------------------------------- tenant purge
@dataclass(frozen=True)
class PurgeReport:
    tenant: str
    deleted: int
    version: int
    gc: GCReport


def purge_tenant(store: MemoryStore, tenant: str, *, coordinator: Any = None, timeout_s: float = 300.0,
                 uncommitted_grace_s: float | None = None) -> PurgeReport:
    """Delete every document of `tenant`, compact, and collect garbage at once, so that its text
    and tensors are gone from every file of the store (backups are the operator's to handle).

    With a running cluster (`coordinator`), the delete goes through it and the cluster serves the
    compacted version before the old files are removed; a request pinned to an older version gets
    SnapshotGoneError (retryable). Files of writes still in flight are kept for
    `uncommitted_grace_s` (the store's default): purge once ingestion jobs of the tenant are done.
    """
    check_tenant(tenant)
    ids = store.snapshot().doc_ids(tenant)
    if ids and coordinator is not None:
        call(coordinator, "delete", ids, tenant=tenant, missing_ok=True, timeout_s=timeout_s)
    elif ids:
        store.delete(ids, tenant=tenant, missing_ok=True)
    result = store.compact()
    if coordinator is not None:
        call(coordinator, "sync", timeout_s=timeout_s)
    report = store.gc(grace_s=0.0, uncommitted_grace_s=uncommitted_grace_s)
    return PurgeReport(tenant, len(ids), result.version, report)


# ---------------------------------------------------------------------------------------------- reencode
def _stored_rows(store: MemoryStore, tenant: str) -> Iterator[SourceRow]:
    """Every live document of `tenant` as a source row: its client id (else `doc-<id>`), text, source, metadata."""
    snap = store.snapshot()
    ids = snap.doc_ids(tenant)
    for start in range(0, len(ids), 256):
        page = ids[start:start + 256]
        texts = snap.texts(page, tenant)
        for doc_id in page:
            info = snap.info(doc_id, tenant)
            client_id = info.client_id or f"doc-{doc_id}"
            text = texts.get(doc_id)
            yield SourceRow(client_id, text, info.source, dict(info.metadata),
                            error=None if text is not None else "no text stored: cannot re-encode")


def reencode(src_url: str, dst_url: str, model: str, options: IngestOptions, *, src_options: dict[str, Any] | None = None,
             dst_options: dict[str, Any] | None = None,
             on_progress: Callable[[str, IngestProgress], None] | None = None,
             pool: EncoderPool | None = None) -> dict[str, IngestSummary]:
    """Re-encode every document's stored text with `model` into a new store at `dst_url`, tenant by tenant.

    Client ids carry over (a document without one gets `doc-<old id>`), ids are the new store's;
    re-running resumes. Returns {tenant: summary}. ValueError if both stores are one.
    pool: encoders of `model` to use (kept open); by default a pool is started and closed here.
    """
    if src_url.rstrip("/") == dst_url.rstrip("/"):
        raise ValueError("reencode writes a new store: --to must differ from --from")
    src = open_store(src_url, src_options)
    own = pool is None
    pool = pool or EncoderPool(model, options)
    try:
        dst = MemoryStore.open(dst_url, pool.fingerprint, create=True, storage_options=dst_options)
        out = {}
        snap = src.snapshot()
        for tenant in snap.tenants():
            opts = dataclasses.replace(options, tenant=tenant)
            report = None if on_progress is None else (lambda p, t=tenant: on_progress(t, p))
            out[tenant] = run_ingest(_stored_rows(src, tenant), dst, pool, opts, writer=StoreWriter(dst),
                                     total=snap.usage()[tenant][0], on_progress=report)
        return out
    finally:
        if own:
            pool.close()


# ---------------------------------------------------------------------------------------------- status / verify
@dataclass(frozen=True)
class StoreStatus:
    url: str
    version: int
    versions_kept: int
    documents: int
    tokens: int
    tenants: dict[str, tuple[int, int]]  # tenant -> (documents, tokens)
    segments: int
    bytes: dict[str, int]  # per tier/file kind: router (the router tier), content (the K/V tier and text), docs
    fingerprint: ModelFingerprint


def store_status(store: MemoryStore) -> StoreStatus:
    snap = store.snapshot()
    usage = snap.usage()
    by_kind: dict[str, int] = {}
    for seg in snap.manifest.segments:
        for kind, ref in seg.files.items():
            by_kind[kind] = by_kind.get(kind, 0) + ref.size
    return StoreStatus(store.url, snap.version, len(store.versions()), sum(n for n, _ in usage.values()),
                       sum(t for _, t in usage.values()), usage, len(snap.manifest.segments), by_kind, store.fingerprint)


def cluster_status(cluster: Any) -> dict[str, Any]:
    """The running cluster: served / latest / refused versions, and per shard its node, the version it
    serves, documents, tokens and chunks. `cluster` is a connected MemoryCluster."""
    import ray

    status: ClusterStatus = cluster.status()
    usage = call(cluster.coordinator, "shard_usage", timeout_s=cluster.spec.timeout_s)
    nodes = _actor_nodes([*cluster.routers, *cluster.kvs])
    shards = []
    for i, state in enumerate(status.shards):
        docs, tokens, chunks = usage[i] if i < len(usage) else (0, 0, 0)
        shards.append({"shard": i, "serves_version": None if state is None else state.version,
                       "router_node": nodes.get(_actor_id(cluster.routers[i])), "kv_node": nodes.get(_actor_id(cluster.kvs[i])),
                       "documents": docs, "tokens": tokens, "chunks": chunks})
    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    return {"version": status.version, "epoch": status.epoch, "store_version": status.store_version,
            "refused_version": status.refused_version, "refused_reason": status.refused_reason,
            "documents": status.documents, "nodes": sorted(alive), "shards": shards}


def _actor_id(handle: Any) -> str:
    return str(handle._actor_id.hex())


def _actor_nodes(handles: Sequence[Any]) -> dict[str, str]:
    """actor id -> node address of the live actors among `handles`."""
    import ray
    from ray.util.state import list_actors

    wanted = {_actor_id(h) for h in handles}
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, timeout=10)
    except Exception as e:  # the state API needs the dashboard; status still works without nodes
        log.warning("cannot list actors (no dashboard?): %s", e)
        return {}
    return {a.actor_id: str(ips.get(a.node_id, a.node_id)) for a in actors if a.actor_id in wanted}


@dataclass(frozen=True)
class ShardCheck:
    shard: int
    expected: int  # documents the coordinator placed on the shard
    held: int  # documents the router shard holds
    missing: tuple[int, ...] = ()  # placed but not held
    extra: tuple[int, ...] = ()  # held but not placed, or not live in the store
    ok: bool = True


def verify_cluster(cluster: Any, store: MemoryStore) -> tuple[int, list[ShardCheck]]:
    """Check every router shard's documents against the coordinator's placement and the store at the
    served version; returns (served version, one ShardCheck per shard)."""
    timeout = cluster.spec.timeout_s
    version = call(cluster.coordinator, "sync", timeout_s=cluster.spec.write_timeout_s)
    placement: dict[int, int] = call(cluster.coordinator, "placement", timeout_s=timeout)
    live = set(store.snapshot(version).doc_ids(ALL_TENANTS))
    checks = []
    for i, router in enumerate(cluster.routers):
        held = set(call(router, "doc_ids", timeout_s=timeout))
        expected = {d for d, s in placement.items() if s == i}
        missing = tuple(sorted(expected - held))
        extra = tuple(sorted((held - expected) | (held - live)))
        checks.append(ShardCheck(i, len(expected), len(held), missing, extra, not missing and not extra))
    unplaced = live - set(placement)
    if unplaced:
        checks.append(ShardCheck(-1, len(unplaced), 0, tuple(sorted(unplaced)), (), False))
    return version, checks


# ---------------------------------------------------------------------------------------------- compact / delete
@dataclass(frozen=True)
class CompactReport:
    commit: CommitResult
    gc: GCReport | None = None
    notes: list[str] = field(default_factory=list)


def compact(store: MemoryStore, gc_grace_s: float | None = None) -> CompactReport:
    """Rewrite segments with dead rows; with `gc_grace_s`, also collect versions older than that."""
    result = store.compact()
    return CompactReport(result, None if gc_grace_s is None else store.gc(grace_s=gc_grace_s))


def resolve_refs(store: MemoryStore, refs: Sequence[str], tenant: str) -> list[int]:
    """Document ids of `refs` (ids, all digits, or client ids) of `tenant`; UnknownDocumentError-free:
    unknown client ids raise ValueError naming them."""
    ids = [int(r) for r in refs if r.isdigit()]
    names = [r for r in refs if not r.isdigit()]
    found = store.snapshot().resolve(names, tenant) if names else {}
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"no documents with client ids {unknown} in tenant {tenant!r}")
    return ids + [found[n] for n in names]
