"""The store's contract on every protocol: round trips, idempotence, updates, deletes, tenants,
fingerprints, compaction, purge, garbage collection, verification and corruption."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import msa_cluster.storage_adapters as sa
from msa_cluster.storage_adapters import (
    ALL_TENANTS,
    CorruptStoreError,
    DocumentExistsError,
    FingerprintMismatchError,
    MemoryStore,
    SnapshotExpiredError,
    StoreConfig,
    StoreNotFoundError,
)
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.types import SnapshotGoneError, UnknownDocumentError
from tests.storage_adapters.store_helpers import BF16, FP32, assert_same_doc, grant, make_doc

ALL = ALL_TENANTS


def open_store(loc, fp=FP32, create=True, **config):
    return MemoryStore.open(loc.url, fp, create=create, storage_options=loc.storage_options, config=StoreConfig(**config))


def store_files(loc) -> dict[str, bytes]:
    fs = StoreFS(loc.url, loc.storage_options)
    return {f"{d}/{f.name}": fs.read(f"{d}/{f.name}") for d in ("segments", "artifacts", "manifest") for f in fs.list(d)}


def test_insert_then_reopen_gives_back_bit_identical_documents(location):
    """Documents written, then read through a fresh store handle, are bit-identical (float32)."""
    docs = [make_doc(i) for i in (0, 3, 9)] + [make_doc(11, num_tokens=1, text=None), make_doc(12, text="ünï ✓")]
    store = open_store(location)
    grant(store, 13)
    assert store.insert(docs).inserted == (0, 3, 9, 11, 12)
    snap = open_store(location, create=False).snapshot()
    assert snap.version == 2 and snap.doc_ids("default") == [0, 3, 9, 11, 12]
    for got, want in zip(snap.documents(tenant="default"), docs):
        assert_same_doc(got, want)
    assert snap.texts([11, 12, 99], "default") == {12: "ünï ✓"}


def test_bfloat16_round_trip_is_bit_exact(location):
    """bfloat16 tensors (no Arrow type) come back with exactly the same bits."""
    docs = [make_doc(i, fp=BF16, num_tokens=9) for i in range(3)]
    store = open_store(location, BF16)
    grant(store, 3)
    store.insert(docs)
    for got, want in zip(open_store(location, BF16, create=False).snapshot().documents(tenant=ALL), docs):
        assert got.keys.dtype == torch.bfloat16
        assert_same_doc(got, want)


def test_reinsert_of_identical_documents_is_idempotent(location):
    """Re-running an insert of the same ids and content commits nothing and writes no file."""
    store = open_store(location)
    grant(store, 6)
    store.insert([make_doc(i) for i in range(4)])
    before = set(store_files(location))
    again = store.insert([make_doc(i) for i in range(4)])
    assert again.version == 2 and again.skipped == (0, 1, 2, 3) and not again.inserted
    assert set(store_files(location)) == before
    mixed = store.insert([make_doc(i) for i in range(6)])
    assert mixed.inserted == (4, 5) and set(mixed.skipped) == {0, 1, 2, 3}
    assert store.snapshot().doc_ids("default") == list(range(6))


def test_same_id_with_new_content_needs_replace(location):
    """A live id with different content is refused unless replace/update, which then wins."""
    store = open_store(location)
    grant(store, 4)
    store.insert([make_doc(1), make_doc(2)])
    with pytest.raises(DocumentExistsError, match="document 1"):
        store.insert([make_doc(1, seed=5)])
    assert store.insert([make_doc(1, seed=5)], replace=True).replaced == (1,)
    assert store.update([make_doc(2, seed=7)]).replaced == (2,)
    snap = store.snapshot()
    assert_same_doc(snap.document(1, "default"), make_doc(1, seed=5))
    assert_same_doc(snap.document(2, "default"), make_doc(2, seed=7))
    assert len(snap) == 2
    with pytest.raises(UnknownDocumentError, match="document 3 is not a document of tenant 'default'"):
        store.update([make_doc(3)])  # allocated, never inserted


def test_delete_hides_documents_but_pinned_snapshots_keep_them(location):
    """After a delete, new snapshots never return the document; a snapshot taken before still does."""
    store = open_store(location)
    grant(store, 8)
    store.insert([make_doc(i) for i in range(3)])
    pinned = store.snapshot()
    assert store.delete([1], tenant="default").deleted == (1,)
    now = store.snapshot()
    assert 1 not in now and now.doc_ids("default") == [0, 2] and now.texts([1], "default") == {}
    with pytest.raises(UnknownDocumentError):
        now.read_kv(1, "default")
    assert 1 not in now.router_keys(tenant=ALL).doc_ids.tolist()
    assert_same_doc(pinned.document(1, "default"), make_doc(1))
    with pytest.raises(UnknownDocumentError, match=r"\[1, 7\]"):
        store.delete([1, 7], tenant="default")
    assert store.delete([7], tenant="default", missing_ok=True).version == now.version


def test_tenants_never_see_each_others_documents(location):
    """Reads, router keys, texts and deletes scoped to a tenant never touch another tenant's rows."""
    store = open_store(location)
    assert grant(store, 3, "b") == [0, 1, 2] and grant(store, 3, "a") == [3, 4, 5]
    store.insert([make_doc(i, tenant="b" if i < 3 else "a") for i in range(6)])
    snap = store.snapshot()
    assert snap.doc_ids("a") == [3, 4, 5] and snap.tenants() == ["a", "b"]
    rk = snap.router_keys(tenant="a")
    assert rk.doc_ids.tolist() == [3, 4, 5] and set(rk.tenants) == {"a"}
    assert snap.texts([0, 3], tenant="a") == {3: "document 3 seed 0"}
    with pytest.raises(UnknownDocumentError):
        snap.read_kv(0, tenant="a")
    with pytest.raises(UnknownDocumentError):
        snap.router_keys([0], tenant="a")
    with pytest.raises(UnknownDocumentError):
        store.delete([0], tenant="a")
    assert [d.doc_id for d in snap.documents(tenant="b")] == [0, 1, 2]
    assert snap.doc_ids(ALL) == list(range(6))


