"""RouterShard: the router keys of a subset of documents, scored per routing layer.

Legend: R routing layers, C chunks, Hkv kv heads, D head dim, B query rows.

A shard holds one `RouterArena` per tenant (the package's one router-key structure), on its
device (its GPU when it has one). Every entry is visible to an interval of store versions and
an interval of placement epochs, so a request pinned to (version, epoch) sees exactly one
snapshot across all layers and rounds while inserts, deletes and rebalances land.

The coordinator drives a shard with one idempotent call, `converge(version, epoch, doc_ids)`:
"hold these documents as of this version and epoch". The shard works out what it lacks from
its own state and the store (behind, ahead, with a gap, or empty after a restart all converge
the same way), so no state of the coordinator or the shard can wedge the cluster.

One round per routing layer: `route` scores and returns the K/V of the shard's local top-k with
the scores, read through a `KVShard` in the same process (the pair's content, reached without
a second call). The K/V is that of the version each row pinned.

The router tier never evicts: past `capacity_bytes` a change is refused whole (MemoryFullError)
and the shard keeps serving what it held. Removed entries count against capacity until their
grace period ends, because pinned requests may still read them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from msa_cluster.actors.kv_shard import KVShard
from msa_cluster.actors.wire import ShardAnswer, WireQuery, to_numpy
from msa_cluster.kernels.arena import Pin, RouterArena
from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore, StoreSnapshot
from msa_cluster.types import MemoryFullError, RoutingQuery, ScoredDoc, SnapshotGoneError, StaleShardError

__all__ = ["RouterShard", "ShardState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardState:
    """What a shard serves: the newest version and epoch it applied, and how many documents it holds."""

    shard_id: int
    version: int
    epoch: int
    documents: int


class RouterShard:
    """Plain class, unit-tested without Ray; `actors.remote.RouterShardActor` subclasses it.

    Example:
        >>> shard = RouterShard(shard_id=0, routing_layers=(2, 3), store=store)       # doctest: +SKIP
        >>> shard.converge(version=4, epoch=1, doc_ids=[7, 9])                         # doctest: +SKIP
        >>> shard.score(2, query, top_k=16, tenants=["acme"], pins=[(4, 1)])           # doctest: +SKIP
        >>> shard.route(2, WireQuery.of(query), 16, ["acme"], [(4, 1)]).kv             # doctest: +SKIP

    kv_budget_bytes: RAM of the K/V tier that `route` reads through (filled on demand, LRU).
    """

    def __init__(self, *, shard_id: int, routing_layers: Sequence[int], store: MemoryStore | None = None,
                 capacity_bytes: int | None = None, device: str | torch.device = "cpu", grace_s: float = 300.0,
                 kv_budget_bytes: int = 1 << 30):
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.shard_id = shard_id
        self.store = store  # where converge() reads router keys
        self.routing_layers = tuple(int(x) for x in routing_layers)
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.grace_s = grace_s
        self.version = -1  # newest store version applied; -1: nothing loaded yet
        self.epoch = 0  # newest placement epoch applied
        self._arenas: dict[str, RouterArena] = {}
        self._tenant_of: dict[int, str] = {}  # live doc id -> tenant
        self._floor = Pin(0, 0)  # requests pinned below were served before a reload: SnapshotGoneError
        self._chunk_bytes = 0
        self._lock = threading.RLock()
        # The pair's K/V in this process, so that one call answers with scores and K/V.
        self.kv = None if store is None else KVShard(shard_id=shard_id, store=store, budget_bytes=kv_budget_bytes)

    # ------------------------------------------------------------------ the coordinator's one call
    def converge(self, version: int, epoch: int, doc_ids: Sequence[int]) -> ShardState:
        """Hold exactly `doc_ids` as of store `version` and placement `epoch`; idempotent.

        From a state just behind, apply the difference (pinned requests keep their view); from
        any other state (ahead, a gap the store no longer has, a new epoch it missed) reload.
        Refused whole with MemoryFullError when the keys do not fit; nothing changes then.
        """
        if self.store is None:
            raise RuntimeError(f"router shard {self.shard_id} has no store to load from")
        target = {int(d) for d in doc_ids}
        with self._lock:
            if (version, epoch) == (self.version, self.epoch) and target == set(self._tenant_of):
                return self.state()
            snap = self.store.snapshot(version)
            if self.kv is not None:  # its hot tier follows (reads name their version, so this only frees RAM)
                self.kv.converge(version, epoch)
            if self.version < 0 or version < self.version or epoch < self.epoch:
                self._reload(snap, epoch, target)
            else:
                try:
                    changed = set(self.store.diff(self.version, version).added) if version > self.version else set()
                except SnapshotGoneError:  # the version this shard holds was collected: start over
                    self._reload(snap, epoch, target)
                    return self.state()
                self._apply(snap, epoch, target, changed)
            return self.state()

    def _apply(self, snap: StoreSnapshot, epoch: int, target: set[int], changed: set[int]) -> None:
        live = set(self._tenant_of)
        leaving = sorted(live - target)
        stale = sorted(live & target & changed)
        arriving = sorted((target - live) | set(stale))
        self._reserve(snap, arriving, freed=0)
        now = time.monotonic()
        deleted = [d for d in leaving if d not in snap]
        moved = [d for d in leaving if d in snap]
        for d in deleted:
            self._arenas[self._tenant_of.pop(d)].remove([d], version=snap.version, now=now)
        for d in moved:  # placement changed: invisible from the new epoch on, kept for older pins
            self._arenas[self._tenant_of.pop(d)].remove([d], epoch=epoch, now=now)
        self._load(snap, arriving, epoch)
        self.version, self.epoch = snap.version, epoch
        self._expire(now)

    def _reload(self, snap: StoreSnapshot, epoch: int, target: set[int]) -> None:
        ids = sorted(target)
        self._reserve(snap, ids, freed=self._held_chunks())
        log.info("router shard %d reloads %d documents at version %d epoch %d", self.shard_id, len(ids), snap.version, epoch)
        self._arenas, self._tenant_of = {}, {}
        self._floor = Pin(snap.version, epoch)
        self._load(snap, ids, epoch)
        self.version, self.epoch = snap.version, epoch

    def _load(self, snap: StoreSnapshot, ids: list[int], epoch: int) -> None:
        if not ids:
            return
        by_tenant: dict[str, list[int]] = {}
        for d in ids:
            by_tenant.setdefault(snap.tenant_of(d), []).append(d)
        for tenant, mine in by_tenant.items():
            rk = snap.router_keys(mine, tenant=ALL_TENANTS)  # one bulk read per tenant
            doc_ids = rk.doc_ids.tolist()
            if tenant in self._arenas:
                bounds = rk.doc_offsets.tolist()
                self._add([(d, tenant, rk.keys[:, bounds[n] : bounds[n + 1]]) for n, d in enumerate(doc_ids)], snap.version, epoch)
            else:  # a fresh arena takes the bulk read as its storage: the keys are held once
                arena = self._arenas[tenant] = self._new_arena()
                arena.adopt(rk.keys, list(zip(doc_ids, rk.doc_offsets.diff().tolist())), version=snap.version, epoch=epoch)
                self._held(tenant, doc_ids, arena)

    def apply(self, version: int, *, added: Sequence[tuple[int, str, torch.Tensor]] = (), removed: Sequence[int] = (),
              epoch: int | None = None) -> ShardState:
        """Apply router keys already read, without a store: added [(doc_id, tenant, keys [R, C, Hkv, D])]
        become visible at `version`, `removed` ids stop being visible there. All or nothing
        (MemoryFullError when the keys do not fit). For benchmarks and store-less use; the cluster
        uses `converge`.
        """
        epoch = self.epoch if epoch is None else epoch
        with self._lock:
            if version < self.version or epoch < self.epoch:
                raise ValueError(f"router shard {self.shard_id} is at version {self.version} epoch {self.epoch}; "
                                 f"cannot apply version {version} epoch {epoch}")
            extra = sum(int(k.shape[1]) for _, _, k in added)
            if self.capacity_bytes is not None and added:
                row = added[0][2][:, :1].numel() * added[0][2].element_size()
                self._refuse_unless_fits(extra, row, freed=0)
            now = time.monotonic()
            for d in removed:
                tenant = self._tenant_of.pop(int(d), None)
                if tenant is not None:
                    self._arenas[tenant].remove([int(d)], version=version, now=now)
            self._add(list(added), version, epoch)
            self.version, self.epoch = version, epoch
            return self.state()

    def _add(self, docs: Sequence[tuple[int, str, torch.Tensor]], version: int, epoch: int) -> None:
        by_tenant: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for doc_id, tenant, keys in docs:
            by_tenant.setdefault(tenant, []).append((int(doc_id), keys))
        for tenant, mine in by_tenant.items():
            arena = self._arenas.get(tenant)
            if arena is None:
                arena = self._arenas[tenant] = self._new_arena()
            arena.append(mine, version=version, epoch=epoch, now=time.monotonic())  # a replaced entry keeps its grace period
            self._held(tenant, [d for d, _ in mine], arena)

    def _held(self, tenant: str, doc_ids: Sequence[int], arena: RouterArena) -> None:
        """Bookkeeping after `doc_ids` of `tenant` went into `arena`."""
        self._chunk_bytes = self._chunk_bytes or arena.chunk_bytes
        self._tenant_of.update((d, tenant) for d in doc_ids)

    def _new_arena(self) -> RouterArena:
        arena = RouterArena(self.routing_layers, device=self.device)
        arena.raise_floor(self._floor)
        return arena

    def _reserve(self, snap: StoreSnapshot, ids: list[int], freed: int) -> None:
        """Refuse (MemoryFullError, nothing changed) when `ids` do not fit beside what stays held."""
        if self.capacity_bytes is None or not ids:
            return
        extra = sum(snap.info(d, tenant=ALL_TENANTS).num_chunks for d in ids)
        self._refuse_unless_fits(extra, self._chunk_bytes or self._row_bytes(snap), freed)

    def _refuse_unless_fits(self, extra: int, row: int, freed: int) -> None:
        assert self.capacity_bytes is not None
        self._expire(time.monotonic())
        need = (self._held_chunks() - freed + extra) * row
        if need > self.capacity_bytes:
            raise MemoryFullError(
                f"router shard {self.shard_id} is full: holding {self._held_chunks() - freed} + {extra} chunks "
                f"({need} bytes) exceeds its {self.capacity_bytes} bytes; add router shards (nodes) or raise the capacity"
            )

    def _row_bytes(self, snap: StoreSnapshot) -> int:
        fp = snap.fingerprint
        itemsize = torch.empty(0, dtype=getattr(torch, fp.dtype)).element_size()
        return len(fp.routing_layers) * fp.num_kv_heads * fp.head_dim * itemsize

    def headroom_bytes(self) -> int | None:
        """Bytes still free (None: unbounded); what the coordinator checks before a commit."""
        with self._lock:
            if self.capacity_bytes is None:
                return None
            self._expire(time.monotonic())
            return self.capacity_bytes - self._held_chunks() * self._chunk_bytes

    def _held_chunks(self) -> int:
        return sum(a.held_chunks for a in self._arenas.values())

    def _expire(self, now: float) -> None:
        for arena in self._arenas.values():
            arena.collect(removed_before_s=now - self.grace_s)

    def expire(self) -> None:
        """Retire entries whose grace period ended now (also runs on every change)."""
        with self._lock:
            self._expire(time.monotonic())

    # ------------------------------------------------------------------ queries
    def score(self, layer: int, query: RoutingQuery, top_k: int, tenants: Sequence[str],
              pins: Sequence[tuple[int, int]]) -> list[list[ScoredDoc]]:
        """Local top-k per query row: [B] lists of ScoredDoc, best first (score desc, doc id asc).

        pins[b] = (version, epoch) of row b's request; a shard not there yet raises StaleShardError.
        """
        B = query.batch_size
        if len(tenants) != B or len(pins) != B:
            raise ValueError(f"{B} query rows need {B} tenants and pins, got {len(tenants)} and {len(pins)}")
        out: list[list[ScoredDoc]] = [[] for _ in range(B)]
        with self._lock:
            for version, epoch in set(pins):
                self._check(Pin(version, epoch))
            for tenant in sorted(set(tenants)):
                arena = self._arenas.get(tenant)
                rows = [b for b in range(B) if tenants[b] == tenant]
                if arena is None:
                    for p in {pins[b] for b in rows}:
                        self._check_floor(Pin(*p))
                    continue
                sub = RoutingQuery(query.vectors[rows], query.mask[rows], query.spec, query.folded)
                for b, picked in zip(rows, arena.score(layer, sub, top_k, [Pin(*pins[b]) for b in rows])):
                    out[b] = picked
        return out

    def route(self, layer: int, query: WireQuery, top_k: int, tenants: Sequence[str],
              pins: Sequence[tuple[int, int]]) -> ShardAnswer:
        """`score`, plus the K/V [C, Hkv, D] at `layer` of every local winner, at the version its row pinned.

        The one call of a routing layer: no second round to a KV shard. Errors are score's, and the
        K/V read's (SnapshotGoneError when the pinned version can no longer be read).
        """
        if self.kv is None:
            raise RuntimeError(f"router shard {self.shard_id} has no store to read K/V from; use score()")
        selected = self.score(layer, query.query(), top_k, tenants, pins)
        wanted: dict[tuple[int, str], dict[int, None]] = {}  # (version, tenant) -> doc ids, in order, once
        for row, (version, _), tenant in zip(selected, pins, tenants):
            wanted.setdefault((version, tenant), {}).update(dict.fromkeys(d.doc_id for d in row))
        kv: dict[tuple[int, int], Any] = {}
        for (version, tenant), ids in wanted.items():
            for doc_id, (k, v) in zip(ids, self.kv.read(layer, list(ids), version, tenant)):
                kv[(doc_id, version)] = (to_numpy(k), to_numpy(v))
        return ShardAnswer(selected, kv, self.kv.store.fingerprint.dtype)

    def _check(self, pin: Pin) -> None:
        if pin.version > self.version or pin.epoch > self.epoch:
            raise StaleShardError(f"router shard {self.shard_id} serves version {self.version} epoch {self.epoch}, "
                                  f"behind the request's version {pin.version} epoch {pin.epoch}")
        self._check_floor(pin)

    def _check_floor(self, pin: Pin) -> None:
        if pin.version < self._floor.version or pin.epoch < self._floor.epoch:
            raise SnapshotGoneError(f"router shard {self.shard_id} reloaded at version {self._floor.version} epoch "
                                    f"{self._floor.epoch}; version {pin.version} epoch {pin.epoch} is gone: take a new snapshot")

    # ------------------------------------------------------------------ introspection
    def state(self) -> ShardState:
        with self._lock:
            return ShardState(self.shard_id, self.version, self.epoch, len(self._tenant_of))

    def ready(self) -> int:
        return self.version

    def doc_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._tenant_of)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "shard_id": self.shard_id,
                "version": self.version,
                "epoch": self.epoch,
                "documents": len(self._tenant_of),
                "tenants": len(self._arenas),
                "chunks": sum(a.live_chunks() for a in self._arenas.values()),
                "held_chunks": self._held_chunks(),
                "bytes": self._held_chunks() * self._chunk_bytes,
                "capacity_bytes": self.capacity_bytes,
                "device": str(self.device),
            }
