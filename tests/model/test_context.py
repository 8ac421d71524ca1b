"""The context bound and the one-copy context assembly of prefill.

Legend: S slots, Hkv kv heads, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from msa_cluster.kernels import attention
from msa_cluster.model import InProcessMemory
from msa_cluster.model.context import LayerContext
from msa_cluster.types import ContextTooLargeError
from tests.model.helpers import make_model, random_docs, random_prompt


def test_chunk_cap_raises_a_typed_error_before_the_context_is_allocated(monkeypatch):
    """A selection over max_chunks_per_query raises ContextTooLargeError naming the limit and its
    value, before that layer's context buffer or attention exists (only the layers before the
    first routing layer ran); at the cap itself prefill succeeds."""
    model = make_model(seed=5, top_k=2, chunk=8, max_chunks_per_query=5)  # routing layers 2 and 3
    memory = InProcessMemory.from_documents(model, random_docs([40, 33, 39], 256))  # 5 chunks each: two give 10
    ids, mask = random_prompt(model, 9)
    assembled: list[int] = []
    real = LayerContext.assemble.__func__  # type: ignore[attr-defined]

    def spy(cls, keys, values, reserve=0):
        assembled.append(sum(k.shape[0] for k in keys))
        return real(cls, keys, values, reserve)

    monkeypatch.setattr(LayerContext, "assemble", classmethod(spy))
    with pytest.raises(ContextTooLargeError, match=r"max_chunks_per_query=5 exceeded: this request needs 10") as err:
        model.prefill(ids, memory, mask)
    assert (err.value.limit, err.value.maximum, err.value.requested) == ("max_chunks_per_query", 5, 10)
    assert isinstance(err.value, ValueError)
    assert assembled == [9, 9]  # layers 0 and 1: template + prompt, no chunks; layer 2 allocated nothing
    roomy = make_model(seed=5, top_k=2, chunk=8, max_chunks_per_query=10)
    out = roomy.prefill(ids, InProcessMemory.from_documents(roomy, random_docs([40, 33, 39], 256)), mask)
    assert all(len(docs) == 2 for docs in out.selected.values())


def test_assemble_copies_each_part_once_into_one_buffer():
    """Under inference mode the parts land in one buffer of S + reserve slots (equal to their cat),
    and later appends fill the reserve in place without reallocating."""
    parts = [torch.randn(n, 2, 4) for n in (3, 0, 5, 2)]
    with torch.inference_mode():
        ctx = LayerContext.assemble(parts, [p + 1 for p in parts], reserve=4)
        buffer = ctx.keys.data_ptr()
        keys, values = ctx.view()
        assert ctx.keys.shape[0] == 14 and ctx.length == 10
        assert torch.equal(keys, torch.cat(parts)) and torch.equal(values, torch.cat(parts) + 1)
        slots = ctx.append(torch.ones(4, 2, 4), torch.ones(4, 2, 4))
        assert slots.tolist() == [10, 11, 12, 13] and ctx.keys.data_ptr() == buffer


def test_assemble_with_grad_is_a_differentiable_cat():
    """With grad enabled (training) the assembled context carries gradients back to every part."""
    parts = [torch.randn(n, 1, 2, requires_grad=True) for n in (2, 3)]
    ctx = LayerContext.assemble(parts, parts)
    keys, values = ctx.view()
    (keys.sum() + 2 * values.sum()).backward()
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in parts)


def test_prefill_with_small_attention_blocks_equals_one_block(monkeypatch):
    """Prefill over many small query and slot blocks gives the logits of one block per layer."""
    model = make_model(seed=6, top_k=2, chunk=8)
    memory = InProcessMemory.from_documents(model, random_docs([40, 33, 41], 256))
    ids, mask = random_prompt(model, 40)
    whole = model.prefill(ids, memory, mask)
    monkeypatch.setattr(attention, "BLOCK_Q", 3)
    monkeypatch.setattr(attention, "BLOCK_S", 5)
    blocked = model.prefill(ids, memory, mask)
    assert blocked.selected == whole.selected
    torch.testing.assert_close(blocked.logits, whole.logits, atol=1e-5, rtol=1e-5)
