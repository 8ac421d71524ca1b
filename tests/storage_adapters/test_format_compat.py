"""A store written by format 1 (no id allocation in its manifests, no client ids in its docs
tables) opens, reads, and becomes format 2 on its next commit."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore
from msa_cluster.storage_adapters._format import FORMAT_VERSION, crc32
from msa_cluster.storage_adapters._fs import StoreFS
from msa_cluster.types import UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, assert_same_doc, make_doc


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
def old_store(location):
    """A format-1 store: tenant a holds 0 and 2, tenant b holds 3; 1 (a's) and 4 (b's) were deleted."""
    store = MemoryStore.open(location.url, FP32, create=True, storage_options=location.storage_options)
    store.allocate_ids("a", count=3)
    store.allocate_ids("b", count=2)
    store.insert([make_doc(i, tenant="a" if i < 3 else "b") for i in range(5)])
    store.delete([1], tenant="a")
    store.delete([4], tenant="b")
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


def test_a_format_1_store_is_writable_and_its_next_commit_writes_format_2(old_store):
    """Allocate, insert, delete, compact and gc work on a format-1 store; the first commit records the allocation."""
    store = _open(old_store)
    old_version = store.latest_version()
    assert store.allocate_ids("a", client_ids=["new"]) == [5]
    fs = StoreFS(old_store.url, old_store.storage_options)
    body = json.loads(fs.read(store.snapshot().manifest.path))
    assert body["format_version"] == FORMAT_VERSION == 2
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
