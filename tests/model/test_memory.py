"""InProcessMemory: encoding contract, tenants, online insert/delete, snapshots, empty memory, bad input."""

import dataclasses

import pytest
import torch

from msa_cluster.model import InProcessMemory
from msa_cluster.types import DocumentExistsError, UnknownDocumentError
from tests.model.helpers import make_model, random_docs, random_prompt


@pytest.fixture(scope="module")
def model():
    return make_model(seed=31, top_k=2)


def test_pooled_shapes_and_chunk_counts(model):
    """pooled() returns float32 [ceil(len/P), Hkv, D] K, V and router K per routing layer."""
    memory = InProcessMemory.from_documents(model, random_docs([1, 8, 9, 17], 256))
    for doc_id, chunks in enumerate([1, 1, 2, 3]):
        for layer in model.config.routing_layers:
            for t in memory.pooled(doc_id, layer):
                assert t.shape == (chunks, 2, 16) and t.dtype == torch.float32
    with pytest.raises(ValueError, match="not a routing layer"):
        memory.pooled(0, 0)
    with pytest.raises(UnknownDocumentError):
        memory.pooled(99, 2)


def test_encoding_is_independent_of_batching(model):
    """A document's pooled tensors do not depend on which other documents are encoded with it."""
    docs = random_docs([5, 40, 23], 256)
    together = InProcessMemory.from_documents(model, docs)
    alone = InProcessMemory.from_documents(model, docs[1:2], doc_ids=[1], batch_tokens=1)
    for a, b in zip(together.pooled(1, 3), alone.pooled(1, 3)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tenants_never_see_each_other(model):
    """Routing for tenant A selects only A's documents; texts() hides B's."""
    docs = random_docs([10, 11, 12, 13, 14, 15], 256)
    tenants = ["a", "b", "a", "b", "a", "b"]
    memory = InProcessMemory.from_documents(model, docs, tenants=tenants, texts=[f"t{i}" for i in range(6)])
    ids, mask = random_prompt(model, 10)
    for tenant, own in (("a", {0, 2, 4}), ("b", {1, 3, 5})):
        out = model.prefill(ids, memory, mask, tenant=tenant)
        assert all(set(s) <= own and len(s) == 2 for s in out.selected.values())
        assert set(memory.snapshot(tenant).texts(range(6))) == own


def test_deleted_documents_are_never_routed_and_snapshots_are_pinned(model):
    """A delete is visible to the next snapshot; a snapshot taken before keeps its version."""
    memory = InProcessMemory.from_documents(model, random_docs([10, 11, 12], 256))
    ids, mask = random_prompt(model, 10)
    before = memory.snapshot()
    winner = model.prefill(ids, memory, mask).selected[2][0]
    memory.delete([winner])
    after = model.prefill(ids, memory, mask)
    assert all(winner not in s for s in after.selected.values())
    assert winner in model.prefill(ids, before, mask).selected[2]
    assert after.version == before.version + 1
    with pytest.raises(UnknownDocumentError):
        memory.delete([winner])


def test_insert_is_online(model):
    """Documents added after construction are routable by the next request."""
    docs = random_docs([10, 11, 12, 30], 256)
    memory = InProcessMemory.from_documents(model, docs[:1])
    new_ids = memory.allocate_ids("default", count=3)
    assert new_ids == [1, 2, 3]
    memory.add(model.encode_documents(docs[1:], doc_ids=new_ids))
    ids, mask = random_prompt(model, 10)
    assert len(memory) == 4
    full = InProcessMemory.from_documents(model, docs)
    assert model.prefill(ids, memory, mask).selected == model.prefill(ids, full, mask).selected


def test_empty_memory_selects_nothing(model):
    """Empty memory is defined: nothing is selected and the prompt attends to itself."""
    ids, mask = random_prompt(model, 8)
    out = model.prefill(ids, InProcessMemory(), mask)
    assert out.selected == {2: [], 3: []} and torch.isfinite(out.logits).all()


def test_all_false_routing_mask_selects_nothing(model):
    """An all-False routing mask selects no document at any layer."""
    memory = InProcessMemory.from_documents(model, random_docs([10, 11], 256))
    ids, mask = random_prompt(model, 8)
    out = model.prefill(ids, memory, torch.zeros_like(mask))
    assert out.selected == {2: [], 3: []}


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.bool), r"\[1, T\]"),
        (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool), "template head"),
        (torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.bool), "routing_mask"),
        (torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool), "False on the template head"),
        (torch.full((1, 8), 9999), torch.zeros(1, 8, dtype=torch.bool), "outside"),
    ],
)
def test_bad_prompt_is_a_clear_error(model, ids, mask, message):
    """Malformed prompts raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        model.prefill(ids, InProcessMemory(), mask)


def test_bad_documents_are_clear_errors(model):
    """Empty documents, duplicate ids and mismatched side lists raise ValueError."""
    with pytest.raises(ValueError, match="empty"):
        model.encode_documents([[1, 2], []])
    with pytest.raises(ValueError, match="unique"):
        model.encode_documents([[1], [2]], doc_ids=[4, 4])
    with pytest.raises(ValueError, match="texts"):
        model.encode_documents([[1], [2]], texts=["x"])
    with pytest.raises(ValueError, match="outside"):
        model.encode_documents([[1, 100000]])


def test_mixing_models_is_refused(model):
    """Documents encoded for other routing layers cannot enter the memory."""
    other = make_model(seed=1, routing="3")
    memory = InProcessMemory.from_documents(model, random_docs([5], 256))
    with pytest.raises(ValueError, match="routing layers"):
        memory.add(other.encode_documents(random_docs([5], 256), doc_ids=[7]))


def test_writes_are_tenant_scoped(model):
    """Another tenant's id behaves exactly like an id never used: same error, nothing changes."""
    memory = InProcessMemory.from_documents(model, random_docs([10, 11], 256), tenants=["a", "b"], texts=["x", "y"])
    version = memory.version
    theirs = model.encode_documents(random_docs([12], 256, seed=3), doc_ids=[0], tenants=["b"])
    never = model.encode_documents(random_docs([12], 256, seed=3), doc_ids=[99], tenants=["b"])
    errors = []
    for write in (lambda: memory.add(theirs, replace=True), lambda: memory.update(theirs),
                  lambda: memory.delete([0], tenant="b"), lambda: memory.get(0, tenant="b"),
                  lambda: memory.add(never, replace=True), lambda: memory.update(never),
                  lambda: memory.delete([99], tenant="b"), lambda: memory.get(99, tenant="b")):
        with pytest.raises(UnknownDocumentError) as e:
            write()
        errors.append(str(e.value).replace("99", "ID").replace("0", "ID"))
    assert len(set(errors)) == 1, errors
    assert memory.version == version and memory.get(0, tenant="a").text == "x"
    assert memory.snapshot("b").texts([0, 1]) == {1: "y"}


