"""The routing reference against dense per-head formulas; top-k and merge rules; launcher checks.

Legend: B query rows, T tokens, H heads, Hkv kv heads, D head dim, C chunks, N documents.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from msa_cluster.kernels import routing
from msa_cluster.kernels.routing import doc_scores, doc_scores_ref, merge_top_k, prepare_queries, select_top_k
from msa_cluster.types import RoutingSpec, ScoredDoc
from tests.kernels.helpers import ROUTING_SPECS as SPECS
from tests.kernels.helpers import assert_close, dense_doc_scores

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5



def _spec(spec: tuple[str, str, str, str], heads: int, kv_heads: int) -> RoutingSpec:
    sim, head, query, chunk = spec
    return RoutingSpec(sim, head, query, chunk, num_heads=heads, num_kv_heads=kv_heads)


def _random_case(seed: int, B: int, T: int, H: int, Hkv: int, D: int, doc_chunks: list[int]):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, -1] = True
    keys = torch.randn(sum(doc_chunks), Hkv, D, generator=g)
    offsets = torch.tensor([0, *doc_chunks]).cumsum(0)
    return q, mask, keys, offsets


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("doc_chunks", [[1], [3, 1, 5], [300, 2, 20]])
def test_doc_scores_ref_matches_dense_per_head_formula(spec, heads, doc_chunks):
    """doc_scores_ref (folded, tiled, float64) equals the per-head dense formula for every reduce option."""
    H, Hkv = heads
    rs = _spec(spec, H, Hkv)
    q, mask, keys, offsets = _random_case(1, B=2, T=5, H=H, Hkv=Hkv, D=8, doc_chunks=doc_chunks)
    got = doc_scores_ref(prepare_queries(q, mask, rs, 0.35), keys, offsets)
    want = dense_doc_scores(q, mask, keys, offsets.tolist(), rs, 0.35)
    assert got.dtype == torch.float32 and got.shape == (2, len(doc_chunks))
    assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_rows_without_routing_tokens_score_minus_inf_and_select_nothing():
    """A query row with no routing token scores -inf for every document and selects nothing."""
    for query_reduce in ("max", "mean", "last"):
        rs = RoutingSpec(query_reduce=query_reduce, num_heads=2, num_kv_heads=1)
        q, _, keys, offsets = _random_case(2, B=2, T=3, H=2, Hkv=1, D=4, doc_chunks=[2, 3])
        mask = torch.tensor([[False, False, False], [True, False, True]])
        scores = doc_scores_ref(prepare_queries(q, mask, rs, 1.0), keys, offsets)
        assert torch.isneginf(scores[0]).all() and torch.isfinite(scores[1]).all()
        assert select_top_k(scores, torch.tensor([7, 9]), 2)[0] == []


def test_no_chunks_gives_minus_inf_scores():
    """C = 0 chunks (empty memory or empty documents) yields -inf scores of shape [B, N]."""
    rs = RoutingSpec(num_heads=2, num_kv_heads=1)
    query = prepare_queries(torch.randn(1, 2, 2, 4), torch.ones(1, 2, dtype=torch.bool), rs, 1.0)
    assert doc_scores_ref(query, torch.empty(0, 1, 4), torch.tensor([0])).shape == (1, 0)
    assert torch.isneginf(doc_scores_ref(query, torch.empty(0, 1, 4), torch.tensor([0, 0, 0]))).all()


@pytest.mark.parametrize("spec", SPECS[:3])
def test_doc_scores_ref_of_any_shard_equals_global(spec):
    """A document's reference score is bit-identical whichever documents share its shard."""
    rs = _spec(spec, 4, 2)
    doc_chunks = [5, 1, 260, 3, 40, 7]
    q, mask, keys, offsets = _random_case(3, B=2, T=4, H=4, Hkv=2, D=8, doc_chunks=doc_chunks)
    query = prepare_queries(q, mask, rs, 0.5)
    full = doc_scores_ref(query, keys, offsets)
    for shard in ([1], [0, 3], [2, 5], [4, 1, 0]):
        shard_keys = torch.cat([keys[offsets[n] : offsets[n + 1]] for n in shard])
        shard_offsets = torch.tensor([0, *[doc_chunks[n] for n in shard]]).cumsum(0)
        assert torch.equal(doc_scores_ref(query, shard_keys, shard_offsets), full[:, shard])