def test_opening_with_another_model_is_an_error_naming_both(location):
    """A store refuses a model whose fingerprint differs, and says which two differ."""
    open_store(location)
    other = dataclasses.replace(FP32, config_hash="other-model")
    with pytest.raises(FingerprintMismatchError, match="test-config.*other-model"):
        open_store(location, other)
    with pytest.raises(FingerprintMismatchError):
        open_store(location, BF16)


def test_opening_a_missing_store_without_create_fails(location):
    """No manifest and no create=True is StoreNotFoundError, not an empty store."""
    with pytest.raises(StoreNotFoundError):
        open_store(location, create=False)


def test_documents_that_do_not_fit_the_model_are_refused(location):
    """Wrong dtype, routing layers, head shape, chunk count or duplicate ids are ValueErrors."""
    store = open_store(location)
    grant(store, 3)
    bad = [
        make_doc(1, fp=BF16),
        dataclasses.replace(make_doc(1), num_tokens=100),
        dataclasses.replace(make_doc(1, fp=dataclasses.replace(FP32, routing_layers=(0, 1)))),
    ]
    for doc in bad:
        with pytest.raises(ValueError, match="document 1"):
            store.insert([doc])
    with pytest.raises(ValueError, match=r"\[2\]"):
        store.insert([make_doc(2), make_doc(2)])
    assert store.latest_version() == 1


def test_compaction_rewrites_without_dead_rows_and_old_readers_keep_working(location):
    """Compaction drops tombstoned rows, keeps ids and bytes, and old snapshots still read."""
    store = open_store(location)
    grant(store, 8)
    store.insert([make_doc(i) for i in range(4)])
    store.insert([make_doc(i) for i in range(4, 8)])
    old = store.snapshot()
    store.delete([1, 6], tenant="default")
    result = store.compact()
    assert len(result.rewritten_segments) == 2
    new = store.snapshot()
    assert new.doc_ids(ALL) == [0, 2, 3, 4, 5, 7] and not new.manifest.tombstones
    assert len(new.manifest.segments) == 1
    for d in new.documents(tenant="default"):
        assert_same_doc(d, make_doc(d.doc_id))
    assert_same_doc(old.document(1, "default"), make_doc(1))
    assert store.compact().version == new.version  # nothing left to do
    store.verify()


