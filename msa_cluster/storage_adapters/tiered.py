"""The two in-memory tiers over a store snapshot.

`TieredKVReader` (content K/V, what a KV shard serves): hot documents in RAM under a byte
budget with LRU eviction; a miss is one checksum-verified range read from the store. Full
means evict, never fail.

`RouterTier` (router keys, what a router shard scores): never evicts, because a missing router
key would silently change which documents are selected; when full it refuses new documents
with `MemoryFullError` and holds nothing of the refused load.

Shape legend: R routing layers, C chunks, Hkv kv heads, D head dim, N documents.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from msa_cluster.storage_adapters.snapshot import RouterKeys, StoreSnapshot
from msa_cluster.types import MemoryFullError

__all__ = ["TieredKVReader", "TierStats", "RouterTier"]


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

    Thread-safe. `tenant` restricts every read to that tenant's documents.

    Example:
        >>> reader = TieredKVReader(store.snapshot(), budget_bytes=1 << 30)  # doctest: +SKIP
        >>> k, v = reader.get(7)                  # [R, C, Hkv, D] each        # doctest: +SKIP
        >>> ks, vs = reader.gather(layer=18, doc_ids=[7, 3])  # [C7 + C3, Hkv, D]  # doctest: +SKIP
    """

    def __init__(self, snapshot: StoreSnapshot, budget_bytes: int, tenant: str | None = None):
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")
        self._snapshot, self.budget_bytes, self.tenant = snapshot, budget_bytes, tenant
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
                if doc_id not in snapshot or snapshot.content_id(doc_id) != self._hot[doc_id].content_id:
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
                self._hot[doc_id] = _Entry(snap.content_id(doc_id), k, v, nbytes)
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


class RouterTier:
    """Router keys held for scoring, with a hard byte capacity and no eviction.

    Example:
        >>> tier = RouterTier(capacity_bytes=8 << 30)                      # doctest: +SKIP
        >>> tier.load(store.snapshot(), doc_ids=range(0, 1000))            # doctest: +SKIP
        >>> rk = tier.keys()   # RouterKeys: keys [R, C, Hkv, D], doc_offsets [N + 1], doc_ids [N]  # doctest: +SKIP
    """

    def __init__(self, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be a non-negative int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._docs: dict[int, tuple[str, torch.Tensor]] = {}  # doc id -> (tenant, [R, C, Hkv, D])
        self._layers: tuple[int, ...] | None = None
        self._bytes = 0
        self._merged: RouterKeys | None = None

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._docs

    def doc_ids(self) -> list[int]:
        return sorted(self._docs)

    def _refuse(self, extra: int, n: int) -> None:
        raise MemoryFullError(
            f"router tier full: holds {self._bytes} of {self.capacity_bytes} bytes, "
            f"{n} new documents need {extra} more; add shards or raise the capacity"
        )

    def load(self, snapshot: StoreSnapshot, doc_ids: Iterable[int] | None = None, tenant: str | None = None) -> int:
        """Read and hold the router keys of `doc_ids` (all of `tenant`'s / the snapshot's by default).

        The size is checked before anything is read: a load that does not fit raises
        MemoryFullError and changes nothing. Returns the number of documents added or refreshed.
        """
        ids = snapshot.doc_ids(tenant) if doc_ids is None else sorted(set(doc_ids))
        with self._lock:
            old = sum(self._docs[i][1].numel() * self._docs[i][1].element_size() for i in ids if i in self._docs)
        need = snapshot.router_nbytes(ids, tenant) - old
        with self._lock:
            if self._bytes + need > self.capacity_bytes:
                self._refuse(need, len(ids))
        return self.add(snapshot.router_keys(ids, tenant))

    def add(self, keys: RouterKeys) -> int:
        """Hold already-read router keys (all or none); MemoryFullError if they do not fit."""
        with self._lock:
            if self._layers is not None and keys.routing_layers != self._layers:
                raise ValueError(f"router keys for layers {keys.routing_layers}, this tier holds {self._layers}")
            offsets = keys.doc_offsets.tolist()
            per_doc = {}
            for j, doc_id in enumerate(keys.doc_ids.tolist()):
                per_doc[doc_id] = (keys.tenants[j], keys.keys[:, offsets[j] : offsets[j + 1]].clone())
            size = lambda t: t.numel() * t.element_size()  # noqa: E731
            delta = sum(size(t) for _, t in per_doc.values()) - sum(size(self._docs[i][1]) for i in per_doc if i in self._docs)
            if self._bytes + delta > self.capacity_bytes:
                self._refuse(delta, len(per_doc))
            self._docs.update(per_doc)
            self._bytes += delta
            self._layers = keys.routing_layers
            self._merged = None
            return len(per_doc)

    def remove(self, doc_ids: Iterable[int]) -> int:
        """Drop documents (e.g. deleted in a newer version); returns how many were held."""
        n = 0
        with self._lock:
            for i in doc_ids:
                held = self._docs.pop(i, None)
                if held is not None:
                    self._bytes -= held[1].numel() * held[1].element_size()
                    n += 1
            if n:
                self._merged = None
        return n

    def keys(self) -> RouterKeys:
        """Everything held, merged in ascending doc id order (cached until the next change)."""
        with self._lock:
            if self._merged is None:
                ids = sorted(self._docs)
                if ids:
                    tensors = [self._docs[i][1] for i in ids]
                    merged = torch.cat(tensors, dim=1)
                    counts = torch.tensor([t.shape[1] for t in tensors], dtype=torch.int64)
                else:
                    merged, counts = torch.empty(0, 0, 0, 0), torch.empty(0, dtype=torch.int64)
                self._merged = RouterKeys(
                    keys=merged,
                    doc_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
                    doc_ids=torch.tensor(ids, dtype=torch.int64),
                    tenants=tuple(self._docs[i][0] for i in ids),
                    routing_layers=self._layers or (),
                )
            return self._merged
