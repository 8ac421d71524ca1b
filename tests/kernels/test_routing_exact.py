"""Exact routing: route_top_k against the canonical float64 reference, adversarial near-ties, and
invariance to tile, thread count, batching and sharding; the fixed-order float64 helpers.

Legend: B query rows, T tokens, H heads, Hkv kv heads, D head dim, C chunks, N documents, K = Hkv * D.
"""

from __future__ import annotations

import math

import pytest
import torch

from msa_cluster.kernels import _exact
from msa_cluster.kernels.routing import doc_scores, doc_scores_ref, merge_top_k, prepare_queries, select_top_k
from msa_cluster.kernels.routing_exact import route_top_k
from msa_cluster.types import RoutingQuery, RoutingSpec
from tests.kernels.helpers import ROUTING_SPECS as SPECS


def _case(seed: int, spec, *, B=3, T=6, H=4, Hkv=2, D=8, docs=40, max_chunks=6, key_dtype=torch.bfloat16):
    """Random documents of 0..max_chunks-1 chunks (empty ones included), a row without routing
    tokens, shuffled ids and a random visibility mask."""
    g = torch.Generator().manual_seed(seed)
    rs = RoutingSpec(*spec, num_heads=H, num_kv_heads=Hkv)
    lengths = torch.randint(0, max_chunks, (docs,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    keys = torch.randn(int(offsets[-1]), Hkv, D, generator=g).to(key_dtype)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, -1] = True
    mask[-1] = False  # a row with no routing token selects nothing
    query = prepare_queries(torch.randn(B, T, H, D, generator=g), mask, rs, 0.3)
    ids = torch.randperm(10 * docs, generator=g)[:docs]
    visible = torch.rand(B, docs, generator=g) < 0.8
    return query, keys, offsets, ids, visible


def _canonical(query, keys, offsets, ids, k, visible=None):
    scores = doc_scores_ref(query, keys, offsets)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    return select_top_k(scores, ids, k)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", range(3))
def test_route_top_k_equals_the_canonical_reference_bit_for_bit(spec, seed):
    """Selections and fp32 scores equal select_top_k(doc_scores_ref) exactly, for every reduce option,
    k below, at and above N, bf16 and fp32 keys, visibility masks and empty documents."""
    for key_dtype in (torch.bfloat16, torch.float32):
        query, keys, offsets, ids, visible = _case(seed, spec, key_dtype=key_dtype)
        for k in (1, 5, 60):
            assert route_top_k(query, keys, offsets, ids, k, visible) == _canonical(query, keys, offsets, ids, k, visible)
        assert route_top_k(query, keys, offsets, ids, 4) == _canonical(query, keys, offsets, ids, 4)


def _near_ties(seed: int, docs: int = 48, K_heads: int = 8, D: int = 128):
    """Documents whose keys differ from one base key by a few ulps in a few coordinates: their exact
    scores differ by far less than the fp32 rounding error of a 1024-wide inner product. Some
    documents repeat a key exactly (true ties, broken by id). Released spec, folded K = 1024."""
    g = torch.Generator().manual_seed(seed)
    rs = RoutingSpec(num_heads=K_heads, num_kv_heads=K_heads)
    base = torch.randn(K_heads * D, generator=g) * 10
    keys = base.repeat(docs, 1)
    for n in range(docs):
        cols = torch.randint(0, K_heads * D, (3,), generator=g)
        steps = torch.randint(-4, 5, (3,), generator=g).float()
        keys[n, cols] = torch.nextafter(keys[n, cols], keys[n, cols] + steps * keys[n, cols].abs())
    keys[5] = keys[4]  # an exact tie
    keys[30] = keys[4]
    mask = torch.ones(2, 3, dtype=torch.bool)
    query = prepare_queries(torch.randn(2, 3, K_heads, D, generator=g), mask, rs, D**-0.5)
    offsets = torch.arange(docs + 1)
    ids = torch.randperm(1000, generator=g)[:docs]
    return query, keys.view(docs, K_heads, D).contiguous(), offsets, ids


def test_adversarial_near_ties_match_an_independent_float64_reference():
    """On near-tied documents, where the fp32 first pass alone picks wrongly, route_top_k picks the
    documents of a float64 per-head reference, and reports its scores rounded to fp32."""
    fp32_wrong = 0
    for seed in range(6):
        query, keys, offsets, ids = _near_ties(seed)
        # one chunk per document, every token routes: the document score is the max over tokens of one K-wide product
        want_scores = (query.vectors.double().flatten(2) @ keys.double().flatten(1).T).amax(dim=1)  # [B, N]
        k = 8
        want = select_top_k(want_scores.float(), ids, k)
        got = route_top_k(query, keys, offsets, ids, k)
        assert [[d.doc_id for d in row] for row in got] == [[d.doc_id for d in row] for row in want]
        assert [[d.score for d in row] for row in got] == [[d.score for d in row] for row in want]
        fp32_wrong += select_top_k(doc_scores(query, keys, offsets), ids, k) != want
    assert fp32_wrong > 0, "the near-tie cases never fooled the fp32 pass: they test nothing"


def test_cancelling_scores_are_exact():
    """Keys whose inner products cancel to near zero (fp32 error larger than the score) still rank exactly."""
    g = torch.Generator().manual_seed(11)
    rs = RoutingSpec(num_heads=2, num_kv_heads=2)
    q = torch.randn(1, 2, 2, 64, generator=g)
    query = prepare_queries(q, torch.ones(1, 2, dtype=torch.bool), rs, 1.0)
    big = torch.randn(30, 2, 32, generator=g) * 1e4
    keys = torch.cat([big, -big + torch.randn(30, 2, 32, generator=g) * 1e-3], dim=-1)  # [30, 2, 64]
    offsets, ids = torch.arange(31), torch.arange(30)
    assert route_top_k(query, keys, offsets, ids, 5) == _canonical(query, keys, offsets, ids, 5)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[5]])
