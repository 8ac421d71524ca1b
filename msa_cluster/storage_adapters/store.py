"""`MemoryStore`: the durable, versioned source of truth of an encoded memory.

Writes never modify a file: an insert uploads new segment files, then publishes manifest
version N+1 with an atomic create-if-absent. Two writers racing for N+1 cannot both win; the
loser re-reads the new latest version, re-applies its change on top of it (a rebase: re-checks
duplicates, maps deletes) and tries N+2. Nothing is lost and nothing is applied twice.

Document ids are allocated by the store, each to one tenant (recorded in the manifest), and
every write names its tenant. The write path itself (allocate, insert, update, delete) is in
`_writes.py`, compaction, gc and verification in `_maintenance.py`, the diff in `_diff.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from msa_cluster.retry import Backoff
from msa_cluster.storage_adapters import _writes
from msa_cluster.storage_adapters._checksums import ALGORITHMS, chained, crc32c
from msa_cluster.storage_adapters._format import (
    Checksums,
    DocRow,
    TensorLayout,
    encode_segment,
    segment_file_name,
)
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.storage_adapters._writes import CommitResult
from msa_cluster.storage_adapters.errors import (
    CommitConflictError,
    CorruptStoreError,
    FingerprintMismatchError,
    StoreNotFoundError,
)
from msa_cluster.storage_adapters.manifest import (
    MANIFEST_DIR,
    SEGMENT_KINDS,
    FileRef,
    IdAllocation,
    Manifest,
    SegmentRef,
    manifest_path,
    normalize_fingerprint,
    parse_manifest_name,
)
from msa_cluster.storage_adapters.snapshot import (
    SegmentCache,
    StoreSnapshot,
    TenantScope,
)
from msa_cluster.types import EncodedDocument, ModelFingerprint, SnapshotGoneError

if TYPE_CHECKING:
    from msa_cluster.storage_adapters._diff import StoreDiff
    from msa_cluster.storage_adapters._maintenance import GCReport, VerifyReport

__all__ = ["MemoryStore", "StoreConfig", "CommitResult"]

log = logging.getLogger(__name__)

SEGMENT_DIR = "segments"
ARTIFACT_DIR = "artifacts"
_ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class StoreConfig:
    """Knobs of a store handle (not persisted: each writer may choose its own)."""

    max_segment_bytes: int = 256 << 20  # a segment's three files together, except one huge document
    gc_grace_s: float = 3600.0  # superseded versions (and files only they use) live at least this long
    uncommitted_grace_s: float = 3600.0  # files no version ever referenced (in-flight writes) live this long
    commit_retries: int = 64  # lost races before CommitConflictError
    verify_writes: bool = True  # read every written file back and check its checksum before committing
    write_workers: int = 4  # segments of one write are encoded and uploaded in parallel by this many threads

    def __post_init__(self) -> None:
        if self.max_segment_bytes < 1 or self.commit_retries < 1 or self.write_workers < 1 or \
                min(self.gc_grace_s, self.uncommitted_grace_s) < 0:
            raise ValueError(f"invalid StoreConfig {self}: sizes and retries must be positive, grace >= 0")


def _new_id() -> str:
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:16]}"


class MemoryStore:
    """A memory store under one fsspec URL (`/path`, `file://`, `s3://bucket/prefix`, `memory://`).

    Thread-safe; several processes (and machines) may write the same store at once. Document
    ids are allocated by the store (`allocate_ids`) to one tenant each; every write and read
    names its tenant, and to a tenant another tenant's id is an id that does not exist.

    Example:
        >>> import tempfile, torch
        >>> from msa_cluster.types import EncodedDocument, ModelFingerprint
        >>> fp = ModelFingerprint("cfg", (2, 3), "float32", num_kv_heads=1, head_dim=4, chunk_size=64)
        >>> store = MemoryStore.open(tempfile.mkdtemp(), fp, create=True)
        >>> [doc_id] = store.allocate_ids("acme", client_ids=["faq.md"])
        >>> t = torch.zeros(2, 1, 1, 4)
        >>> doc = EncodedDocument(doc_id, t, t, t, num_tokens=10, routing_layers=(2, 3), text="hi",
        ...                       tenant="acme", client_id="faq.md")
        >>> store.insert([doc]).inserted
        (0,)
        >>> snap = store.snapshot()
        >>> snap.doc_ids("acme"), snap.texts([0], "acme"), snap.texts([0], "other"), snap.resolve(["faq.md"], "acme")
        ([0], {0: 'hi'}, {}, {'faq.md': 0})
    """

    def __init__(self, fs: StoreFS, fingerprint: ModelFingerprint, config: StoreConfig):
        self._fs = fs
        self.fingerprint = fingerprint
        self.config = config
        self.layout = TensorLayout.from_fingerprint(fingerprint)
        self._cache = SegmentCache(fs, self.layout)
        self._snapshots: OrderedDict[int, StoreSnapshot] = OrderedDict()
        self._latest: Manifest | None = None  # the newest version this handle has seen
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._fs.url

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        url: str,
        fingerprint: ModelFingerprint,
        *,
        create: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        config: StoreConfig | None = None,
    ) -> MemoryStore:
        """Open the store at `url` encoded by the model `fingerprint`; `create` makes an empty one if absent.

        Raises StoreNotFoundError (no store and not `create`) or FingerprintMismatchError.
        """
        fp = normalize_fingerprint(fingerprint)
        TensorLayout.from_fingerprint(fp)
        fs = StoreFS(url, dict(storage_options or {}))
        store = cls(fs, fp, config or StoreConfig())
        if store._list_latest() is None:
            if not create:
                raise StoreNotFoundError(f"no memory store at {url} (no {MANIFEST_DIR}/); pass create=True to make one")
            first = Manifest(version=0, fingerprint=fp, created_at=time.time(), operation="create", ids=IdAllocation())
            if fs.create_exclusive(first.path, first.to_json()):
                log.info("created memory store %s", url)
        found = normalize_fingerprint(store._latest_manifest().fingerprint)
        if found != fp:
            raise FingerprintMismatchError(f"store {url} was encoded by model {found}, not by model {fp}")
        return store

    def close(self) -> None:
        with self._lock:
            self._snapshots.clear()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ versions
    def versions(self) -> list[int]:
        """Committed versions still present (old ones disappear with `gc`), ascending."""
        names = (parse_manifest_name(f.name) for f in self._fs.list(MANIFEST_DIR))
        return sorted(v for v in names if v is not None)

    def _read_manifest(self, version: int) -> Manifest | None:
        """Version `version`, or None if it does not exist (never committed, or collected)."""
        path = manifest_path(version)
        try:
            data = self._fs.read(path)
        except FileNotFoundError:
            return None
        m = Manifest.from_json(data, self._fs.display(path))
        if m.version != version:
            raise CorruptStoreError(f"manifest {self._fs.display(path)} says version {m.version}", (self._fs.display(path),))
        return m

    def _list_latest(self) -> Manifest | None:
        for _ in range(5):  # the listed latest can only vanish if it was superseded and collected meanwhile
            versions = self.versions()
            if not versions:
                return None
            m = self._read_manifest(versions[-1])
            if m is not None:
                return self._note(m)
        raise CommitConflictError(f"store {self.url}: versions kept vanishing while looking for the latest")

    def _note(self, m: Manifest) -> Manifest:
        with self._lock:
            if self._latest is None or m.version > self._latest.version:
                self._latest = m
        return m

    def _latest_manifest(self) -> Manifest:
        """The latest version, found by probing forward from the last one this handle saw.

        Versions are contiguous from the oldest kept one to the latest (N+1 is only ever created
        by a writer that read N, and gc removes the oldest first), so galloping forward and then
        bisecting finds it in O(log new versions) small GETs, with no listing. A listing is used
        on the first call and when the version this handle knew has been collected.
        """
        known = self._latest
        if known is None:
            m = self._list_latest()
            if m is None:
                raise StoreNotFoundError(f"no memory store at {self.url}")
            return m
        nxt = self._read_manifest(known.version + 1)
        if nxt is None:
            if self._fs.exists(known.path):
                return known
            return self._list_latest() or known
        lo, hi, step = nxt, None, 1
        while hi is None:
            cand = self._read_manifest(lo.version + step)
            if cand is None:
                hi = lo.version + step
            else:
                lo, step = cand, step * 2
        while hi - lo.version > 1:
            mid = (lo.version + hi) // 2
            cand = self._read_manifest(mid)
            if cand is None:
                hi = mid
            else:
                lo = cand
        return self._note(lo)

    def latest_version(self) -> int:
        return self._latest_manifest().version

    def _manifest(self, version: int) -> Manifest:
        with self._lock:
            snap = self._snapshots.get(version)
        if snap is not None:
            return snap.manifest
        m = self._read_manifest(version)
        if m is None:
            raise SnapshotGoneError(f"store {self.url} has no version {version} (never committed or collected)")
        return m

    def snapshot(self, version: int | None = None) -> StoreSnapshot:
        """Pin a version (the latest by default): every read through it sees that version only."""
        latest: Manifest | None = None
        if version is None:
            latest = self._latest_manifest()
            v = latest.version
        else:
            v = int(version)
        with self._lock:
            snap = self._snapshots.get(v)
            if snap is not None:
                self._snapshots.move_to_end(v)
                return snap
        with self._lock:  # the newest earlier version with a directory: the new one extends it
            base = max((s for k, s in self._snapshots.items() if k < v and s._dir is not None), key=lambda s: s.version, default=None)
        snap = StoreSnapshot(latest if latest is not None else self._manifest(v), self._fs, self._cache, base)
        with self._lock:
            snap = self._snapshots.setdefault(v, snap)
            while len(self._snapshots) > 4:
                self._snapshots.popitem(last=False)
        return snap

    # ------------------------------------------------------------------ commit
    def _upgraded(self, m: Manifest) -> Manifest:
        """`m` with its id allocation (derived from the documents when `m` was written by format 1)."""
        return m if m.ids is not None else dataclasses.replace(m, ids=self.snapshot(m.version).ids)

    def _commit(
        self,
        operation: str,
        build: Callable[[Manifest], tuple[dict, CommitResult] | None],
        base: Manifest | None = None,
    ) -> CommitResult:
        """Publish base.child(**changes) with compare-and-swap on the version number.

        base: the version the caller already read as the latest when its call began (saves a
        round trip), else the latest is read now. A lost race waits (`Backoff`, jittered so that
        racing writers spread out), re-reads the latest and rebuilds the change on it. A no-op
        (build returns None, or no changes) is decided against a version that was the latest
        during the call, so it is linearizable without a write.
        """
        policy = Backoff(self.config.commit_retries, initial_s=0.002, max_s=0.25, jitter=0.5)
        waits = policy.delays()
        base = base or self._latest_manifest()
        while True:
            base = self._upgraded(base)
            plan = build(base)
            if plan is None:
                return CommitResult(version=base.version)
            changes, result = plan
            if not changes:
                return dataclasses.replace(result, version=base.version)
            new = base.child(operation, **changes)
            if self._fs.create_exclusive(new.path, new.to_json()):
                self._note(new)
                log.info("store %s: committed version %d (%s)", self.url, new.version, operation)
                return dataclasses.replace(result, version=new.version)
            wait = next(waits, None)
            if wait is None:
                raise CommitConflictError(f"store {self.url}: gave up {operation} after {policy.attempts} lost races")
            log.debug("store %s: lost the race for version %d; rebasing", self.url, new.version)
            time.sleep(wait)
            base = self._latest_manifest()

    def _check_readback(self, ref: FileRef) -> None:
        size, crc = self._fs.checksum(ref.path, ALGORITHMS[ref.algorithm])
        if size != ref.size or crc != ref.crc:
            name = self._fs.display(ref.path)
            raise CorruptStoreError(f"file {name} does not read back as written", (name,))

    def _put(self, rel: str, views: Sequence[Any]) -> tuple[int, int] | None:
        """Write a file as the concatenation of `views`; with `verify_writes`, its (size, CRC32C)
        as read back (the caller compares it with the CRC32C of `views`)."""
        self._fs.write_views(rel, views)
        return self._fs.checksum(rel, crc32c) if self.config.verify_writes else None

    def _file_ref(self, rel: str, views: Sequence[Any], put: Callable[[], tuple[int, int] | None]) -> FileRef:
        """The FileRef of a file written from `views`: its CRC32C is taken from them, then `put`
        (the write, or waiting for it) gives the file as read back, or None if not read back."""
        ref = FileRef(rel, sum(memoryview(v).nbytes for v in views), chained(crc32c, views))
        back = put()
        if back is not None and back != (ref.size, ref.crc):
            name = self._fs.display(rel)
            raise CorruptStoreError(f"file {name} does not read back as written", (name,))
        return ref

    def _write_file(self, rel: str, views: Sequence[Any]) -> FileRef:
        """Write a (small) file as the concatenation of `views`, checked as `_put` says."""
        return self._file_ref(rel, views, lambda: self._put(rel, views))

    def _write_batch(self, rel: str, batch: Any) -> FileRef:
        """Store a one-batch Arrow IPC file (a docs table) and return its FileRef.

        Locally the CRC32C is taken from the written file itself (mapped back after the fsync), so
        the file is always verified; elsewhere `verify_writes` downloads it again to check.
        """
        buf = self._fs.write_ipc(rel, batch)
        ref = FileRef(rel, len(buf), crc32c(buf))
        if self.config.verify_writes and self._fs.kind != "local":
            self._check_readback(ref)
        return ref

    def _encode(
        self, seg_id: str, docs: list[EncodedDocument], crcs: Sequence[Checksums | None]
    ) -> tuple[SegmentRef, list[DocRow]]:
        """Write one segment of `docs`; removes what it wrote if it fails.

        The three files are written (and read back) by three threads while this one computes
        the documents' checksums and then the tensor files' CRC32Cs from the same buffers: the
        checksums take CPU time that the writes (mostly waiting for fsync) leave idle.
        """
        files: dict[str, FileRef] = {}
        pending: dict[str, tuple[str, list[Any], Future]] = {}
        path = {kind: f"{SEGMENT_DIR}/{segment_file_name(seg_id, kind)}" for kind in SEGMENT_KINDS}
        pool = ThreadPoolExecutor(len(SEGMENT_KINDS), thread_name_prefix="msa-put")
        table: list[Future] = []

        def write_file(kind: str, views: list[Any]) -> None:
            pending[kind] = (path[kind], views, pool.submit(self._put, path[kind], views))

        def write_table(kind: str, batch: Any) -> None:
            table.append(pool.submit(self._write_batch, path[kind], batch))

        try:
            rows = encode_segment(seg_id, docs, self.layout, write_file, write_table, crcs)
            for kind, (rel, views, put) in pending.items():
                files[kind] = self._file_ref(rel, views, put.result)
            files["docs"] = table[0].result()
        except BaseException:
            wait([put for _, _, put in pending.values()] + table)  # no write may land after the clean-up
            for rel in path.values():
                self._fs.delete(rel)
            raise
        finally:
            pool.shutdown(wait=True)
        return SegmentRef(seg_id, len(rows), sum(r.num_chunks for r in rows), files), rows

    def _write_segments(
        self, docs: list[EncodedDocument], crcs: Sequence[Checksums | None]
    ) -> list[tuple[SegmentRef, list[DocRow]]]:
        """Upload docs as segments of at most max_segment_bytes; returns them (not yet committed)."""
        groups: list[list[int]] = [[]]
        size = 0
        for i, d in enumerate(docs):
            nbytes = 3 * d.keys.numel() * d.keys.element_size()
            if groups[-1] and size + nbytes > self.config.max_segment_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes

        def one(group: list[int]) -> tuple[SegmentRef, list[DocRow]]:
            return self._encode(_new_id(), [docs[i] for i in group], [crcs[i] for i in group])

        if len(groups) == 1:
            out = [one(groups[0])]
        else:  # segments are independent files: encode and upload them in parallel, keep their order
            with ThreadPoolExecutor(min(len(groups), self.config.write_workers), thread_name_prefix="msa-seg") as pool:
                futures = [pool.submit(one, g) for g in groups]
                out, error = [], None
                for f in futures:
                    try:
                        out.append(f.result())
                    except BaseException as e:  # every upload finishes before the written ones are discarded
                        error = error or e
            if error is not None:
                self._discard(seg for seg, _ in out)
                raise error
        self._fs.sync_dir(SEGMENT_DIR)
        return out

    def _discard(self, segments: Iterable[SegmentRef]) -> None:
        """Best-effort removal of uncommitted files (gc would collect them later anyway)."""
        for seg in segments:
            for ref in seg.files.values():
                self._fs.delete(ref.path)

    # ------------------------------------------------------------------ ids
    def allocate_ids(self, tenant: str, *, count: int | None = None, client_ids: Sequence[str] | None = None) -> list[int]:
        """Hand out document ids to `tenant` in one commit (operation "allocate"); exactly one of:

        count: that many fresh ids, ascending (0 gives [] and commits nothing).
        client_ids: one id per client id, in order. A client id live for `tenant` in the latest
          version gets its document's id, so re-running an ingestion is idempotent and ids are
          stable; the others get fresh ids (a client id allocated but not inserted yet is not an
          alias yet: asking again gives another id). Repeated client ids are a ValueError.

        Ids are global ints, never reused, each allocated to one tenant: `insert` accepts a
        document only under an id allocated to its tenant.
        """
        return _writes.allocate_ids(self, tenant, count=count, client_ids=client_ids)

    # ------------------------------------------------------------------ insert / update / delete
    def insert(self, docs: Iterable[EncodedDocument], *, replace: bool = False) -> CommitResult:
        """Add documents in one commit (atomic: all or none become visible).

        Each document's id must have been allocated to its tenant (`allocate_ids`), else
        UnknownDocumentError and nothing is written. A document whose id is live with identical
        content is skipped (idempotent re-runs). A live id with different content, or a client id
        live under another id of the tenant, raises DocumentExistsError unless `replace`: then the
        document is replaced, and a client id moves to the new id (its old document is deleted in
        the same commit, and listed in `deleted`).
        """
        return _writes.insert(self, docs, replace=replace)

    def check_writes(self, docs: Iterable[EncodedDocument], *, live: bool) -> None:
        """Validate documents as insert (live=False) or update (live=True) would, writing nothing.

        ValueError for a shape or dtype the store's model does not produce; UnknownDocumentError
        for an id that is not the document's tenant's. A cache that must check room before a
        commit (the cluster's coordinator) calls this first, so bad input is never "full".
        """
        docs = list(docs)
        for d in docs:
            self.layout.check(d)
        _writes._refuse_foreign(self, self.snapshot(), docs, live)

    def update(self, docs: Iterable[EncodedDocument]) -> CommitResult:
        """Replace live documents by id in one commit; every id must be live in its document's
        tenant, else UnknownDocumentError and nothing is written."""
        return _writes.update(self, docs)

    def delete(self, doc_ids: Iterable[int], *, tenant: TenantScope, missing_ok: bool = False) -> CommitResult:
        """Tombstone `tenant`'s documents by id in one commit (ALL_TENANTS: an operator's delete).

        Ids not live in `tenant` (another tenant's, deleted, never used: all alike) raise
        UnknownDocumentError listing them unless `missing_ok`. The rows stay in their segment
        files until `compact` rewrites them and `gc` removes the old files.
        """
        return _writes.delete(self, doc_ids, tenant=tenant, missing_ok=missing_ok)

    def put_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> CommitResult:
        """Store a named set of tensors (e.g. "template": the template-head K/V) as safetensors."""
        from safetensors.torch import save as save_safetensors

        if not isinstance(name, str) or not _ARTIFACT_NAME.match(name):
            raise ValueError(f"artifact name {name!r} must match {_ARTIFACT_NAME.pattern}")
        if not tensors or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise TypeError("tensors must be a non-empty mapping of str to torch.Tensor")
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        ref = self._write_file(f"{ARTIFACT_DIR}/{name}-{_new_id()}.safetensors", [data])

        def build(base_m: Manifest):
            return {"artifacts": {**base_m.artifacts, name: ref}}, CommitResult(0)

        return self._commit(f"put {name}", build)

    # ------------------------------------------------------------------ maintenance
    def compact(self, *, small_segment_bytes: int | None = None) -> CommitResult:
        """Rewrite segments that hold tombstoned rows (and merge small ones) without the dead rows.

        Document ids are unchanged. Readers of older versions keep working until `gc` removes the
        old files after the grace period; `gc(grace_s=0)` right after purges deleted documents'
        text and tensors from storage for good.
        """
        from msa_cluster.storage_adapters._maintenance import compact

        return compact(self, small_segment_bytes)

    def gc(self, grace_s: float | None = None, uncommitted_grace_s: float | None = None) -> GCReport:
        """Delete versions superseded more than `grace_s` ago, then the files no kept version uses.

        A file that only collected versions used goes at once; a file no version ever used (an
        in-flight or crashed write) only after `uncommitted_grace_s`, so running writers are safe.
        The latest version is always kept. Returns a GCReport.
        """
        from msa_cluster.storage_adapters._maintenance import collect_garbage

        grace = self.config.gc_grace_s if grace_s is None else grace_s
        floor = self.config.uncommitted_grace_s if uncommitted_grace_s is None else uncommitted_grace_s
        return collect_garbage(self, grace, floor)

    def diff(self, old_version: int, new_version: int) -> StoreDiff:
        """What changed from `old_version` (-1: the empty store) to `new_version`: a StoreDiff.

        Read from the two manifests and the docs tables of the segments that changed between
        them only. SnapshotGoneError if a version was collected.
        """
        from msa_cluster.storage_adapters._diff import diff_versions

        return diff_versions(self, old_version, new_version)

    def verify(self, version: int | None = None) -> VerifyReport:
        """Check every file and every document of a version; raises CorruptStoreError naming the files."""
        from msa_cluster.storage_adapters._maintenance import verify

        return verify(self, self.latest_version() if version is None else version)

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"
