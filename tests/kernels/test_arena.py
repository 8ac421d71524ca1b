"""RouterArena's storage: blocks that grow without copying and score exactly like one contiguous
tensor (a single-block arena), a bulk load adopted without a copy, compaction block by block, and
adopt refusing what it cannot hold."""

import random
import weakref

import pytest
import torch

from msa_cluster.kernels import arena as arena_module
from msa_cluster.kernels.arena import Pin, RouterArena
from msa_cluster.kernels.routing import prepare_queries
from msa_cluster.types import RoutingSpec, SnapshotGoneError

LAYERS = (2, 3)
SPEC = RoutingSpec(num_heads=2, num_kv_heads=2)
HUGE = 1 << 30  # block_chunks of the single-block reference arena


def _docs(seed: int, counts: list[int], first_id: int | None = None) -> list[tuple[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = 10 * seed if first_id is None else first_id
    return [(base + i, torch.randn(len(LAYERS), c, 2, 4, generator=g)) for i, c in enumerate(counts)]


def _query(batch: int = 1, seed: int = 9, spec: RoutingSpec = SPEC):
    q = torch.randn(batch, 3, 2, 4, generator=torch.Generator().manual_seed(seed))
    return prepare_queries(q, torch.ones(batch, 3, dtype=torch.bool), spec, 0.5)


def _top(arena: RouterArena, pin: Pin) -> list[list[tuple[int, float]]]:
    return [[(d.doc_id, d.score) for d in row] for row in arena.score(3, _query(), 4, [pin])]


def _scored(arena: RouterArena, layer: int, query, k: int, pins: list[Pin]) -> list[list[tuple[int, float]]]:
    return [[(d.doc_id, d.score) for d in row] for row in arena.score(layer, query, k, pins)]


def _pair(block_chunks: int) -> tuple[RouterArena, RouterArena]:
    """(arena of small blocks, single-block reference) that take the same changes."""
    return RouterArena(LAYERS, block_chunks=block_chunks), RouterArena(LAYERS, block_chunks=HUGE)


def test_adopted_bulk_load_scores_like_appended_documents_and_shares_the_storage():
    """adopt keeps the bulk read as one block without a copy; later appends add blocks and leave it in place."""
    docs = _docs(1, [3, 1, 5, 2])
    bulk = torch.cat([k for _, k in docs], dim=1)  # [R, 11, Hkv, D]: what a shard's bulk read returns
    appended, adopted = RouterArena(LAYERS), RouterArena(LAYERS, block_chunks=4)
    appended.append(docs, version=1)
    assert adopted.visible_ids(Pin(1)) == []
    adopted.adopt(bulk, [(d, int(k.shape[1])) for d, k in docs], version=1)
    assert adopted.visible_ids(Pin(1)) == [10, 11, 12, 13]
    assert adopted._blocks.tensors[0].data_ptr() == bulk.data_ptr()  # held once, not copied
    assert _top(adopted, Pin(1)) == _top(appended, Pin(1))
    assert adopted.live_ids() == appended.live_ids() and adopted.held_chunks == 11

    more = _docs(2, [4, 2, 2])  # later changes go through append: new blocks, earlier entries stay
    for arena in (appended, adopted):
        arena.append(more, version=2)
        arena.remove([docs[0][0]], version=3)
    for pin in (Pin(1), Pin(2), Pin(3)):
        assert _top(adopted, pin) == _top(appended, pin)
    assert adopted._blocks.tensors[0].data_ptr() == bulk.data_ptr() and len(adopted._blocks.tensors) == 3


def test_growth_adds_blocks_and_copies_nothing():
    """Appends past a block allocate new blocks; the earlier blocks keep their storage and their keys."""
    arena = RouterArena(LAYERS, block_chunks=8)
    arena.append(_docs(1, [3, 4]), version=1)
    first = arena._blocks.tensors[0]
    ptr, snapshot = first.data_ptr(), first[:, :7].clone()
    for v in range(2, 8):
        arena.append(_docs(v, [2, 3, 1, 4]), version=v)
    blocks = arena._blocks.tensors
    assert len(blocks) >= 5 and all(b.shape[1] == 8 for b in blocks)
    assert blocks[0].data_ptr() == ptr and torch.equal(blocks[0][:, :7], snapshot)
    assert arena.held_chunks == arena._used == 7 + 6 * 10


def test_small_arena_blocks_start_small():
    """A small arena does not allocate a whole default block: its first block fits what came, at least 1024 chunks."""
    arena = RouterArena(LAYERS)
    arena.append(_docs(1, [3]), version=1)
    assert [b.shape[1] for b in arena._blocks.tensors] == [1024]
    big = RouterArena(LAYERS, block_chunks=4096)
    big.append(_docs(2, [1500, 1500]), version=1)
    assert [b.shape[1] for b in big._blocks.tensors] == [3000]


@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_score_like_a_single_block_arena(chunk_reduce, seed):
    """Many small documents over many blocks, removes, replacements and mixed pins: ids, scores and order
    equal the single-block arena's bit for bit."""
    rnd = random.Random(seed)
    spec = RoutingSpec(num_heads=2, num_kv_heads=2, chunk_reduce=chunk_reduce)
    small, ref = _pair(block_chunks=16)
    next_id = 0
    for v in range(1, 7):
        docs = _docs(100 * seed + v, [rnd.randint(1, 6) for _ in range(rnd.randint(3, 12))], first_id=next_id)
        next_id += len(docs)
        live = small.live_ids()
        replaced = [(d, torch.randn(len(LAYERS), rnd.randint(1, 5), 2, 4)) for d in rnd.sample(live, min(2, len(live)))]
        twin = [(next_id, docs[0][1].clone())]  # the same keys under another id: a tie across blocks
        next_id += 1
        gone = rnd.sample(live, min(3, len(live)))
        for arena in (small, ref):
            arena.append(docs + replaced + twin, version=v)
            arena.remove([d for d in gone if d not in {r for r, _ in replaced}], version=v)
    assert len(small._blocks.tensors) > 5 and len(ref._blocks.tensors) == 1
    pins = [Pin(v) for v in (1, 3, 6, 6, 2, 5)]
    for qseed in range(4):
        query = _query(len(pins), seed=qseed, spec=spec)
        for k in (1, 3, 8, 1000):
            assert _scored(small, 3, query, k, pins) == _scored(ref, 3, query, k, pins)
            assert _scored(small, 2, query, k, pins[:1] * len(pins)) == _scored(ref, 2, query, k, pins[:1] * len(pins))


def test_compaction_repacks_block_by_block_and_scores_the_same(monkeypatch):
    """Compaction keeps blocks without retired entries as they are, repacks the rest freeing each old block
    before the next is copied, and changes no result."""
    small, ref = _pair(block_chunks=8)
    for arena in (small, ref):
        arena.compact_min_chunks = 0
        for v in range(1, 6):
            arena.append(_docs(v, [2, 2, 3, 1]), version=v)  # 8 chunks a version: one block each
    gone = [10, 11, 12, 13, 30, 31, 32, 40, 41, 42]  # 22 of 40 chunks: past half, so collect compacts
    ref.remove(gone, version=6)
    ref.collect(below=Pin(6))
    old = [weakref.ref(b) for b in small._blocks.tensors]
    kept = {small._blocks.tensors[i].data_ptr() for i in (1, 4)}  # versions 2 and 5: nothing of them is removed
    dead_when_placing = []
    place = arena_module._Blocks.place

    def spy(self, keys, pending):
        dead_when_placing.append([r() is None for r in old])
        return place(self, keys, pending)

    monkeypatch.setattr(arena_module._Blocks, "place", spy)
    small.remove(gone, version=6)
    small.collect(below=Pin(6))
    monkeypatch.undo()
    assert small.held_chunks == small._used == 18 and ref._used == 18
    assert small.live_ids() == ref.live_ids() and len(small.live_ids()) == 10
    assert [b.data_ptr() in kept for b in small._blocks.tensors] == [True, False, True]
    # placing version 3's kept entry, then version 4's: the old blocks already repacked are freed
    assert dead_when_placing == [[True, False, False, False, False], [True, False, True, False, False]]
    assert old[0]() is None and len(ref._blocks.tensors) == 1
    query = _query(2, seed=4)
    for k in (1, 5, 100):
        assert _scored(small, 3, query, k, [Pin(6), Pin(6)]) == _scored(ref, 3, query, k, [Pin(6), Pin(6)])
    with pytest.raises(SnapshotGoneError):
        small.score(3, _query(), 3, [Pin(5)])
    for arena in (small, ref):  # still appendable after compaction, replacements included
        arena.append(_docs(7, [5, 2]) + [(33, torch.ones(len(LAYERS), 2, 2, 4))], version=7)
    assert _scored(small, 3, query, 100, [Pin(7), Pin(6)]) == _scored(ref, 3, query, 100, [Pin(7), Pin(6)])


def test_a_document_larger_than_a_block_gets_a_block_of_its_own_size():
    """A 10-chunk document in an arena of 4-chunk blocks: one block of 10, the next document in a new block."""
    small, ref = _pair(block_chunks=4)
    for arena in (small, ref):
        arena.append(_docs(1, [2, 10, 1, 4]), version=1)
    assert [b.shape[1] for b in small._blocks.tensors] == [4, 10, 4, 4]
    query = _query(3, seed=5)
    assert _scored(small, 3, query, 3, [Pin(1)] * 3) == _scored(ref, 3, query, 3, [Pin(1)] * 3)


def test_score_skips_blocks_no_row_sees(monkeypatch):
    """Blocks with no entry visible to any row are not scored at all."""
    arena = RouterArena(LAYERS, block_chunks=4)
    for v in range(1, 5):
        arena.append(_docs(v, [4]), version=v)
    arena.remove([10, 20, 30], version=5)
    calls = []
    real = arena_module.route_top_k
    monkeypatch.setattr(arena_module, "route_top_k", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert [d.doc_id for d in arena.score(3, _query(), 5, [Pin(5)])[0]] == [40]
    assert len(calls) == 1


def test_append_refuses_keys_of_another_head_shape_and_changes_nothing():
    """[Hkv, D] must match the arena's, for every document of an append, before anything is placed."""
    arena = RouterArena(LAYERS)
    arena.append(_docs(1, [2]), version=1)
    with pytest.raises(ValueError, match="do not match"):
        arena.append([(5, torch.zeros(len(LAYERS), 2, 2, 4)), (6, torch.zeros(len(LAYERS), 2, 1, 4))], version=2)
    assert arena.live_ids() == [10] and arena._used == 2
    with pytest.raises(ValueError, match="block_chunks"):
        RouterArena(LAYERS, block_chunks=0)


def test_adopt_refuses_a_used_arena_and_keys_that_do_not_match_the_documents():
    """adopt takes only an empty arena and keys that hold exactly the named documents."""
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