def test_selections_do_not_depend_on_tile_threads_batch_or_shard(spec):
    """The same row gets identical selections and scores with any first-pass tile, 1 or 2 torch
    threads, 1 to 5 tile workers, alone or batched with other rows (padded to a longer T), and from any sharding merged."""
    query, keys, offsets, ids, _ = _case(4, spec, B=3, T=6, docs=50, max_chunks=9)
    want = route_top_k(query, keys, offsets, ids, 6)
    threads = torch.get_num_threads()
    try:
        for tile, n_threads, workers in ((1, 1, 1), (7, 2, 2), (8, 1, 3), (4096, 2, None), (3, 2, 5)):
            torch.set_num_threads(n_threads)
            assert route_top_k(query, keys, offsets, ids, 6, tile=tile, workers=workers) == want
            assert torch.get_num_threads() == n_threads  # the workers' single-thread section restored it
    finally:
        torch.set_num_threads(threads)
    for b in range(3):  # each row alone, its tokens padded with 5 non-routing ones
        vectors = torch.cat([query.vectors[b : b + 1], torch.randn(1, 5, *query.vectors.shape[2:])], dim=1)
        mask = torch.cat([query.mask[b : b + 1], torch.zeros(1, 5, dtype=torch.bool)], dim=1)
        alone = RoutingQuery(vectors, mask, query.spec, query.folded)
        assert route_top_k(alone, keys, offsets, ids, 6) == [want[b]]
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    for n_shards in (2, 3, 7):
        parts = []
        for s in range(n_shards):
            docs = list(range(s, 50, n_shards))
            shard_keys = torch.cat([keys[offsets[n] : offsets[n + 1]] for n in docs])
            shard_offsets = torch.tensor([0, *[lengths[n] for n in docs]]).cumsum(0)
            parts.append(route_top_k(query, shard_keys, shard_offsets, ids[docs], 6))
        assert merge_top_k(parts, 6) == want


def test_first_pass_bound_covers_the_fp32_error():
    """The first pass's chunk scores lie within the stated bound of the canonical ones."""
    from msa_cluster.kernels.routing import _exact_chunk_scores, first_pass

    query, keys, offsets, ids, _ = _case(5, SPECS[3], B=2, docs=30)
    exact = _exact_chunk_scores(query, keys.float())
    for start, a, e in first_pass(query, keys, tile=16):
        exact_tile = exact[:, start : start + a.shape[1]]
        finite = torch.isfinite(exact_tile)
        assert ((a.double() - exact_tile).abs()[finite] <= e[finite]).all()


def test_empty_inputs_and_rows_without_routing_tokens_select_nothing():
    """No chunks, no documents, and a row with no routing token: empty selections, no error."""
    query, keys, offsets, ids, _ = _case(6, SPECS[0])
    assert route_top_k(query, keys[:0], torch.zeros(3, dtype=torch.int64), ids[:2], 3) == [[], [], []]
    assert route_top_k(query, keys[:0], torch.zeros(1, dtype=torch.int64), ids[:0], 3) == [[], [], []]
    assert route_top_k(query, keys, offsets, ids, 3)[-1] == []


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, o, i, v: (q, k, o, i, 0, v), ValueError, "top-k must be >= 1"),
        (lambda q, k, o, i, v: (q, k.int(), o, i, 3, v), TypeError, "router_keys dtype"),
        (lambda q, k, o, i, v: (q, k, o[:-1], i, 3, v), ValueError, "doc_offsets must run from 0"),
        (lambda q, k, o, i, v: (q, k, o, i[:-1], 3, v), ValueError, "doc_ids has"),
        (lambda q, k, o, i, v: (q, k, o, i, 3, v[:, :-1]), ValueError, "visible must be"),
        (lambda q, k, o, i, v: (q, k, o, i, 3, v.int()), ValueError, "visible must be"),
    ],
)
def test_route_top_k_rejects_bad_inputs(change, error, match):
    """Bad inputs get an error naming them."""
    args = change(*_case(7, SPECS[0]))
    with pytest.raises(error, match=match):
        route_top_k(*args)


