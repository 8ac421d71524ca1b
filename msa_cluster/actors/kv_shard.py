"""KVShard: pooled K/V (and raw texts) of its documents, served per routing layer.

Content lives in node RAM through the store's `TieredKVReader` (an LRU under a byte budget of
whole documents and single layers; a cold read of one layer reads that layer's bytes only). It evicts when full and never crashes.
Requests name the version they pinned: a document updated after that version is read from
the pinned snapshot, not from the newer hot copy.

Legend: C chunks, Hkv kv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore, StoreError, StoreSnapshot, TieredKVReader
from msa_cluster.types import SnapshotGoneError, routing_row

__all__ = ["KVShard"]


class KVShard:
    """Plain class; `actors.remote` wraps it as an actor.

    Example:
        >>> shard = KVShard(shard_id=0, store=store, budget_bytes=1 << 30)           # doctest: +SKIP
        >>> shard.converge(version=3, epoch=0, doc_ids=[1, 4])                       # doctest: +SKIP
        >>> k, v, counts = shard.fetch(18, [4, 1], version=3, tenant="acme")         # doctest: +SKIP
    """

    def __init__(self, *, shard_id: int, store: MemoryStore, budget_bytes: int = 1 << 30):
        self.shard_id = shard_id
        self.store = store
        self.budget_bytes = budget_bytes
        self._reader: TieredKVReader | None = None
        self.version = -1

    def _snapshot(self, version: int) -> StoreSnapshot:
        try:
            return self.store.snapshot(version)  # the store caches recent snapshots
        except (StoreError, FileNotFoundError) as e:
            raise SnapshotGoneError(f"kv shard {self.shard_id}: version {version} is not readable: {e}") from e

    def converge(self, version: int, epoch: int = 0, doc_ids: Sequence[int] = (), prefetch: bool = False) -> int:
        """Move the hot tier to `version` (dropping documents deleted or changed there); idempotent.

        The KV tier holds no state a request depends on (every read names its version), so any
        state converges by moving forward; `epoch` is accepted for symmetry with router shards.
        """
        snap = self._snapshot(version)
        if self._reader is None:
            self._reader = TieredKVReader(snap, self.budget_bytes, ALL_TENANTS)
        elif version > self.version:
            self._reader.set_snapshot(snap)
        self.version = max(self.version, version)
        if prefetch:
            self._reader.prefetch([i for i in doc_ids if i in snap])
        return self.version

    def ready(self) -> int:
        return self.version

    def fetch(self, layer: int, doc_ids: Sequence[int], version: int, tenant: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """K, V [sum C, Hkv, D] of `tenant`'s `doc_ids` at `layer`, in the given order, and C per doc."""
        pieces = self.read(layer, doc_ids, version, tenant)
        if not pieces:
            return torch.empty(0), torch.empty(0), []
        return torch.cat([k for k, _ in pieces]), torch.cat([v for _, v in pieces]), [int(k.shape[0]) for k, _ in pieces]

    def read(self, layer: int, doc_ids: Sequence[int], version: int, tenant: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) [C, Hkv, D] of each of `tenant`'s `doc_ids` at `layer`: views of the tier's tensors,
        no copy; a cold document is read at this layer only."""
        snap = self._snapshot(version)
        routing_row(snap.fingerprint.routing_layers, layer)  # ValueError unless a routing layer
        out = []
        for doc_id in doc_ids:
            snap.info(int(doc_id), tenant=tenant)  # UnknownDocumentError unless it is the tenant's
            out.append(self._layer_kv(int(doc_id), layer, snap))
        return out

    def _layer_kv(self, doc_id: int, layer: int, snap: StoreSnapshot) -> tuple[torch.Tensor, torch.Tensor]:
        """From the hot tier when it holds this version's content of the document, else from `snap`."""
        reader = self._reader
        if reader is not None:
            hot = reader.snapshot
            if hot is snap or (doc_id in hot and hot.content_id(doc_id, tenant=ALL_TENANTS) == snap.content_id(doc_id, tenant=ALL_TENANTS)):
                return reader.layer(doc_id, layer)
        return snap.read_kv(doc_id, tenant=ALL_TENANTS, layer=layer)

    def texts(self, doc_ids: Sequence[int], version: int, tenant: str) -> dict[int, str]:
        """Raw texts of the documents of `tenant` live at `version`; other ids are left out."""
        snap = self._snapshot(version)
        return snap.texts([i for i in doc_ids if i in snap], tenant=tenant)

    def stats(self) -> dict[str, Any]:
        s = self._reader.stats() if self._reader is not None else None
        return {"shard_id": self.shard_id, "version": self.version, "tier": None if s is None else s.__dict__}
