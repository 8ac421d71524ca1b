"""The write path of `MemoryStore`: id allocation, insert, update and delete (called through its methods).

Each write checks its arguments against the latest version first, so that a refused write
uploads nothing, then hands `MemoryStore._commit` a `build` function that decides the change
again on whichever version the commit lands on (a rebase after a lost race): ids allocated
meanwhile are not handed out twice, documents deleted meanwhile are not resurrected, and a
client id taken meanwhile is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msa_cluster.storage_adapters._format import FORMAT_VERSION, Checksums, DocRow, doc_checksums, metadata_json, text_checksum
from msa_cluster.storage_adapters.errors import CommitConflictError, DocumentExistsError
from msa_cluster.storage_adapters.manifest import Manifest
from msa_cluster.storage_adapters.snapshot import (
    ALL_TENANTS,
    StoreSnapshot,
    TenantScope,
    check_scope,
    unknown_documents,
)
from msa_cluster.types import EncodedDocument, check_tenant

if TYPE_CHECKING:
    from msa_cluster.storage_adapters.store import MemoryStore

__all__ = ["CommitResult", "allocate_ids", "insert", "update", "delete"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitResult:
    """What a write did. version: the version that holds the change (the current one for a no-op)."""

    version: int
    inserted: tuple[int, ...] = ()
    replaced: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()  # re-inserts of identical content: idempotent no-ops
    deleted: tuple[int, ...] = ()  # deleted, or left behind by a client id that moved to another id
    rewritten_segments: tuple[str, ...] = ()
    allocated: tuple[int, ...] = ()  # ids handed out by allocate_ids, in the order asked


class _Restart(Exception):
    """What a write was planned on changed under it in a way a rebase cannot absorb: start over."""


def doc_digest(doc: EncodedDocument, crcs: Checksums) -> tuple:
    """`DocRow.digest` of the row `doc` will be stored as in a segment of format `crcs.format`."""
    text_length, text_crc = text_checksum(doc.text, crcs.format)
    return (
        doc.tenant, doc.source, metadata_json(doc.metadata), int(doc.num_tokens), doc.num_chunks, crcs.content,
        crcs.router, text_length, text_crc, doc.client_id,
    )  # fmt: skip


class _Digests:
    """The documents of one write, digested as a segment of a given format would store them.

    A live row is compared in its own segment's format (a format-2 row with CRC32s against the
    document's CRC32s), so re-inserting unchanged documents into an older store stays a no-op.
    Computed on demand and cached; `checksums` keeps those of the current format for the write.
    """

    def __init__(self, docs: Iterable[EncodedDocument]):
        self._docs = {d.doc_id: d for d in docs}
        self._digests: dict[tuple[int, int], tuple] = {}
        self.checksums: dict[int, Checksums] = {}

    def __call__(self, doc_id: int, fmt: int) -> tuple:
        key = (doc_id, fmt)
        if key not in self._digests:
            crcs = doc_checksums(self._docs[doc_id], fmt)
            if fmt == FORMAT_VERSION:
                self.checksums[doc_id] = crcs
            self._digests[key] = doc_digest(self._docs[doc_id], crcs)
        return self._digests[key]

    def note(self, row: DocRow) -> None:
        """A row this write stored: its digest is known without checksumming again."""
        self._digests.setdefault((row.doc_id, row.format), row.digest())


def refuse_repeats(what: str, values: Iterable[Any]) -> None:
    """ValueError naming the values that appear more than once."""
    repeated = sorted(v for v, n in Counter(values).items() if n > 1)
    if repeated:
        raise ValueError(f"{what} {repeated} appear more than once in one call")


def check_client_ids(client_ids: Sequence[str]) -> list[str]:
    """`client_ids` as a list, if they are unique non-empty strings of at most 256 characters."""
    if isinstance(client_ids, str):
        raise TypeError(f"client_ids must be a sequence of strings, not one string {client_ids!r}")
    out = list(client_ids)
    bad = [c for c in out if not isinstance(c, str) or not 0 < len(c) <= 256]
    if bad:
        raise ValueError(f"client ids must be non-empty strings of at most 256 characters, got {bad[:3]!r}")
    refuse_repeats("client ids", out)
    return out


# ------------------------------------------------------------------------------------ ids
def allocate_ids(
    store: MemoryStore, tenant: str, *, count: int | None = None, client_ids: Sequence[str] | None = None
) -> list[int]:
    """See `MemoryStore.allocate_ids`."""
    check_tenant(tenant)
    if (count is None) == (client_ids is None):
        raise ValueError("allocate_ids takes exactly one of count= and client_ids=")
    wanted = check_client_ids(client_ids) if client_ids is not None else []
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if count == 0 or (client_ids is not None and not wanted):
        return []

    def build(base_m: Manifest) -> tuple[dict, CommitResult]:
        assert base_m.ids is not None
        known = store.snapshot(base_m.version).resolve(wanted, tenant) if wanted else {}
        need = count if count is not None else sum(c not in known for c in wanted)
        if need == 0:
            return {}, CommitResult(0, allocated=tuple(known[c] for c in wanted))
        ids, fresh = base_m.ids.allocate(tenant, need)
        fresh_ids = iter(fresh)
        allocated = [known[c] if c in known else next(fresh_ids) for c in wanted] if wanted else list(fresh)
        return {"ids": ids}, CommitResult(0, allocated=tuple(allocated))

    return list(store._commit("allocate", build).allocated)


# ------------------------------------------------------------------------------------ insert / update / delete
def insert(store: MemoryStore, docs: Iterable[EncodedDocument], *, replace: bool = False, existing: bool = False) -> CommitResult:
    """See `MemoryStore.insert`; `existing`: every id must be live in its tenant (`update`),
    checked again on the version the commit lands on, so a concurrent delete is never undone."""
    docs = list(docs)
    for d in docs:
        store.layout.check(d)
    refuse_repeats("document ids", (d.doc_id for d in docs))
    refuse_repeats("client ids (as tenant/client id)", (f"{d.tenant}/{d.client_id}" for d in docs if d.client_id is not None))
    for _ in range(3):
        try:
            return _insert_once(store, docs, replace, existing)
        except _Restart:
            log.info("store %s: documents skipped as present changed meanwhile; inserting again", store.url)
    raise CommitConflictError(f"store {store.url}: insert kept racing deletes of the same documents; gave up")


def _refuse_foreign(store: MemoryStore, snap: StoreSnapshot, docs: list[EncodedDocument], live: bool) -> None:
    """UnknownDocumentError for documents whose id is not their tenant's (allocated to it; and
    live in it when `live`), listing those of the first such tenant."""
    ids = snap.ids
    bad = [d for d in docs if not (snap.holds(d.doc_id, d.tenant) if live else ids.owns(d.tenant, d.doc_id))]
    if bad:
        tenant = bad[0].tenant
        raise unknown_documents([d.doc_id for d in bad if d.tenant == tenant], tenant)


def _alias_moves(store: MemoryStore, snap: StoreSnapshot, docs: Iterable[Any], replace: bool) -> dict[int, str]:
    """{old id: client id} of the client ids that `docs` (documents or rows) move away from another
    live id of their tenant; DocumentExistsError naming the client id unless `replace`."""
    docs = list(docs)
    own = {d.doc_id for d in docs}
    moves = {}
    for d in docs:
        if d.client_id is None:
            continue
        old = snap.resolve([d.client_id], d.tenant).get(d.client_id)
        if old is None or old == d.doc_id or old in own:  # an id of this insert is replaced anyway
            continue
        if not replace:
            raise DocumentExistsError(
                f"client id {d.client_id!r} of tenant {d.tenant!r} is document {old} in store {store.url} "
                f"(version {snap.version}), not {d.doc_id}; use replace=True to move it"
            )
        moves[old] = d.client_id
    return moves


def _insert_once(store: MemoryStore, docs: list[EncodedDocument], replace: bool, existing: bool) -> CommitResult:
    base = store.snapshot()
    _refuse_foreign(store, base, docs, live=existing)
    # checksums up front only for ids already live (to compare); new ones get theirs while encoding
    digests = _Digests(docs)
    fresh = [i for i, d in enumerate(docs) if not _same(store, base, d.doc_id, digests, replace)]
    if not fresh:
        return CommitResult(version=base.version, skipped=tuple(d.doc_id for d in docs))
    _alias_moves(store, base, (docs[i] for i in fresh), replace)  # refuse before writing anything
    written = store._write_segments([docs[i] for i in fresh], [digests.checksums.get(docs[i].doc_id) for i in fresh])
    for _, rows in written:
        for row in rows:
            digests.note(row)
    fresh_set = set(fresh)
    skipped_early = tuple(d.doc_id for i, d in enumerate(docs) if i not in fresh_set)

    def build(base_m: Manifest):
        snap = store.snapshot(base_m.version)
        if not all(_same(store, snap, i, digests, replace) for i in skipped_early):
            raise _Restart  # a document not written because it was present is gone or changed now
        gone = [r for _, rows in written for r in rows if r.doc_id not in snap]
        if existing and gone:  # deleted meanwhile: the update comes after the delete, so it fails
            raise unknown_documents([r.doc_id for r in gone if r.tenant == gone[0].tenant], gone[0].tenant)
        tombs = {k: set(v) for k, v in base_m.tombstones.items()}
        ins, rep, skip, keep = [], [], list(skipped_early), []
        for seg, rows in written:
            dead = set()
            for row in rows:
                if row.doc_id not in snap:
                    ins.append(row.doc_id)
                    continue
                old = snap.info(row.doc_id, ALL_TENANTS).segment_id
                if _same(store, snap, row.doc_id, digests, replace):
                    skip.append(row.doc_id)
                    dead.add(row.doc_id)
                else:
                    rep.append(row.doc_id)
                    tombs.setdefault(old, set()).add(row.doc_id)
            if len(dead) < len(rows):
                keep.append(seg)
                if dead:
                    tombs[seg.id] = dead
        if not keep:
            return None
        moved = _alias_moves(store, snap, (r for _, rows in written for r in rows), replace)
        for old_id in moved:
            tombs.setdefault(snap.info(old_id, ALL_TENANTS).segment_id, set()).add(old_id)
        result = CommitResult(0, tuple(ins), tuple(rep), tuple(skip), deleted=tuple(sorted(moved)))
        return {"segments": base_m.segments + tuple(keep), "tombstones": tombs}, result

    try:
        result = store._commit("insert", build, base.manifest)
    except BaseException:
        store._discard(seg for seg, _ in written)
        raise
    if not result.inserted and not result.replaced:
        store._discard(seg for seg, _ in written)
        return CommitResult(version=result.version, skipped=tuple(d.doc_id for d in docs))
    return result


def _same(store: MemoryStore, snap: StoreSnapshot, doc_id: int, digests: _Digests, replace: bool) -> bool:
    """True if doc_id is live in snap with the content this write has for it; raise if live and
    different (unless replace)."""
    if doc_id not in snap:
        return False
    row = snap._row(doc_id, ALL_TENANTS)[2]
    if row.digest() == digests(doc_id, row.format):
        return True
    if not replace:
        raise DocumentExistsError(
            f"document {doc_id} is already in store {store.url} (version {snap.version}) with different "
            f"content; use replace=True or update() to overwrite it"
        )
    return False


def update(store: MemoryStore, docs: Iterable[EncodedDocument]) -> CommitResult:
    """See `MemoryStore.update`."""
    docs = list(docs)
    return insert(store, docs, replace=True, existing=True)


def delete(store: MemoryStore, doc_ids: Iterable[int], *, tenant: TenantScope, missing_ok: bool = False) -> CommitResult:
    """See `MemoryStore.delete`."""
    tenant = check_scope(tenant)
    ids = list(dict.fromkeys(int(i) for i in doc_ids))
    snap = store.snapshot()
    unknown = [i for i in ids if not snap.holds(i, tenant)]
    if unknown and not missing_ok:
        raise unknown_documents(unknown, tenant)

    def build(base_m: Manifest):
        now = store.snapshot(base_m.version)
        live = sorted(i for i in ids if now.holds(i, tenant))  # deleted by another writer meanwhile: done
        if not live:
            return None
        tombs = {k: set(v) for k, v in base_m.tombstones.items()}
        for i in live:
            tombs.setdefault(now.info(i, ALL_TENANTS).segment_id, set()).add(i)
        return {"tombstones": tombs}, CommitResult(0, deleted=tuple(live))

    return store._commit("delete", build, snap.manifest)
