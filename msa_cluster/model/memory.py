"""The model's one interface to memory, and the in-process implementation.

`MemoryBackend.snapshot(tenant)` pins one version of one tenant's memory; a request uses that
snapshot for every routing layer and every interleave round. `MemorySnapshot.retrieve` is one
round trip per routing layer: it scores a batch of routing queries, picks the top-k documents
and returns their pooled K/V together. The Ray backend in `actors/` implements the same protocol.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from msa_cluster.kernels.arena import Pin, RouterArena
from msa_cluster.types import (
    DEFAULT_TENANT,
    DocumentExistsError,
    EncodedDocument,
    Retrieval,
    RoutingQuery,
    UnknownDocumentError,
    check_tenant,
)

if TYPE_CHECKING:
    from msa_cluster.model.modeling import MSAForCausalLM

__all__ = ["MemoryBackend", "MemorySnapshot", "InProcessMemory"]


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


def _not_yours(doc_id: int, tenant: str) -> UnknownDocumentError:
    """The one error for an id this tenant does not hold: never used, deleted, or another tenant's."""
    return UnknownDocumentError(f"document {doc_id} is not a document of tenant {tenant!r}")


class _InProcessSnapshot:
    """One tenant's memory at one version: scoring and K/V come from the tenant's arena."""

    def __init__(self, memory: InProcessMemory, version: int, tenant: str):
        self.version = version
        self.tenant = tenant
        self._memory = memory
        self._pin = Pin(version)

    def _doc(self, doc_id: int) -> EncodedDocument | None:
        arena = self._memory._arenas.get(self.tenant)
        i = None if arena is None else arena.entry(doc_id, self._pin)
        return None if i is None or arena is None else arena.payload(i)

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        arena = self._memory._arenas.get(self.tenant)
        if arena is None:
            return Retrieval([[] for _ in range(query.batch_size)], [torch.empty(0)] * query.batch_size,
                             [torch.empty(0)] * query.batch_size)
        with self._memory._lock:
            selected = arena.score(layer, query, top_k, [self._pin] * query.batch_size)
            docs = [[self._doc(sd.doc_id) for sd in row] for row in selected]
        keys, values = [], []
        for row in docs:
            held = [d for d in row if d is not None]  # every selected entry is visible at this pin
            i = held[0].layer_index(layer) if held else 0
            keys.append(torch.cat([d.keys[i] for d in held]) if held else torch.empty(0))
            values.append(torch.cat([d.values[i] for d in held]) if held else torch.empty(0))
        return Retrieval(selected=selected, keys=keys, values=values)

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        out = {}
        with self._memory._lock:
            for i in doc_ids:
                doc = self._doc(int(i))
                if doc is not None and doc.text is not None:
                    out[int(i)] = doc.text
        return out

    @property
    def doc_ids(self) -> list[int]:
        arena = self._memory._arenas.get(self.tenant)
        with self._memory._lock:
            return [] if arena is None else arena.visible_ids(self._pin)

    def close(self) -> None:
        """Nothing to release: the memory retires old entries once no snapshot object refers to them."""


