"""Ray actors of the memory tier: each role's plain class, subclassed with an `__init__` that loads it from the store.

This is Ray's own pattern (`PrefixTreeActor(PrefixTree)`): the methods are the plain class's,
unit-tested without Ray. A (re)started shard asks the coordinator (a named actor) for its
assignment and reads its keys from the store, so Ray can restart a killed shard on any node and
it comes back with every committed document: nothing lives only in Ray.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
import torch

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import Assignment, Coordinator
from msa_cluster.actors.kv_shard import KVShard
from msa_cluster.actors.router_shard import RouterShard
from msa_cluster.storage_adapters import MemoryStore
from msa_cluster.types import ModelFingerprint

__all__ = ["CoordinatorActor", "RouterShardActor", "KVShardActor", "shard_names"]

log = logging.getLogger(__name__)


def shard_names(cluster: str, shard: int) -> tuple[str, str]:
    return f"{cluster}-router-{shard}", f"{cluster}-kv-{shard}"


def _open(store_url: str, fingerprint: ModelFingerprint, storage_options: dict[str, Any] | None) -> MemoryStore:
    return MemoryStore.open(store_url, fingerprint, storage_options=storage_options)


def _assignment(coordinator: str, shard_id: int, timeout_s: float, namespace: str | None) -> Assignment:
    assignment: Assignment = call(ray.get_actor(coordinator, namespace=namespace), "assignment", shard_id, timeout_s=timeout_s)
    return assignment


@ray.remote
class CoordinatorActor(Coordinator):
    """Named, detached, threaded. On a restart it finds its shards by name and converges them.

    A background thread syncs every `poll_s` seconds: commits by other writers (an ingestion
    job) are served within that bound, and shards that missed a change catch up.
    """

    def __init__(self, *, cluster: str, store_url: str, fingerprint: ModelFingerprint,
                 storage_options: dict[str, Any] | None = None, timeout_s: float = 30.0, namespace: str | None = None,
                 poll_s: float = 2.0):
        super().__init__(store=_open(store_url, fingerprint, storage_options), timeout_s=timeout_s)
        self.cluster, self.namespace = cluster, namespace
        self._where = {"store_url": store_url, "fingerprint": fingerprint}
        routers, kvs = self._find_shards()
        # A restart: the shards outlived the old coordinator. Recovery runs on the poll thread, not here:
        # restarting shards ask this actor for their assignment while it recovers, so it must answer.
        self._routers, self._kvs = routers, kvs
        self._stop = threading.Event()
        threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="coordinator-poll").start()

    def describe(self) -> dict[str, Any]:
        """The store this cluster serves and the model fingerprint (for `MemoryCluster.connect`)."""
        return dict(self._where)

    def _find_shards(self) -> tuple[list[Any], list[Any]]:
        routers: list[Any] = []
        kvs: list[Any] = []
        while True:
            try:
                pair = [ray.get_actor(name, namespace=self.namespace) for name in shard_names(self.cluster, len(routers))]
            except ValueError:  # no actor of that name: the pairs end here (or this is the first start)
                return routers, kvs
            routers.append(pair[0])
            kvs.append(pair[1])

    def _poll(self, every_s: float) -> None:
        """Recover at once after a restart, then serve new commits every `every_s` (0: recovery only)."""
        from ray.util.metrics import Gauge

        gauges = {name: Gauge(f"msa_cluster_{name}", description=text, tag_keys=("cluster",)) for name, text in (
            ("served_version", "store version the memory cluster serves (-1 while starting or recovering)"),
            ("store_version", "latest committed store version"),
            ("refused_version", "a newer store version the cluster could not hold (-1: none)"),
        )}
        per_shard = {name: Gauge(f"msa_cluster_{name}", description=text, tag_keys=("cluster", "shard")) for name, text in (
            ("shard_documents", "documents placed on the shard pair at the served version"),
            ("shard_tokens", "tokens of the documents placed on the shard pair"),
            ("shard_chunks", "router-key chunks placed on the shard pair"),
            ("kv_tier_hits", "K/V RAM-tier hits since the KV shard started"),
            ("kv_tier_misses", "K/V RAM-tier misses (reads from the store) since the KV shard started"),
            ("kv_tier_evictions", "K/V RAM-tier evictions since the KV shard started"),
            ("kv_tier_bytes", "bytes held in the K/V RAM tier"),
        )}
        wait = 0.0
        while not self._stop.wait(wait):
            wait = every_s or 1.0
            try:
                if self._routers and (every_s > 0 or self.version < 0):
                    self.sync()
                status = self.status()
                for name, value in (("served_version", status.version), ("store_version", status.store_version),
                                    ("refused_version", -1 if status.refused_version is None else status.refused_version)):
                    gauges[name].set(value, tags={"cluster": self.cluster})
                self._export_shards(per_shard)
            except Exception as e:  # the next round retries; a failed poll must not end the thread
                log.warning("coordinator poll: %s: %s", type(e).__name__, e)


    def _export_shards(self, gauges: dict[str, Any]) -> None:
        """Per-shard documents, tokens and chunks, and each KV shard's RAM-tier counters."""
        for shard, (docs, tokens, chunks) in enumerate(self.shard_usage()):
            tags = {"cluster": self.cluster, "shard": str(shard)}
            for name, value in (("shard_documents", docs), ("shard_tokens", tokens), ("shard_chunks", chunks)):
                gauges[name].set(value, tags=tags)
        for shard, kv in enumerate(list(self._kvs)):
            try:
                tier = call(kv, "stats", timeout_s=self.timeout_s).get("tier")
            except Exception as e:  # a shard restarting: its counters are exported on the next poll
                log.info("kv shard %d stats: %s", shard, e)
                continue
            if tier:
                tags = {"cluster": self.cluster, "shard": str(shard)}
                for name in ("hits", "misses", "evictions", "bytes"):
                    gauges[f"kv_tier_{name}"].set(tier[name], tags=tags)