def test_delete_compact_gc_purges_text_and_tensors_from_storage(location):
    """After delete + compact + gc(0), no stored file contains the document's text or K/V bytes."""
    store = open_store(location)
    grant(store, 7)
    secret = make_doc(5, text="the secret of document five")
    store.insert([make_doc(4), secret, make_doc(6)])
    blob = secret.keys.contiguous().view(torch.uint8).numpy().tobytes()
    assert any(blob in b for b in store_files(location).values())
    store.delete([5], tenant="default")
    store.compact()
    report = store.gc(grace_s=0)
    assert report.kept_versions == (store.latest_version(),) and report.deleted_files
    for name, data in store_files(location).items():
        assert b"secret of document five" not in data, name
        assert blob not in data, name
    assert store.snapshot().doc_ids("default") == [4, 6]
    store.verify()


def test_gc_respects_the_grace_period_and_expired_snapshots_say_so(location):
    """gc keeps recently superseded versions; with grace 0 a pinned old version raises SnapshotGoneError."""
    store = open_store(location)
    grant(store, 2)
    store.insert([make_doc(0)])
    pinned = store.snapshot()
    store.insert([make_doc(1)])
    store.delete([0], tenant="default")
    store.compact()
    assert store.gc().deleted_versions == ()  # default grace: one hour
    assert store.versions() == [0, 1, 2, 3, 4, 5]
    store.gc(grace_s=0)
    assert store.versions() == [5]
    with pytest.raises(SnapshotGoneError):
        pinned.read_kv(0, "default")
    with pytest.raises(SnapshotExpiredError):  # the deprecated name is the same class
        store.snapshot(1)
    with pytest.raises(SnapshotGoneError):
        store.diff(1, 5)
    assert SnapshotExpiredError is SnapshotGoneError


def test_gc_leaves_uncommitted_files_of_running_writers_alone(location):
    """A file no version references is only collected after the uncommitted grace period."""
    store = open_store(location)
    grant(store, 1)
    store.insert([make_doc(0)])
    fs = StoreFS(location.url, location.storage_options)
    fs.write("segments/in-flight.content.arrow", b"partial")
    store.gc(grace_s=0)
    assert fs.exists("segments/in-flight.content.arrow")
    store.gc(grace_s=0, uncommitted_grace_s=0)
    assert not fs.exists("segments/in-flight.content.arrow")
    assert store.snapshot().doc_ids("default") == [0]


def _flip(loc, rel: str, offset: int) -> None:
    fs = StoreFS(loc.url, loc.storage_options)
    data = bytearray(fs.read(rel))
    data[offset] ^= 0x40
    fs.write(rel, bytes(data))


