"""The cluster roles as plain classes (no Ray): exactness vs InProcessMemory, online changes, tenants."""

import math

import pytest
import torch

from msa_cluster.actors.coordinator import Coordinator, balance
from msa_cluster.actors.memory import ClusterMemory
from msa_cluster.actors.router_shard import RouterShard
from msa_cluster.kernels.routing import prepare_queries
from msa_cluster.model import InProcessMemory
from msa_cluster.model.generation import GenerationConfig, generate
from msa_cluster.types import MemoryFullError, SnapshotGoneError, StaleShardError
from tests.actors.helpers import plain_cluster, store_with
from tests.model.helpers import random_prompt


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 30])
def test_distributed_equals_local(model, docs, shards):
    """Any shard count (even more shards than documents) gives InProcessMemory's selections, logits and tokens."""
    store = store_with(model, docs)
    local = InProcessMemory(store.snapshot().documents())
    coord, _, _ = plain_cluster(store, model, shards)
    cluster = ClusterMemory(coord)
    for tenant in ("acme", "globex"):
        for seed in (2, 3):
            ids, mask = random_prompt(model, 12, seed=seed)
            a = model.prefill(ids, local, mask, tenant=tenant)
            b = model.prefill(ids, cluster, mask, tenant=tenant)
            assert a.selected == b.selected and a.scores == b.scores
            assert torch.equal(a.logits, b.logits)
    cfg = GenerationConfig(max_new_tokens=5)
    assert generate(model, ids, local, mask, cfg, tenant="acme").tokens == generate(model, ids, cluster, mask, cfg, tenant="acme").tokens


def test_placement_is_balanced_by_chunks(model, docs):
    """Least-loaded placement keeps shards within one largest document of each other."""
    chunks = {d.doc_id: d.num_chunks for d in docs}
    placed = balance(chunks, 3)
    loads = [sum(c for d, c in chunks.items() if placed[d] == s) for s in range(3)]
    assert max(loads) - min(loads) <= max(chunks.values())
    assert balance(chunks, 3) == placed  # deterministic
    with pytest.raises(ValueError, match="at least one shard"):
        balance(chunks, 0)


def test_online_insert_and_delete(model, docs):
    """Inserts become routable and deletes vanish for the next request; a pinned snapshot keeps its view."""
    store = store_with(model, docs[:10])
    coord, _, _ = plain_cluster(store, model, 2)
    cluster = ClusterMemory(coord)
    ids, mask = random_prompt(model, 12)
    before = cluster.snapshot("acme")
    coord.insert(docs[10:])
    full = InProcessMemory(docs)
    assert model.prefill(ids, cluster, mask, tenant="acme").selected == model.prefill(ids, full, mask, tenant="acme").selected
    winner = model.prefill(ids, cluster, mask, tenant="acme").selected[2][0]
    coord.delete([winner])
    after = model.prefill(ids, cluster, mask, tenant="acme")
    assert all(winner not in s for s in after.selected.values())
    old = model.prefill(ids, before, mask)  # pinned at the first version: only docs[:10]
    assert all(d < 10 for s in old.selected.values() for d in s)


def test_external_writer_is_picked_up_by_sync(model, docs):
    """A commit made straight to the store (an ingestion job) reaches the shards on sync()."""
    store = store_with(model, docs[:5])
    coord, routers, _ = plain_cluster(store, model, 2)
    store.insert(docs[5:8])
    assert coord.sync() == store.snapshot().version
    assert sorted(routers[0].doc_ids() + routers[1].doc_ids()) == list(range(8))


