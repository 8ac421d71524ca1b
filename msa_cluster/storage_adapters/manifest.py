"""The versioned manifest: which segments, tombstones and artifacts make up one store version.

Each version is one immutable JSON object `manifest/v<12 digits>.json`, created only if absent
(see `_fs.StoreFS.create_exclusive`), so publishing version N+1 is a compare-and-swap on N.
The JSON carries its own CRC32, so a damaged manifest is an error, never a wrong snapshot.
Each file reference names its checksum's algorithm ("crc32" up to format 2, "crc32c" from 3):
a store whose files were written by different formats verifies each with its own.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from msa_cluster.storage_adapters._checksums import ALGORITHMS, crc32
from msa_cluster.storage_adapters._format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.types import ModelFingerprint

__all__ = ["FileRef", "SegmentRef", "IdAllocation", "Manifest", "MANIFEST_DIR", "manifest_path", "parse_manifest_name"]

MANIFEST_DIR = "manifest"
_NAME = re.compile(r"^v(\d{12})\.json$")
SEGMENT_KINDS = ("docs", "router", "content")


def manifest_path(version: int) -> str:
    return f"{MANIFEST_DIR}/v{version:012d}.json"


def parse_manifest_name(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def normalize_fingerprint(fp: ModelFingerprint) -> ModelFingerprint:
    if not isinstance(fp, ModelFingerprint):
        raise TypeError(f"expected a ModelFingerprint, got {type(fp).__name__}")
    return replace(fp, routing_layers=tuple(int(x) for x in fp.routing_layers), dtype=str(fp.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class FileRef:
    """An immutable file of the store: path relative to the root, size and checksum of its bytes."""

    path: str
    size: int
    crc: int
    algorithm: str = "crc32c"  # a key of _checksums.ALGORITHMS

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, self.algorithm: self.crc}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> FileRef:
        algorithms = [a for a in ALGORITHMS if a in body]
        if len(algorithms) != 1 or set(body) != {"path", "size", *algorithms}:
            raise ValueError(f"a file reference has keys {sorted(body)}, expected path, size and one of {sorted(ALGORITHMS)}")
        return cls(str(body["path"]), int(body["size"]), int(body[algorithms[0]]), algorithms[0])


@dataclass(frozen=True)
class SegmentRef:
    id: str
    num_docs: int
    num_chunks: int
    files: Mapping[str, FileRef]  # "docs", "router", "content"

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())


Range = tuple[int, int]  # [start, end) of document ids


def _merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted, non-empty ranges with overlapping or adjacent ones merged."""
    out: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class IdAllocation:
    """Which document ids the store has handed out, and to which tenant.

    Ids are global ints, allocated upward from 0 and never reused: `next_doc_id` is the next
    one to hand out; `ranges[tenant]` the [start, end) ranges allocated to a tenant (sorted,
    adjacent ones merged), so ranges of different tenants never overlap.
    """

    next_doc_id: int = 0
    ranges: Mapping[str, tuple[Range, ...]] = field(default_factory=dict)

    def owns(self, tenant: str, doc_id: int) -> bool:
        """True if `doc_id` was allocated to `tenant`."""
        ranges = self.ranges.get(tenant, ())
        i = bisect.bisect_right(ranges, doc_id, key=lambda r: r[0]) - 1
        return i >= 0 and ranges[i][0] <= doc_id < ranges[i][1]

    def allocate(self, tenant: str, count: int) -> tuple[IdAllocation, range]:
        """The allocation after handing `count` fresh ids to `tenant`, and those ids."""
        start = self.next_doc_id
        ranges = dict(self.ranges)
        ranges[tenant] = _merge((*ranges.get(tenant, ()), (start, start + count)))
        return IdAllocation(start + count, ranges), range(start, start + count)

    @classmethod
    def derive(cls, owners: Mapping[int, str], highest: int) -> IdAllocation:
        """The allocation of a store of format 1: each live id is its document's tenant's; ids
        up to `highest` (the largest ever stored) are spent."""
        by_tenant: dict[str, list[Range]] = {}
        for doc_id, tenant in owners.items():
            by_tenant.setdefault(tenant, []).append((doc_id, doc_id + 1))
        return cls(highest + 1, {t: _merge(r) for t, r in by_tenant.items()})

    def to_json(self) -> dict[str, Any]:
        return {
            "next_doc_id": self.next_doc_id,
            "id_ranges": {t: [list(r) for r in rs] for t, rs in sorted(self.ranges.items())},
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> IdAllocation:
        ranges = {str(t): _merge((int(a), int(b)) for a, b in rs) for t, rs in body["id_ranges"].items()}
        out = cls(int(body["next_doc_id"]), ranges)
        if any(r[-1][1] > out.next_doc_id for r in ranges.values() if r) or out.next_doc_id < 0:
            raise ValueError(f"id ranges reach past next_doc_id {out.next_doc_id}")
        return out


@dataclass(frozen=True)
class Manifest:
    """One committed version. `tombstones[segment_id]` holds the ids of that segment's dead rows.

    ids: the document ids allocated so far; None in a version written by format 1 (the store
    derives it from the live documents, see `StoreSnapshot.ids`, and writes it on its next commit).
    """

    version: int
    fingerprint: ModelFingerprint
    segments: tuple[SegmentRef, ...] = ()
    tombstones: Mapping[str, frozenset[int]] = field(default_factory=dict)
    artifacts: Mapping[str, FileRef] = field(default_factory=dict)
    parent: int | None = None
    created_at: float = 0.0
    operation: str = "create"
    ids: IdAllocation | None = field(default_factory=IdAllocation)

    @property
    def path(self) -> str:
        return manifest_path(self.version)

    def files(self) -> set[str]:
        """Every file this version references."""
        out = {f.path for s in self.segments for f in s.files.values()}
        out.update(f.path for f in self.artifacts.values())
        return out

    def child(self, operation: str, **changes: Any) -> Manifest:
        """The next version built on this one (tombstones of dropped segments are dropped)."""
        m = replace(
            self, version=self.version + 1, parent=self.version, created_at=time.time(), operation=operation, **changes
        )
        live = {s.id for s in m.segments}
        tombs = {k: frozenset(v) for k, v in m.tombstones.items() if k in live and v}
        return replace(m, tombstones=tombs)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> bytes:
        assert self.ids is not None, "a format-1 manifest is upgraded before it is written"
        body = {
            "format": "msa-store",
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "operation": self.operation,
            "fingerprint": {**asdict(self.fingerprint), "routing_layers": list(self.fingerprint.routing_layers)},
            "segments": [
                {
                    "id": s.id,
                    "num_docs": s.num_docs,
                    "num_chunks": s.num_chunks,
                    "files": {k: f.to_json() for k, f in sorted(s.files.items())},
                }
                for s in self.segments
            ],
            "tombstones": {k: sorted(v) for k, v in sorted(self.tombstones.items())},
            "artifacts": {k: f.to_json() for k, f in sorted(self.artifacts.items())},
            **self.ids.to_json(),
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        body["crc32"] = crc32(canonical.encode())
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Manifest:
        try:
            body = json.loads(data)
            stored = body.pop("crc32")
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
            if crc32(canonical.encode()) != stored:
                raise ValueError("checksum mismatch")
            if body["format"] != "msa-store" or body["format_version"] not in READABLE_FORMAT_VERSIONS:
                raise ValueError(
                    f"format {body['format']!r} v{body['format_version']} is not msa-store v{READABLE_FORMAT_VERSIONS}"
                )
            fp = dict(body["fingerprint"])
            fp["routing_layers"] = tuple(fp["routing_layers"])
            segments = tuple(
                SegmentRef(
                    id=s["id"],
                    num_docs=int(s["num_docs"]),
                    num_chunks=int(s["num_chunks"]),
                    files={k: FileRef.from_json(f) for k, f in s["files"].items()},
                )
                for s in body["segments"]
            )
            if any(set(s.files) != set(SEGMENT_KINDS) for s in segments):
                raise ValueError(f"a segment does not list exactly the files {SEGMENT_KINDS}")
            return cls(
                version=int(body["version"]),
                parent=body["parent"],
                created_at=float(body["created_at"]),
                operation=str(body["operation"]),
                fingerprint=ModelFingerprint(**fp),
                segments=segments,
                tombstones={k: frozenset(int(x) for x in v) for k, v in body["tombstones"].items()},
                artifacts={k: FileRef.from_json(f) for k, f in body["artifacts"].items()},
                ids=IdAllocation.from_json(body) if body["format_version"] >= 2 else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptStoreError(f"manifest {name} is corrupt: {e}", (name,)) from e
