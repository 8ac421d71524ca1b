"""Coordinator: which store version the cluster serves, and where each document lives.

One per cluster (a named, detached actor in Ray). Everything it knows can be rebuilt from the
store and from what live shards report, so a restart loses nothing. It:
- places documents on shard pairs (router shard i + KV shard i), balanced by chunk count;
- moves every shard to a store version with one idempotent call per shard,
  `converge(version, epoch, doc_ids)`, and serves a version only once every shard has it:
  a change some shard refuses (MemoryFullError) leaves the cluster serving the latest version
  it can hold, and `status()` names the refused one until capacity is added;
- checks router capacity before its own writes commit, so a write it cannot hold is refused
  whole and never reaches the store;
- stamps each placement with an epoch: a request pinned before a rebalance keeps seeing its
  documents on the shards that held them, or gets a typed retryable error.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from msa_cluster.actors.calls import KVHandle, RouterHandle, gather, submit
from msa_cluster.actors.fanout import ClusterView, fan_out, fetch_texts
from msa_cluster.actors.router_shard import ShardState
from msa_cluster.storage_adapters import ALL_TENANTS, CommitResult, MemoryStore
from msa_cluster.storage_adapters.snapshot import DocInfo, StoreSnapshot, unknown_documents
from msa_cluster.types import (
    EncodedDocument,
    MemoryFullError,
    QuotaExceededError,
    Retrieval,
    RoutingQuery,
    ShardUnavailableError,
    SnapshotGoneError,
    check_tenant,
)

__all__ = ["Coordinator", "Assignment", "ClusterStatus", "TenantQuota", "balance"]

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
    biggest = max(chunks.values(), default=0)
    loads = [0] * num_shards
    placed: dict[int, int] = {}
    for doc_id in sorted(chunks, key=lambda d: (-chunks[d], d)):
        s = current.get(doc_id)
        if s is not None and s < num_shards and loads[s] + chunks[doc_id] <= fair + biggest:
            placed[doc_id] = s
            loads[s] += chunks[doc_id]
    _place(sorted(set(chunks) - set(placed)), chunks, loads, placed)
    return placed


def _place(doc_ids: Iterable[int], chunks: dict[int, int], loads: list[int], placed: dict[int, int]) -> None:
    """Put each document, largest first, on the least-loaded shard (ties to the lower index)."""
    for doc_id in sorted(doc_ids, key=lambda d: (-chunks[d], d)):
        s = min(range(len(loads)), key=lambda i: (loads[i], i))
        placed[doc_id] = s
        loads[s] += chunks[doc_id]


@dataclass(frozen=True)
class Assignment:
    """What shard i must hold: its documents as of (version, epoch). version -1: nothing yet."""

    version: int
    epoch: int
    doc_ids: tuple[int, ...]


@dataclass(frozen=True)
class TenantQuota:
    """Per-tenant bounds on stored documents and tokens (None: unbounded), checked under the write lock."""

    max_documents: int | None = None
    max_tokens: int | None = None

    def check(self, snap: StoreSnapshot, docs: Sequence[EncodedDocument]) -> None:
        """QuotaExceededError if writing `docs` over `snap` would take a tenant over a bound."""
        usage = snap.usage()
        by_tenant: dict[str, dict[int, EncodedDocument]] = {}
        for d in docs:
            by_tenant.setdefault(d.tenant, {})[d.doc_id] = d
        for tenant, new in sorted(by_tenant.items()):
            n, tokens = usage.get(tenant, (0, 0))
            for doc_id, d in new.items():
                if snap.holds(doc_id, tenant):
                    tokens += d.num_tokens - snap.info(doc_id, tenant).num_tokens
                else:
                    n, tokens = n + 1, tokens + d.num_tokens
            for limit, maximum, value in (("max_documents_per_tenant", self.max_documents, n),
                                          ("max_tokens_per_tenant", self.max_tokens, tokens)):
                if maximum is not None and value > maximum:
                    raise QuotaExceededError(limit, maximum, value, f"tenant {tenant!r} would hold {value}; nothing was written")


@dataclass(frozen=True)
class ClusterStatus:
    version: int  # the version the cluster serves
    epoch: int
    store_version: int  # the store's latest
    refused_version: int | None  # a newer store version the cluster could not hold, and why
    refused_reason: str | None
    documents: int
    shards: tuple[ShardState | None, ...]  # None: the shard has not confirmed the served state
    chunks_per_shard: tuple[int, ...]


class Coordinator:
    """Plain class; `actors.remote.CoordinatorActor` subclasses it as a named, detached, threaded actor.

    routers[i] and kvs[i] are handles (Ray actors or plain objects) of shard pair i.
    """

    def __init__(self, *, store: MemoryStore, routers: Sequence[RouterHandle] = (), kvs: Sequence[KVHandle] = (),
                 timeout_s: float = 30.0):
        if len(routers) != len(kvs):
            raise ValueError(f"{len(routers)} router shards but {len(kvs)} kv shards: they come in pairs")
        self.store = store
        self.timeout_s = timeout_s
        self._routers, self._kvs = list(routers), list(kvs)
        self._lock = threading.RLock()  # serialises changes
        self.version = -1  # the version served: every shard holds it
        self.epoch = 0  # the placement epoch served
        self._next_epoch = 1  # epochs are never reused, even for a rebalance that was refused
        self._placement: dict[int, int] = {}  # doc id -> shard, at the served version
        self._chunks: dict[int, int] = {}  # doc id -> chunks, at the served version
        self._acked: dict[int, tuple[int, int]] = {}  # shard -> (version, epoch) it confirmed
        self.refused: tuple[int, str] | None = None
        self._usage_cache: tuple[tuple[int, int, int], list[tuple[int, int, int]]] | None = None  # see shard_usage

    # ------------------------------------------------------------------ shards
    def assignment(self, shard: int) -> Assignment:
        """What a (re)started shard loads from the store."""
        with self._lock:
            if self.version < 0:
                return Assignment(-1, self.epoch, ())
            return Assignment(self.version, self.epoch, tuple(sorted(d for d, s in self._placement.items() if s == shard)))

    def attach(self, routers: Sequence[RouterHandle], kvs: Sequence[KVHandle]) -> int:
        """Serve with these shard pairs (start-up, nodes joined or left): rebalance in a new epoch.

        Refused whole (MemoryFullError) when the new placement does not fit; the old one stays.
        """
        if len(routers) != len(kvs) or not routers:
            raise ValueError(f"{len(routers)} router shards and {len(kvs)} kv shards: need at least one pair, in pairs")
        with self._lock:
            old = (self._routers, self._kvs, self._placement, self._chunks, self._acked)
            self._routers, self._kvs, self._acked = list(routers), list(kvs), {}
            try:
                return self._move_to(self._latest() if self.version < 0 else self.version, rebalance=True)
            except BaseException:
                self._routers, self._kvs, self._placement, self._chunks, self._acked = old
                raise

    def recover(self, routers: Sequence[RouterHandle], kvs: Sequence[KVHandle]) -> int:
        """After a coordinator restart: adopt what the live shards hold, then serve the latest version
        the shards can hold (the store's latest, else the newest one a shard served before).

        A shard that does not answer is skipped: when Ray restarts it, it loads its assignment itself.
        """
        with self._lock:
            self._routers, self._kvs = list(routers), list(kvs)
            held: dict[int, int] = {}
            served: set[int] = set()
            for s, router in enumerate(self._routers):
                try:
                    state, ids = gather([submit(router, "state"), submit(router, "doc_ids")], self.timeout_s)
                    self._next_epoch = max(self._next_epoch, state.epoch + 1)
                    served.add(state.version)
                    for d in ids:
                        held.setdefault(d, s)
                except ShardUnavailableError as e:
                    log.warning("router shard %d did not answer during recovery: %s", s, e)
            self._placement, self._chunks, self.version = held, {}, -1
            latest = self._latest()
            refusal: MemoryFullError | None = None
            for version in [latest, *self._fallbacks(served, latest)]:
                try:
                    self._move_to(version, rebalance=True)
                    break
                except MemoryFullError as e:  # too big for the shards: fall back to what they held before
                    refusal = refusal or e
                except ShardUnavailableError as e:
                    log.warning("recovery is not complete yet (the next sync retries): %s", e)
                    break
            if refusal is not None:
                self.refused = (latest, str(refusal))
            return self.version

    def _fallbacks(self, served: set[int], latest: int, limit: int = 32) -> list[int]:
        """Older versions to try when the latest does not fit: from the newest a shard holds, downwards."""
        top = min(max(served, default=-1), latest - 1)
        kept = set(self.store.versions())
        return [v for v in range(top, max(top - limit, -1), -1) if v in kept]

    def sync(self) -> int:
        """Serve the store's latest version (changes from any writer), or converge shards that lag; returns the served one."""
        with self._lock:
            if self.version < 0 and self._routers:
                return self.recover(self._routers, self._kvs)  # not serving since a restart: start from the shards
            latest = self._latest()
            if latest == self.version and len(self._acked) == len(self._routers) and all(
                    a == (self.version, self.epoch) for a in self._acked.values()):
                return self.version
            try:
                return self._move_to(latest, rebalance=self.version < 0)
            except MemoryFullError as e:
                log.warning("cluster keeps serving version %d: %s", self.version, e)
                return self.version

    def _latest(self) -> int:
        return self.store.latest_version()

    def _move_to(self, version: int, *, rebalance: bool) -> int:
        """Converge every shard to `version` (a new epoch when rebalancing); serve it once all hold it."""
        chunks, placement = self._plan(version, rebalance)
        epoch = self._next_epoch if rebalance else self.epoch
        if rebalance:
            self._next_epoch += 1
        n = len(self._routers)
        assigned = [sorted(d for d, s in placement.items() if s == i) for i in range(n)]
        pending = [submit(self._routers[i], "converge", version, epoch, assigned[i]) for i in range(n)]
        pending += [submit(self._kvs[i], "converge", version, epoch, assigned[i]) for i in range(n)]
        results: list[Any] = []
        errors: list[BaseException] = []
        for p in pending:  # every shard gets its chance; the first refusal is reported
            try:
                results.append(gather([p], self.timeout_s)[0])
            except (MemoryFullError, ShardUnavailableError) as e:
                results.append(None)
                errors.append(e)
        for i in range(n):
            if isinstance(results[i], ShardState):
                self._acked[i] = (results[i].version, results[i].epoch)
        full = [e for e in errors if isinstance(e, MemoryFullError)]
        if full:
            self.refused = (version, str(full[0]))
            raise MemoryFullError(f"the cluster cannot hold store version {version}: {full[0]}") from full[0]
        if errors:
            raise errors[0]
        self.version, self.epoch, self._placement, self._chunks = version, epoch, placement, chunks
        if self.refused is not None and self.refused[0] <= version:
            self.refused = None
        return version

    def _plan(self, version: int, rebalance: bool) -> tuple[dict[int, int], dict[int, int]]:
        """(chunks, placement) of every document live at `version`, moving as few as possible."""
        chunks, placement = dict(self._chunks), dict(self._placement)
        try:
            if self.version < 0 or not self._chunks:
                raise SnapshotGoneError("no served version to start from")
            if version != self.version:
                diff = self.store.diff(self.version, version)
                for d in diff.removed:
                    chunks.pop(d, None)
                    placement.pop(d, None)
                chunks.update(diff.chunks)
        except SnapshotGoneError:  # nothing served yet, or the served version was collected: read it all
            snap = self.store.snapshot(version)
            chunks = {d: snap.info(d, tenant=ALL_TENANTS).num_chunks for d in snap.doc_ids(ALL_TENANTS)}
            return chunks, balance(chunks, len(self._routers), self._placement)
        if rebalance:
            return chunks, balance(chunks, len(self._routers), placement)
        loads = [0] * len(self._routers)
        for d, s in placement.items():
            loads[s] += chunks[d]
        _place([d for d in chunks if d not in placement], chunks, loads, placement)
        return chunks, placement

    # ------------------------------------------------------------------ writes (checked for room first)
    def allocate_ids(self, tenant: str, *, count: int | None = None, client_ids: Sequence[str] | None = None) -> list[int]:
        """Ids for new documents of `tenant` (see MemoryStore.allocate_ids)."""
        return self.store.allocate_ids(tenant, count=count, client_ids=client_ids)

    def insert(self, docs: Iterable[EncodedDocument], *, replace: bool = False, quota: TenantQuota | None = None) -> CommitResult:
        """Commit documents and serve them; refused whole (MemoryFullError, nothing committed) without room,
        and (QuotaExceededError) when a tenant would go over `quota`."""
        docs = list(docs)
        with self._lock:
            self.store.check_writes(docs, live=False)
            if quota is not None:
                quota.check(self.store.snapshot(), docs)
            self._check_room(docs)
            before = self.store.latest_version()
            result = self.store.insert(docs, replace=replace)
            if result.version != before:
                self._serve_or_undo(result, {d.doc_id: d.tenant for d in docs})
            return result

    def update(self, docs: Iterable[EncodedDocument], *, quota: TenantQuota | None = None) -> CommitResult:
        """Replace live documents of their tenants (UnknownDocumentError for any other id)."""
        docs = list(docs)
        with self._lock:
            self.store.check_writes(docs, live=True)
            if quota is not None:
                quota.check(self.store.snapshot(), docs)
            self._check_room(docs)
            result = self.store.update(docs)
            self._serve_or_undo(result, {d.doc_id: d.tenant for d in docs})
            return result

    def delete(self, doc_ids: Iterable[int], *, tenant: str, missing_ok: bool = False) -> CommitResult:
        """Delete documents of `tenant`; visible to the next request once served."""
        doc_ids = [int(i) for i in doc_ids]
        with self._lock:
            snap = self.store.snapshot()
            unknown = [i for i in doc_ids if not snap.holds(i, tenant)]  # a bad tenant: ValueError
            if unknown and not missing_ok:
                raise unknown_documents(unknown, tenant)  # before any room check: bad input is never "full"
            self._refuse_with_backlog()
            result = self.store.delete(doc_ids, tenant=tenant, missing_ok=missing_ok)
            self._serve_or_undo(result, {d: tenant for d in result.deleted})
            return result

    def _check_room(self, docs: list[EncodedDocument]) -> None:
        """MemoryFullError naming the shard when the new documents (and any backlog) would not fit.

        The estimate places documents as `_plan` will: replaced ones stay on their shard, new ones go
        to the least-loaded shard. A shard still answers for itself when it converges.
        """
        self._refuse_with_backlog()
        if not docs:
            return
        # The backlog is empty here (_refuse_with_backlog synced): only these documents are new.
        new = {d.doc_id: d.num_chunks for d in docs}
        extra = [0] * len(self._routers)
        for d, c in new.items():  # a new version of a placed document stays where it is
            if d in self._placement:
                extra[self._placement[d]] += c
        fresh = {d: c for d, c in new.items() if d not in self._placement}
        loads = [a + b for a, b in zip(self._loads(), extra)]
        placed: dict[int, int] = {}
        _place(fresh, fresh, loads, placed)
        for d, s in placed.items():
            extra[s] += fresh[d]
        room = gather([submit(r, "headroom_bytes") for r in self._routers], self.timeout_s)
        row = _chunk_bytes(docs[0])
        for i, (free, need) in enumerate(zip(room, extra)):
            if free is not None and need * row > free:
                raise MemoryFullError(f"router shard {i} has room for {max(free, 0) // row} more chunks, and this write "
                                      f"needs {need}; nothing was written. Add router shards (nodes) or raise the capacity")

    def _refuse_with_backlog(self) -> None:
        """Writes wait behind a store version the cluster could not hold: refuse them until it fits."""
        if self.store.latest_version() != self.version:
            self.sync()
        if self.refused is not None and self.refused[0] > self.version:
            raise MemoryFullError(f"the cluster serves version {self.version} and cannot hold store version "
                                  f"{self.refused[0]} ({self.refused[1]}); nothing was written. Add router shards "
                                  "(nodes) or raise the capacity")

    def _serve_or_undo(self, result: CommitResult, tenants: dict[int, str]) -> None:
        """Serve a committed write; if the cluster cannot hold it (a writer raced the room check),
        commit its inverse, so the write is refused whole, and raise MemoryFullError."""
        try:
            self._move_or_raise(result.version)
        except MemoryFullError:
            old = self.store.snapshot(self.version)
            for tenant in sorted(set(tenants.values())):
                added = [d for d in result.inserted if tenants.get(d) == tenant]
                if added:
                    self.store.delete(added, tenant=tenant, missing_ok=True)
                back = [d for d in (*result.replaced, *result.deleted) if tenants.get(d) == tenant and old.holds(d, tenant)]
                if back:
                    self.store.insert(old.documents(back, tenant=tenant), replace=True)
            self.sync()
            raise

    def _move_or_raise(self, version: int) -> None:
        """Serve `version` now: MemoryFullError if some shard refuses, ShardUnavailableError if one is down."""
        if version > self.version:
            try:
                self._move_to(version, rebalance=self.version < 0)
            except ShardUnavailableError as e:  # committed; served once the shard is back (the poll retries)
                log.warning("version %d is committed but not served yet: %s", version, e)

    # ------------------------------------------------------------------ queries
    def view(self) -> ClusterView:
        """The version and placement epoch served, and the shard handles: what a request pins."""
        with self._lock:
            if self.version < 0:
                raise ShardUnavailableError("the memory cluster is starting or recovering: no version is served yet")
            return ClusterView(self.version, tuple(self._routers), tuple(self._kvs), self.timeout_s, self.epoch)

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int, tenants: Sequence[str]) -> Retrieval:
        """Coordinator-side fan-out (the alternative to generator-side; see BENCHMARKS.md)."""
        return fan_out(self.view(), layer, query, top_k, tenants)

    def texts(self, doc_ids: Sequence[int], tenant: str, version: int | None = None) -> dict[int, str]:
        view = self.view()
        return fetch_texts(view, doc_ids, tenant, view.version if version is None else version)

    # ------------------------------------------------------------------ the memory API's reads (store's latest)
    def usage(self, tenant: str) -> tuple[int, int]:
        """(live documents, their tokens) of `tenant` at the store's latest version."""
        return self.store.snapshot().usage().get(check_tenant(tenant), (0, 0))

    def documents(self, tenant: str, *, after: int = -1, limit: int = 100) -> list[DocInfo]:
        """A page of `tenant`'s live documents at the store's latest version: ids > `after`, ascending."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        snap = self.store.snapshot()
        ids = snap.doc_ids(tenant)
        start = bisect.bisect_right(ids, after)
        return [snap.info(i, tenant) for i in ids[start : start + limit]]

    def document(self, doc_id: int, tenant: str) -> tuple[DocInfo, str | None]:
        """One live document of `tenant` and its text (UnknownDocumentError for any other id)."""
        snap = self.store.snapshot()
        info = snap.info(int(doc_id), tenant)
        return info, snap.texts([info.doc_id], tenant).get(info.doc_id)

    def infos(self, doc_ids: Sequence[int], tenant: str, version: int | None = None) -> dict[int, DocInfo]:
        """What the store knows of those of `doc_ids` that `tenant` holds at `version` (latest by default)."""
        snap = self.store.snapshot(version)
        return {i: snap.info(i, tenant) for i in dict.fromkeys(int(d) for d in doc_ids) if snap.holds(i, tenant)}

    def resolve(self, client_ids: Sequence[str], tenant: str) -> dict[str, int]:
        """{client id: doc id} of the client ids live for `tenant` at the store's latest version."""
        return self.store.snapshot().resolve(list(client_ids), tenant)

    def shard_usage(self) -> list[tuple[int, int, int]]:
        """(documents, tokens, chunks) placed on each shard at the served version (cached per version and epoch)."""
        with self._lock:
            key, placement, version = (self.version, self.epoch, len(self._routers)), dict(self._placement), self.version
        cached = self._usage_cache
        if cached is not None and cached[0] == key:
            return list(cached[1])
        out = [[0, 0, 0] for _ in range(key[2])]
        if version >= 0:
            snap = self.store.snapshot(version)
            for doc_id, shard in placement.items():
                info = snap.info(doc_id, ALL_TENANTS)
                row = out[shard]
                row[0], row[1], row[2] = row[0] + 1, row[1] + info.num_tokens, row[2] + info.num_chunks
        usage = [(a, b, c) for a, b, c in out]
        self._usage_cache = (key, usage)
        return list(usage)

    def _loads(self) -> list[int]:
        """Chunks placed on each shard at the served version."""
        loads = [0] * len(self._routers)
        for d, s in self._placement.items():
            loads[s] += self._chunks.get(d, 0)
        return loads

    def ready(self) -> int:
        """The version served (-1 while starting or recovering): also a liveness probe."""
        return self.version

    def placement(self) -> dict[int, int]:
        with self._lock:
            return dict(self._placement)

    def status(self) -> ClusterStatus:
        with self._lock:
            loads = self._loads()
            shards = tuple(ShardState(i, *self._acked[i], sum(1 for s in self._placement.values() if s == i))
                           if self._acked.get(i) == (self.version, self.epoch) else None for i in range(len(self._routers)))
            return ClusterStatus(self.version, self.epoch, self._latest(), self.refused[0] if self.refused else None,
                                 self.refused[1] if self.refused else None, len(self._placement), shards, tuple(loads))

    def stats(self) -> dict[str, Any]:
        s = self.status()
        return {"version": s.version, "epoch": s.epoch, "documents": s.documents, "shards": len(s.shards),
                "chunks_per_shard": list(s.chunks_per_shard), "refused_version": s.refused_version}


def _chunk_bytes(doc: EncodedDocument) -> int:
    """Bytes of one chunk of router keys across all routing layers."""
    rk = doc.router_keys
    return int(rk.shape[0] * rk.shape[2] * rk.shape[3] * torch.empty(0, dtype=rk.dtype).element_size())