def test_rebalance_when_shards_join_and_leave(model, docs):
    """Going from 2 to 3 shard pairs and back keeps every document placed once and selections unchanged."""
    from msa_cluster.actors.kv_shard import KVShard

    store = store_with(model, docs)
    coord, routers, kvs = plain_cluster(store, model, 2)
    ids, mask = random_prompt(model, 12)
    want = model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected
    routers.append(RouterShard(2, model.config.routing_layers, store=store))
    kvs.append(KVShard(2, store))
    coord.attach(routers, kvs)
    held = sorted(d for r in routers for d in r.doc_ids())
    assert held == sorted(d.doc_id for d in docs) and all(r.doc_ids() for r in routers)
    assert model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected == want
    coord.attach(routers[:1], kvs[:1])
    assert routers[0].doc_ids() == sorted(d.doc_id for d in docs)
    assert model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected == want


def _query(model, seed=2):
    ids, mask = random_prompt(model, 10, seed=seed)
    q = torch.randn(1, 10, model.config.num_attention_heads, model.config.head_dim, generator=torch.Generator().manual_seed(seed))
    return prepare_queries(q, mask, model.config.routing_spec(), model.config.routing_scale())


def test_router_shard_versions_and_tenants(model, docs):
    """A shard answers per pinned version and tenant; removed entries stay visible to older versions."""
    shard = RouterShard(0, model.config.routing_layers)
    shard.apply(1, added=[(d.doc_id, d.tenant, d.router_keys) for d in docs[:6]])
    shard.apply(2, removed=[0, 2])
    q = _query(model)
    old = {d.doc_id for d in shard.score(2, q, 10, ["acme"], 1)[0]}
    new = {d.doc_id for d in shard.score(2, q, 10, ["acme"], 2)[0]}
    assert old == {0, 2, 4} and new == {4}
    with pytest.raises(StaleShardError):
        shard.score(2, q, 10, ["acme"], 3)
    with pytest.raises(ValueError, match="not a routing layer"):
        shard.score(0, q, 10, ["acme"], 2)


def test_router_shard_grace_and_compaction(model, docs):
    """Past the grace period removed entries are dropped, old versions refused, the arena compacted."""
    shard = RouterShard(0, model.config.routing_layers, grace_s=0.0)
    shard.apply(1, added=[(d.doc_id, d.tenant, d.router_keys) for d in docs])
    shard.apply(2, removed=[d.doc_id for d in docs[2:]])
    with pytest.raises(SnapshotGoneError):
        shard.score(2, _query(model), 3, ["acme"], 1)
    assert shard.stats()["documents"] == 2
    assert {d.doc_id for d in shard.score(2, _query(model), 5, ["acme"], 2)[0]} == {0}


def test_router_tier_refuses_when_full(model, docs):
    """A full router shard refuses new documents with MemoryFullError and keeps what it had."""
    d = docs[0]
    row = d.router_keys[:, :1].numel() * d.router_keys.element_size()
    shard = RouterShard(0, model.config.routing_layers, capacity_bytes=row * d.num_chunks)
    shard.apply(1, added=[(d.doc_id, d.tenant, d.router_keys)])
    with pytest.raises(MemoryFullError, match="full"):
        shard.apply(2, added=[(docs[1].doc_id, docs[1].tenant, docs[1].router_keys)])
    assert shard.doc_ids() == [d.doc_id] and shard.version == 1


def test_scores_do_not_depend_on_neighbours(model, docs):
    """A document's score is bit-identical whichever other documents share its shard."""
    q = _query(model, seed=4)
    a = RouterShard(0, model.config.routing_layers)
    a.apply(1, added=[(d.doc_id, "t", d.router_keys) for d in docs])
    b = RouterShard(1, model.config.routing_layers)
    b.apply(1, added=[(d.doc_id, "t", d.router_keys) for d in docs[7:9]])
    all_scores = {d.doc_id: d.score for d in a.score(3, q, 100, ["t"], 1)[0]}
    few = {d.doc_id: d.score for d in b.score(3, q, 100, ["t"], 1)[0]}
    assert few == {k: all_scores[k] for k in few} and all(math.isfinite(s) for s in few.values())


