"""Bringing the memory cluster up on Ray: placement groups, shard pairs, the coordinator.

Each shard pair (router shard i + KV shard i) gets a STRICT_PACK placement group of two
bundles, so both land on one node: the router bundle takes a GPU when the cluster has GPUs,
the KV bundle only CPU and RAM. One pair per GPU by default, else one per alive node.
`shard_resources` adds custom resources to a pair's bundles (e.g. to pin pairs to nodes or
to node groups); Ray reschedules a lost pair's group on any node that has room.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import ClusterStatus
from msa_cluster.actors.memory import ClusterMemory
from msa_cluster.actors.remote import CoordinatorActor, KVShardActor, RouterShardActor, shard_names
from msa_cluster.storage_adapters import CommitResult
from msa_cluster.types import EncodedDocument, ModelFingerprint

__all__ = ["ClusterSpec", "MemoryCluster"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSpec:
    """How to lay the memory cluster out (validated on construction)."""

    name: str = "msa"
    namespace: str = "msa"  # Ray namespace of the named actors, so other jobs (serve, ingest) find them
    num_shards: int | None = None  # default: one pair per GPU, else one per alive node
    use_gpus: bool | None = None  # default: when the cluster has GPUs
    cpus_per_actor: float = 0.25
    router_capacity_bytes: int | None = None
    kv_budget_bytes: int = 1 << 30
    grace_s: float = 300.0
    timeout_s: float = 30.0  # every call on the query path
    start_timeout_s: float = 300.0  # actors starting (imports, loading keys from the store)
    write_timeout_s: float = 300.0  # a write: the store commit and every shard loading it
    poll_s: float = 2.0  # the coordinator serves other writers' commits (an ingestion job) within this bound
    shard_resources: Sequence[dict[str, float]] = field(default_factory=tuple)  # per pair, cycled

    def __post_init__(self) -> None:
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.cpus_per_actor <= 0 or self.timeout_s <= 0 or self.write_timeout_s <= 0:
            raise ValueError("cpus_per_actor, timeout_s and write_timeout_s must be > 0")
        if self.poll_s < 0 or self.grace_s < 0:
            raise ValueError(f"poll_s ({self.poll_s}) and grace_s ({self.grace_s}) must be >= 0")


class MemoryCluster:
    """A running memory cluster: coordinator + shard pairs, addressed by name.

    Example:
        >>> ray.init()                                                               # doctest: +SKIP
        >>> cluster = MemoryCluster.start("s3://bucket/memory", model.fingerprint())  # doctest: +SKIP
        >>> out = model.prefill(ids, cluster.memory(), routing_mask)                  # doctest: +SKIP
    """

    def __init__(self, spec: ClusterSpec, store_url: str, fingerprint: ModelFingerprint, storage_options: dict | None):
        self.spec, self.store_url, self.fingerprint, self.storage_options = spec, store_url, fingerprint, storage_options
        self.coordinator: Any = None
        self.routers: list[Any] = []
        self.kvs: list[Any] = []
        self.groups: list[Any] = []

    @property
    def coordinator_name(self) -> str:
        return f"{self.spec.name}-coordinator"

    @classmethod
    def start(cls, store_url: str, fingerprint: ModelFingerprint, spec: ClusterSpec = ClusterSpec(),
              storage_options: dict | None = None) -> MemoryCluster:
        """Start the coordinator (named, detached) and the shard pairs; wait until all are loaded."""
        self = cls(spec, store_url, fingerprint, storage_options)
        use_gpus = self._use_gpus()
        n = spec.num_shards or self._default_shards(use_gpus)
        self.coordinator = CoordinatorActor.options(  # type: ignore[attr-defined]
            name=self.coordinator_name, namespace=spec.namespace, lifetime="detached", max_restarts=-1, max_concurrency=32,
            num_cpus=spec.cpus_per_actor,
        ).remote(cluster=spec.name, store_url=store_url, fingerprint=fingerprint, storage_options=storage_options,
                 timeout_s=spec.timeout_s, namespace=spec.namespace, poll_s=spec.poll_s)
        call(self.coordinator, "ready", timeout_s=spec.start_timeout_s)  # named and answering before shards ask it
        self._add_pairs(range(n), use_gpus)
        call(self.coordinator, "attach", self.routers, self.kvs, timeout_s=spec.start_timeout_s)
        return self

    @classmethod
    def connect(cls, spec: ClusterSpec = ClusterSpec(), storage_options: dict | None = None) -> MemoryCluster:
        """The running cluster named `spec.name` in `spec.namespace` (ValueError if there is none)."""
        from ray.util import get_placement_group

        coordinator = ray.get_actor(f"{spec.name}-coordinator", namespace=spec.namespace)
        info = call(coordinator, "describe", timeout_s=spec.timeout_s)
        self = cls(spec, info["store_url"], info["fingerprint"], storage_options)
        self.coordinator = coordinator
        while True:
            try:
                pair = [ray.get_actor(n, namespace=spec.namespace) for n in shard_names(spec.name, len(self.routers))]
            except ValueError:
                break
            self.groups.append(get_placement_group(f"{spec.name}-pair-{len(self.routers)}"))
            self.routers.append(pair[0])
            self.kvs.append(pair[1])
        return self

    def _use_gpus(self) -> bool:
        if self.spec.use_gpus is not None:
            return self.spec.use_gpus
        return ray.cluster_resources().get("GPU", 0) >= 1

    def _default_shards(self, use_gpus: bool) -> int:
        if use_gpus:
            return int(ray.cluster_resources()["GPU"])
        return max(1, sum(1 for node in ray.nodes() if node["Alive"]))

    def _add_pairs(self, shards: Sequence[int], use_gpus: bool) -> None:
        spec = self.spec
        new_routers, new_kvs = [], []
        for s in shards:
            extra = dict(spec.shard_resources[s % len(spec.shard_resources)]) if spec.shard_resources else {}
            router_bundle = {"CPU": spec.cpus_per_actor, **extra}
            if use_gpus:
                router_bundle["GPU"] = 1
            pg = placement_group([router_bundle, {"CPU": spec.cpus_per_actor, **extra}], strategy="STRICT_PACK",
                                 lifetime="detached", name=f"{spec.name}-pair-{s}")
            ray.get(pg.ready(), timeout=spec.start_timeout_s)
            common = dict(max_restarts=-1, max_concurrency=8, num_cpus=spec.cpus_per_actor, lifetime="detached",
                          namespace=spec.namespace)
            rname, kname = shard_names(spec.name, s)
            where = dict(coordinator=self.coordinator_name, store_url=self.store_url, fingerprint=self.fingerprint,
                         storage_options=self.storage_options, timeout_s=spec.start_timeout_s, namespace=spec.namespace)
            router = RouterShardActor.options(  # type: ignore[attr-defined]
                name=rname, num_gpus=1 if use_gpus else 0, resources=extra or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0), **common,
            ).remote(shard_id=s, capacity_bytes=spec.router_capacity_bytes, grace_s=spec.grace_s,
                     kv_budget_bytes=spec.kv_budget_bytes, **where)
            kv = KVShardActor.options(  # type: ignore[attr-defined]
                name=kname, resources=extra or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1), **common,
            ).remote(shard_id=s, budget_bytes=spec.kv_budget_bytes, **where)
            self.groups.append(pg)
            new_routers.append(router)
            new_kvs.append(kv)
        ray.get([a.ready.remote() for a in new_routers + new_kvs], timeout=spec.start_timeout_s)
        self.routers += new_routers
        self.kvs += new_kvs

    def memory(self, batch_window_s: float = 0.0, retries: int = 3) -> ClusterMemory:
        """A MemoryBackend for a model in this process (a driver, a Serve replica, a test)."""
        return ClusterMemory(self.coordinator, timeout_s=self.spec.timeout_s, batch_window_s=batch_window_s, retries=retries)

    # ------------------------------------------------------------------ writes (through the coordinator)
    def allocate_ids(self, tenant: str, *, count: int | None = None, client_ids: Sequence[str] | None = None) -> list[int]:
        """Ids for new documents of `tenant`, to encode them with (see MemoryStore.allocate_ids)."""
        ids: list[int] = call(self.coordinator, "allocate_ids", tenant, count=count, client_ids=client_ids,
                              timeout_s=self.spec.write_timeout_s)
        return ids

    def insert(self, docs: Sequence[EncodedDocument], *, replace: bool = False) -> CommitResult:
        """Commit and serve documents; MemoryFullError (nothing written) when the router tier has no room."""
        result: CommitResult = call(self.coordinator, "insert", list(docs), replace=replace, timeout_s=self.spec.write_timeout_s)
        return result

    def update(self, docs: Sequence[EncodedDocument]) -> CommitResult:
        """Replace live documents of their tenants (UnknownDocumentError for any other id)."""
        result: CommitResult = call(self.coordinator, "update", list(docs), timeout_s=self.spec.write_timeout_s)
        return result

    def delete(self, doc_ids: Sequence[int], *, tenant: str, missing_ok: bool = False) -> CommitResult:
        """Delete documents of `tenant`; the next request no longer sees them."""
        result: CommitResult = call(self.coordinator, "delete", list(doc_ids), tenant=tenant, missing_ok=missing_ok,
                                    timeout_s=self.spec.write_timeout_s)
        return result

    def sync(self) -> int:
        """Serve the store's latest version now (other writers' commits); returns the version served."""
        version: int = call(self.coordinator, "sync", timeout_s=self.spec.write_timeout_s)
        return version

    def status(self) -> ClusterStatus:
        """Served and latest store versions, a refused version if any, and each shard's state."""
        status: ClusterStatus = call(self.coordinator, "status", timeout_s=self.spec.timeout_s)
        return status

    def scale(self, num_shards: int) -> int:
        """Grow or shrink to `num_shards` pairs (nodes joined or leaving); documents are rebalanced."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        current = len(self.routers)
        if num_shards > current:
            self._add_pairs(range(current, num_shards), self._use_gpus())
            version: int = call(self.coordinator, "attach", self.routers, self.kvs, timeout_s=self.spec.start_timeout_s)
            return version
        version = call(self.coordinator, "attach", self.routers[:num_shards], self.kvs[:num_shards],
                       timeout_s=self.spec.start_timeout_s)
        for actor in self.routers[num_shards:] + self.kvs[num_shards:]:
            ray.kill(actor, no_restart=True)
        for pg in self.groups[num_shards:]:
            remove_placement_group(pg)
        del self.routers[num_shards:], self.kvs[num_shards:], self.groups[num_shards:]
        return version

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until every shard answers (e.g. after a node was lost and Ray restarted them)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get([a.ready.remote() for a in self.routers + self.kvs], timeout=max(deadline - time.monotonic(), 0.1))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def shutdown(self) -> None:
        """Stop every actor and release the placement groups. The store is untouched."""
        for actor in [self.coordinator, *self.routers, *self.kvs]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)
        self.routers, self.kvs, self.groups, self.coordinator = [], [], [], None
