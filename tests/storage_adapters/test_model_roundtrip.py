"""The store is a faithful source of truth for the model: memory rebuilt from it prefills identically."""

from __future__ import annotations

import pytest
import torch

from msa_cluster.model import InProcessMemory, MSAForCausalLM
from msa_cluster.model.tiny import bundled_checkpoint
from msa_cluster.storage_adapters import ALL_TENANTS, FingerprintMismatchError, MemoryStore
from tests.model.helpers import random_docs, random_prompt


@pytest.fixture(scope="module")
def tiny():
    return MSAForCausalLM.from_pretrained(bundled_checkpoint()).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_from_the_store_gives_bit_identical_prefill_logits(tiny, location, dtype):
    """Encode with the tiny checkpoint, write, reopen: InProcessMemory from the store prefills bit-identically."""
    model = tiny.to(dtype)
    try:
        docs = random_docs([5, 64, 65, 130, 200, 17, 90], model.config.vocab_size, seed=11)
        tenants = ["default"] * 6 + ["other"]
        fp = model.fingerprint()
        store = MemoryStore.open(location.url, fp, create=True, storage_options=location.storage_options)
        ids = store.allocate_ids("default", count=6) + store.allocate_ids("other", count=1)
        encoded = model.encode_documents(docs, texts=[f"text {i}" for i in range(7)], tenants=tenants, doc_ids=ids)
        store.insert(encoded)
        reopened = MemoryStore.open(location.url, fp, storage_options=location.storage_options).snapshot()
        layers = model.config.routing_layers
        in_memory = InProcessMemory(encoded, routing_layers=layers)
        from_store = InProcessMemory(reopened.documents(tenant=ALL_TENANTS), routing_layers=layers)
        ids, mask = random_prompt(model, 24, seed=5)
        a, b = model.prefill(ids, in_memory, mask), model.prefill(ids, from_store, mask)
        assert a.selected == b.selected and a.logits.dtype == b.logits.dtype
        assert torch.equal(a.logits, b.logits)
        assert reopened.texts([0, 6], "default") == {0: "text 0"} and reopened.texts([6], "other") == {6: "text 6"}
        assert reopened.doc_ids("other") == [6]
    finally:
        tiny.to(torch.float32)


def test_a_store_refuses_documents_of_another_model(tiny, tmp_path):
    """A store written by the tiny model will not open for a model with another config."""
    url = f"file://{tmp_path}/store"
    MemoryStore.open(url, tiny.fingerprint(), create=True)
    other = MSAForCausalLM.from_pretrained(bundled_checkpoint()).to(torch.bfloat16)
    with pytest.raises(FingerprintMismatchError, match="bfloat16"):
        MemoryStore.open(url, other.fingerprint())
