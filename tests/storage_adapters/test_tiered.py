"""The K/V tier evicts within its budget and never fails; the router tier never evicts and refuses when full."""

from __future__ import annotations

import pytest
import torch

from msa_cluster.storage_adapters import CorruptStoreError, MemoryStore, RouterTier, TieredKVReader
from msa_cluster.types import MemoryFullError, UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, make_doc

DOC_TOKENS = 8  # 2 chunks: K and V of a document are 2 * (2 layers * 2 chunks * 2 heads * 8 * 4 B) = 512 B
KV_BYTES = 512


def _store(loc):
    store = MemoryStore.open(loc.url, FP32, create=True, storage_options=loc.storage_options)
    store.insert([make_doc(i, num_tokens=DOC_TOKENS, tenant="a" if i < 6 else "b") for i in range(8)])
    return store


def test_hot_tier_evicts_least_recently_used_within_its_budget(location):
    """With room for 3 documents, reading 8 keeps the 3 most recently used and never exceeds the budget."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=3 * KV_BYTES)
    for i in range(8):
        k, v = reader.get(i)
        want = make_doc(i, num_tokens=DOC_TOKENS)
        assert torch.equal(k, want.keys) and torch.equal(v, want.values)
        assert reader.stats().bytes <= 3 * KV_BYTES
    reader.get(5)  # hit: 5 becomes most recent, so 6 is the next to go
    reader.get(0)  # miss: evicts 6
    s = reader.stats()
    assert (s.hits, s.misses, s.evictions, s.documents) == (1, 9, 6, 3)
    reader.get(7)
    assert reader.stats().hits == 2


def test_documents_larger_than_the_budget_are_served_uncached(location):
    """A zero or tiny budget still answers every read correctly; nothing is cached, nothing fails."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=100)
    k, _ = reader.get(2)
    assert torch.equal(k, make_doc(2, num_tokens=DOC_TOKENS).keys)
    assert reader.stats().documents == 0 and reader.stats().bytes == 0


def test_gather_concatenates_one_layer_in_the_given_order(location):
    """gather(layer, ids) is the per-layer concatenation [sum C, Hkv, D] that attention reads."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=1 << 20)
    k, v = reader.gather(3, [4, 1])
    d4, d1 = make_doc(4, num_tokens=DOC_TOKENS), make_doc(1, num_tokens=DOC_TOKENS)
    assert torch.equal(k, torch.cat([d4.keys[1], d1.keys[1]])) and torch.equal(v, torch.cat([d4.values[1], d1.values[1]]))
    assert reader.gather(1, [])[0].shape == (0, 2, 8)
    with pytest.raises(ValueError, match="routing layer"):
        reader.gather(2, [1])


def test_moving_to_a_new_version_drops_deleted_and_updated_documents_from_ram(location):
    """After delete/update + set_snapshot, RAM holds none of the old bytes; compaction keeps valid entries."""
    store = _store(location)
    reader = TieredKVReader(store.snapshot(), budget_bytes=1 << 20)
    reader.prefetch(range(8))
    store.delete([2])
    store.insert([make_doc(3, num_tokens=DOC_TOKENS, tenant="a", seed=1)], replace=True)
    store.compact()
    reader.set_snapshot(store.snapshot())
    assert reader.stats().documents == 6  # docs 2 (deleted) and 3 (updated) dropped; compaction alone drops nothing
    with pytest.raises(UnknownDocumentError):
        reader.get(2)
    assert torch.equal(reader.get(3)[0], make_doc(3, num_tokens=DOC_TOKENS, seed=1).keys)


def test_tenant_scoped_reader_refuses_other_tenants(location):
    """A reader bound to a tenant cannot fetch another tenant's K/V."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=1 << 20, tenant="b")
    reader.get(7)
    with pytest.raises(UnknownDocumentError):
        reader.get(0)


def test_cold_reads_on_s3_are_single_range_reads(location):
    """On object storage a cold document costs one ranged GET of exactly its K/V bytes."""
    if location.protocol != "s3":
        pytest.skip("range reads are what matters on object storage; local reads mmap the file")
    store = _store(location)
    snap = store.snapshot()
    assert 5 in snap  # the docs tables are read when a snapshot is first used, not per document
    calls = []
    fs = snap._fs.fs
    original = fs.cat_file

    def spy(path, start=None, end=None, **kw):
        calls.append((path, start, end))
        return original(path, start=start, end=end, **kw)

    fs.cat_file = spy
    try:
        TieredKVReader(snap, budget_bytes=1 << 20).get(5)
    finally:
        del fs.cat_file
    assert len(calls) == 1 and calls[0][0].endswith(".content.arrow") and calls[0][2] - calls[0][1] == KV_BYTES


def test_local_reads_are_zero_copy_views_of_the_segment(location):
    """On local disk read_kv returns tensors that live in the segment's memory map, not in a copy."""
    if location.protocol != "file":
        pytest.skip("memory maps exist only for local files")
    snap = _store(location).snapshot()
    k, v = snap.read_kv(4)
    buf = snap._cache.mapped(snap.manifest.segments[0].files["content"])
    import pyarrow as pa

    base = pa.py_buffer(buf).address
    assert base <= k.data_ptr() < base + len(buf) and base <= v.data_ptr() < base + len(buf)
    k.add_(1)  # copy-on-write: a caller's write never reaches the file ...
    assert torch.equal(MemoryStore.open(location.url, FP32).snapshot().read_kv(4)[0], make_doc(4, num_tokens=DOC_TOKENS).keys)
    with pytest.raises(CorruptStoreError, match="document 4"):  # ... and is never served as data
        snap.read_kv(4)


def test_router_tier_refuses_when_full_and_keeps_what_it_had(location):
    """A full router tier raises MemoryFullError, holds nothing of the refused load, and never evicts."""
    snap = _store(location).snapshot()
    per_doc = snap.router_nbytes([0])
    tier = RouterTier(capacity_bytes=5 * per_doc)
    assert tier.load(snap, [0, 1, 2, 3]) == 4
    before = tier.keys()
    with pytest.raises(MemoryFullError, match="router tier full"):
        tier.load(snap, [4, 5])
    assert tier.doc_ids() == [0, 1, 2, 3] and tier.nbytes == 4 * per_doc
    assert torch.equal(tier.keys().keys, before.keys)
    assert tier.load(snap, [4]) == 1 and tier.nbytes == 5 * per_doc
    with pytest.raises(MemoryFullError):
        tier.add(snap.router_keys([6]))
    assert tier.remove([0, 99]) == 1
    assert tier.load(snap, [6]) == 1


def test_router_tier_keys_equal_the_snapshot_bulk_load(location):
    """Keys assembled from several loads equal one bulk load of the same documents, tenants included."""
    snap = _store(location).snapshot()
    tier = RouterTier(capacity_bytes=1 << 20)
    tier.load(snap, tenant="b")
    tier.load(snap, [5, 0, 2])
    tier.load(snap, [2])  # reloading a held document refreshes it, no double counting
    got, want = tier.keys(), snap.router_keys([0, 2, 5, 6, 7])
    assert torch.equal(got.keys, want.keys) and torch.equal(got.doc_offsets, want.doc_offsets)
    assert got.doc_ids.tolist() == [0, 2, 5, 6, 7] and got.tenants == ("a", "a", "a", "b", "b")
    assert got.tenant_mask("b").tolist() == [False, False, False, True, True]
    assert tier.nbytes == want.nbytes