class InProcessMemory:
    """All of memory in this process: for tests, single-node use and as the exactness baseline.

    Document ids are scoped to a tenant, as in the store: an id belongs to the tenant it was
    allocated to (by `allocate_ids`, or by the documents the memory was built from), and every
    other tenant sees it exactly like an id that was never used. Writes are online: each bumps
    the version; snapshots taken before keep theirs for as long as they are referenced.

    Example:
        >>> memory = InProcessMemory.from_documents(model, [[1, 2, 3], [4, 5]])  # doctest: +SKIP
        >>> k, v, rk = memory.pooled(0, layer=model.config.routing_layers[0])    # doctest: +SKIP
        >>> [new] = memory.allocate_ids("default", count=1)                      # doctest: +SKIP
    """

    def __init__(self, documents: Iterable[EncodedDocument] = (), routing_layers: Sequence[int] | None = None,
                 device: str | torch.device = "cpu"):  # fmt: skip
        self._lock = threading.RLock()
        self.device = torch.device(device)  # where the router arenas live (scored there); K/V stays where it was encoded
        self.version = 0
        self.routing_layers = tuple(routing_layers) if routing_layers is not None else None
        self._arenas: dict[str, RouterArena] = {}
        self._owner: dict[int, str] = {}  # doc id -> the tenant it was allocated to
        self._live: dict[int, EncodedDocument] = {}  # doc id -> its document at the newest version
        self._aliases: dict[tuple[str, str], int] = {}  # (tenant, client id) -> live doc id
        self._next_id = 0
        self._snapshots: weakref.WeakValueDictionary[tuple[str, int], _InProcessSnapshot] = weakref.WeakValueDictionary()
        documents = list(documents)
        for d in documents:  # building from documents allocates their ids to their tenants
            self._claim(d.doc_id, check_tenant(d.tenant))
        if documents:
            self.add(documents, replace=True)

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

    # ------------------------------------------------------------------ ids
    def _claim(self, doc_id: int, tenant: str) -> None:
        owner = self._owner.setdefault(int(doc_id), tenant)
        if owner != tenant:
            raise _not_yours(doc_id, tenant)
        self._next_id = max(self._next_id, int(doc_id) + 1)

    def allocate_ids(self, tenant: str, *, count: int | None = None, client_ids: Sequence[str] | None = None) -> list[int]:
        """Fresh ids for `tenant` (or, for client ids already live in it, their ids), as the store does."""
        check_tenant(tenant)
        if (count is None) == (client_ids is None):
            raise ValueError("allocate_ids takes exactly one of count and client_ids")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        if client_ids is not None and len(set(client_ids)) != len(client_ids):
            raise ValueError("client ids repeat within one allocate_ids call")
        with self._lock:
            wanted: list[str | None] = list(client_ids) if client_ids is not None else [None] * (count or 0)
            out = []
            for cid in wanted:
                known = None if cid is None else self._aliases.get((tenant, cid))
                if known is None:
                    known = self._next_id
                    self._claim(known, tenant)
                out.append(known)
            return out

    # ------------------------------------------------------------------ writes
    def add(self, documents: Iterable[EncodedDocument], *, replace: bool = False) -> int:
        """Insert documents (ids allocated to their tenants); returns the new version.

        A live id with different content needs `replace=True`; another tenant's id, or an id never
        allocated, raises UnknownDocumentError and nothing changes.
        """
        documents = list(documents)
        with self._lock:
            self._check_writes(documents, replace)
            version = self.version + 1
            for tenant in sorted({d.tenant for d in documents}):
                mine = [d for d in documents if d.tenant == tenant]
                moved = [self._aliases[(tenant, d.client_id)] for d in mine
                         if d.client_id is not None and self._aliases.get((tenant, d.client_id), d.doc_id) != d.doc_id]
                self._drop(moved, tenant, version)
                arena = self._arenas.setdefault(tenant, RouterArena(d.routing_layers if (d := mine[0]) else (), device=self.device))
                arena.append([(d.doc_id, d.router_keys) for d in mine], version=version, payloads=mine)
                for d in mine:
                    self._forget_alias(d.doc_id)
                    self._live[d.doc_id] = d
                    if d.client_id is not None:
                        self._aliases[(tenant, d.client_id)] = d.doc_id
            return self._bump()

    def _check_writes(self, documents: list[EncodedDocument], replace: bool) -> None:
        ids = [d.doc_id for d in documents]
        if len(set(ids)) != len(ids):
            raise ValueError(f"document ids repeat within one write: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        for d in documents:
            if self.routing_layers is not None and d.routing_layers != self.routing_layers:
                raise ValueError(f"document {d.doc_id} was encoded for routing layers {d.routing_layers}, "
                                 f"this memory holds {self.routing_layers}")
            if self._owner.get(d.doc_id) != d.tenant:
                raise _not_yours(d.doc_id, d.tenant)
            if not replace and d.doc_id in self._live and self._live[d.doc_id] is not d:
                raise DocumentExistsError(f"document {d.doc_id} of tenant {d.tenant!r} is live with other content; "
                                          "use replace=True or update() to overwrite it")
            alias = None if d.client_id is None else self._aliases.get((d.tenant, d.client_id))
            if not replace and alias is not None and alias != d.doc_id:
                raise DocumentExistsError(f"client id {d.client_id!r} of tenant {d.tenant!r} names document {alias}; "
                                          "use replace=True to move it")
        if self.routing_layers is None and documents:
            self.routing_layers = documents[0].routing_layers

    def update(self, documents: Iterable[EncodedDocument]) -> int:
        """Replace live documents of their tenants; an id not live there raises UnknownDocumentError."""
        documents = list(documents)
        with self._lock:
            for d in documents:
                if d.doc_id not in self._live or self._live[d.doc_id].tenant != d.tenant:
                    raise _not_yours(d.doc_id, d.tenant)
            return self.add(documents, replace=True)

    def delete(self, doc_ids: Iterable[int], *, tenant: str = DEFAULT_TENANT) -> int:
        """Delete documents of `tenant`; any other id raises UnknownDocumentError and nothing changes."""
        doc_ids = [int(i) for i in doc_ids]
        with self._lock:
            for i in doc_ids:
                if i not in self._live or self._live[i].tenant != tenant:
                    raise _not_yours(i, tenant)
            self._drop(doc_ids, tenant, self.version + 1)
            return self._bump()

    def _drop(self, doc_ids: Sequence[int], tenant: str, version: int) -> None:
        if doc_ids:
            self._arenas[tenant].remove(doc_ids, version=version)
        for i in doc_ids:
            self._forget_alias(i)
            self._live.pop(i, None)

    def _forget_alias(self, doc_id: int) -> None:
        old = self._live.get(doc_id)
        if old is not None and old.client_id is not None:
            self._aliases.pop((old.tenant, old.client_id), None)

    def _bump(self) -> int:
        self.version += 1
        self._collect()
        return self.version

    def _collect(self) -> None:
        """Retire entries that no referenced snapshot (and not the newest version) can see."""
        pinned = [v for (_, v) in list(self._snapshots.keys())]
        oldest = Pin(min(pinned + [self.version]))
        for arena in self._arenas.values():
            arena.collect(below=oldest)

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self._live)

    def documents(self, tenant: str | None = None) -> list[EncodedDocument]:
        """Live documents (of `tenant`, or of every tenant for None), by id."""
        with self._lock:
            return [self._live[i] for i in sorted(self._live) if tenant is None or self._live[i].tenant == tenant]

    def get(self, doc_id: int, tenant: str = DEFAULT_TENANT) -> EncodedDocument:
        doc = self._live.get(doc_id)
        if doc is None or doc.tenant != tenant:
            raise _not_yours(doc_id, tenant)
        return doc

    def resolve(self, client_ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> dict[str, int]:
        """{client id: doc id} for the client ids live in `tenant`; the others are left out."""
        with self._lock:
            return {c: self._aliases[(tenant, c)] for c in client_ids if (tenant, c) in self._aliases}

    def pooled(self, doc_id: int, layer: int, tenant: str = DEFAULT_TENANT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V, router K) of one document at one routing layer, each [C, Hkv, D] float32."""
        doc = self.get(doc_id, tenant)
        i = doc.layer_index(layer)
        return doc.keys[i].float(), doc.values[i].float(), doc.router_keys[i].float()

    def snapshot(self, tenant: str = DEFAULT_TENANT) -> _InProcessSnapshot:
        with self._lock:
            key = (tenant, self.version)
            snap = self._snapshots.get(key)
            if snap is None:
                snap = _InProcessSnapshot(self, self.version, tenant)
                self._snapshots[key] = snap
            return snap
