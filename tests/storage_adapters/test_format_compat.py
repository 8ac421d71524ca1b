"""Older stores open and stay consistent under new writes.

Format 2 (zlib CRC32, Arrow tensor files): `fixtures/store_v2`, written by the format-2 code; new
writes add format-3 segments beside its old ones, and compaction rewrites those as format 3.
Format 1 (no id allocation in its manifests, no client ids in its docs tables): made from the
fixture by `rewrite_as_format_1`; it opens, reads, and is upgraded by its next commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore
from msa_cluster.storage_adapters._checksums import crc32
from msa_cluster.storage_adapters._format import FORMAT_VERSION
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.storage_adapters.errors import DocumentExistsError
from msa_cluster.types import UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, assert_same_doc, make_doc

V2_FIXTURE = Path(__file__).parent / "fixtures" / "store_v2"


def install_v2_store(loc) -> None:
    """Copy the format-2 fixture to `loc`: tenant a holds 0 and 2 (client ids a0, a2), tenant b
    holds 3; 1 (a's, client id a1) and 4 (b's) were deleted; artifact "template" is [[0, 1, 2], [3, 4, 5]]."""
    fs = StoreFS(loc.url, loc.storage_options)
    for path in sorted(V2_FIXTURE.rglob("*")):
        if path.is_file():
            fs.write(path.relative_to(V2_FIXTURE).as_posix(), path.read_bytes())


def v2_doc(i: int):
    return make_doc(i, tenant="a" if i < 3 else "b", client_id=f"a{i}" if i < 3 else None)


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def rewrite_as_format_1(loc) -> None:
    """Turn every file of the store at `loc` into what format 1 wrote: docs tables lose the
    client_id column, manifests lose next_doc_id and id_ranges and say format_version 1."""
    fs = StoreFS(loc.url, loc.storage_options)
    refs = {}
    for f in fs.list("segments"):
        rel = f"segments/{f.name}"
        if f.name.endswith(".docs.arrow"):
            batch = pa.ipc.open_file(pa.py_buffer(fs.read(rel))).get_batch(0)
            assert batch.schema.names[-1] == "client_id"
            schema = pa.schema(list(batch.schema)[:-1], metadata=batch.schema.metadata)
            data = _ipc(pa.record_batch(batch.columns[:-1], schema=schema))
            fs.write(rel, data)
            refs[rel] = {"size": len(data), "crc32": crc32(data)}
    for f in fs.list("manifest"):
        rel = f"manifest/{f.name}"
        body = json.loads(fs.read(rel))
        for key in ("crc32", "next_doc_id", "id_ranges"):
            del body[key]
        body["format_version"] = 1
        for seg in body["segments"]:
            for ref in seg["files"].values():
                ref.update(refs.get(ref["path"], {}))
        body["crc32"] = crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        fs.write(rel, json.dumps(body, sort_keys=True, indent=1).encode())


@pytest.fixture
def v2_store(location):
    install_v2_store(location)
    return location


@pytest.fixture
def old_store(location):
    """A format-1 store: tenant a holds 0 and 2, tenant b holds 3; 1 (a's) and 4 (b's) were deleted."""
    install_v2_store(location)
    rewrite_as_format_1(location)
    return location


def _open(loc) -> MemoryStore:
    return MemoryStore.open(loc.url, FP32, storage_options=loc.storage_options)


def test_a_format_1_store_opens_and_reads(old_store):
    """Documents, tenants and verification of a format-1 store read as before; client ids read as None."""
    store = _open(old_store)
    snap = store.snapshot()
    assert snap.manifest.ids is None and snap.doc_ids(ALL_TENANTS) == [0, 2, 3]
    assert snap.doc_ids("a") == [0, 2] and snap.tenants() == ["a", "b"]
    for d in snap.documents(tenant=ALL_TENANTS):
        assert_same_doc(d, make_doc(d.doc_id, tenant=d.tenant))
        assert d.client_id is None
    assert store.verify().documents == 5
    with pytest.raises(UnknownDocumentError):
        snap.read_kv(3, "a")


def test_a_format_1_store_derives_its_id_allocation_from_its_documents(old_store):
    """Live ids belong to their document's tenant; next_doc_id is past every id ever stored, deleted ones too."""
    ids = _open(old_store).snapshot().ids
    assert ids.next_doc_id == 5 and ids.ranges == {"a": ((0, 1), (2, 3)), "b": ((3, 4),)}


