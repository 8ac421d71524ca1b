"""Coordinator: the cluster's view of the store and the placement of documents on shards.

One per cluster (a named, detached actor in Ray; restartable: everything it knows is rebuilt
from the store and from what live shards report). It:
- places documents on shard pairs (router shard i + KV shard i), balanced by chunk count,
  documents as the unit;
- applies store changes (inserts, deletes, updates, also those committed by other writers
  such as an ingestion job) to the shards online: shards read the new keys from the store
  themselves, the coordinator only sends document ids;
- hands requests a `ClusterView` (pinned version + shard handles) for generator-side fan-out,
  and can also run the fan-out itself (`retrieve`), which the benchmark compares;
- rebalances when shards are added or removed (nodes join or leave).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from msa_cluster.actors.calls import gather, submit
from msa_cluster.actors.fanout import ClusterView, fan_out, fetch_texts
from msa_cluster.storage_adapters import CommitResult, MemoryStore, StoreSnapshot
from msa_cluster.types import EncodedDocument, Retrieval, RoutingQuery, ShardUnavailable

__all__ = ["Coordinator", "balance"]

log = logging.getLogger(__name__)


def balance(chunks: dict[int, int], num_shards: int, current: dict[int, int] | None = None) -> dict[int, int]:
    """Place documents (id -> chunk count) on `num_shards` shards, least-loaded first.

    Documents already placed on a shard that still exists stay there unless that shard holds
    more than its fair share; the rest go, largest first, to the least-loaded shard (ties to
    the lower shard index), so placement is deterministic.
    """
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    current = current or {}
    fair = sum(chunks.values()) / num_shards
    loads = [0] * num_shards
    placed: dict[int, int] = {}
    for doc_id in sorted(chunks, key=lambda d: (-chunks[d], d)):
        s = current.get(doc_id)
        if s is not None and s < num_shards and loads[s] + chunks[doc_id] <= fair + max(chunks.values()):
            placed[doc_id] = s
            loads[s] += chunks[doc_id]
    for doc_id in sorted(set(chunks) - set(placed), key=lambda d: (-chunks[d], d)):
        s = min(range(num_shards), key=lambda i: (loads[i], i))
        placed[doc_id] = s
        loads[s] += chunks[doc_id]
    return placed


class Coordinator:
    """Plain class; `actors.remote` makes it a named, detached, threaded actor.

    routers[i] and kvs[i] are handles (Ray actors or plain objects) of shard pair i.
    """

    def __init__(self, store: MemoryStore, routers: Sequence[Any] = (), kvs: Sequence[Any] = (), timeout_s: float = 30.0):
        if len(routers) != len(kvs):
            raise ValueError(f"{len(routers)} router shards but {len(kvs)} kv shards: they come in pairs")
        self.store = store
        self.timeout_s = timeout_s
        self._routers, self._kvs = list(routers), list(kvs)
        self._lock = threading.RLock()  # serialises changes; never held while waiting on a shard's start-up
        self._placement: dict[int, int] = {}
        self._chunks: dict[int, int] = {}
        self.version = -1

    # ------------------------------------------------------------------ placement
    def plan(self, num_shards: int | None = None) -> int:
        """Place every document of the latest store version (no shard is contacted)."""
        with self._lock:
            snap = self.store.snapshot()
            self._chunks = {d: snap.info(d).num_chunks for d in snap.doc_ids()}
            n = len(self._routers) if num_shards is None else num_shards
            self._placement = balance(self._chunks, n, self._placement)
            self.version = snap.version
            return self.version

    def assignment(self, shard: int) -> tuple[int, list[int]]:
        """(version, doc ids) a shard must hold: what a (re)started shard loads from the store."""
        with self._lock:
            if self.version < 0:
                self.plan()
            return self.version, sorted(d for d, s in self._placement.items() if s == shard)

    def attach(self, routers: Sequence[Any], kvs: Sequence[Any], load: bool = True) -> int:
        """Use these shard pairs (start-up, or nodes joined/left): rebalance and reload every shard."""
        if len(routers) != len(kvs):
            raise ValueError(f"{len(routers)} router shards but {len(kvs)} kv shards: they come in pairs")
        with self._lock:
            self._routers, self._kvs = list(routers), list(kvs)
            version = self.plan(len(routers))
            if load:
                self._reset_all()
            return version

    def _reset_all(self, only: Sequence[int] | None = None) -> None:
        pending = []
        for s, (router, kv) in enumerate(zip(self._routers, self._kvs)):
            if only is not None and s not in only:
                continue
            ids = sorted(d for d, o in self._placement.items() if o == s)
            pending += [submit(router, "reset", self.version, ids), submit(kv, "sync", self.version, ids)]
        gather(pending, self.timeout_s)

    def recover(self, routers: Sequence[Any], kvs: Sequence[Any]) -> int:
        """After a coordinator restart: adopt what the live shards hold, reload only what differs.

        A shard that does not answer is skipped: when Ray restarts it, it loads its assignment itself.
        """
        with self._lock:
            self._routers, self._kvs = list(routers), list(kvs)
            held: dict[int, int] = {}
            for s, router in enumerate(self._routers):
                try:
                    for d in gather([submit(router, "doc_ids")], self.timeout_s)[0]:
                        held.setdefault(d, s)
                except ShardUnavailable as e:
                    log.warning("router shard %d did not answer during recovery: %s", s, e)
            self._placement = held
            self.plan(len(self._routers))
            stale = [s for s in range(len(self._routers)) if sorted(d for d, o in held.items() if o == s)
                     != sorted(d for d, o in self._placement.items() if o == s)]
            try:
                self._reset_all(only=stale)
            except ShardUnavailable as e:
                log.warning("some shards were not reloaded during recovery: %s", e)
            return self.version

    # ------------------------------------------------------------------ changes
    def sync(self) -> int:
        """Bring shards to the store's latest version (inserts/deletes from any writer)."""
        with self._lock:
            new = self.store.snapshot()
            if new.version <= self.version:
                return self.version
            old = self.store.snapshot(self.version) if self.version >= 0 else None
            added, removed = _diff(old, new)
            for d in removed:
                self._placement.pop(d, None)
                self._chunks.pop(d, None)
            for d in added:
                self._chunks[d] = new.info(d).num_chunks
            fresh = {d: self._chunks[d] for d in added if d not in self._placement}
            loads = self._loads()
            for d in sorted(fresh, key=lambda d: (-fresh[d], d)):
                s = min(range(len(self._routers)), key=lambda i: (loads[i], i))
                self._placement[d] = s
                loads[s] += fresh[d]
            pending = []
            for s, (router, kv) in enumerate(zip(self._routers, self._kvs)):
                mine = [d for d in added if self._placement[d] == s]
                pending += [submit(router, "update", new.version, mine, removed), submit(kv, "sync", new.version, mine)]
            self.version = new.version
            try:
                gather(pending, self.timeout_s)
            except ShardUnavailable as e:  # a restarted shard loads the new version from the store itself
                log.warning("a shard missed version %d: %s", new.version, e)
            return self.version

    def _loads(self) -> list[int]:
        loads = [0] * len(self._routers)
        for d, s in self._placement.items():
            loads[s] += self._chunks.get(d, 0)
        return loads

    def insert(self, docs: Iterable[EncodedDocument], replace: bool = False) -> CommitResult:
        """Commit documents to the store, then apply them to the shards; returns the commit."""
        result = self.store.insert(list(docs), replace=replace)
        self.sync()
        return result

    def delete(self, doc_ids: Iterable[int], tenant: str | None = None, missing_ok: bool = False) -> CommitResult:
        result = self.store.delete(list(doc_ids), tenant=tenant, missing_ok=missing_ok)
        self.sync()
        return result

    # ------------------------------------------------------------------ queries
    def view(self) -> ClusterView:
        """The latest version and the shard handles: what a request pins."""
        with self._lock:
            return ClusterView(self.version, tuple(self._routers), tuple(self._kvs), self.timeout_s)

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int, tenants: Sequence[str], versions: Sequence[int] | None = None) -> Retrieval:
        """Coordinator-side fan-out (the alternative to generator-side; see BENCHMARKS.md)."""
        return fan_out(self.view(), layer, query, top_k, tenants, versions)

    def texts(self, doc_ids: Sequence[int], tenant: str, version: int | None = None) -> dict[int, str]:
        view = self.view()
        return fetch_texts(view, doc_ids, tenant, view.version if version is None else version)

    def placement(self) -> dict[int, int]:
        with self._lock:
            return dict(self._placement)

    def stats(self) -> dict:
        with self._lock:
            return {"version": self.version, "documents": len(self._placement), "shards": len(self._routers), "chunks_per_shard": self._loads()}


def _diff(old: StoreSnapshot | None, new: StoreSnapshot) -> tuple[list[int], list[int]]:
    """(added or changed ids, removed ids) between two versions."""
    new_ids = set(new.doc_ids())
    if old is None:
        return sorted(new_ids), []
    old_ids = set(old.doc_ids())
    changed = [d for d in new_ids & old_ids if new.content_id(d) != old.content_id(d)]
    return sorted((new_ids - old_ids) | set(changed)), sorted(old_ids - new_ids)
