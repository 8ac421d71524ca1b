"""The model's one interface to memory, and the in-process implementation.

`MemoryBackend.snapshot(tenant)` pins one version of one tenant's memory; a request uses that
snapshot for every routing layer and every interleave round. `MemorySnapshot.retrieve` is one
round trip per routing layer: it scores a batch of routing queries, picks the top-k documents
and returns their pooled K/V together. The Ray backend in `actors/` implements the same protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from msa_cluster.kernels.routing import doc_scores, select_top_k
from msa_cluster.types import (
    DEFAULT_TENANT,
    EncodedDocument,
    Retrieval,
    RoutingQuery,
    UnknownDocumentError,
)

if TYPE_CHECKING:
    from msa_cluster.model.modeling import MSAForCausalLM

__all__ = ["MemoryBackend", "MemorySnapshot", "InProcessMemory", "LayerIndex"]


@runtime_checkable
class MemorySnapshot(Protocol):
    """One tenant's memory at one version. Safe to use from one request at a time."""

    version: int
    tenant: str

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        """Select the top-k documents of each query row at `layer` and return their pooled K/V."""
        ...

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        """Raw texts of the given documents; ids not visible in this snapshot are left out."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class MemoryBackend(Protocol):
    def snapshot(self, tenant: str = DEFAULT_TENANT) -> MemorySnapshot: ...


@dataclass(frozen=True)
class LayerIndex:
    """Router keys of a set of documents at one layer, contiguous by document.

    router_keys: [C, Hkv, D]; doc_offsets: [N + 1]; doc_ids: [N] (ascending global ids).
    """

    router_keys: torch.Tensor
    doc_offsets: torch.Tensor
    doc_ids: torch.Tensor

    @classmethod
    def build(cls, docs: Sequence[EncodedDocument], layer: int) -> LayerIndex:
        docs = sorted(docs, key=lambda d: d.doc_id)
        if docs:
            rk = torch.cat([d.router_keys[d.layer_index(layer)] for d in docs])
            counts = torch.tensor([d.num_chunks for d in docs], dtype=torch.int64)
        else:
            rk = torch.empty(0, 0, 0)
            counts = torch.empty(0, dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        ids = torch.tensor([d.doc_id for d in docs], dtype=torch.int64)
        return cls(router_keys=rk, doc_offsets=offsets, doc_ids=ids)

    def top_k(self, query: RoutingQuery, k: int):
        if self.doc_ids.numel() == 0:
            return [[] for _ in range(query.batch_size)]
        return select_top_k(doc_scores(query, self.router_keys, self.doc_offsets), self.doc_ids, k)


class _InProcessSnapshot:
    def __init__(self, version: int, tenant: str, docs: dict[int, EncodedDocument]):
        self.version = version
        self.tenant = tenant
        self._docs = docs
        self._indexes: dict[int, LayerIndex] = {}

    def _index(self, layer: int) -> LayerIndex:
        if layer not in self._indexes:
            self._indexes[layer] = LayerIndex.build(list(self._docs.values()), layer)
        return self._indexes[layer]

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        selected = self._index(layer).top_k(query, top_k)
        keys, values = [], []
        for row in selected:
            ks, vs = [], []
            for sd in row:
                doc = self._docs[sd.doc_id]
                i = doc.layer_index(layer)
                ks.append(doc.keys[i])
                vs.append(doc.values[i])
            keys.append(torch.cat(ks) if ks else torch.empty(0))
            values.append(torch.cat(vs) if vs else torch.empty(0))
        return Retrieval(selected=selected, keys=keys, values=values)

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        return {i: self._docs[i].text for i in doc_ids if i in self._docs and self._docs[i].text is not None}

    @property
    def doc_ids(self) -> list[int]:
        return sorted(self._docs)

    def close(self) -> None:
        """Nothing to release: in-process snapshots are shared and dropped with their version."""


class InProcessMemory:
    """All of memory in this process: for tests, single-node use and as the exactness baseline.

    Insert and delete are online: each bumps the version; snapshots taken before keep theirs.

    Example:
        >>> memory = InProcessMemory.from_documents(model, [[1, 2, 3], [4, 5]])  # doctest: +SKIP
        >>> k, v, rk = memory.pooled(0, layer=model.config.routing_layers[0])    # doctest: +SKIP
    """

    def __init__(self, documents: Iterable[EncodedDocument] = (), routing_layers: Sequence[int] | None = None):
        self._lock = threading.Lock()
        self._docs: dict[int, EncodedDocument] = {}
        self.version = 0
        self.routing_layers = tuple(routing_layers) if routing_layers is not None else None
        self._snapshots: dict[str, _InProcessSnapshot] = {}
        self.add(documents)

    @classmethod
    def from_documents(
        cls,
        model: MSAForCausalLM,
        docs: Sequence[Sequence[int]],
        texts: Sequence[str | None] | None = None,
        tenants: Sequence[str] | None = None,
        doc_ids: Sequence[int] | None = None,
        batch_tokens: int = 8192,
    ) -> InProcessMemory:
        """Encode already-wrapped token id lists with `model`; doc id = list index unless given."""
        encoded = model.encode_documents(docs, texts=texts, tenants=tenants, doc_ids=doc_ids, batch_tokens=batch_tokens)
        return cls(encoded, routing_layers=model.config.routing_layers)

    def add(self, documents: Iterable[EncodedDocument]) -> int:
        """Insert or replace documents; returns the new version."""
        documents = list(documents)
        for d in documents:
            if self.routing_layers is not None and d.routing_layers != self.routing_layers:
                raise ValueError(
                    f"document {d.doc_id} was encoded for routing layers {d.routing_layers}, "
                    f"this memory holds {self.routing_layers}"
                )
        with self._lock:
            if self.routing_layers is None and documents:
                self.routing_layers = documents[0].routing_layers
            for d in documents:
                self._docs[d.doc_id] = d
            return self._bump()

    def delete(self, doc_ids: Iterable[int]) -> int:
        """Delete documents by id (unknown ids are an error); returns the new version."""
        doc_ids = list(doc_ids)
        with self._lock:
            missing = [i for i in doc_ids if i not in self._docs]
            if missing:
                raise UnknownDocumentError(f"unknown document ids: {missing}")
            for i in doc_ids:
                del self._docs[i]
            return self._bump()

    def _bump(self) -> int:
        self.version += 1
        self._snapshots.clear()
        return self.version

    def __len__(self) -> int:
        return len(self._docs)

    def documents(self) -> list[EncodedDocument]:
        with self._lock:
            return [self._docs[i] for i in sorted(self._docs)]

    def get(self, doc_id: int) -> EncodedDocument:
        try:
            return self._docs[doc_id]
        except KeyError:
            raise UnknownDocumentError(f"unknown document id {doc_id}") from None

    def pooled(self, doc_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V, router K) of one document at one routing layer, each [C, Hkv, D] float32."""
        doc = self.get(doc_id)
        i = doc.layer_index(layer)
        return doc.keys[i].float(), doc.values[i].float(), doc.router_keys[i].float()

    def snapshot(self, tenant: str = DEFAULT_TENANT) -> _InProcessSnapshot:
        with self._lock:
            snap = self._snapshots.get(tenant)
            if snap is None:
                docs = {i: d for i, d in self._docs.items() if d.tenant == tenant}
                snap = self._snapshots[tenant] = _InProcessSnapshot(self.version, tenant, docs)
            return snap