def test_a_corrupt_byte_is_an_error_naming_the_segment(location):
    """Flipping one byte of a document's K/V, router keys or a docs table fails loudly, naming the file."""
    store = open_store(location)
    grant(store, 3)
    store.insert([make_doc(i) for i in range(3)])
    snap = store.snapshot()
    seg = snap.manifest.segments[0]
    row = store._cache.docs(seg).rows[1]
    content = seg.files["content"].path
    _flip(location, content, row.content_offset + 3)
    fresh = open_store(location, create=False)
    with pytest.raises(CorruptStoreError, match=seg.id) as err:
        fresh.snapshot().read_kv(1, "default")
    assert err.value.paths and seg.id in err.value.paths[0]
    fresh.snapshot().read_kv(0, "default")  # the other documents are still readable
    with pytest.raises(CorruptStoreError, match=f"{seg.id}.content.bin"):
        fresh.verify()
    router = seg.files["router"]
    _flip(location, router.path, router.size // 2)
    with pytest.raises(CorruptStoreError, match=f"{seg.id}.router.bin"):
        open_store(location, create=False).snapshot().router_keys(tenant=ALL)
    _flip(location, seg.files["docs"].path, 100)
    with pytest.raises(CorruptStoreError, match=f"{seg.id}.docs.arrow"):
        open_store(location, create=False).snapshot().doc_ids(ALL)


def test_a_truncated_segment_is_an_error_naming_it(location):
    """A content file cut short is reported with its name, never read as wrong tensors."""
    store = open_store(location)
    grant(store, 3)
    store.insert([make_doc(i, num_tokens=30) for i in range(3)])
    seg = store.snapshot().manifest.segments[0]
    fs = StoreFS(location.url, location.storage_options)
    rel = seg.files["content"].path
    fs.write(rel, fs.read(rel)[: seg.files["content"].size // 2])
    fresh = open_store(location, create=False)
    with pytest.raises(CorruptStoreError, match=seg.id):
        fresh.snapshot().read_kv(2, "default")
    with pytest.raises(CorruptStoreError, match=seg.id):
        fresh.verify()


def test_router_keys_load_in_bulk_in_doc_id_order(location):
    """Bulk router keys equal each document's own, ordered by id, across segments and subsets."""
    store = open_store(location)
    grant(store, 10)
    store.insert([make_doc(i) for i in (5, 1, 9)])
    store.insert([make_doc(i) for i in (4, 2)])
    snap = store.snapshot()
    rk = snap.router_keys(tenant="default")
    assert rk.doc_ids.tolist() == [1, 2, 4, 5, 9]
    for j, doc_id in enumerate(rk.doc_ids.tolist()):
        a, b = rk.doc_offsets[j], rk.doc_offsets[j + 1]
        assert torch.equal(rk.keys[:, a:b], make_doc(doc_id).router_keys)
    sub = snap.router_keys([9, 2], tenant="default")
    assert sub.doc_ids.tolist() == [2, 9] and torch.equal(sub.layer(3)[: make_doc(2).num_chunks], make_doc(2).router_keys[1])
    empty = snap.router_keys([], tenant="default")
    assert empty.keys.shape == (2, 0, 2, 8) and empty.doc_offsets.tolist() == [0]


def test_large_inserts_split_into_segments_in_one_atomic_commit(location):
    """An insert bigger than max_segment_bytes becomes several segments published by one version."""
    store = open_store(location, max_segment_bytes=4000)
    grant(store, 8)
    docs = [make_doc(i, num_tokens=12) for i in range(8)]  # 3 chunks: 3 * 2 * 3 * 64 B = 1152 B each
    assert store.insert(docs).version == 2
    snap = store.snapshot()
    assert len(snap.manifest.segments) > 2 and snap.doc_ids(ALL) == list(range(8))
    merged = open_store(location, create=False).compact(small_segment_bytes=1 << 20)  # merge small segments
    assert merged.version == 3 and len(merged.rewritten_segments) == len(snap.manifest.segments)
    assert len(store.snapshot().manifest.segments) == 1 and store.snapshot().doc_ids(ALL) == list(range(8))


def test_segments_are_written_in_parallel_in_order_and_fail_whole(location):
    """With several write workers, segments keep the documents' order; one failed upload fails the
    write whole: nothing is committed and no segment file of it is left behind."""
    import threading

    serial, parallel = open_store(location, max_segment_bytes=4000, write_workers=1), None
    grant(serial, 8)
    serial.insert([make_doc(i, num_tokens=12) for i in range(8)])
    order = [[r.doc_id for r in serial.snapshot()._docs(seg).rows] for seg in serial.snapshot().manifest.segments]
    loc2 = dataclasses.replace(location, url=location.url.rstrip("/") + "-parallel")
    parallel = open_store(loc2, max_segment_bytes=4000, write_workers=4)
    grant(parallel, 16)
    parallel.insert([make_doc(i, num_tokens=12) for i in range(8)])
    assert [[r.doc_id for r in parallel.snapshot()._docs(seg).rows] for seg in parallel.snapshot().manifest.segments] == order
    before = parallel.latest_version()
    fs = StoreFS(loc2.url, loc2.storage_options)
    files_before = {f.name for f in fs.list("segments")}
    real, calls, lock = parallel._put, [0], threading.Lock()

    def flaky(rel, views):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 5:
            raise OSError("upload failed")
        return real(rel, views)

    parallel._put = flaky  # type: ignore[method-assign]
    with pytest.raises(OSError, match="upload failed"):
        parallel.insert([make_doc(i, num_tokens=12) for i in range(8, 16)])
    assert parallel.latest_version() == before and {f.name for f in fs.list("segments")} == files_before


def test_named_tensors_round_trip_through_safetensors(location):
    """The template-head K/V is stored and read back bit-exactly, with no pickle involved."""
    store = open_store(location)
    template = {"k": torch.randn(4, 3, 2, 8).to(torch.bfloat16), "v": torch.randn(4, 3, 2, 8)}
    store.put_tensors(sa.TEMPLATE_ARTIFACT, template)
    got = open_store(location, create=False).snapshot().tensors(sa.TEMPLATE_ARTIFACT)
    assert got.keys() == template.keys() and all(torch.equal(got[k], template[k]) for k in template)
    with pytest.raises(ValueError):
        store.put_tensors("../escape", template)
    with pytest.raises(KeyError):
        store.snapshot().tensors("missing")


def test_empty_store_reads_as_empty(location):
    """A new store has version 0 and no documents; every read is empty, not an error."""
    snap = open_store(location).snapshot()
    assert snap.version == 0 and len(snap) == 0 and snap.doc_ids(ALL) == [] and snap.documents(tenant=ALL) == []
    assert snap.router_keys(tenant=ALL).keys.shape[1] == 0 and snap.tenants() == []
    assert open_store(location).verify().files == 0


def test_segment_files_are_arrow_ipc_or_raw_tensor_bytes(location):
    """Docs tables are Arrow IPC, manifests JSON, tensor files raw bytes of the documents' tensors:
    nothing a reader would unpickle."""
    store = open_store(location)
    grant(store, 1)
    doc = make_doc(0)
    store.insert([doc])
    files = store_files(location)
    for name, data in files.items():
        if name.endswith(".arrow"):
            assert data[:6] == b"ARROW1" and data[-6:] == b"ARROW1", name
    [content] = [d for n, d in files.items() if n.endswith(".content.bin")]
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (doc.keys, doc.values))
    assert content == raw + doc.text.encode()
    [router] = [d for n, d in files.items() if n.endswith(".router.bin")]
    assert router == b"".join(doc.router_keys[r].contiguous().view(torch.uint8).numpy().tobytes() for r in range(2))


def test_public_docstring_examples_run():
    """The runnable examples in the package and MemoryStore docstrings pass as doctests."""
    for module in (sa, sa.store):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_each_commit_extends_the_last_directory_and_matches_a_full_rebuild(tmp_path):
    """A new version's directory grows from the last one's (commit cost follows the change, not the store),
    and equals a rebuild from every segment after inserts, replaces, client-id moves, deletes and compaction."""
    from msa_cluster.storage_adapters.snapshot import StoreSnapshot

    loc = tmp_path.as_uri()
    store = sa.MemoryStore.open(loc, FP32, create=True)

    def check() -> None:
        snap = store.snapshot()
        grown = snap._directory()
        full = StoreSnapshot(snap.manifest, store._fs, store._cache)
        assert grown == full._directory() and snap._aliases == full._aliases
        tenants = {"a": store.snapshot().doc_ids("a"), "b": store.snapshot().doc_ids("b")}
        assert tenants == {"a": full.doc_ids("a"), "b": full.doc_ids("b")}

    a = store.allocate_ids("a", count=6)
    b = store.allocate_ids("b", count=2)
    store.insert([make_doc(i, tenant="a", client_id=f"c{i}") for i in a[:3]])
    check()
    store.insert([make_doc(i, tenant="b") for i in b])
    check()
    store.insert([make_doc(a[0], tenant="a", client_id="c0", seed=1)], replace=True)  # a new version of one doc
    check()
    store.insert([make_doc(a[3], tenant="a", client_id="c1")], replace=True)  # client id c1 moves to a new id
    check()
    assert store.snapshot().resolve(["c1"], "a") == {"c1": a[3]} and a[1] not in store.snapshot()
    store.delete([a[2]], tenant="a")
    check()
    store.compact(small_segment_bytes=1 << 30)  # segments rewritten: the next directory is rebuilt in full
    check()
    store.insert([make_doc(i, tenant="a") for i in a[4:]])
    check()
    assert store.snapshot()._base is None  # used once, then let go
    store.close()
