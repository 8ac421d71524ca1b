"""The K/V tier evicts within its budget, never fails, and reads only the tenant it is bound to."""

from __future__ import annotations

import pytest
import torch

from msa_cluster.storage_adapters import ALL_TENANTS, CorruptStoreError, MemoryStore, TieredKVReader
from msa_cluster.types import UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, make_doc

DOC_TOKENS = 8  # 2 chunks: K and V of a document are 2 * (2 layers * 2 chunks * 2 heads * 8 * 4 B) = 512 B
KV_BYTES = 512


def _store(loc):
    store = MemoryStore.open(loc.url, FP32, create=True, storage_options=loc.storage_options)
    store.allocate_ids("a", count=6)
    store.allocate_ids("b", count=2)
    store.insert([make_doc(i, num_tokens=DOC_TOKENS, tenant="a" if i < 6 else "b") for i in range(8)])
    return store


def test_hot_tier_evicts_least_recently_used_within_its_budget(location):
    """With room for 3 documents, reading 8 keeps the 3 most recently used and never exceeds the budget."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=3 * KV_BYTES, tenant=ALL_TENANTS)
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
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=100, tenant=ALL_TENANTS)
    k, _ = reader.get(2)
    assert torch.equal(k, make_doc(2, num_tokens=DOC_TOKENS).keys)
    assert reader.stats().documents == 0 and reader.stats().bytes == 0


def test_gather_concatenates_one_layer_in_the_given_order(location):
    """gather(layer, ids) is the per-layer concatenation [sum C, Hkv, D] that attention reads."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=1 << 20, tenant=ALL_TENANTS)
    k, v = reader.gather(3, [4, 1])
    d4, d1 = make_doc(4, num_tokens=DOC_TOKENS), make_doc(1, num_tokens=DOC_TOKENS)
    assert torch.equal(k, torch.cat([d4.keys[1], d1.keys[1]])) and torch.equal(v, torch.cat([d4.values[1], d1.values[1]]))
    assert reader.gather(1, [])[0].shape == (0, 2, 8)
    with pytest.raises(ValueError, match="routing layer"):
        reader.gather(2, [1])


def test_moving_to_a_new_version_drops_deleted_and_updated_documents_from_ram(location):
    """After delete/update + set_snapshot, RAM holds none of the old bytes; compaction keeps valid entries."""
    store = _store(location)
    reader = TieredKVReader(store.snapshot(), budget_bytes=1 << 20, tenant=ALL_TENANTS)
    reader.prefetch(range(8))
    store.delete([2], tenant="a")
    store.insert([make_doc(3, num_tokens=DOC_TOKENS, tenant="a", seed=1)], replace=True)
    store.compact()
    reader.set_snapshot(store.snapshot())
    assert reader.stats().documents == 6  # docs 2 (deleted) and 3 (updated) dropped; compaction alone drops nothing
    with pytest.raises(UnknownDocumentError):
        reader.get(2)
    assert torch.equal(reader.get(3)[0], make_doc(3, num_tokens=DOC_TOKENS, seed=1).keys)


def test_tenant_scoped_reader_refuses_other_tenants(location):
    """A reader bound to a tenant cannot fetch another tenant's K/V: the error is that of an unused id."""
    reader = TieredKVReader(_store(location).snapshot(), budget_bytes=1 << 20, tenant="b")
    reader.get(7)
    with pytest.raises(UnknownDocumentError) as foreign:
        reader.get(0)
    with pytest.raises(UnknownDocumentError) as unused:
        reader.get(1000)
    assert str(foreign.value) == str(unused.value).replace("1000", "0")


def test_a_cold_document_is_one_range_read_of_exactly_its_kv_bytes(location, monkeypatch):
    """A cold document costs one read of exactly its K/V bytes (on object storage one ranged GET)."""
    snap = _store(location).snapshot()
    assert 5 in snap  # the docs tables are read when a snapshot is first used, not per document
    calls = _count_reads(monkeypatch)
    gets: list[int] = []
    fs = snap._fs.fs
    original = fs.cat_ranges

    def spy(paths, starts, ends, **kw):
        gets.extend(e - s for s, e in zip(starts, ends))
        return original(paths, starts, ends, **kw)

    monkeypatch.setattr(fs, "cat_ranges", spy)
    TieredKVReader(snap, budget_bytes=1 << 20, tenant=ALL_TENANTS).get(5)
    assert [(rel.rsplit(".", 2)[-2:], n) for rel, n in calls] == [(["content", "bin"], KV_BYTES)]
    assert gets == ([] if location.protocol == "file" else [KV_BYTES])


