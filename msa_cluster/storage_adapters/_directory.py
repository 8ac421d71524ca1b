"""A version's id directory: which segment row holds each live document id, and each live
(tenant, client id)'s document, derived from the manifest and the segments' document tables.

Built from every segment, or grown from an earlier version's directory when the newer manifest
only appends segments and adds tombstones (every insert, update and delete; not a compaction),
so that a commit's cost follows what it changed, not the size of the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from msa_cluster.storage_adapters._format import SegmentDocs
from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.storage_adapters.manifest import Manifest, SegmentRef

Docs = Callable[[SegmentRef], SegmentDocs]


@dataclass
class Directory:
    rows: dict[int, tuple[SegmentRef, int]] = field(default_factory=dict)  # doc id -> (segment, row)
    aliases: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, client id) -> live doc id


def build(manifest: Manifest, docs: Docs, where: str) -> Directory:
    """The directory of `manifest` from every segment; `where` names the manifest in errors."""
    return _add(Directory(), manifest, manifest.segments, docs, where)


def grow(old: Manifest, old_dir: Directory, new: Manifest, docs: Docs, where: str) -> Directory | None:
    """The directory of `new` from `old`'s, or None when `new` does more than append segments and
    add tombstones to `old`."""
    n = len(old.segments)
    if tuple(s.id for s in new.segments[:n]) != tuple(s.id for s in old.segments):
        return None
    newly: dict[str, set[int]] = {}
    for seg in old.segments:
        before, after = set(old.tombstones.get(seg.id, ())), set(new.tombstones.get(seg.id, ()))
        if not before <= after:
            return None
        if after - before:
            newly[seg.id] = after - before
    out = Directory(dict(old_dir.rows), dict(old_dir.aliases))
    for seg_id, dead in newly.items():
        for doc_id in dead:
            hit = out.rows.get(doc_id)
            if hit is None or hit[0].id != seg_id:
                continue
            del out.rows[doc_id]
            row = docs(hit[0]).rows[hit[1]]
            if row.client_id is not None and out.aliases.get((row.tenant, row.client_id)) == doc_id:
                del out.aliases[(row.tenant, row.client_id)]
    return _add(out, new, new.segments[n:], docs, where)


def _add(out: Directory, manifest: Manifest, segments: Sequence[SegmentRef], docs: Docs, where: str) -> Directory:
    """Add the live rows of `segments` (in manifest order) and their client ids to `out`."""
    for seg in segments:
        dead = manifest.tombstones.get(seg.id, frozenset())
        for i, row in enumerate(docs(seg).rows):
            if row.doc_id in dead:
                continue
            if row.doc_id in out.rows:
                raise CorruptStoreError(
                    f"manifest {where}: document {row.doc_id} is live in segments {out.rows[row.doc_id][0].id} and {seg.id}",
                    (where,),
                )
            out.rows[row.doc_id] = (seg, i)
            if row.client_id is not None:
                out.aliases[(row.tenant, row.client_id)] = row.doc_id
    return out
