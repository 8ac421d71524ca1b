"""The K/V tier over a store snapshot.

`TieredKVReader` (content K/V, what a KV shard serves): hot K/V in RAM under a byte budget with
LRU eviction. The tier holds whole documents (`get`, `prefetch`) and single routing layers of
documents (`layer`, `gather`): a miss of one layer is a checksum-verified read of that layer's
two ranges K[r], V[r] only, so a query that routes at one layer never pulls in the others. Full
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
    keys: torch.Tensor  # [R, C, Hkv, D] for a whole document, [C, Hkv, D] for one layer
    values: torch.Tensor
    nbytes: int


_WHOLE = -1  # the layer-row part of the key of a whole document's entry


class TieredKVReader:
    """Content K/V of a snapshot's documents through an LRU RAM tier of `budget_bytes`.

    Thread-safe. `tenant` restricts every read to that tenant's documents (ALL_TENANTS: a KV
    shard's reader, which serves ids that its caller already scoped to a tenant).

    Example:
        >>> reader = TieredKVReader(store.snapshot(), 1 << 30, ALL_TENANTS)  # doctest: +SKIP
        >>> k, v = reader.get(7)                  # [R, C, Hkv, D] each        # doctest: +SKIP
        >>> k, v = reader.layer(7, layer=18)      # [C, Hkv, D] each           # doctest: +SKIP
        >>> ks, vs = reader.gather(layer=18, doc_ids=[7, 3])  # [C7 + C3, Hkv, D]  # doctest: +SKIP
    """

    def __init__(self, snapshot: StoreSnapshot, budget_bytes: int, tenant: TenantScope):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")
        self._snapshot, self.budget_bytes, self.tenant = snapshot, budget_bytes, check_scope(tenant)
        self._lock = threading.Lock()
        self._hot: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # (doc id, layer row or _WHOLE)
        self._keys_of: dict[int, set[tuple[int, int]]] = {}  # doc id -> its keys in _hot
        self._bytes = self._hits = self._misses = self._evictions = 0

    @property
    def snapshot(self) -> StoreSnapshot:
        return self._snapshot

    def set_snapshot(self, snapshot: StoreSnapshot) -> None:
        """Move to another version; hot documents deleted or changed in it are dropped from RAM."""
        with self._lock:
            self._snapshot = snapshot
            for doc_id, keys in list(self._keys_of.items()):
                cid = self._hot[next(iter(keys))].content_id
                if doc_id not in snapshot or snapshot.content_id(doc_id, ALL_TENANTS) != cid:
                    self._drop_doc(doc_id)

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._hot.pop(key)
        self._bytes -= entry.nbytes
        keys = self._keys_of[key[0]]
        keys.discard(key)
        if not keys:
            del self._keys_of[key[0]]

    def _drop_doc(self, doc_id: int) -> None:
        for key in list(self._keys_of.get(doc_id, ())):
            self._drop(key)

    def _lookup(self, key: tuple[int, int]) -> tuple[StoreSnapshot, _Entry | None]:
        """The pinned snapshot and the hot entry of `key` (None on a miss), counting the hit or miss."""
        with self._lock:
            entry = self._hot.get(key)
            if entry is not None:
                self._hot.move_to_end(key)
                self._hits += 1
            else:
                self._misses += 1
            return self._snapshot, entry

    def _admit(self, snap: StoreSnapshot, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a freshly read (k, v) hot if it fits the budget, evicting least recently used entries."""
        nbytes = k.numel() * k.element_size() * 2
        with self._lock:
            if snap is not self._snapshot or key in self._hot or nbytes > self.budget_bytes:
                return
            if key[1] == _WHOLE:  # the document's hot layers are in the whole entry now
                for other in list(self._keys_of.get(key[0], ())):
                    self._drop(other)
            while self._bytes + nbytes > self.budget_bytes:
                self._drop(next(iter(self._hot)))
                self._evictions += 1
            self._hot[key] = _Entry(snap.content_id(key[0], ALL_TENANTS), k, v, nbytes)
            self._keys_of.setdefault(key[0], set()).add(key)
            self._bytes += nbytes

    def get(self, doc_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one document, each [R, C, Hkv, D] in the store dtype. Do not modify them."""
        snap, entry = self._lookup((doc_id, _WHOLE))
        if entry is not None:
            return entry.keys, entry.values
        # outside the lock: a cold read must not block hits. read_kv hands over fresh memory, so
        # the budget is real RAM and no entry pins a segment's memory map
        k, v = snap.read_kv(doc_id, self.tenant)
        self._admit(snap, (doc_id, _WHOLE), k, v)
        return k, v

    def layer(self, doc_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [C, Hkv, D] of one document at one routing layer. Do not modify them.

        From the hot whole document or hot layer if there is one; else a cold read of that
        layer's bytes only, kept hot as a layer entry.
        """
        r = self._layer_row(layer)
        with self._lock:
            whole = self._hot.get((doc_id, _WHOLE))
            if whole is not None:
                self._hot.move_to_end((doc_id, _WHOLE))
                self._hits += 1
                return whole.keys[r], whole.values[r]
        snap, entry = self._lookup((doc_id, r))
        if entry is not None:
            return entry.keys, entry.values
        k, v = snap.read_kv(doc_id, self.tenant, layer=layer)
        self._admit(snap, (doc_id, r), k, v)
        return k, v

    def gather(self, layer: int, doc_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `doc_ids` at one routing layer, concatenated in the given order: [sum C, Hkv, D].

        Cold documents are read at this layer only (see `layer`)."""
        self._layer_row(layer)
        if not doc_ids:
            lay = self._snapshot._layout
            empty = torch.empty(0, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype)
            return empty, empty.clone()
        ks, vs = zip(*(self.layer(i, layer) for i in doc_ids))
        return torch.cat(ks), torch.cat(vs)

    def _layer_row(self, layer: int) -> int:
        layers = self._snapshot.fingerprint.routing_layers
        if layer not in layers:
            raise ValueError(f"layer {layer} is not a routing layer; routing layers: {layers}")
        return layers.index(layer)

    def prefetch(self, doc_ids: Iterable[int]) -> None:
        """Warm the hot tier with whole documents (later ones may evict earlier ones if the budget is small)."""
        for i in doc_ids:
            self.get(i)

    def evict(self, doc_ids: Iterable[int]) -> None:
        with self._lock:
            for i in doc_ids:
                self._drop_doc(i)

    def stats(self) -> TierStats:
        """Counts of hot entries: `documents` counts documents with any hot K/V (whole or a layer)."""
        with self._lock:
            return TierStats(self._hits, self._misses, self._evictions, len(self._keys_of), self._bytes, self.budget_bytes)