def test_batched_requests_get_their_own_rows(model, docs):
    """Concurrent requests batched into one fan-out each get exactly their unbatched selections."""
    import threading

    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 2)
    batched = ClusterMemory(coord, batch_window_s=0.05)
    plain = ClusterMemory(coord)
    prompts = [random_prompt(model, 8 + s, seed=s) for s in range(6)]
    want = [model.prefill(i, plain, m, tenant=("acme", "globex")[s % 2]).selected for s, (i, m) in enumerate(prompts)]
    got = [None] * 6

    def run(s):
        i, m = prompts[s]
        got[s] = model.prefill(i, batched, m, tenant=("acme", "globex")[s % 2]).selected

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_coordinator_needs_pairs(model, docs):
    """Router and KV shards come in pairs."""
    with pytest.raises(ValueError, match="pairs"):
        Coordinator(store_with(model, []), [object()], [])


def test_coordinator_recovery_adopts_what_shards_hold(model, docs):
    """A fresh coordinator (after a restart) adopts the live shards' placement without reloading them."""
    store = store_with(model, docs)
    old, routers, kvs = plain_cluster(store, model, 3)
    before = old.placement()
    fresh = Coordinator(store)
    fresh.recover(routers, kvs)
    assert fresh.placement() == before and fresh.version == old.version
    ids, mask = random_prompt(model, 12)
    assert model.prefill(ids, ClusterMemory(fresh), mask, tenant="acme").selected == \
        model.prefill(ids, InProcessMemory(docs), mask, tenant="acme").selected


def test_calls_map_role_errors_and_timeouts():
    """Plain-object calls re-raise the role's own error type; gather keeps the order of results."""
    from msa_cluster.actors.calls import call, gather, submit

    class Role:
        def ok(self, x):
            return x * 2

        def bad(self):
            raise MemoryFullError("full")

    r = Role()
    assert gather([submit(r, "ok", 1), submit(r, "ok", 2)], 1.0) == [2, 4]
    with pytest.raises(MemoryFullError):
        call(r, "bad")


def test_cluster_texts_are_tenant_and_version_filtered(model, docs):
    """Interleave reads texts only of the request's tenant, live at its pinned version."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 2)
    memory = ClusterMemory(coord)
    acme = memory.snapshot("acme")  # acme owns the even ids
    assert sorted(acme.texts([0, 1, 2, 3, 999])) == [0, 2]
    coord.delete([2])
    assert sorted(memory.snapshot("acme").texts([0, 2])) == [0]
    assert sorted(acme.texts([0, 2])) == [0, 2]  # the pinned snapshot still reads version-consistent texts


def test_generator_batches_only_with_company(model, docs):
    """A lone request does not wait for a batch window; the Generator reports requests in flight."""
    import time

    from msa_cluster.actors.generator import Generator
    from msa_cluster.model.tokenizer import ByteTokenizer

    coord, _, _ = plain_cluster(store_with(model, docs), model, 2)
    memory = ClusterMemory(coord, batch_window_s=0.5)
    gen = Generator(model, ByteTokenizer(), memory)
    ids, mask = random_prompt(model, 10)
    t0 = time.monotonic()
    got = gen.prefill_selection(ids[0].tolist(), mask[0].tolist(), "acme")
    assert time.monotonic() - t0 < 0.5 * len(model.config.routing_layers)  # no window was waited
    assert got["selected"] == model.prefill(ids, InProcessMemory(docs), mask, tenant="acme").selected
    assert gen.stats() == {"active_requests": 0}


def test_a_document_on_two_shards_is_selected_once(model, docs):
    """Mid-rebalance a document may sit on two shards: the merged selection still holds it once."""
    from msa_cluster.actors.fanout import fan_out

    store = store_with(model, docs)
    coord, routers, _ = plain_cluster(store, model, 2)
    q = _query(model)
    want = fan_out(coord.view(), 2, q, 3, ["acme"]).selected
    for r in routers:  # a stale copy of every document on the other shard, as during a move
        r.update(coord.version, [d.doc_id for d in docs], [])
    got = fan_out(coord.view(), 2, q, 3, ["acme"])
    assert got.selected == want and len({d.doc_id for d in got.selected[0]}) == 3
