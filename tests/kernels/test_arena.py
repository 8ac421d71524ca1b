"""RouterArena's storage: a bulk load adopted without a copy scores like documents appended one by
one, an adopted arena keeps growing, and adopt refuses what it cannot hold."""

import pytest
import torch

from msa_cluster.kernels.arena import Pin, RouterArena
from msa_cluster.kernels.routing import prepare_queries
from msa_cluster.types import RoutingSpec

LAYERS = (2, 3)
SPEC = RoutingSpec(num_heads=2, num_kv_heads=2)


def _docs(seed: int, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(10 * seed + i, torch.randn(len(LAYERS), c, 2, 4, generator=g)) for i, c in enumerate(counts)]


def _query():
    q = torch.randn(1, 3, 2, 4, generator=torch.Generator().manual_seed(9))
    return prepare_queries(q, torch.ones(1, 3, dtype=torch.bool), SPEC, 0.5)


def _top(arena: RouterArena, pin: Pin) -> list[list[tuple[int, float]]]:
    return [[(d.doc_id, d.score) for d in row] for row in arena.score(3, _query(), 4, [pin])]


def test_adopted_bulk_load_scores_like_appended_documents_and_shares_the_storage():
    docs = _docs(1, [3, 1, 5, 2])
    bulk = torch.cat([k for _, k in docs], dim=1)  # [R, 11, Hkv, D]: what a shard's bulk read returns
    appended, adopted = RouterArena(LAYERS), RouterArena(LAYERS)
    appended.append(docs, version=1)
    adopted.adopt(bulk, [(d, int(k.shape[1])) for d, k in docs], version=1)
    assert adopted._keys is not None and adopted._keys.data_ptr() == bulk.data_ptr()  # held once, not copied
    assert _top(adopted, Pin(1)) == _top(appended, Pin(1))
    assert adopted.live_ids() == appended.live_ids() and adopted.held_chunks == 11

    more = _docs(2, [4, 2])  # later changes go through append: storage grows, earlier entries stay
    for arena in (appended, adopted):
        arena.append(more, version=2)
        arena.remove([docs[0][0]], version=3)
    for pin in (Pin(1), Pin(2), Pin(3)):
        assert _top(adopted, pin) == _top(appended, pin)
    assert adopted._keys.shape[1] >= 17


def test_growth_is_by_a_quarter_once_past_the_minimum():
    arena = RouterArena(LAYERS)
    arena.adopt(torch.zeros(len(LAYERS), 2000, 2, 4), [(1, 2000)], version=1)
    arena.append(_docs(3, [1]), version=2)
    assert arena._keys is not None and arena._keys.shape[1] == 2500


def test_adopt_refuses_a_used_arena_and_keys_that_do_not_match_the_documents():
    arena = RouterArena(LAYERS)
    with pytest.raises(ValueError, match="do not hold"):
        arena.adopt(torch.zeros(len(LAYERS), 4, 2, 4), [(1, 3)], version=1)
    with pytest.raises(ValueError, match="do not hold"):
        arena.adopt(torch.zeros(3, 4, 2, 4), [(1, 4)], version=1)
    with pytest.raises(ValueError, match="distinct"):
        arena.adopt(torch.zeros(len(LAYERS), 4, 2, 4), [(1, 2), (1, 2)], version=1)
    arena.append(_docs(4, [2]), version=1)
    with pytest.raises(ValueError, match="empty arena"):
        arena.adopt(torch.zeros(len(LAYERS), 2, 2, 4), [(5, 2)], version=2)
