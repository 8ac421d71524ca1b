"""The cluster roles as plain classes (no Ray): exactness vs InProcessMemory, online changes, tenants."""

import dataclasses
import math
import threading

import pytest
import torch

from msa_cluster.actors.calls import call, gather, submit
from msa_cluster.actors.coordinator import Coordinator, balance
from msa_cluster.actors.memory import ClusterMemory
from msa_cluster.kernels.routing import prepare_queries
from msa_cluster.model import InProcessMemory
from msa_cluster.model.generation import GenerationConfig, generate
from msa_cluster.storage_adapters import ALL_TENANTS
from msa_cluster.types import MemoryFullError, SnapshotGoneError, StaleShardError, UnknownDocumentError
from tests.actors.helpers import allocate_like, kv, plain_cluster, router, store_with
from tests.model.helpers import random_prompt


def oracle(store, version=None):
    """InProcessMemory holding exactly the store's documents at `version` (the exactness baseline)."""
    return InProcessMemory(store.snapshot(version).documents(tenant=ALL_TENANTS))


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 30])
def test_distributed_equals_local(model, docs, shards):
    """Any shard count (even more shards than documents) gives InProcessMemory's selections, logits and tokens."""
    store = store_with(model, docs)
    local = oracle(store)
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
    allocate_like(store, docs[10:])
    coord.insert(docs[10:])
    full = InProcessMemory(docs)
    assert model.prefill(ids, cluster, mask, tenant="acme").selected == model.prefill(ids, full, mask, tenant="acme").selected
    winner = model.prefill(ids, cluster, mask, tenant="acme").selected[2][0]
    coord.delete([winner], tenant="acme")
    after = model.prefill(ids, cluster, mask, tenant="acme")
    assert all(winner not in s for s in after.selected.values())
    old = model.prefill(ids, before, mask)  # pinned at the first version: only docs[:10]
    assert all(d < 10 for s in old.selected.values() for d in s)


def test_external_writer_is_picked_up_by_sync(model, docs):
    """A commit made straight to the store (an ingestion job) reaches the shards on sync()."""
    store = store_with(model, docs[:5])
    coord, routers, _ = plain_cluster(store, model, 2)
    allocate_like(store, docs[5:8])
    store.insert(docs[5:8])
    assert coord.sync() == store.latest_version()
    assert sorted(routers[0].doc_ids() + routers[1].doc_ids()) == list(range(8))


def test_rebalance_when_shards_join_and_leave(model, docs):
    """Going from 2 to 3 shard pairs and back keeps every document placed once and selections unchanged."""
    store = store_with(model, docs)
    coord, routers, kvs = plain_cluster(store, model, 2)
    ids, mask = random_prompt(model, 12)
    want = model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected
    routers.append(router(store, model, 2))
    kvs.append(kv(store, 2))
    coord.attach(routers, kvs)
    held = sorted(d for r in routers for d in r.doc_ids())
    assert held == sorted(d.doc_id for d in docs) and all(r.doc_ids() for r in routers)
    assert model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected == want
    coord.attach(routers[:1], kvs[:1])
    assert routers[0].doc_ids() == sorted(d.doc_id for d in docs)
    assert model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected == want


def _query(model, seed=2, rows=1):
    ids, mask = random_prompt(model, 10, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 10, model.config.num_attention_heads, model.config.head_dim, generator=g)
    return prepare_queries(q, mask.expand(rows, -1), model.config.routing_spec(), model.config.routing_scale())


def test_router_shard_versions_and_tenants(model, docs):
    """A shard answers per pinned version and tenant; removed entries stay visible to older versions."""
    store = store_with(model, docs[:6])
    shard = router(store, model, 0)
    v1 = store.latest_version()
    shard.converge(v1, 0, range(6))
    v2 = store.delete([0, 2], tenant="acme").version
    shard.converge(v2, 0, [1, 3, 4, 5])
    q = _query(model)
    old = {d.doc_id for d in shard.score(2, q, 10, ["acme"], [(v1, 0)])[0]}
    new = {d.doc_id for d in shard.score(2, q, 10, ["acme"], [(v2, 0)])[0]}
    assert old == {0, 2, 4} and new == {4}
    assert {d.doc_id for d in shard.score(2, q, 10, ["globex"], [(v2, 0)])[0]} == {1, 3, 5}
    with pytest.raises(StaleShardError):
        shard.score(2, q, 10, ["acme"], [(v2 + 1, 0)])
    with pytest.raises(ValueError, match="not a routing layer"):
        shard.score(0, q, 10, ["acme"], [(v2, 0)])