def test_a_format_1_store_is_writable_and_its_next_commit_writes_the_current_format(old_store):
    """Allocate, insert, delete, compact and gc work on a format-1 store; the first commit records the allocation."""
    store = _open(old_store)
    old_version = store.latest_version()
    assert store.allocate_ids("a", client_ids=["new"]) == [5]
    fs = StoreFS(old_store.url, old_store.storage_options)
    body = json.loads(fs.read(store.snapshot().manifest.path))
    assert body["format_version"] == FORMAT_VERSION == 3
    assert body["next_doc_id"] == 6 and body["id_ranges"] == {"a": [[0, 1], [2, 3], [5, 6]], "b": [[3, 4]]}
    store.insert([make_doc(5, tenant="a", client_id="new"), make_doc(2, tenant="a", seed=4)], replace=True)
    with pytest.raises(UnknownDocumentError):
        store.insert([make_doc(1, tenant="a")])  # deleted before the upgrade: no longer anyone's
    store.delete([3], tenant="b")
    store.compact()
    store.gc(grace_s=0)
    snap = _open(old_store).snapshot()
    assert snap.doc_ids(ALL_TENANTS) == [0, 2, 5] and snap.resolve(["new"], "a") == {"new": 5}
    assert_same_doc(snap.document(2, "a"), make_doc(2, tenant="a", seed=4))
    assert store.verify().documents == 3 and store.latest_version() > old_version


def test_a_plain_write_upgrades_a_format_1_store_too(old_store):
    """A delete (no allocation) as first commit also writes the derived allocation into the new manifest."""
    store = _open(old_store)
    store.delete([0], tenant="a")
    m = store.snapshot().manifest
    assert m.ids is not None and m.ids.next_doc_id == 5 and m.ids.owns("a", 0) and m.ids.owns("b", 3)


def _formats(store: MemoryStore) -> dict[str, int]:
    """{segment id: format} of the latest version."""
    snap = store.snapshot()
    return {seg.id: store._cache.docs(seg).format for seg in snap.manifest.segments}


def test_a_format_2_store_reads_as_before(v2_store):
    """Documents, client ids, router keys, one-layer reads, the artifact and verification of the fixture."""
    store = _open(v2_store)
    snap = store.snapshot()
    assert list(_formats(store).values()) == [2]
    assert snap.doc_ids(ALL_TENANTS) == [0, 2, 3] and snap.resolve(["a0", "a1", "a2"], "a") == {"a0": 0, "a2": 2}
    for d in snap.documents(tenant=ALL_TENANTS):
        assert_same_doc(d, v2_doc(d.doc_id))
    rk = snap.router_keys(tenant=ALL_TENANTS)
    assert torch.equal(rk.keys[:, rk.doc_offsets[1] : rk.doc_offsets[2]], v2_doc(2).router_keys)
    k, v = snap.read_kv(3, "b", layer=3)
    assert torch.equal(k, v2_doc(3).keys[1]) and torch.equal(v, v2_doc(3).values[1])
    assert torch.equal(snap.tensors("template")["k"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert store.verify().documents == 5


def test_new_writes_to_a_format_2_store_add_format_3_segments(v2_store):
    """An insert writes a format-3 segment (CRC32C) beside the format-2 one; both read and verify."""
    store = _open(v2_store)
    store.allocate_ids("a", client_ids=["new"])
    store.insert([make_doc(5, tenant="a", client_id="new")])
    fs = StoreFS(v2_store.url, v2_store.storage_options)
    body = json.loads(fs.read(store.snapshot().manifest.path))
    assert body["format_version"] == 3
    old, new = body["segments"]
    assert all("crc32" in f and "crc32c" not in f for f in old["files"].values())
    assert all("crc32c" in f for f in new["files"].values()) and new["files"]["content"]["path"].endswith(".content.bin")
    assert sorted(_formats(store).values()) == [2, 3]
    snap = _open(v2_store).snapshot()
    assert_same_doc(snap.document(5, "a"), make_doc(5, tenant="a", client_id="new"))
    assert_same_doc(snap.document(2, "a"), v2_doc(2))
    assert store.verify().documents == 6


def test_unchanged_documents_reinserted_into_a_format_2_store_are_skipped(v2_store):
    """Idempotence holds across formats: a format-2 row is compared with the document's CRC32s."""
    store = _open(v2_store)
    version = store.latest_version()
    result = store.insert([v2_doc(0), v2_doc(2)])
    assert result.skipped == (0, 2) and result.version == version == store.latest_version()
    with pytest.raises(DocumentExistsError):
        store.insert([make_doc(0, tenant="a", client_id="a0", seed=9)])
    assert store.insert([make_doc(0, tenant="a", client_id="a0", seed=9)], replace=True).replaced == (0,)
    assert_same_doc(store.snapshot().document(0, "a"), make_doc(0, tenant="a", client_id="a0", seed=9))


def test_compaction_rewrites_format_2_segments_as_format_3(v2_store):
    """The fixture's segment has tombstones: compaction rewrites its live rows as format 3, bit-exact."""
    store = _open(v2_store)
    store.compact()
    store.gc(grace_s=0)
    assert list(_formats(store).values()) == [3]
    snap = _open(v2_store).snapshot()
    for d in snap.documents(tenant=ALL_TENANTS):
        assert_same_doc(d, v2_doc(d.doc_id))
    assert store.verify().documents == 3
    assert store.insert([v2_doc(2)]).skipped == (2,)