def test_live_id_needs_replace_and_client_ids_alias_one_document(model):
    """A live id with new content needs replace; a client id names one live document per tenant."""
    memory = InProcessMemory(routing_layers=model.config.routing_layers)
    first = memory.allocate_ids("a", client_ids=["doc-x", "doc-y"])
    docs = model.encode_documents(random_docs([10, 11], 256), doc_ids=first, tenants=["a", "a"])
    docs = [dataclasses.replace(d, client_id=c) for d, c in zip(docs, ["doc-x", "doc-y"])]
    memory.add(docs)
    assert memory.allocate_ids("a", client_ids=["doc-y", "doc-z"])[0] == first[1]
    assert memory.resolve(["doc-x", "nope"], tenant="a") == {"doc-x": first[0]}
    assert memory.resolve(["doc-x"], tenant="b") == {}
    changed = model.encode_documents(random_docs([12], 256, seed=5), doc_ids=[first[0]], tenants=["a"])
    with pytest.raises(DocumentExistsError):
        memory.add(changed)
    [moved_to] = memory.allocate_ids("a", count=1)
    again = dataclasses.replace(model.encode_documents(random_docs([12], 256, seed=5), doc_ids=[moved_to], tenants=["a"])[0],
                                client_id="doc-x")
    with pytest.raises(DocumentExistsError, match="doc-x"):
        memory.add([again])
    memory.add([again], replace=True)
    assert memory.resolve(["doc-x"], tenant="a") == {"doc-x": moved_to} and first[0] not in memory.snapshot("a").doc_ids


def test_old_snapshots_release_their_history(model):
    """Removed entries are retired once no snapshot object can see them, and pinned ones still read."""
    memory = InProcessMemory.from_documents(model, random_docs([10, 11, 12], 256))
    pinned = memory.snapshot()
    memory.delete([0])
    assert pinned.texts([0]) == {} and 0 in pinned.doc_ids and 0 not in memory.snapshot().doc_ids
    del pinned
    memory.delete([1])
    assert memory._arenas["default"].held_chunks == memory._live[2].num_chunks