def test_router_shard_grace_and_compaction(model, docs):
    """Past the grace period removed entries retire, their versions are refused, and the arena compacts."""
    big = [d for d in docs for _ in range(1)]
    store = store_with(model, big)
    shard = router(store, model, 0, grace_s=0.0)
    v1 = store.latest_version()
    shard.converge(v1, 0, [d.doc_id for d in big])
    arena = shard._arenas["acme"]
    assert [b.shape[1] for b in arena._blocks.tensors] == [arena.held_chunks]  # the bulk load adopted: one block, keys held once
    used_before = arena._used
    acme = [d.doc_id for d in big if d.tenant == "acme"]
    v2 = store.delete(acme[1:], tenant="acme").version
    shard.converge(v2, 0, [d.doc_id for d in big if d.doc_id not in acme[1:]])
    with pytest.raises(SnapshotGoneError):
        shard.score(2, _query(model), 3, ["acme"], [(v1, 0)])
    assert shard.stats()["documents"] == len(big) - len(acme) + 1
    assert {d.doc_id for d in shard.score(2, _query(model), 5, ["acme"], [(v2, 0)])[0]} == {acme[0]}
    arena.compact_min_chunks = 0  # compact even this small arena
    arena.collect(removed_before_s=math.inf)
    assert arena._used == big[0].num_chunks < used_before  # packed down to the one live entry


def test_router_shard_refuses_when_full_and_keeps_what_it_had(model, docs):
    """A full router shard refuses a change whole with MemoryFullError and keeps serving what it had."""
    d = docs[0]
    row = d.router_keys[:, :1].numel() * d.router_keys.element_size()
    store = store_with(model, docs[:2])
    shard = router(store, model, 0, capacity_bytes=row * d.num_chunks)
    v = store.latest_version()
    shard.converge(v, 0, [0])
    with pytest.raises(MemoryFullError, match="full"):
        shard.converge(v, 0, [0, 1])
    assert shard.doc_ids() == [0] and shard.version == v
    assert shard.headroom_bytes() == 0


def test_scores_do_not_depend_on_neighbours(model, docs):
    """A document's score is bit-identical whichever other documents share its shard."""
    q = _query(model, seed=4)
    store = store_with(model, docs)
    v = store.latest_version()
    a, b = router(store, model, 0), router(store, model, 1)
    a.converge(v, 0, [d.doc_id for d in docs])
    b.converge(v, 0, [d.doc_id for d in docs[7:10]])
    t = docs[8].tenant
    all_scores = {d.doc_id: d.score for d in a.score(3, q, 100, [t], [(v, 0)])[0]}
    few = {d.doc_id: d.score for d in b.score(3, q, 100, [t], [(v, 0)])[0]}
    assert few and few == {k: all_scores[k] for k in few} and all(math.isfinite(s) for s in few.values())


