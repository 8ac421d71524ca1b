"""The K/V tier over a store snapshot.

`TieredKVReader` (content K/V, what a KV shard serves): hot documents in RAM under a byte
budget with LRU eviction; a miss is one checksum-verified range read from the store. Full
means evict, never fail. (Router keys are held by the router shards' own arena: they never
evict, since a missing router key would silently change which documents are selected.)

Shape legend: R routing layers, C chunks, Hkv kv heads, D head dim, N documents.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from msa_cluster.storage_adapters.snapshot import ALL_TENANTS, StoreSnapshot, TenantScope, check_scope

__all__ = ["TieredKVReader", "TierStats"]


@dataclass(frozen=True)
class TierStats:
    hits: int
    misses: int
    evictions: int
    documents: int
    bytes: int
    budget_bytes: int


@dataclass
class _Entry:
    content_id: tuple[int, int, int]
    keys: torch.Tensor
    values: torch.Tensor
    nbytes: int


class TieredKVReader:
    """Content K/V of a snapshot's documents through an LRU RAM tier of `budget_bytes`.

    Thread-safe. `tenant` restricts every read to that tenant's documents (ALL_TENANTS: a KV
    shard's reader, which serves ids that its caller already scoped to a tenant).

    Example:
        >>> reader = TieredKVReader(store.snapshot(), 1 << 30, ALL_TENANTS)  # doctest: +SKIP
        >>> k, v = reader.get(7)                  # [R, C, Hkv, D] each        # doctest: +SKIP
        >>> ks, vs = reader.gather(layer=18, doc_ids=[7, 3])  # [C7 + C3, Hkv, D]  # doctest: +SKIP
    """

    def __init__(self, snapshot: StoreSnapshot, budget_bytes: int, tenant: TenantScope):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")
        self._snapshot, self.budget_bytes, self.tenant = snapshot, budget_bytes, check_scope(tenant)
        self._lock = threading.Lock()
        self._hot: OrderedDict[int, _Entry] = OrderedDict()
        self._bytes = self._hits = self._misses = self._evictions = 0

    @property
    def snapshot(self) -> StoreSnapshot:
        return self._snapshot

    def set_snapshot(self, snapshot: StoreSnapshot) -> None:
        """Move to another version; hot documents deleted or changed in it are dropped from RAM."""
        with self._lock:
            self._snapshot = snapshot
            for doc_id in list(self._hot):
                if doc_id not in snapshot or snapshot.content_id(doc_id, ALL_TENANTS) != self._hot[doc_id].content_id:
                    self._drop(doc_id)

    def _drop(self, doc_id: int) -> None:
        entry = self._hot.pop(doc_id)
        self._bytes -= entry.nbytes

    def get(self, doc_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one document, each [R, C, Hkv, D] in the store dtype. Do not modify them."""
        with self._lock:
            snap = self._snapshot
            entry = self._hot.get(doc_id)
            if entry is not None:
                self._hot.move_to_end(doc_id)
                self._hits += 1
                return entry.keys, entry.values
            self._misses += 1
        k, v = snap.read_kv(doc_id, self.tenant)  # outside the lock: a cold read must not block hits
        # own the bytes: the budget then is real RAM, and no entry pins a segment's memory map
        k, v = k.clone(), v.clone()
        nbytes = k.numel() * k.element_size() * 2
        with self._lock:
            if snap is self._snapshot and doc_id not in self._hot and nbytes <= self.budget_bytes:
                while self._bytes + nbytes > self.budget_bytes:
                    self._drop(next(iter(self._hot)))
                    self._evictions += 1
                self._hot[doc_id] = _Entry(snap.content_id(doc_id, ALL_TENANTS), k, v, nbytes)
                self._bytes += nbytes
        return k, v

    def gather(self, layer: int, doc_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `doc_ids` at one routing layer, concatenated in the given order: [sum C, Hkv, D]."""
        r = self._layer_row(layer)
        ks, vs = zip(*(self.get(i) for i in doc_ids)) if doc_ids else ((), ())
        if not ks:
            lay = self._snapshot._layout
            empty = torch.empty(0, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
            return empty, empty.clone()
        return torch.cat([k[r] for k in ks]), torch.cat([v[r] for v in vs])

    def _layer_row(self, layer: int) -> int:
        layers = self._snapshot.fingerprint.routing_layers
        if layer not in layers:
            raise ValueError(f"layer {layer} is not a routing layer; routing layers: {layers}")
        return layers.index(layer)

    def prefetch(self, doc_ids: Iterable[int]) -> None:
        """Warm the hot tier (later documents may evict earlier ones if the budget is small)."""
        for i in doc_ids:
            self.get(i)

    def evict(self, doc_ids: Iterable[int]) -> None:
        with self._lock:
            for i in doc_ids:
                if i in self._hot:
                    self._drop(i)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self._hits, self._misses, self._evictions, len(self._hot), self._bytes, self.budget_bytes)
