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


def allocate_like(store, docs):
    """Allocate each document's id to its tenant, in id order (the ids the documents were encoded with)."""
    for d in sorted(docs, key=lambda d: d.doc_id):
        got = store.allocate_ids(d.tenant, count=1)
        assert got == [d.doc_id], (got, d.doc_id)


def store_with(model, docs, url=None):
    store = MemoryStore.open(url or f"memory://actors-{next(_ids)}", model.fingerprint(), create=True)
    if docs:
        allocate_like(store, docs)
        store.insert(docs)
    return store


def router(store, model, shard_id, **kw):
    return RouterShard(shard_id=shard_id, routing_layers=model.config.routing_layers, store=store, **kw)


def kv(store, shard_id):
    return KVShard(shard_id=shard_id, store=store, budget_bytes=1 << 20)


def plain_cluster(store, model, shards, **router_kw):
    """Coordinator + shard pairs as plain objects in this process."""
    routers = [router(store, model, i, **router_kw) for i in range(shards)]
    kvs = [kv(store, i) for i in range(shards)]
    coord = Coordinator(store=store, routers=routers, kvs=kvs)
    coord.attach(routers, kvs)
    return coord, routers, kvs


def tiny_model():
    return make_model(seed=51, top_k=3)
