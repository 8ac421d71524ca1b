"""RouterShard: the router keys of a subset of documents, scored per routing layer.

Legend: R routing layers, C chunks, Hkv kv heads, D head dim, N entries, B query rows.

Keys live in one append-only arena per shard, [R, capacity, Hkv, D], on the shard's device
(its GPU when it has one). Each entry (one version of one document) owns a contiguous chunk
range and the version interval [added, removed) in which it is visible. A query names the
store version its request pinned, so one request sees one snapshot across all layers and
rounds even while inserts and deletes land; entries removed longer ago than `grace_s` are
dropped and the arena is compacted once half of it is dead.

Scores come from the canonical `doc_scores` (fixed tiles, float64 then float32): a document's
score does not depend on its neighbours in the arena, so any sharding selects the same
documents as scoring everything in one place. Tenant and version filtering happen before top-k.
The router tier never evicts; past `capacity_bytes` it refuses new documents (MemoryFullError).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import torch

from msa_cluster.kernels.routing import doc_scores, select_top_k
from msa_cluster.types import MemoryFullError, RoutingQuery, ScoredDoc, SnapshotGoneError, StaleShardError

__all__ = ["RouterShard", "RouterEntry"]

log = logging.getLogger(__name__)


@dataclass
class RouterEntry:
    doc_id: int
    tenant: str
    start: int  # first chunk in the arena
    count: int  # chunks
    added: int  # version the entry became visible
    removed: float = math.inf  # version it stopped being visible
    removed_at: float = math.inf  # wall time of the removal, for the grace period


class RouterShard:
    """Plain class, unit-tested without Ray; `actors.remote` wraps it as an actor.

    Example:
        >>> shard = RouterShard(0, routing_layers=(2, 3))                               # doctest: +SKIP
        >>> shard.apply(version=1, added=[(7, "acme", rk)])  # rk [R, C, Hkv, D]      # doctest: +SKIP
        >>> shard.score(2, query, top_k=16, tenants=["acme"], version=1)              # doctest: +SKIP
    """

    def __init__(self, shard_id: int, routing_layers: tuple[int, ...], capacity_bytes: int | None = None,
                 device: str | torch.device = "cpu", grace_s: float = 300.0, store=None):
        self.shard_id = shard_id
        self.store = store  # a MemoryStore: where update()/reset() read router keys
        self.routing_layers = tuple(routing_layers)
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.grace_s = grace_s
        self.version = -1  # newest version applied; -1: nothing loaded yet
        self.oldest_version = 0  # requests pinned before this may have lost removed entries
        self._arena: torch.Tensor | None = None  # [R, capacity, Hkv, D]
        self._used = 0
        self._entries: list[RouterEntry] = []
        self._live: dict[int, RouterEntry] = {}  # doc id -> entry visible at self.version
        self._lock = threading.RLock()
        self._tables: dict[tuple[int, str], tuple] = {}  # (version, tenant) -> (offsets, ids, visible)

    # ------------------------------------------------------------------ state changes
    def apply(self, version: int, added=(), removed=()) -> int:
        """Make `version` current: `added` is [(doc_id, tenant, keys [R, C, Hkv, D])], `removed` doc ids.

        All or nothing: if the added keys do not fit, MemoryFullError and nothing changes.
        A re-added id replaces its previous entry from `version` on.
        """
        added = list(added)
        with self._lock:
            if version < self.version:  # already loaded a later snapshot, which includes this change
                log.debug("router shard %d at version %d skips older change %d", self.shard_id, self.version, version)
                return self.version
            extra = sum(k.shape[1] for _, _, k in added)
            self._reserve(extra, added)
            now = time.monotonic()
            for doc_id in list(removed) + [d for d, _, _ in added]:
                old = self._live.pop(int(doc_id), None)
                if old is not None:
                    old.removed, old.removed_at = version, now
            for doc_id, tenant, keys in added:
                if tuple(keys.shape[:1]) != (len(self.routing_layers),):
                    raise ValueError(f"router keys of document {doc_id} have shape {tuple(keys.shape)}; expected [R={len(self.routing_layers)}, C, Hkv, D]")
                entry = RouterEntry(int(doc_id), str(tenant), self._used, int(keys.shape[1]), version)
                self._arena[:, self._used : self._used + entry.count] = keys.to(self.device)
                self._used += entry.count
                self._entries.append(entry)
                self._live[entry.doc_id] = entry
            self.version = version
            self._tables.clear()
            self._prune(now)
            return self.version

    def update(self, version: int, added_ids=(), removed_ids=()) -> int:
        """Apply the store change that produced `version` (the coordinator sends ids only)."""
        return self.update_from(self.store.snapshot(version), added_ids, removed_ids)

    def reset(self, version: int, doc_ids) -> int:
        """Hold exactly `doc_ids` as of `version`, read from the store."""
        return self.reset_from(self.store.snapshot(version), doc_ids)

    def update_from(self, snapshot, added_ids=(), removed_ids=()) -> int:
        """Apply a store change: read the added documents' router keys from `snapshot` (one bulk read)."""
        added_ids = sorted(int(i) for i in added_ids)
        rk = snapshot.router_keys(doc_ids=added_ids) if added_ids else None
        added = []
        if rk is not None:
            bounds = rk.doc_offsets.tolist()
            for n, doc_id in enumerate(rk.doc_ids.tolist()):
                added.append((doc_id, rk.tenants[n], rk.keys[:, bounds[n] : bounds[n + 1]]))
        return self.apply(snapshot.version, added=added, removed=removed_ids)

    def reset_from(self, snapshot, doc_ids) -> int:
        """Drop everything and hold exactly `doc_ids` of `snapshot` (start-up, restart, rebalance)."""
        with self._lock:
            self._arena, self._used, self._entries, self._live = None, 0, [], {}
            self._tables.clear()
            self.version, self.oldest_version = -1, snapshot.version
            return self.update_from(snapshot, doc_ids)

    def _reserve(self, extra: int, added) -> None:
        if not added:
            return
        sample = added[0][2]
        if self._arena is None:
            self._arena = torch.empty(len(self.routing_layers), 0, *sample.shape[2:], dtype=sample.dtype, device=self.device)
        row_bytes = sample[:, :1].numel() * sample.element_size()  # one chunk, all routing layers
        if self.capacity_bytes is not None and (self._held_chunks() + extra) * row_bytes > self.capacity_bytes:
            raise MemoryFullError(
                f"router shard {self.shard_id} is full: {self._held_chunks()} + {extra} chunks exceed "
                f"{self.capacity_bytes} bytes; add router shards (nodes) or raise the capacity"
            )
        need = self._used + extra
        if need > self._arena.shape[1]:
            grown = self._arena.new_empty(self._arena.shape[0], max(need, 2 * self._arena.shape[1], 1024), *self._arena.shape[2:])
            grown[:, : self._used] = self._arena[:, : self._used]
            self._arena = grown

    def _held_chunks(self) -> int:
        """Chunks of every entry still held: visible ones and removed ones inside the grace period."""
        return sum(e.count for e in self._entries)

    def _prune(self, now: float) -> None:
        """Forget entries removed more than grace_s ago; compact the arena when half of it is dead."""
        expired = [e for e in self._entries if e.removed_at + self.grace_s <= now]
        if expired:
            self.oldest_version = max(self.oldest_version, max(int(e.removed) for e in expired))
            keep = [e for e in self._entries if e.removed_at + self.grace_s > now]
            self._entries = keep
        live = self._held_chunks()
        if self._arena is not None and self._used > 1024 and live * 2 < self._used:
            arena = self._arena.new_empty(self._arena.shape[0], max(live, 1024), *self._arena.shape[2:])
            pos = 0
            for e in self._entries:
                arena[:, pos : pos + e.count] = self._arena[:, e.start : e.start + e.count]
                e.start, pos = pos, pos + e.count
            self._arena, self._used = arena, pos

    def expire(self) -> None:
        """Run the grace-period pruning now (also runs on every apply)."""
        with self._lock:
            self._prune(time.monotonic())

    # ------------------------------------------------------------------ queries
    def _table(self, version: int, tenant: str):
        """(entries in arena order, doc_ids [N], visible [N]) for one (version, tenant)."""
        key = (version, tenant)
        if key not in self._tables:
            entries = sorted(self._entries, key=lambda e: e.start)
            ids = torch.tensor([e.doc_id for e in entries], dtype=torch.int64)
            visible = torch.tensor([e.tenant == tenant and e.added <= version < e.removed for e in entries], dtype=torch.bool)
            self._tables[key] = (entries, ids, visible)
        return self._tables[key]

    def check_version(self, version: int) -> None:
        if version > self.version:
            raise StaleShardError(f"router shard {self.shard_id} is at version {self.version}, behind request version {version}")
        if version < self.oldest_version:
            raise SnapshotGoneError(f"version {version} is older than router shard {self.shard_id} keeps ({self.oldest_version})")

    def score(self, layer: int, query: RoutingQuery, top_k: int, tenants: list[str], versions: list[int] | int) -> list[list[ScoredDoc]]:
        """Local top-k per query row: [B] lists of ScoredDoc, best first (score desc, doc id asc)."""
        if layer not in self.routing_layers:
            raise ValueError(f"layer {layer} is not a routing layer; routing layers: {self.routing_layers}")
        B = query.batch_size
        versions = [versions] * B if isinstance(versions, int) else list(versions)
        if len(tenants) != B or len(versions) != B:
            raise ValueError(f"{B} query rows need {B} tenants and versions, got {len(tenants)} and {len(versions)}")
        with self._lock:
            for v in set(versions):
                self.check_version(v)
            if not self._entries:
                return [[] for _ in range(B)]
            r = self.routing_layers.index(layer)
            keys = self._arena[r, : self._used]
            out: list[list[ScoredDoc]] = [[] for _ in range(B)]
            groups: dict[tuple[str, int], list[int]] = {}
            for b in range(B):
                groups.setdefault((tenants[b], versions[b]), []).append(b)
            tables = {g: self._table(g[1], g[0]) for g in groups}
            entries, ids, _ = next(iter(tables.values()))
            if not _contiguous(entries, self._used):  # expired entries leave holes until compaction
                keys = torch.cat([keys[e.start : e.start + e.count] for e in entries])
            offsets = torch.tensor([0] + [e.count for e in entries], dtype=torch.int64).cumsum(0)
        scores = doc_scores(_to(query, keys.device), keys, offsets).cpu()
        for (tenant, version), rows in groups.items():
            visible = tables[(tenant, version)][2]
            sub = scores[rows].masked_fill(~visible, -math.inf)
            for b, picked in zip(rows, select_top_k(sub, ids, top_k)):
                out[b] = picked
        return out

    # ------------------------------------------------------------------ introspection
    def doc_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._live)

    def stats(self) -> dict:
        with self._lock:
            row = self._arena[:, :1].numel() * self._arena.element_size() if self._arena is not None else 0
            return {
                "shard_id": self.shard_id,
                "version": self.version,
                "documents": len(self._live),
                "chunks": sum(e.count for e in self._live.values()),
                "arena_chunks": self._used,
                "bytes": self._used * row,
                "capacity_bytes": self.capacity_bytes,
                "device": str(self.device),
            }


def _contiguous(entries: list[RouterEntry], used: int) -> bool:
    pos = 0
    for e in entries:
        if e.start != pos:
            return False
        pos += e.count
    return pos == used


def _to(query: RoutingQuery, device: torch.device) -> RoutingQuery:
    if query.vectors.device == device:
        return query
    return RoutingQuery(query.vectors.to(device), query.mask.to(device), query.spec, query.folded)
