"""Concurrent writers never lose a commit; concurrent readers always see one consistent version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from msa_cluster.storage_adapters import ALL_TENANTS, DocumentExistsError, MemoryStore
from msa_cluster.types import UnknownDocumentError
from tests.storage_adapters.store_helpers import FP32, grant, make_doc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _open(loc, create=False):
    return MemoryStore.open(loc.url, FP32, create=create, storage_options=loc.storage_options)


def _run_threads(targets) -> None:
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]


def test_concurrent_thread_writers_never_lose_a_commit(location):
    """Four threads with their own store handles commit 16 inserts at once: all 16 versions survive."""
    grant(_open(location, create=True), 40)
    versions = []

    def writer(w: int):
        def run():
            store = _open(location)
            for j in range(4):
                versions.append(store.insert([make_doc(10 * w + j)]).version)

        return run

    _run_threads([writer(w) for w in range(4)])
    store = _open(location)
    assert sorted(versions) == list(range(2, 18))
    assert store.latest_version() == 17 and store.versions() == list(range(18))
    assert store.snapshot().doc_ids("default") == sorted(10 * w + j for w in range(4) for j in range(4))
    store.verify()


def test_a_stale_handle_decides_against_the_latest_version(location):
    """A handle that last saw an old version still deletes, skips and inserts against the newest one."""
    a, b = _open(location, create=True), _open(location)
    a.snapshot()
    grant(b, 7)
    b.insert([make_doc(5), make_doc(6)])
    assert a.delete([5], tenant="default").deleted == (5,)  # a never saw document 5 before
    assert a.insert([make_doc(6)]).skipped == (6,)
    assert b.insert([make_doc(5)]).inserted == (5,)
    assert a.snapshot().doc_ids("default") == [5, 6] and a.latest_version() == 4


_WRITER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.storage_adapters.store_helpers import FP32, make_doc
from msa_cluster.storage_adapters import MemoryStore
url, options, first = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
store = MemoryStore.open(url, FP32, storage_options=options)
out = []
for i in range(first, first + 4):
    out.append(store.insert([make_doc(i)]).version)
out.append(store.delete([first], tenant="default").version)
print(json.dumps(out))
"""


def test_concurrent_process_writers_never_lose_a_commit(shared_location):
    """Two processes (say the API and an ingestion job) commit at once: every commit is kept."""
    loc = shared_location
    grant(_open(loc, create=True), 104)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, ROOT, loc.url, json.dumps(loc.storage_options), str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in (0, 100)
    ]
    versions = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        versions += json.loads(out)
    assert sorted(versions) == list(range(2, 12))
    snap = _open(loc).snapshot()
    assert snap.doc_ids("default") == [i for first in (0, 100) for i in range(first + 1, first + 4)]


def test_readers_see_one_consistent_version_during_insert_delete_compact(location):
    """Readers racing inserts, updates, deletes and compactions always see exactly one version's documents."""
    grant(_open(location, create=True), 10)
    expected: dict[int, dict[int, int]] = {0: {}, 1: {}}  # version -> {doc id: seed}
    seen: list[tuple[int, dict[int, int]]] = []
    done = threading.Event()

    def writer():
        store, live = _open(location), {}
        steps = [
            ("insert", list(range(6)), 0),
            ("delete", [1, 4], 0),
            ("insert", list(range(6, 10)), 0),
            ("compact", [], 0),
            ("update", [0, 7], 3),
            ("delete", [6], 0),
            ("compact", [], 0),
            ("insert", [1, 4], 9),
        ]
        try:
            for op, ids, seed in steps:
                if op in ("insert", "update"):
                    r = store.insert([make_doc(i, seed=seed) for i in ids], replace=op == "update")
                    live.update({i: seed for i in ids})
                elif op == "delete":
                    r = store.delete(ids, tenant="default")
                    for i in ids:
                        live.pop(i)
                else:
                    r = store.compact()
                expected[r.version] = dict(live)
        finally:
            done.set()

    def reader():
        store = _open(location)
        while not done.is_set() or len(seen) < 4:
            snap = store.snapshot()
            docs = snap.documents(tenant=ALL_TENANTS)
            got = {}
            for d in docs:
                seed = int(d.text.rsplit(" ", 1)[1])
                want = make_doc(d.doc_id, seed=seed)
                assert all(getattr(d, t).equal(getattr(want, t)) for t in ("keys", "values", "router_keys"))
                got[d.doc_id] = seed
            rk = snap.router_keys(tenant=ALL_TENANTS)
            assert rk.doc_ids.tolist() == sorted(got)
            seen.append((snap.version, got))

    _run_threads([writer, reader, reader])
    assert len(expected) == 10
    for version, got in seen:
        assert got == expected[version], version


def _race(store, action):
    """Make `store`'s next segment upload run `action` (another writer's commit) right after it."""
    original, fired = store._write_segments, []

    def racing(*args):
        out = original(*args)
        if not fired:
            fired.append(True)
            action()
        return out

    store._write_segments = racing


def test_insert_rebases_over_a_concurrent_delete_of_a_document_it_skipped(location):
    """A document skipped as already present, then deleted by another writer mid-insert, is inserted after all."""
    a = _open(location, create=True)
    b = _open(location)
    grant(a, 3)
    a.insert([make_doc(1)])
    _race(a, lambda: b.delete([1], tenant="default"))
    result = a.insert([make_doc(1), make_doc(2)])
    assert set(result.inserted) == {1, 2} and result.version == 4
    assert a.snapshot().doc_ids("default") == [1, 2]


def test_insert_conflicting_with_a_concurrent_insert_is_refused(location):
    """Two writers inserting the same new id with different content: the second gets DocumentExistsError."""
    a = _open(location, create=True)
    b = _open(location)
    grant(a, 8)
    _race(a, lambda: b.insert([make_doc(7, seed=1)]))
    with pytest.raises(DocumentExistsError, match="document 7"):
        a.insert([make_doc(7, seed=2)])
    snap = a.snapshot()
    assert snap.doc_ids("default") == [7] and snap.texts([7], "default") == {7: "document 7 seed 1"}
    assert len(snap.manifest.segments) == 1  # the loser's segment was never published


def test_compaction_keeps_deletes_and_updates_committed_while_it_ran(location):
    """Rows deleted or replaced during a compaction stay dead in the rewritten segment."""
    a = _open(location, create=True)
    b = _open(location)
    grant(a, 4)
    a.insert([make_doc(i) for i in range(4)])
    a.delete([0], tenant="default")

    def concurrent():
        b.delete([1], tenant="default")
        b.insert([make_doc(2, seed=5)], replace=True)

    _race(a, concurrent)
    assert a.compact().rewritten_segments
    snap = a.snapshot()
    assert snap.doc_ids("default") == [2, 3] and snap.texts([2], "default") == {2: "document 2 seed 5"}
    a.verify()


def test_update_racing_a_delete_of_its_document_fails_and_stays_deleted(location):
    """An update whose document another writer deletes mid-update raises UnknownDocumentError; the delete stands."""
    a = _open(location, create=True)
    b = _open(location)
    grant(a, 2)
    a.insert([make_doc(0), make_doc(1)])
    _race(a, lambda: b.delete([0], tenant="default"))
    with pytest.raises(UnknownDocumentError, match="document 0 is not a document of tenant 'default'"):
        a.update([make_doc(0, seed=4), make_doc(1, seed=4)])
    snap = a.snapshot()
    assert snap.doc_ids("default") == [1] and snap.texts([1], "default") == {1: "document 1 seed 0"}
