"""The one-round fan-out as plain classes (no Ray): exact against two rounds and InProcessMemory, pinned K/V, wire format."""

import dataclasses

import numpy as np
import pytest
import torch

from msa_cluster.actors.fanout import PlainExchange, fan_out
from msa_cluster.actors.router_shard import RouterShard
from msa_cluster.actors.wire import ShardAnswer, WireQuery, assemble, to_numpy
from msa_cluster.model import InProcessMemory
from msa_cluster.storage_adapters import ALL_TENANTS
from msa_cluster.types import RoutingQuery, RoutingSpec, ScoredDoc, UnknownDocumentError
from tests.actors.helpers import plain_cluster, store_with
from tests.actors.test_plain_roles import _query

LAYER = 3


def _same(a, b):
    assert a.selected == b.selected
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 30])
def test_one_round_equals_two_rounds_and_local(model, docs, shards):
    """One round gives two rounds' and InProcessMemory's selections, scores and K/V bit for bit, rows of both tenants mixed."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, shards)
    view = coord.view()
    q = _query(model, seed=6, rows=3)
    tenants = ["acme", "globex", "acme"]
    one = fan_out(view, LAYER, q, 4, tenants)
    two = fan_out(view, LAYER, q, 4, tenants, rounds=2)
    _same(one, two)
    local = InProcessMemory(store.snapshot().documents(tenant=ALL_TENANTS))
    for b, tenant in enumerate(tenants):
        row = dataclasses.replace(q, vectors=q.vectors[b : b + 1], mask=q.mask[b : b + 1])
        _same(
            local.snapshot(tenant).retrieve(LAYER, row, 4),
            type(one)(one.selected[b : b + 1], one.keys[b : b + 1], one.values[b : b + 1]),
        )


def test_a_shard_answers_with_the_pinned_versions_kv(model, docs):
    """After an update, a request pinned before it gets the old K/V from the same one round, and a new pin the new K/V."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 2)
    old_view = coord.view()
    q = _query(model, seed=3)
    tenant = "acme"
    before = fan_out(old_view, LAYER, q, 24, [tenant])
    target = before.selected[0][0].doc_id
    doc = next(d for d in docs if d.doc_id == target)
    changed = dataclasses.replace(doc, keys=doc.keys + 1.0, values=doc.values - 1.0)
    coord.update([changed])
    new_view = coord.view()
    assert new_view.version > old_view.version
    _same(fan_out(new_view, LAYER, q, 24, [tenant], pins=[(old_view.version, old_view.epoch)]), before)
    after = fan_out(new_view, LAYER, q, 24, [tenant])
    i = [d.doc_id for d in after.selected[0]].index(target)
    start = sum(next(x for x in docs if x.doc_id == d.doc_id).num_chunks for d in after.selected[0][:i])
    assert torch.equal(after.values[0][start : start + doc.num_chunks], changed.values[model.config.routing_layers.index(LAYER)])


def test_extra_kv_is_bounded_by_the_other_shards_top_k(model, docs):
    """Each shard sends at most top_k documents per row; the generator keeps top_k: at most (shards-1)*top_k extra."""
    store = store_with(model, docs)
    coord, _, _ = plain_cluster(store, model, 3)
    view = coord.view()
    q = _query(model, seed=8, rows=2)
    pins = [(view.version, view.epoch)] * 2
    answers = PlainExchange(view.routers).route(LAYER, WireQuery.of(q), 2, ["acme", "acme"], pins, 30.0)
    for a in answers:
        assert set(a.kv) == {(d.doc_id, view.version) for row in a.selected for d in row}
        assert all(len(row) <= 2 for row in a.selected)
    assert sum(len(a.kv) for a in answers) <= 3 * 2 * 2


def test_route_refuses_other_tenants_and_needs_a_store(model, docs):
    """route() reads K/V only for the row's tenant, and a shard without a store says it cannot serve K/V."""
    store = store_with(model, docs)
    coord, routers, _ = plain_cluster(store, model, 1)
    v = coord.view().version
    other = next(d.doc_id for d in docs if d.tenant == "globex")
    with pytest.raises(UnknownDocumentError):
        routers[0].kv.read(LAYER, [other], v, "acme")
    bare = RouterShard(shard_id=9, routing_layers=model.config.routing_layers)
    with pytest.raises(RuntimeError, match="no store"):
        bare.route(LAYER, WireQuery.of(_query(model)), 2, ["acme"], [(0, 0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wire_round_trip_is_exact(dtype):
    """K/V travel as numpy (bf16 as int16 bits) and assemble into each row's buffer bit for bit, read-only inputs too."""
    g = torch.Generator().manual_seed(1)
    k = [torch.randn(c, 2, 4, generator=g).to(dtype) for c in (1, 3, 2)]
    kv = {}
    for i, t in enumerate(k):
        a, b = to_numpy(t), to_numpy(-t)
        a.flags.writeable = b.flags.writeable = False  # as Ray hands them over
        kv[(i, 5)] = (a, b)
    rows = [[ScoredDoc(2, 1.0), ScoredDoc(0, 0.5)], [], [ScoredDoc(1, 0.1)]]
    keys, values = assemble(rows, [5, 5, 5], [ShardAnswer([], kv, str(dtype).removeprefix("torch."))])
    assert torch.equal(keys[0], torch.cat([k[2], k[0]])) and torch.equal(values[2], -k[1])
    assert keys[1].numel() == 0 and keys[0].dtype == dtype
    q = WireQuery.of(
        RoutingQuery(
            torch.randn(2, 3, 2, 4, generator=g),
            torch.ones(2, 3, dtype=torch.bool),
            RoutingSpec(num_heads=4, num_kv_heads=2),
            folded=True,
        )
    )
    q.vectors.flags.writeable = False
    assert torch.equal(q.query().vectors, torch.from_numpy(np.array(q.vectors)))
