"""The compiled-graph round on a real two-node Ray cluster: exact, typed errors, timeouts, recompiles.

Graphs are compiled over shards on the driver's node only; shards across two nodes go by plain calls
(Ray 2.60's raylet aborts when a cross-node graph is torn down: see `actors.compiled`)."""

import time

import pytest
import ray
import torch

from msa_cluster.actors.compiled import CompiledExchange, close_shared
from msa_cluster.actors.memory import ClusterMemory
from msa_cluster.actors.wire import ShardAnswer, WireQuery
from msa_cluster.types import RoutingQuery, RoutingSpec, ScoredDoc, ShardUnavailableError, StaleShardError

QUERY = WireQuery.of(
    RoutingQuery(
        torch.zeros(1, 2, 2, 4), torch.ones(1, 2, dtype=torch.bool), RoutingSpec(num_heads=2, num_kv_heads=2), folded=True
    )
)


@ray.remote(num_cpus=0.1, max_concurrency=4)
class _Shard:
    """Answers `route` like a router shard; can be made slow, stale or wrong."""

    def __init__(self, i):
        self.i, self.delay = i, 0.0

    def set_delay(self, s):
        self.delay = s

    def route(self, layer, query, top_k, tenants, pins):
        time.sleep(self.delay)
        if layer < 0:
            raise ValueError(f"layer {layer} is not a routing layer")
        if pins[0][0] > 10:
            raise StaleShardError(f"shard {self.i} serves version 10, behind {pins[0][0]}")
        return ShardAnswer([[ScoredDoc(self.i, float(layer))]], {}, "float32")


def _start_shards(nodes):
    actors = [_Shard.options(resources={nodes[i % len(nodes)]: 1}).remote(i) for i in range(3)]
    ray.get([a.set_delay.remote(0.0) for a in actors], timeout=60)
    return actors


@pytest.fixture
def shards(ray_nodes):
    """Three shards on the driver's node (the head, node_a)."""
    actors = _start_shards(["node_a"])
    yield actors
    for a in actors:
        ray.kill(a)


def test_shards_on_two_nodes_go_by_plain_calls(ray_nodes):
    """Shards across nodes are never compiled into a graph; their rounds still answer, in shard order, with typed errors."""
    actors = _start_shards(["node_a", "node_b"])
    ex = CompiledExchange(actors)
    try:
        assert [a.selected[0][0].doc_id for a in _route(ex)] == [0, 1, 2]
        with pytest.raises(StaleShardError):
            _route(ex, version=11)
        assert _route(ex, layer=7)[2].selected[0][0].score == 7.0
        assert ex.spans_nodes is True and ex.compiles == 0
    finally:
        ex.close()
        for a in actors:
            ray.kill(a)


def _route(ex, layer=5, version=1, timeout_s=30.0):
    return ex.route(layer, QUERY, 2, ["t"], [(version, 0)], timeout_s)


def test_answers_in_shard_order_and_role_errors_keep_their_type(shards):
    """Answers come in shard order; a shard's own errors come back as their types, and the next round works."""
    ex = CompiledExchange(shards)
    try:
        assert [a.selected[0][0].doc_id for a in _route(ex)] == [0, 1, 2]
        with pytest.raises(ValueError, match="not a routing layer"):
            _route(ex, layer=-1)
        with pytest.raises(StaleShardError):  # a ShardUnavailableError subclass: the caller retries
            _route(ex, version=11)
        assert _route(ex, layer=7)[2].selected[0][0].score == 7.0
        assert _route(ex, layer=8)[2].selected[0][0].score == 8.0
        assert ex.compiles == 3 and ex.spans_nodes is False  # rebuilt after each error
    finally:
        ex.close()
    assert _route(ex)[1].selected[0][0].doc_id == 1  # closed: plain calls from now on
    assert ex.compiles == 3


def test_a_slow_shard_times_out_typed_and_the_graph_is_rebuilt(shards):
    """A round past its timeout is ShardUnavailableError within the bound; the next round compiles a new graph."""
    ex = CompiledExchange(shards)
    try:
        _route(ex)
        ray.get(shards[1].set_delay.remote(2.0), timeout=30)  # a plain call, while the graph holds the actor
        t0 = time.monotonic()
        with pytest.raises(ShardUnavailableError, match="compiled routing round failed"):
            _route(ex, timeout_s=0.5)
        assert time.monotonic() - t0 < 0.5 + 10.0  # the timeout plus tearing the graph down on a loaded machine
        ray.get(shards[1].set_delay.remote(0.0), timeout=30)
        assert [a.selected[0][0].doc_id for a in _route(ex)] == [0, 1, 2]
        assert ex.compiles == 2
    finally:
        ex.close()


def test_a_killed_shard_is_shard_unavailable(shards):
    """A shard that dies makes the round ShardUnavailableError, not a hang or a Ray error."""
    ex = CompiledExchange(shards)
    try:
        _route(ex)
        ray.kill(shards[2], no_restart=True)  # asynchronous: rounds fail once the kill has landed
        deadline = time.monotonic() + 60
        while True:
            try:
                _route(ex, timeout_s=10.0)
            except ShardUnavailableError:
                break
            assert time.monotonic() < deadline, "a round with a killed shard kept answering"
            time.sleep(0.2)
    finally:
        ex.close()


def test_compiled_cluster_memory_equals_local(ray_nodes, model, docs, tmp_path):
    """ClusterMemory(compiled=True) over real shard pairs on the driver's node gives InProcessMemory's selections and logits."""
    from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster
    from msa_cluster.model import InProcessMemory
    from tests.actors.helpers import store_with
    from tests.model.helpers import random_prompt

    url = f"file://{tmp_path}/store"
    store_with(model, docs[:12], url)
    spec = ClusterSpec(name="compiled", num_shards=2, timeout_s=30, shard_resources=({"node_a": 1}, {"node_a": 1}))
    cluster = MemoryCluster.start(url, model.fingerprint(), spec)
    try:
        memory = ClusterMemory(cluster.coordinator, timeout_s=30, compiled=True)
        local = InProcessMemory(docs[:12])
        for tenant, seed in (("acme", 7), ("globex", 8)):
            ids, mask = random_prompt(model, 12, seed=seed)
            a = model.prefill(ids, local, mask, tenant=tenant)
            b = model.prefill(ids, memory, mask, tenant=tenant)
            assert a.selected == b.selected and a.scores == b.scores and torch.equal(a.logits, b.logits)
        from msa_cluster.actors import compiled

        assert [ex.compiles for ex in compiled._shared.values()] == [1]  # it really went through one graph
    finally:
        close_shared()
        cluster.shutdown()
