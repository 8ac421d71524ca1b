"""Faults on a real Ray cluster: a killed shard, a killed coordinator, a crashed worker node.

A stream of queries runs throughout; every query either succeeds or fails with ShardUnavailableError
within its timeout (none hangs), and after recovery every committed document is routable again.
"""

import threading
import time

import pytest
import ray
import torch

from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster
from msa_cluster.model import InProcessMemory
from msa_cluster.types import ShardUnavailableError
from tests.actors.helpers import corpus, store_with
from tests.model.helpers import random_prompt

TIMEOUT_S = 5.0
HANG_MARGIN_S = 10.0  # compute and backoff on a loaded 2-core machine
# The stream retries once: view and fan-out may each spend two attempts of TIMEOUT_S.
MAX_QUERY_S = 4 * TIMEOUT_S + HANG_MARGIN_S


@pytest.fixture(scope="module")
def setup(ray_nodes, model, tmp_path_factory):
    docs = corpus(model, n=16)
    url = f"file://{tmp_path_factory.mktemp('fault-store')}"
    store_with(model, docs, url)
    # Each bundle takes one shard slot; each node has two pairs' worth: two pairs per node.
    spec = ClusterSpec(name="faults", num_shards=4, timeout_s=TIMEOUT_S, shard_resources=({"shard_slot": 1},))
    cluster = MemoryCluster.start(url, model.fingerprint(), spec)
    yield cluster, docs
    cluster.shutdown()


class Stream:
    """Queries in a background thread, bounded in count and time; records outcomes and durations."""

    def __init__(self, model, memory, max_queries=400, max_s=240.0):
        self.model, self.memory, self.max_queries, self.max_s = model, memory, max_queries, max_s
        self.outcomes: list[tuple[str, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        ids, mask = random_prompt(self.model, 10, seed=9)
        start = time.monotonic()
        while not self.stop.is_set() and len(self.outcomes) < self.max_queries and time.monotonic() - start < self.max_s:
            t0 = time.monotonic()
            try:
                self.model.prefill(ids, self.memory, mask, tenant="acme")
                self.outcomes.append(("ok", time.monotonic() - t0))
            except ShardUnavailableError:
                self.outcomes.append(("unavailable", time.monotonic() - t0))
            except Exception as e:  # any other error is a test failure, reported below
                self.outcomes.append((f"error: {type(e).__name__}: {e}", time.monotonic() - t0))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the query stream hung"


def _routable(model, cluster, docs):
    local = InProcessMemory(docs)
    ids, mask = random_prompt(model, 12, seed=3)
    for tenant in ("acme", "globex"):
        a = model.prefill(ids, local, mask, tenant=tenant)
        b = model.prefill(ids, cluster.memory(retries=8), mask, tenant=tenant)  # restarts may still be settling
        assert a.selected == b.selected and torch.equal(a.logits, b.logits)
    held = sorted(d for r in cluster.routers for d in ray.get(r.doc_ids.remote(), timeout=30))
    assert held == sorted(d.doc_id for d in docs)


def _check(stream):
    bad = [o for o in stream.outcomes if o[0] not in ("ok", "unavailable")]
    assert not bad, bad[:3]
    assert max(d for _, d in stream.outcomes) < MAX_QUERY_S
    assert any(o == "ok" for o, _ in stream.outcomes)


def test_killed_shard_and_coordinator_recover(setup, model):
    """Killing a router shard, a KV shard and the coordinator mid-stream: clean failures, full recovery."""
    cluster, docs = setup
    with Stream(model, cluster.memory(retries=1)) as stream:
        time.sleep(1.0)
        ray.kill(cluster.routers[1], no_restart=False)
        ray.kill(cluster.kvs[2], no_restart=False)
        cluster.wait_ready(120)
        ray.kill(cluster.coordinator, no_restart=False)
        deadline = time.monotonic() + 120
        while True:  # the restarted coordinator answers again
            try:
                ray.get(cluster.coordinator.stats.remote(), timeout=5)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                assert time.monotonic() < deadline, "the coordinator did not come back"
        time.sleep(1.0)
    _check(stream)
    _routable(model, cluster, docs)


def test_worker_node_crash_recovers_on_a_new_node(setup, model, ray_nodes):
    """SIGKILL the worker node: its shards fail cleanly, then come back from the store on a new node."""
    cluster, docs = setup
    with Stream(model, cluster.memory(retries=1)) as stream:
        time.sleep(1.0)
        ray_nodes.kill("127.0.0.3")
        time.sleep(3 * TIMEOUT_S)  # queries meanwhile fail with ShardUnavailableError, none hangs
        ray_nodes.start_worker("127.0.0.4", {"shard_slot": 4, "node_b": 100})
        cluster.wait_ready(180)
        time.sleep(1.0)
    _check(stream)
    assert any(o == "unavailable" for o, _ in stream.outcomes)
    _routable(model, cluster, docs)
