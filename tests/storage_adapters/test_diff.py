"""MemoryStore.diff equals a brute-force diff of the two versions' documents, and reads only
the docs tables of segments that changed."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore, StoreConfig, StoreDiff
from msa_cluster.types import SnapshotGoneError
from tests.storage_adapters.conftest import _clear_memory
from tests.storage_adapters.store_helpers import FP32, make_doc

TENANTS = ("a", "b")


def brute_force(store: MemoryStore, old: int, new: int) -> StoreDiff:
    """The diff from every live document's row digest at both versions."""

    def rows(version: int) -> dict:
        if version < 0:
            return {}
        snap = store.snapshot(version)
        return {i: snap._row(i, ALL_TENANTS)[2] for i in snap.doc_ids(ALL_TENANTS)}

    a, b = rows(old), rows(new)
    added = tuple(sorted(i for i, r in b.items() if i not in a or a[i].digest() != r.digest()))
    return StoreDiff(
        added=added,
        removed=tuple(sorted(set(a) - set(b))),
        tenants={i: b[i].tenant for i in added},
        chunks={i: b[i].num_chunks for i in added},
    )


_op = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(TENANTS), st.integers(1, 3), st.integers(0, 3)),
    st.tuples(st.just("replace"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("reinsert"), st.integers(0, 50)),
    st.tuples(st.just("delete"), st.integers(0, 50), st.integers(1, 2)),
    st.tuples(st.just("compact"), st.booleans()),
    st.tuples(st.just("move alias"), st.integers(0, 50), st.integers(0, 3)),
)


def _apply(store: MemoryStore, op: tuple, seeds: dict[int, tuple[str, int, str]]) -> None:
    """Run one operation; `seeds` tracks each live id's (tenant, seed, client id)."""
    live = sorted(seeds)
    kind = op[0]
    if kind == "insert":
        _, tenant, n, seed = op
        ids = store.allocate_ids(tenant, count=n)
        store.insert([make_doc(i, tenant=tenant, seed=seed, client_id=f"c{i}") for i in ids])
        seeds.update({i: (tenant, seed, f"c{i}") for i in ids})
    elif kind in ("replace", "reinsert") and live:
        doc_id = live[op[1] % len(live)]
        tenant, seed, client_id = seeds[doc_id]
        seed = op[2] if kind == "replace" else seed
        store.insert([make_doc(doc_id, tenant=tenant, seed=seed, client_id=client_id)], replace=True)
        seeds[doc_id] = (tenant, seed, client_id)
    elif kind == "move alias" and live:  # a new id takes an old document's client id: the old one goes
        old = live[op[1] % len(live)]
        tenant, _, client_id = seeds.pop(old)
        [new] = store.allocate_ids(tenant, count=1)
        result = store.insert([make_doc(new, tenant=tenant, seed=op[2], client_id=client_id)], replace=True)
        assert result.deleted == (old,)
        seeds[new] = (tenant, op[2], client_id)
    elif kind == "delete" and live:
        first = op[1] % len(live)
        tenant = seeds[live[first]][0]
        gone = [i for i in live[first : first + op[2]] if seeds[i][0] == tenant]
        store.delete(gone, tenant=tenant)
        for i in gone:
            del seeds[i]
    elif kind == "compact":
        store.compact(small_segment_bytes=1 << 20 if op[1] else 0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=8))
def test_diff_equals_a_brute_force_diff_over_random_histories(ops):
    """Over random insert/replace/delete/compact/alias-move histories, diff(i, j) == brute force for every pair of versions."""
    url = f"memory://diff-{uuid.uuid4().hex[:12]}"
    try:
        store = MemoryStore.open(url, FP32, create=True, config=StoreConfig(verify_writes=False))
        seeds: dict[int, tuple[str, int, str]] = {}
        for op in ops:
            _apply(store, op, seeds)
        last = store.snapshot()
        assert last.doc_ids(ALL_TENANTS) == sorted(seeds)
        assert all((last.info(i, t).client_id, last.texts([i], t)[i]) == (c, f"document {i} seed {s}") for i, (t, s, c) in seeds.items())
        versions = [-1, *store.versions()]
        for old in versions:
            for new in versions:
                assert store.diff(old, new) == brute_force(store, old, new), (old, new)
    finally:
        _clear_memory(url)


def test_compaction_moves_nothing_into_a_diff(location):
    """Compaction alone diffs as empty; across a compaction, only real changes show."""
    store = MemoryStore.open(location.url, FP32, create=True, storage_options=location.storage_options)
    store.allocate_ids("a", count=6)
    store.insert([make_doc(i, tenant="a") for i in range(3)])
    store.insert([make_doc(i, tenant="a") for i in range(3, 6)])
    before = store.latest_version()
    store.delete([1], tenant="a")
    store.insert([make_doc(4, tenant="a", seed=2)], replace=True)
    middle = store.latest_version()
    assert store.compact().rewritten_segments
    after = store.latest_version()
    assert store.diff(middle, after) == StoreDiff((), (), {}, {})
    d = store.diff(before, after)
    assert d.added == (4,) and d.removed == (1,) and d.tenants == {4: "a"} and d.chunks == {4: make_doc(4).num_chunks}
    assert store.diff(-1, after).added == (0, 2, 3, 4, 5) and store.diff(after, -1).removed == (0, 2, 3, 4, 5)


def test_diff_reads_only_the_segments_that_changed(location):
    """After many inserts, the diff of one more insert opens only the new segment's docs table."""
    store = MemoryStore.open(location.url, FP32, create=True, storage_options=location.storage_options)
    ids = store.allocate_ids("a", count=11)
    for i in ids[:10]:
        store.insert([make_doc(i, tenant="a")])
    old = store.latest_version()
    store.insert([make_doc(ids[10], tenant="a")])
    fresh = MemoryStore.open(location.url, FP32, storage_options=location.storage_options)
    opened = []
    original = fresh._cache.docs
    fresh._cache.docs = lambda seg: opened.append(seg.id) or original(seg)
    assert fresh.diff(old, old + 1).added == (ids[10],)
    assert opened == [fresh.snapshot().manifest.segments[-1].id]


def test_diff_of_a_collected_version_is_snapshot_gone(location):
    """A version removed by gc cannot be diffed: SnapshotGoneError, not a wrong answer."""
    store = MemoryStore.open(location.url, FP32, create=True, storage_options=location.storage_options)
    store.allocate_ids("a", count=1)
    store.insert([make_doc(0, tenant="a")])
    store.gc(grace_s=0)
    with pytest.raises(SnapshotGoneError):
        store.diff(1, 2)
    with pytest.raises(ValueError):
        store.diff(-2, 2)
