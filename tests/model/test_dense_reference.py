"""The sparse prefill equals the dense reference with an explicit mask (fp32), selections exact."""

import pytest
import torch

from msa_cluster.model import InProcessMemory
from tests.model.helpers import Dense, make_model, random_docs, random_prompt

ATOL = 1e-5  # fp32
RTOL = 1e-5

CASES = {
    "gqa1": dict(heads=2, kv_heads=2),
    "gqa2": dict(heads=4, kv_heads=2),
    "gqa4": dict(heads=4, kv_heads=1),
    "cosine": dict(similarity="cosine"),
    "no_router": dict(decouple_router=False),
    "head_max_query_mean_chunk_mean": dict(head_reduce_method="max", query_reduce_method="mean", chunk_reduce_method="mean"),
    "query_last": dict(query_reduce_method="last"),
    "all_layers_route": dict(routing="all"),
}


def _check(model, lengths, prompt_len=14, seed=2):
    docs = random_docs(lengths, model.config.vocab_size)
    memory = InProcessMemory.from_documents(model, docs)
    ids, mask = random_prompt(model, prompt_len, seed=seed)
    out = model.prefill(ids, memory, mask)
    dense = Dense(model)
    pooled = [dense.encode(d) for d in docs]
    for n, p in enumerate(pooled):
        for layer, (k, v, rk) in p.items():
            got = memory.pooled(n, layer)
            for a, b in zip(got, (k, v, rk)):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    logits, selections = dense.prefill(ids[0], mask[0], pooled)
    assert out.selected == selections
    torch.testing.assert_close(out.logits[0], logits, atol=ATOL, rtol=RTOL)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_reference(case):
    """Logits and per-layer selections match the dense masked reference across routing variants and GQA ratios."""
    opts = dict(CASES[case])
    model = make_model(seed=3, **opts)
    _check(model, [5, 8, 13, 21, 30, 2])


@pytest.mark.parametrize("lengths", [[1], [7], [64], [3, 65, 9, 16, 17]], ids=["len1", "short", "exact", "mixed"])
def test_awkward_document_lengths(lengths):
    """One document, documents shorter than a chunk, and lengths not a multiple of the chunk size."""
    _check(make_model(seed=4), lengths)


def test_top_k_larger_than_memory_selects_everything():
    """With k > N every document is selected, ordered by score."""
    model = make_model(seed=5, top_k=8)
    out = _check(model, [9, 10, 11])
    assert all(sorted(s) == [0, 1, 2] for s in out.selected.values())


def test_selects_top_k_when_memory_is_larger():
    """With N > k exactly k documents are selected per routing layer."""
    model = make_model(seed=6, top_k=2)
    out = _check(model, [9, 10, 11, 12, 13, 14, 15])
    assert all(len(s) == 2 for s in out.selected.values())


def test_prompt_of_one_token_after_template():
    """The shortest valid prompt (template head + one routing token) matches the reference."""
    _check(make_model(seed=7), [10, 20], prompt_len=4)


def test_bfloat16_model_rounds_pooled_values():
    """A bf16 model stores pooled K/V in bf16 (as the reference) and returns them as float32."""
    model = make_model(seed=8, dtype=torch.bfloat16)
    memory = InProcessMemory.from_documents(model, random_docs([20, 30], model.config.vocab_size))
    doc = memory.get(0)
    assert doc.keys.dtype == torch.bfloat16
    k, v, rk = memory.pooled(0, model.config.routing_layers[0])
    assert k.dtype == torch.float32 and k.shape == (3, 2, 16)
    assert torch.equal(k, k.bfloat16().float())
    ids, mask = random_prompt(model, 10)
    out = model.prefill(ids, memory, mask)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
