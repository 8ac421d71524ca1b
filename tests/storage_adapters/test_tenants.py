"""Document ids belong to tenants: the store allocates them, client ids alias them per tenant, and
to a tenant another tenant's id is exactly an id that was never used."""

from __future__ import annotations

import re
import threading

import pytest

import msa_cluster.storage_adapters.store as store_module
from msa_cluster.retry import Backoff
from msa_cluster.storage_adapters import (
    ALL_TENANTS,
    CommitConflictError,
    DocumentExistsError,
    MemoryStore,
    StoreConfig,
)
from msa_cluster.types import UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, assert_same_doc, make_doc

UNUSED = 99  # an id no tenant was ever given


def open_store(loc, **config) -> MemoryStore:
    return MemoryStore.open(loc.url, FP32, create=True, storage_options=loc.storage_options, config=StoreConfig(**config))


def two_tenants(loc) -> MemoryStore:
    """Tenant a holds documents 0 and 1 (client ids a0, a1); tenant b holds 2 and 3 (b2, b3)."""
    store = open_store(loc)
    assert store.allocate_ids("a", client_ids=["a0", "a1"]) == [0, 1]
    assert store.allocate_ids("b", client_ids=["b2", "b3"]) == [2, 3]
    docs = [make_doc(i, tenant="a" if i < 2 else "b", client_id=f"{'a' if i < 2 else 'b'}{i}") for i in range(4)]
    store.insert(docs)
    return store


def _error(fn) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def _same_as_unused(fn, foreign: int) -> None:
    """fn(foreign) and fn(UNUSED) fail with the same type and, ids aside, the same message."""
    a, b = _error(lambda: fn(foreign)), _error(lambda: fn(UNUSED))
    assert type(a) is type(b) is UnknownDocumentError
    assert re.sub(rf"\b{foreign}\b", "N", str(a)) == re.sub(rf"\b{UNUSED}\b", "N", str(b)) != ""


def test_another_tenants_id_is_written_exactly_like_an_unused_one(location):
    """insert(replace=True), insert, update and delete of b's id by a fail like an unused id and change nothing."""
    store = two_tenants(location)
    version, snap = store.latest_version(), store.snapshot()
    writes = {
        "insert replace": lambda i: store.insert([make_doc(i, tenant="a", seed=9)], replace=True),
        "insert": lambda i: store.insert([make_doc(i, tenant="a", seed=9)]),
        "update": lambda i: store.update([make_doc(i, tenant="a", seed=9)]),
        "delete": lambda i: store.delete([i], tenant="a"),
    }
    for name, write in writes.items():
        _same_as_unused(write, 2)
        assert store.latest_version() == version, name
    assert str(_error(lambda: writes["insert"](2))) == "document 2 is not a document of tenant 'a'"
    assert store.delete([2, UNUSED], tenant="a", missing_ok=True).version == version
    after = store.snapshot()
    for i in range(4):
        assert_same_doc(after.document(i, ALL_TENANTS), snap.document(i, ALL_TENANTS))


def test_a_tenants_insert_writes_no_file_for_an_id_it_was_not_given(location):
    """A batch with one foreign id is refused before any segment is uploaded: all or nothing."""
    store = two_tenants(location)
    store.allocate_ids("a", count=1)  # id 4
    files = {f.name for f in store._fs.list("segments")}
    with pytest.raises(UnknownDocumentError, match="document 3 is not a document of tenant 'a'"):
        store.insert([make_doc(4, tenant="a"), make_doc(3, tenant="a")])
    assert {f.name for f in store._fs.list("segments")} == files
    assert 4 not in store.snapshot()


def test_another_tenants_id_is_read_exactly_like_an_unused_one(location):
    """Every snapshot read of b's id by a fails like an unused id; texts and resolve leave it out."""
    snap = two_tenants(location).snapshot()
    reads = [
        lambda i: snap.read_kv(i, "a"),
        lambda i: snap.info(i, "a"),
        lambda i: snap.document(i, "a"),
        lambda i: snap.documents([i], tenant="a"),
        lambda i: snap.content_id(i, "a"),
        lambda i: snap.kv_nbytes(i, "a"),
        lambda i: snap.router_keys([i], tenant="a"),
        lambda i: snap.router_nbytes([i], "a"),
    ]
    for read in reads:
        _same_as_unused(read, 2)
    assert snap.texts([0, 2, UNUSED], "a") == {0: "document 0 seed 0"}
    assert snap.resolve(["a0", "b2", "zz"], "a") == {"a0": 0} and snap.resolve(["a0"], "b") == {}
    assert not snap.holds(2, "a") and snap.holds(2, "b") and snap.holds(2, ALL_TENANTS)
    assert snap.info(2, "b").client_id == "b2" and snap.document(3, ALL_TENANTS).client_id == "b3"


def test_reads_must_name_a_tenant(location):
    """A missing or malformed tenant is a ValueError, never a read of every tenant."""
    snap = two_tenants(location).snapshot()
    for bad in (None, "", "*", "a b"):
        with pytest.raises(ValueError, match="not a valid tenant"):
            snap.doc_ids(bad)
        with pytest.raises(ValueError, match="not a valid tenant"):
            snap.read_kv(0, bad)
    with pytest.raises(TypeError):
        snap.router_keys([0])  # tenant is keyword-only and required
    with pytest.raises(TypeError):
        two_tenants(location).delete([0])  # delete names its tenant too