def test_select_top_k_breaks_ties_to_lower_doc_id():
    """Equal scores rank by ascending document id, whatever the column order."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -math.inf]])
    ids = torch.tensor([50, 40, 10, 30, 20, 5])
    got = select_top_k(scores, ids, 4)[0]
    assert [d.doc_id for d in got] == [10, 20, 40, 30]
    assert [d.score for d in got] == [3.0, 3.0, 3.0, 2.0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 20])
def test_select_top_k_matches_sorting_all_documents(seed, k):
    """select_top_k equals a full sort by (score desc, id asc), ties and -inf included."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (3, 12), generator=g).float()  # many ties
    scores[scores == -3] = -math.inf
    ids = torch.randperm(100, generator=g)[:12]
    got = select_top_k(scores, ids, k)
    for row, picked in zip(scores.tolist(), got):
        want = sorted((-s, int(i)) for s, i in zip(row, ids) if s != -math.inf)[:k]
        assert [(-d.score, d.doc_id) for d in picked] == want


def test_select_top_k_rejects_k_below_one():
    """k < 1 is a user error (ValueError naming k)."""
    with pytest.raises(ValueError, match="top-k must be >= 1"):
        select_top_k(torch.zeros(1, 2), torch.tensor([0, 1]), 0)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", range(3))
def test_merge_top_k_of_any_split_equals_select_top_k_of_all(num_shards, seed):
    """Per-shard top-k merged equals the global top-k, for any split (more shards than docs too)."""
    g = torch.Generator().manual_seed(seed)
    N, k = 5, 3
    scores = torch.randint(0, 3, (2, N), generator=g).float()
    scores[0, 1] = -math.inf
    ids = torch.randperm(50, generator=g)[:N]
    rng = random.Random(seed)
    owner = [rng.randrange(num_shards) for _ in range(N)]
    parts = []
    for s in range(num_shards):
        cols = torch.tensor([n for n in range(N) if owner[n] == s], dtype=torch.int64)
        parts.append(select_top_k(scores[:, cols], ids[cols], k))
    assert merge_top_k(parts, k) == select_top_k(scores, ids, k)


def test_merge_top_k_of_nothing_is_empty():
    """No shard answers -> no rows; empty shards contribute nothing."""
    assert merge_top_k([], 3) == []
    assert merge_top_k([[[]], [[ScoredDoc(4, 1.0)]]], 3) == [[ScoredDoc(4, 1.0)]]


def test_cpu_dispatch_matches_an_independent_loop_and_never_runs_triton(monkeypatch):
    """On CPU, doc_scores takes the reference path (Triton is never called) and equals a plain loop."""
    monkeypatch.setattr(routing, "doc_scores_triton", lambda *a, **k: pytest.fail("Triton ran for CPU tensors"))
    rs = RoutingSpec(num_heads=4, num_kv_heads=2)
    q, mask, keys, offsets = _random_case(4, B=2, T=3, H=4, Hkv=2, D=8, doc_chunks=[2, 4, 1])
    got = doc_scores(prepare_queries(q, mask, rs, 0.5), keys, offsets)
    # Written out per document, chunk, token and head: head mean, max over routing tokens, max over chunks.
    want = torch.full((2, 3), -math.inf, dtype=torch.float64)
    for b in range(2):
        for n in range(3):
            for c in range(int(offsets[n]), int(offsets[n + 1])):
                for t in range(3):
                    if mask[b, t]:
                        s = sum(float(q[b, t, h].double() @ keys[c, h // 2].double()) for h in range(4)) * 0.5 / 4
                        want[b, n] = max(want[b, n], s)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)


def _query(H=4, Hkv=2, D=8, **kw):
    rs = RoutingSpec(num_heads=H, num_kv_heads=Hkv, **kw)
    return prepare_queries(torch.randn(1, 3, H, D), torch.ones(1, 3, dtype=torch.bool), rs, 1.0)


@pytest.mark.parametrize(
    "keys, offsets, error, match",
    [
        ([[1.0]], [0, 1], TypeError, "router_keys must be a torch.Tensor"),
        (torch.zeros(4, 2, 8, dtype=torch.int32), [0, 4], TypeError, "router_keys dtype"),
        (torch.zeros(4, 16), [0, 4], ValueError, "router_keys must be 3-D"),
        (torch.zeros(2, 4, 8).transpose(0, 1), [0, 4], ValueError, "router_keys must be contiguous"),
        (torch.zeros(4, 2, 6), [0, 4], ValueError, "head dim 6"),
        (torch.zeros(4, 1, 8), [0, 4], ValueError, "kv heads"),
        (torch.zeros(4, 2, 8), [0, 3], ValueError, "doc_offsets must run from 0 to C=4"),
        (torch.zeros(4, 2, 8), [0, 3, 2, 4], ValueError, "non-decreasing"),
        (torch.zeros(4, 2, 8), [0.0, 4.0], TypeError, "doc_offsets dtype"),
    ],
)
def test_doc_scores_launcher_rejects_bad_inputs(keys, offsets, error, match):
    """The Triton launcher names the bad input before launching anything."""
    offsets = torch.tensor(offsets)
    with pytest.raises(error, match=match):
        routing.doc_scores_triton(_query(), keys, offsets)