def test_read_kv_hands_the_caller_its_own_tensors(location):
    """read_kv returns fresh memory: a caller's write changes neither the file nor later reads."""
    snap = _store(location).snapshot()
    k, v = snap.read_kv(4, "a")
    k.add_(1)
    v.add_(1)
    want = make_doc(4, num_tokens=DOC_TOKENS)
    again = snap.read_kv(4, "a")
    assert torch.equal(again[0], want.keys) and torch.equal(again[1], want.values)
    fresh = MemoryStore.open(location.url, FP32, storage_options=location.storage_options).snapshot()
    assert torch.equal(fresh.read_kv(4, "a")[0], want.keys)


def _count_reads(monkeypatch) -> list[tuple[str, int]]:
    """Record (file, bytes asked for) of every read the store makes through StoreFS."""
    from msa_cluster.storage_adapters._fs import StoreFS

    calls: list[tuple[str, int]] = []

    def spy(name, size):
        real = getattr(StoreFS, name)

        def wrapped(self, rel, *args, **kwargs):
            out = real(self, rel, *args, **kwargs)
            calls.append((rel, size(out, args)))
            return out

        monkeypatch.setattr(StoreFS, name, wrapped)

    spy("read", lambda out, args: len(out))
    spy("map", lambda out, args: len(out))
    spy("read_range", lambda out, args: len(out))
    spy("read_into", lambda out, args: sum(out))
    return calls


def test_a_cold_one_layer_read_reads_only_that_layers_bytes(location, monkeypatch):
    """A fresh handle's read_kv(layer=) reads the docs table and the two ranges K[r], V[r] of the
    content file (2 * C * Hkv * D * 4 B), no router bytes and no other layer's, and gives that layer."""
    _store(location)
    calls = _count_reads(monkeypatch)
    snap = MemoryStore.open(location.url, FP32, storage_options=location.storage_options).snapshot()
    assert 5 in snap  # the docs tables: read once per handle, not per document
    calls.clear()
    k, v = snap.read_kv(5, "a", layer=3)
    want = make_doc(5, num_tokens=DOC_TOKENS)
    assert torch.equal(k, want.keys[1]) and torch.equal(v, want.values[1])
    assert [(rel.rsplit(".", 2)[-2:], n) for rel, n in calls] == [(["content", "bin"], KV_BYTES // 2)]
    with pytest.raises(ValueError, match="not a routing layer"):
        snap.read_kv(5, "a", layer=2)


def test_a_corrupt_byte_in_one_layer_fails_that_layer_only(location):
    """Per-layer CRC32Cs: a flipped byte in layer 3's V fails reads of layer 3 and of the whole
    document, naming the file, while layer 1 still reads and verifies."""
    from msa_cluster.storage_adapters._fs import StoreFS

    store = _store(location)
    seg = store.snapshot().manifest.segments[0]
    row = store._cache.docs(seg).rows[5]
    fs = StoreFS(location.url, location.storage_options)
    data = bytearray(fs.read(seg.files["content"].path))
    data[row.content_offset + row.content_length - 1] ^= 0x40  # the last byte of V[layer 3]
    fs.write(seg.files["content"].path, bytes(data))
    snap = MemoryStore.open(location.url, FP32, storage_options=location.storage_options).snapshot()
    assert torch.equal(snap.read_kv(5, "a", layer=1)[0], make_doc(5, num_tokens=DOC_TOKENS).keys[0])
    for layer in (3, None):
        with pytest.raises(CorruptStoreError, match=f"{seg.id}.content.bin"):
            snap.read_kv(5, "a", layer=layer)


def test_the_tiers_cold_read_of_one_layer_reads_only_that_layers_bytes(location, monkeypatch):
    """gather(layer) of cold documents reads K[r], V[r] of each (2 * C * Hkv * D * 4 B), nothing of
    other layers; the layers are then hot (a second gather reads nothing), and a layer of a
    document held whole is served from it."""
    snap = _store(location).snapshot()
    assert 5 in snap
    reader = TieredKVReader(snap, budget_bytes=1 << 20, tenant=ALL_TENANTS)
    calls = _count_reads(monkeypatch)
    k, v = reader.gather(3, [5, 1])
    d5, d1 = make_doc(5, num_tokens=DOC_TOKENS), make_doc(1, num_tokens=DOC_TOKENS)
    assert torch.equal(k, torch.cat([d5.keys[1], d1.keys[1]])) and torch.equal(v, torch.cat([d5.values[1], d1.values[1]]))
    assert [(rel.rsplit(".", 2)[-2:], n) for rel, n in calls] == [(["content", "bin"], KV_BYTES // 2)] * 2
    calls.clear()
    assert torch.equal(reader.gather(3, [1, 5])[0], torch.cat([d1.keys[1], d5.keys[1]]))
    assert calls == [] and reader.stats().hits == 2 and reader.stats().bytes == KV_BYTES
    reader.get(1)  # the whole document replaces its hot layer
    assert torch.equal(reader.layer(1, 1)[1], d1.values[0]) and calls[-1][1] == KV_BYTES
    assert len(calls) == 1 and reader.stats().bytes == KV_BYTES + KV_BYTES // 2
