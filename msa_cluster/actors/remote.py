"""Thin Ray actor wrappers over the plain role classes. No logic here beyond wiring.

Each shard actor loads its own state at start-up: it asks the coordinator (a named actor) for
its assignment and reads the keys from the store. So Ray can restart a killed shard on any
node and it comes back with every committed document: nothing lives only in Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import Coordinator
from msa_cluster.actors.kv_shard import KVShard
from msa_cluster.actors.memory import ClusterMemory
from msa_cluster.actors.router_shard import RouterShard
from msa_cluster.storage_adapters import MemoryStore
from msa_cluster.types import ModelFingerprint

__all__ = ["CoordinatorActor", "RouterShardActor", "KVShardActor", "GeneratorActor", "EncoderActor", "shard_names"]

log = logging.getLogger(__name__)


def shard_names(cluster: str, shard: int) -> tuple[str, str]:
    return f"{cluster}-router-{shard}", f"{cluster}-kv-{shard}"


def _open(store_url: str, fingerprint: ModelFingerprint, storage_options: dict | None) -> MemoryStore:
    return MemoryStore.open(store_url, fingerprint, storage_options=storage_options)


@ray.remote
class CoordinatorActor:
    """Named, detached, threaded; on a restart it finds its shards by name and reloads them."""

    def __init__(self, cluster: str, store_url: str, fingerprint: ModelFingerprint, storage_options: dict | None = None,
                 timeout_s: float = 30.0, namespace: str | None = None):
        self.cluster, self.namespace = cluster, namespace
        self.impl = Coordinator(_open(store_url, fingerprint, storage_options), timeout_s=timeout_s)
        routers, kvs = self._find_shards()
        if routers:  # a restart: the shards outlived the old coordinator; adopt what they hold
            self.impl.recover(routers, kvs)

    def _find_shards(self):
        routers, kvs = [], []
        while True:
            try:
                pair = [ray.get_actor(name, namespace=self.namespace) for name in shard_names(self.cluster, len(routers))]
            except ValueError:  # no actor of that name: the pairs end here (or this is the first start)
                return routers, kvs
            routers.append(pair[0])
            kvs.append(pair[1])

    def attach(self, routers: list, kvs: list, load: bool = True) -> int:
        return self.impl.attach(routers, kvs, load)

    def assignment(self, shard: int):
        return self.impl.assignment(shard)

    def plan(self, num_shards: int) -> int:
        return self.impl.plan(num_shards)

    def sync(self) -> int:
        return self.impl.sync()

    def insert(self, docs, replace: bool = False):
        return self.impl.insert(docs, replace=replace)

    def delete(self, doc_ids, tenant=None, missing_ok: bool = False):
        return self.impl.delete(doc_ids, tenant=tenant, missing_ok=missing_ok)

    def view(self):
        return self.impl.view()

    def retrieve(self, layer, query, top_k, tenants, versions=None):
        return self.impl.retrieve(layer, query, top_k, tenants, versions)

    def texts(self, doc_ids, tenant, version=None):
        return self.impl.texts(doc_ids, tenant, version)

    def placement(self):
        return self.impl.placement()

    def stats(self):
        return self.impl.stats()


class _ShardBase:
    def _assignment(self, coordinator: str, shard_id: int, timeout_s: float, namespace: str | None):
        return call(ray.get_actor(coordinator, namespace=namespace), "assignment", shard_id, timeout_s=timeout_s)


@ray.remote
class RouterShardActor(_ShardBase):
    def __init__(self, shard_id: int, coordinator: str, store_url: str, fingerprint: ModelFingerprint,
                 storage_options: dict | None = None, capacity_bytes: int | None = None, grace_s: float = 300.0,
                 timeout_s: float = 30.0, namespace: str | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        store = _open(store_url, fingerprint, storage_options)
        self.impl = RouterShard(shard_id, fingerprint.routing_layers, capacity_bytes, device, grace_s, store=store)
        version, doc_ids = self._assignment(coordinator, shard_id, timeout_s, namespace)
        if version >= 0:
            self.impl.reset(version, doc_ids)

    def ready(self) -> int:
        return self.impl.version

    def score(self, layer, query, top_k, tenants, versions):
        return self.impl.score(layer, query, top_k, tenants, versions)

    def update(self, version, added_ids, removed_ids):
        return self.impl.update(version, added_ids, removed_ids)

    def reset(self, version, doc_ids):
        return self.impl.reset(version, doc_ids)

    def doc_ids(self):
        return self.impl.doc_ids()

    def stats(self):
        return {**self.impl.stats(), "node": ray.get_runtime_context().get_node_id()}


@ray.remote
class KVShardActor(_ShardBase):
    def __init__(self, shard_id: int, coordinator: str, store_url: str, fingerprint: ModelFingerprint,
                 storage_options: dict | None = None, budget_bytes: int = 1 << 30, timeout_s: float = 30.0,
                 namespace: str | None = None):
        self.impl = KVShard(shard_id, _open(store_url, fingerprint, storage_options), budget_bytes)
        version, doc_ids = self._assignment(coordinator, shard_id, timeout_s, namespace)
        if version >= 0:
            self.impl.sync(version, doc_ids)

    def ready(self) -> int:
        return self.impl.version

    def sync(self, version, doc_ids=(), prefetch: bool = False):
        return self.impl.sync(version, doc_ids, prefetch)

    def fetch(self, layer, doc_ids, version):
        return self.impl.fetch(layer, doc_ids, version)

    def texts(self, doc_ids, version, tenant):
        return self.impl.texts(doc_ids, version, tenant)

    def stats(self):
        return {**self.impl.stats(), "node": ray.get_runtime_context().get_node_id()}


@ray.remote
class GeneratorActor:
    """The model and a batching ClusterMemory; run with max_concurrency > 1 to batch requests."""

    def __init__(self, checkpoint: str, coordinator: str, batch_window_s: float = 0.002, timeout_s: float = 30.0,
                 retries: int = 3, dtype: Any = None, namespace: str | None = None):
        from msa_cluster.actors.generator import Generator  # the model stack loads only where it runs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        memory = ClusterMemory(ray.get_actor(coordinator, namespace=namespace), timeout_s=timeout_s, batch_window_s=batch_window_s, retries=retries)
        self.impl = Generator.from_checkpoint(checkpoint, memory, dtype=dtype, device=device)

    def answer(self, question: str, tenant: str, config=None):
        return self.impl.answer(question, tenant, config)

    def prefill_selection(self, input_ids, routing_mask, tenant):
        return self.impl.prefill_selection(input_ids, routing_mask, tenant)

    def stats(self):
        return self.impl.stats()


@ray.remote
class EncoderActor:
    def __init__(self, checkpoint: str, **kw):
        from msa_cluster.actors.encoder import Encoder

        self.impl = Encoder.from_checkpoint(checkpoint, **kw)

    def encode(self, rows):
        return self.impl.encode(rows)