def test_fixed_sum_is_pairwise_and_ignores_trailing_zero_padding():
    """fixed_sum follows the pairwise order (checked against a written-out tree), and padding with
    zeros to any longer length gives the same bits."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 13, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 13, dtype=torch.float64)
    got = _exact.fixed_sum(x)
    padded = torch.cat([x, torch.zeros(5, 16)], dim=1)

    def tree(v: list[float]) -> float:
        v = v + [0.0] * (16 - len(v))
        while len(v) > 1:
            half = len(v) // 2
            v = [a + b for a, b in zip(v[:half], v[half:])]
        return v[0]

    assert got.tolist() == [tree(row) for row in x.tolist()]
    assert torch.equal(_exact.fixed_sum(padded), got)
    assert torch.equal(_exact.fixed_sum(-torch.zeros(2, 3)), torch.zeros(2))  # -0.0 comes out as +0.0


def test_outward_rounding_to_fp32():
    """round_up/round_down give an fp32 above/below a float64, within 1 ulp of the nearest one."""
    x = torch.tensor([1.0 + 2**-30, -1.0 - 2**-30, 0.5, 1e30], dtype=torch.float64)
    up, down = _exact.round_up_fp32(x), _exact.round_down_fp32(x)
    assert (up.double() >= x).all() and (down.double() <= x).all()
    ulp = torch.tensor([2**-23, 2**-23, 2**-24, 2.0**(99 - 23)], dtype=torch.float64)
    assert ((up.double() - x) <= 2 * ulp).all() and ((x - down.double()) <= 2 * ulp).all()


def test_upper_and_lower_enclose_an_fp32_sum():
    """upper(x, e) >= x + e >= ... >= x - e >= lower(x, e) exactly, powers of two and negatives included."""
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(1000, generator=g) * 100, torch.tensor([1.0, -1.0, 2.0**-20, -(2.0**30), 0.0])])
    e = torch.cat([torch.rand(1000, generator=g) * 1e-3, torch.tensor([2.0**-24, 2.0**-25, 2.0**-44, 1.0, 2.0**-140])])
    x64, e64 = x.double(), e.double()
    assert (_exact.upper(x, e).double() >= x64 + e64).all()
    assert (_exact.lower(x, e).double() <= x64 - e64).all()


def test_cpu_tiles_follow_the_work_and_the_workers():
    """A lone query keeps big tiles (one worker); a batch gets enough tiles for every worker; no tile
    exceeds the cache bound."""
    from msa_cluster.kernels.routing import tile_chunks
    from msa_cluster.kernels.routing_exact import _TILES_PER_WORKER, _tile_for

    assert _tile_for(2048, 1024, rows=64, workers=2) == 512  # 64 MFLOP per tile: 4 tiles, too few for 2 workers
    assert -(-2048 // _tile_for(2048, 1024, rows=2048, workers=2)) >= 2 * _TILES_PER_WORKER
    assert _tile_for(10**6, 1024, rows=64, workers=2) == tile_chunks(1024)
    assert _tile_for(2048, 1024, rows=2048, workers=1) == tile_chunks(1024)  # one worker: the biggest tiles


def test_float64_pass_rescores_only_chunks_near_the_boundary(monkeypatch):
    """On random keys the float64 pass sees a few chunks per selected document, not the memory:
    the first pass's bound prunes everything that cannot reach the top-k (here < 5% of 4,000 chunks)."""
    import msa_cluster.kernels.routing_exact as exact_module

    kept: list[int] = []
    real = exact_module._exact_chunks

    def spy(query, keys, rows, chunks, floor):
        kept.append(rows.numel())
        return real(query, keys, rows, chunks, floor)

    monkeypatch.setattr(exact_module, "_exact_chunks", spy)
    g = torch.Generator().manual_seed(12)
    rs = RoutingSpec(num_heads=8, num_kv_heads=4)
    query = prepare_queries(torch.randn(2, 16, 8, 32, generator=g), torch.ones(2, 16, dtype=torch.bool), rs, 32**-0.5)
    keys = torch.randn(4000, 4, 32, generator=g).bfloat16()
    offsets, ids = torch.arange(0, 4001, 8), torch.arange(500)
    assert route_top_k(query, keys, offsets, ids, 8, tile=256) == _canonical(query, keys, offsets, ids, 8)
    assert kept and kept[0] < 0.05 * 4000