def test_client_ids_resolve_to_stable_ids_per_tenant(location):
    """allocate_ids gives a live client id its document's id again; the same client id in another tenant is another id."""
    store = two_tenants(location)
    v = store.latest_version()
    assert store.allocate_ids("a", client_ids=["a1", "a0"]) == [1, 0]
    assert store.latest_version() == v  # nothing new: nothing committed
    assert store.allocate_ids("a", client_ids=["a1", "new", "a0"]) == [1, 4, 0]
    assert store.allocate_ids("a", client_ids=["new"]) == [5]  # allocated but never inserted: not an alias yet
    assert store.allocate_ids("b", client_ids=["a0"]) == [6]
    assert store.allocate_ids("a", count=2) == [7, 8]
    ids = store.snapshot().ids
    assert ids.next_doc_id == 9 and ids.ranges == {"a": ((0, 2), (4, 6), (7, 9)), "b": ((2, 4), (6, 7))}
    assert store.insert([make_doc(i, tenant="a", client_id=f"a{i}") for i in range(2)]).skipped == (0, 1)


def test_allocate_ids_refuses_bad_arguments(location):
    """Exactly one of count/client_ids; count >= 0 (0 is []); client ids unique, non-empty strings; a valid tenant."""
    store = open_store(location)
    for kwargs in ({}, {"count": 1, "client_ids": ["x"]}, {"count": -1}, {"count": True}, {"client_ids": ["x", "x"]}):
        with pytest.raises(ValueError):
            store.allocate_ids("a", **kwargs)
    with pytest.raises(ValueError, match=r"\['x'\]"):
        store.allocate_ids("a", client_ids=["x", "y", "x"])
    with pytest.raises(TypeError):
        store.allocate_ids("a", client_ids="xy")
    with pytest.raises(ValueError):
        store.allocate_ids("a", client_ids=[""])
    with pytest.raises(ValueError, match="not a valid tenant"):
        store.allocate_ids("no spaces", count=1)
    assert store.allocate_ids("a", count=0) == [] and store.allocate_ids("a", client_ids=[]) == []
    assert store.latest_version() == 0


def test_a_client_id_moves_only_with_replace(location):
    """A live client id under a new id is DocumentExistsError; with replace=True it moves and the old id goes, in one commit."""
    store = two_tenants(location)
    [new] = store.allocate_ids("a", count=1)
    version = store.latest_version()
    with pytest.raises(DocumentExistsError, match="client id 'a0' of tenant 'a' is document 0"):
        store.insert([make_doc(new, tenant="a", client_id="a0")])
    assert store.latest_version() == version
    result = store.insert([make_doc(new, tenant="a", client_id="a0", seed=3)], replace=True)
    assert result.inserted == (new,) and result.deleted == (0,) and result.version == version + 1
    snap = store.snapshot()
    assert snap.resolve(["a0"], "a") == {"a0": new} and 0 not in snap and snap.doc_ids("a") == [1, new]
    assert snap.resolve(["b2"], "b") == {"b2": 2}  # the same name space is per tenant
    with pytest.raises(ValueError, match="client ids"):
        store.insert([make_doc(0, tenant="a", client_id="x"), make_doc(1, tenant="a", client_id="x")], replace=True)


def test_client_ids_can_swap_between_documents_of_one_insert(location):
    """Replacing two documents whose client ids trade places keeps both documents and both aliases."""
    store = two_tenants(location)
    store.insert([make_doc(0, tenant="a", client_id="a1"), make_doc(1, tenant="a", client_id="a0")], replace=True)
    snap = store.snapshot()
    assert snap.resolve(["a0", "a1"], "a") == {"a0": 1, "a1": 0} and snap.doc_ids("a") == [0, 1]


def test_a_client_id_taken_by_a_concurrent_insert_is_refused(location):
    """The client id check runs again on the version the commit lands on, so a racing writer's alias wins."""
    a, b = open_store(location), open_store(location)
    a.allocate_ids("t", count=2)
    original = a._write_segments

    def racing(*args):
        out = original(*args)
        b.insert([make_doc(0, tenant="t", client_id="x")])
        return out

    a._write_segments = racing
    with pytest.raises(DocumentExistsError, match="client id 'x'"):
        a.insert([make_doc(1, tenant="t", client_id="x")])
    snap = a.snapshot()
    assert snap.doc_ids("t") == [0] and snap.resolve(["x"], "t") == {"x": 0}


def test_concurrent_allocations_never_hand_out_an_id_twice(location):
    """Four threads with their own handles allocate at once: every id is handed out once, to the tenant that asked."""
    open_store(location)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(tenant: str) -> None:
        try:
            store = open_store(location)
            got[tenant] = [i for _ in range(4) for i in store.allocate_ids(tenant, count=3)]
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"t{w}",)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    every = sorted(i for ids in got.values() for i in ids)
    assert every == list(range(48))
    final = open_store(location).snapshot().ids
    assert final.next_doc_id == 48
    for tenant, ids in got.items():
        assert all(final.owns(tenant, i) for i in ids)
        assert not any(final.owns(other, i) for other in got if other != tenant for i in ids)


def test_lost_races_wait_by_the_shared_backoff_policy(location, monkeypatch):
    """_commit waits between lost races by msa_cluster.retry.Backoff (jittered) and gives up after commit_retries tries."""
    store = open_store(location, commit_retries=5)
    waits: list[float] = []
    monkeypatch.setattr(store_module.time, "sleep", waits.append)
    monkeypatch.setattr(store._fs, "create_exclusive", lambda path, data: False)
    with pytest.raises(CommitConflictError, match="5 lost races"):
        store.allocate_ids("a", count=1)
    plain = list(Backoff(5, initial_s=0.002, max_s=0.25).delays())
    assert len(waits) == 4 and len(set(waits)) > 1
    assert all(0.5 * p <= w <= 1.5 * p for w, p in zip(waits, plain))