def test_batched_requests_get_their_own_rows(model, docs):
    """Concurrent requests share fan-outs (batching happened) and each gets exactly its unbatched selections."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 2)
    batched = ClusterMemory(coord, batch_window_s=0.2)
    plain = ClusterMemory(coord)
    prompts = [random_prompt(model, 8 + s, seed=s) for s in range(6)]
    want = [model.prefill(i, plain, m, tenant=("acme", "globex")[s % 2]).selected for s, (i, m) in enumerate(prompts)]
    got = [None] * 6
    start = threading.Barrier(6)

    def run(s):
        i, m = prompts[s]
        start.wait()
        got[s] = model.prefill(i, batched, m, tenant=("acme", "globex")[s % 2]).selected

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    assert batched.batcher.batches_run >= 1  # at least one fan-out served several requests


def test_coordinator_needs_pairs(model, docs):
    """Router and KV shards come in pairs."""
    with pytest.raises(ValueError, match="pairs"):
        Coordinator(store=store_with(model, []), routers=[object()], kvs=[])


def test_coordinator_recovery_adopts_what_shards_hold(model, docs):
    """A fresh coordinator (after a restart) adopts the live shards' placement without reloading them."""
    store = store_with(model, docs)
    old, routers, kvs = plain_cluster(store, model, 3)
    before = old.placement()
    arenas = [dict(r._arenas) for r in routers]
    floors = [r._floor for r in routers]
    fresh = Coordinator(store=store)
    fresh.recover(routers, kvs)
    assert fresh.placement() == before and fresh.version == old.version
    # Nothing was reloaded: every shard kept its very arena objects, and pins older than the restart still work.
    assert all(r._arenas[t] is a[t] for r, a in zip(routers, arenas) for t in a)
    assert [r._floor for r in routers] == floors
    ids, mask = random_prompt(model, 12)
    assert model.prefill(ids, ClusterMemory(fresh), mask, tenant="acme").selected == \
        model.prefill(ids, InProcessMemory(docs), mask, tenant="acme").selected


def test_calls_reraise_role_errors_in_order():
    """Plain-object calls re-raise the role's own error type; gather keeps the order of results."""

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
    coord.delete([2], tenant="acme")
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


# ---------------------------------------------------------------------------------------------
# Regression tests for the four failures a review reproduced on the previous cluster.


def test_a_refused_insert_commits_nothing_and_queries_keep_working(model, docs):
    """An insert the router tier cannot hold is refused whole; queries work and the next small insert is routed."""
    d0 = docs[0]
    row = d0.router_keys[:, :1].numel() * d0.router_keys.element_size()
    store = store_with(model, docs[:4])
    room = sum(d.num_chunks for d in docs[:4]) + docs[4].num_chunks
    coord, _, _ = plain_cluster(store, model, 1, capacity_bytes=row * room)
    memory = ClusterMemory(coord)
    ids, mask = random_prompt(model, 12)
    allocate_like(store, docs[4:])
    version = store.latest_version()
    with pytest.raises(MemoryFullError, match="nothing was written"):
        coord.insert(docs[4:10])
    assert store.latest_version() == version and coord.status().refused_version is None
    assert model.prefill(ids, memory, mask, tenant="acme").selected == model.prefill(ids, oracle(store), mask, tenant="acme").selected
    coord.insert([docs[4]])
    got = model.prefill(ids, memory, mask, tenant="acme")
    assert got.version == store.latest_version()
    assert got.selected == model.prefill(ids, oracle(store), mask, tenant="acme").selected


def test_an_external_commit_that_does_not_fit_is_reported_and_nothing_wedges(model, docs):
    """A commit by another writer the cluster cannot hold leaves it serving the last version it holds."""
    d0 = docs[0]
    row = d0.router_keys[:, :1].numel() * d0.router_keys.element_size()
    store = store_with(model, docs[:4])
    coord, _, _ = plain_cluster(store, model, 1, capacity_bytes=row * sum(d.num_chunks for d in docs[:6]))
    served = coord.version
    allocate_like(store, docs[4:])
    too_big = store.insert(docs[4:]).version
    assert coord.sync() == served
    status = coord.status()
    assert status.refused_version == too_big and "full" in status.refused_reason
    ids, mask = random_prompt(model, 12)
    assert model.prefill(ids, ClusterMemory(coord), mask, tenant="acme").selected == \
        model.prefill(ids, oracle(store, served), mask, tenant="acme").selected
    # The operator removes what does not fit; the cluster then serves the newest version again.
    fixed = store.delete([d.doc_id for d in docs[6:]], tenant=ALL_TENANTS).version
    assert coord.sync() == fixed and coord.status().refused_version is None


