"""What changed between two store versions, read from their manifests and changed segments only.

A document live in one version and not at the same place in the other sits in a segment that
was added or dropped between them, or its row's tombstone changed. So the rows of those segments
(their small docs tables) decide the whole diff: an unchanged segment with unchanged tombstones
holds the same live rows in both versions. The cost is proportional to what changed, not to the
size of the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from msa_cluster.storage_adapters._format import DocRow
from msa_cluster.storage_adapters.manifest import Manifest
from msa_cluster.storage_adapters.snapshot import StoreSnapshot

if TYPE_CHECKING:
    from msa_cluster.storage_adapters.store import MemoryStore

__all__ = ["StoreDiff", "diff_versions"]


@dataclass(frozen=True)
class StoreDiff:
    """The change from one version to another, as a cache of the store applies it.

    added: ids live in the new version whose content differs from the old one's (new documents
      and replaced ones; not documents that compaction merely moved with identical checksums),
      ascending. removed: ids live in the old version and not in the new one, ascending.
    tenants, chunks: the tenant and chunk count of every added id.
    """

    added: tuple[int, ...]
    removed: tuple[int, ...]
    tenants: Mapping[int, str]
    chunks: Mapping[int, int]


def _moved_rows(snap: StoreSnapshot | None, other: Manifest | None) -> dict[int, DocRow]:
    """Rows live in `snap` but not live at the same place in `other`: every row of a segment
    `other` lacks, and the rows whose tombstone `other` adds, minus those dead in `snap`."""
    if snap is None:
        return {}
    m = snap.manifest
    theirs = {s.id: s for s in other.segments} if other is not None else {}
    out: dict[int, DocRow] = {}
    for seg in m.segments:
        dead = m.tombstones.get(seg.id, frozenset())
        if seg.id in theirs:
            assert other is not None
            changed = other.tombstones.get(seg.id, frozenset()) - dead
            if not changed:
                continue
            out.update((r.doc_id, r) for r in snap._docs(seg).rows if r.doc_id in changed)
        else:
            out.update((r.doc_id, r) for r in snap._docs(seg).rows if r.doc_id not in dead)
    return out


def _pinned(store: MemoryStore, version: int) -> StoreSnapshot:
    """A snapshot of `version` that does not push the store's recent snapshots out of its cache."""
    with store._lock:
        cached = store._snapshots.get(version)
    return cached if cached is not None else StoreSnapshot(store._manifest(version), store._fs, store._cache)


def diff_versions(store: MemoryStore, old_version: int, new_version: int) -> StoreDiff:
    if old_version < -1 or new_version < -1:
        raise ValueError(f"versions must be >= -1 (-1: the empty store), got {old_version} and {new_version}")
    old = _pinned(store, old_version) if old_version >= 0 else None
    new = _pinned(store, new_version) if new_version >= 0 else None
    old_m = old.manifest if old is not None else None
    new_m = new.manifest if new is not None else None
    gone = _moved_rows(old, new_m)
    came = _moved_rows(new, old_m)
    added = sorted(i for i, row in came.items() if i not in gone or gone[i].digest() != row.digest())
    return StoreDiff(
        added=tuple(added),
        removed=tuple(sorted(i for i in gone if i not in came)),
        tenants={i: came[i].tenant for i in added},
        chunks={i: came[i].num_chunks for i in added},
    )
