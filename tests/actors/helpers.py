"""Shared set-up for the actor tests: a tiny model, an encoded corpus in a store."""

from __future__ import annotations

import itertools

from msa_cluster.actors.coordinator import Coordinator
from msa_cluster.actors.kv_shard import KVShard
from msa_cluster.actors.router_shard import RouterShard
from msa_cluster.storage_adapters import MemoryStore
from tests.model.helpers import make_model, random_docs

_ids = itertools.count()
TENANTS = ["acme", "globex"]


def corpus(model, n=24, seed=5):
    lengths = [3 + (i * 37) % 61 for i in range(n)]
    docs = random_docs(lengths, model.config.vocab_size, seed=seed)
    return model.encode_documents(
        docs, texts=[f"text of document {i}" for i in range(n)], tenants=[TENANTS[i % 2] for i in range(n)]
    )


def store_with(model, docs, url=None):
    store = MemoryStore.open(url or f"memory://actors-{next(_ids)}", model.fingerprint(), create=True)
    if docs:
        store.insert(docs)
    return store


def plain_cluster(store, model, shards):
    """Coordinator + shard pairs as plain objects in this process."""
    routers = [RouterShard(i, model.config.routing_layers, store=store) for i in range(shards)]
    kvs = [KVShard(i, store, budget_bytes=1 << 20) for i in range(shards)]
    coord = Coordinator(store, routers, kvs)
    coord.attach(routers, kvs)
    return coord, routers, kvs


def tiny_model():
    return make_model(seed=51, top_k=3)