def test_coordinator_restart_after_external_writes_converges(model, docs):
    """A coordinator restarted after another writer updated, deleted and compacted serves the latest version exactly."""
    store = store_with(model, docs)
    _, routers, kvs = plain_cluster(store, model, 2)
    changed = model.encode_documents([[7, 7, 7, 9] * 40], doc_ids=[0], tenants=["acme"])
    store.update(changed)
    store.delete([3, 5], tenant="globex")
    store.compact()
    fresh = Coordinator(store=store)
    fresh.recover(routers, kvs)
    assert fresh.version == store.latest_version()
    memory = ClusterMemory(fresh)
    for tenant in ("acme", "globex"):
        for seed in (2, 5):
            ids, mask = random_prompt(model, 12, seed=seed)
            a = model.prefill(ids, memory, mask, tenant=tenant)
            b = model.prefill(ids, oracle(store), mask, tenant=tenant)
            assert a.selected == b.selected and torch.equal(a.logits, b.logits)


def test_a_pinned_request_keeps_its_selections_through_a_rebalance(model, docs):
    """A snapshot taken before a rebalance selects exactly what it selected before, on the old shards."""
    store = store_with(model, docs)
    coord, routers, kvs = plain_cluster(store, model, 2)
    memory = ClusterMemory(coord)
    ids, mask = random_prompt(model, 12)
    pinned = memory.snapshot("acme")
    want = model.prefill(ids, pinned, mask)
    routers.append(router(store, model, 2))
    kvs.append(kv(store, 2))
    coord.attach(routers, kvs)  # documents move to the new shard in a new epoch
    assert routers[2].doc_ids()
    again = model.prefill(ids, pinned, mask)
    assert again.selected == want.selected and torch.equal(again.logits, want.logits)
    coord.attach(routers[1:], kvs[1:])  # and shrink: the old view's shards still hold its entries
    again = model.prefill(ids, pinned, mask)
    assert again.selected == want.selected and torch.equal(again.logits, want.logits)


def test_writes_through_the_cluster_are_tenant_scoped(model, docs):
    """Another tenant's id through the coordinator behaves exactly like an id never used, and nothing changes."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 2)
    version = coord.version
    theirs = dataclasses.replace(docs[0], tenant="globex")  # doc 0 belongs to acme
    never = dataclasses.replace(docs[0], tenant="globex", doc_id=10_000)
    messages = []
    for write in (lambda d: coord.insert([d], replace=True), lambda d: coord.update([d]),
                  lambda d: coord.delete([d.doc_id], tenant="globex")):
        for doc in (theirs, never):
            with pytest.raises(UnknownDocumentError) as e:
                write(doc)
            messages.append(str(e.value).replace(str(doc.doc_id), "ID"))
    assert len(set(messages[0::2])) == 1 and messages[0::2] == messages[1::2]
    assert coord.version == version == store.latest_version()
    assert store.snapshot().info(0, tenant="acme").tenant == "acme"


def test_a_kv_shards_cold_read_of_one_layer_reads_only_that_layer(model, docs, monkeypatch):
    """KVShard.read at one layer reads K[r] and V[r] of each cold document (2 * C * Hkv * D * itemsize
    bytes) and nothing of the other layers; a second read of that layer is served from RAM."""
    from msa_cluster.storage_adapters._fs import StoreFS

    store = store_with(model, docs)
    shard = kv(store, 0)
    version = shard.converge(store.latest_version())
    snap = store.snapshot(version)
    ids = snap.doc_ids("acme")[:3]
    layer = model.config.routing_layers[-1]
    r = model.config.routing_layers.index(layer)
    want = [snap.read_kv(i, "acme") for i in ids]
    asked: list[int] = []
    real = StoreFS.read_into

    def spy(self, rel, ranges):
        asked.extend(memoryview(b).nbytes for _, b in ranges)
        return real(self, rel, ranges)

    monkeypatch.setattr(StoreFS, "read_into", spy)
    for _ in range(2):
        for (k, v), (wk, wv) in zip(shard.read(layer, ids, version, "acme"), want):
            assert torch.equal(k, wk[r]) and torch.equal(v, wv[r])
    assert asked == [wk[r].numel() * wk.element_size() for wk, _ in want for _ in range(2)]
