"""The versioned manifest: which segments, tombstones and artifacts make up one store version.

Each version is one immutable JSON object `manifest/v<12 digits>.json`, created only if absent
(see `_fs.StoreFS.create_exclusive`), so publishing version N+1 is a compare-and-swap on N.
The JSON carries its own CRC32, so a damaged manifest is an error, never a wrong snapshot.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from msa_cluster.storage_adapters._format import FORMAT_VERSION, crc32
from msa_cluster.storage_adapters.errors import CorruptStoreError
from msa_cluster.types import ModelFingerprint

__all__ = ["FileRef", "SegmentRef", "Manifest", "MANIFEST_DIR", "manifest_path", "parse_manifest_name"]

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
    """An immutable file of the store: path relative to the root, size and CRC32 of its bytes."""

    path: str
    size: int
    crc32: int


@dataclass(frozen=True)
class SegmentRef:
    id: str
    num_docs: int
    num_chunks: int
    files: Mapping[str, FileRef]  # "docs", "router", "content"

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())


@dataclass(frozen=True)
class Manifest:
    """One committed version. `tombstones[segment_id]` holds the ids of that segment's dead rows."""

    version: int
    fingerprint: ModelFingerprint
    segments: tuple[SegmentRef, ...] = ()
    tombstones: Mapping[str, frozenset[int]] = field(default_factory=dict)
    artifacts: Mapping[str, FileRef] = field(default_factory=dict)
    parent: int | None = None
    created_at: float = 0.0
    operation: str = "create"

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
                    "files": {k: asdict(f) for k, f in sorted(s.files.items())},
                }
                for s in self.segments
            ],
            "tombstones": {k: sorted(v) for k, v in sorted(self.tombstones.items())},
            "artifacts": {k: asdict(f) for k, f in sorted(self.artifacts.items())},
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
            if body["format"] != "msa-store" or body["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format {body['format']!r} v{body['format_version']} is not msa-store v{FORMAT_VERSION}")
            fp = dict(body["fingerprint"])
            fp["routing_layers"] = tuple(fp["routing_layers"])
            segments = tuple(
                SegmentRef(
                    id=s["id"],
                    num_docs=int(s["num_docs"]),
                    num_chunks=int(s["num_chunks"]),
                    files={k: FileRef(**f) for k, f in s["files"].items()},
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
                artifacts={k: FileRef(**f) for k, f in body["artifacts"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptStoreError(f"manifest {name} is corrupt: {e}", (name,)) from e