@ray.remote
class RouterShardActor(RouterShard):
    def __init__(self, *, shard_id: int, coordinator: str, store_url: str, fingerprint: ModelFingerprint,
                 storage_options: dict[str, Any] | None = None, capacity_bytes: int | None = None, grace_s: float = 300.0,
                 timeout_s: float = 30.0, namespace: str | None = None, kv_budget_bytes: int = 1 << 30):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(shard_id=shard_id, routing_layers=fingerprint.routing_layers,
                         store=_open(store_url, fingerprint, storage_options), capacity_bytes=capacity_bytes,
                         device=device, grace_s=grace_s, kv_budget_bytes=kv_budget_bytes)
        _load_assignment(self, coordinator, shard_id, timeout_s, namespace)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "node": ray.get_runtime_context().get_node_id()}


@ray.remote
class KVShardActor(KVShard):
    def __init__(self, *, shard_id: int, coordinator: str, store_url: str, fingerprint: ModelFingerprint,
                 storage_options: dict[str, Any] | None = None, budget_bytes: int = 1 << 30, timeout_s: float = 30.0,
                 namespace: str | None = None):
        super().__init__(shard_id=shard_id, store=_open(store_url, fingerprint, storage_options), budget_bytes=budget_bytes)
        _load_assignment(self, coordinator, shard_id, timeout_s, namespace)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "node": ray.get_runtime_context().get_node_id()}


def _load_assignment(shard: RouterShard | KVShard, coordinator: str, shard_id: int, timeout_s: float,
                     namespace: str | None) -> None:
    """A (re)started shard loads what the coordinator says it holds; failures leave it for the next sync."""
    try:
        a = _assignment(coordinator, shard_id, timeout_s, namespace)
        if a.version >= 0:
            shard.converge(a.version, a.epoch, a.doc_ids)
    except Exception as e:  # an empty shard answers StaleShardError until the coordinator converges it
        log.warning("shard %d starts empty (%s: %s); the coordinator's next sync loads it", shard_id, type(e).__name__, e)
