"""Decoding over the fixed sparse context equals re-prefilling the longer sequence."""

import pytest
import torch

from msa_cluster.model import InProcessMemory
from msa_cluster.model.generation import GenerationConfig, generate
from tests.model.helpers import make_model, random_docs, random_prompt

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    model = make_model(seed=21)
    memory = InProcessMemory.from_documents(model, random_docs([12, 30, 7, 45, 19], 256))
    return model, memory


def test_decode_equals_prefill_of_longer_prompt(setup):
    """Logits of appended tokens equal those of one prefill over prompt + tokens (same routing tokens)."""
    model, memory = setup
    ids, mask = random_prompt(model, 12)
    extra = torch.tensor([[5, 77, 130]])
    out = model.prefill(ids, memory, mask)
    dec = model.decode(out.context, extra)
    long_ids = torch.cat([ids, extra], 1)
    long_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    full = model.prefill(long_ids, memory, long_mask)
    assert full.selected == out.selected
    torch.testing.assert_close(dec, full.logits[:, -3:], atol=ATOL, rtol=ATOL)


def test_multi_token_append_is_causal(setup):
    """Feeding three tokens at once equals feeding them one by one (no bidirectional block)."""
    model, memory = setup
    ids, mask = random_prompt(model, 10)
    a = model.prefill(ids, memory, mask).context
    b = model.prefill(ids, memory, mask).context
    together = model.decode(a, torch.tensor([[1, 2, 3]]))
    one_by_one = torch.cat([model.decode(b, torch.tensor([[t]])) for t in (1, 2, 3)], 1)
    torch.testing.assert_close(together, one_by_one, atol=ATOL, rtol=ATOL)
    assert a.next_position == b.next_position == 10 + model.config.memory.top_k_docs + 3


def test_decode_grows_past_reserve(setup):
    """Decoding beyond the reserved slots grows the buffers without changing results."""
    model, memory = setup
    ids, mask = random_prompt(model, 8)
    small = model.prefill(ids, memory, mask, reserve=0).context
    big = model.prefill(ids, memory, mask, reserve=64).context
    for t in range(5):
        torch.testing.assert_close(model.decode(small, torch.tensor([[t]])), model.decode(big, torch.tensor([[t]])))


def test_generate_greedy_is_deterministic_and_stops(setup):
    """Greedy generation is reproducible, honours max_new_tokens and stop tokens."""
    model, memory = setup
    ids, mask = random_prompt(model, 9)
    cfg = GenerationConfig(max_new_tokens=6)
    a, b = generate(model, ids, memory, mask, cfg), generate(model, ids, memory, mask, cfg)
    assert a.tokens == b.tokens and len(a.tokens) == 6 and a.finish_reason == "length"
    stop = GenerationConfig(max_new_tokens=6, stop_token_ids=(a.tokens[2],))
    c = generate(model, ids, memory, mask, stop)
    assert c.tokens == a.tokens[: a.tokens.index(a.tokens[2]) + 1] and c.finish_reason == "stop"


def test_sampling_is_seeded(setup):
    """Sampling with the same seed gives the same tokens; bad sampling settings are rejected."""
    model, memory = setup
    ids, mask = random_prompt(model, 9)
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, ids, memory, mask, cfg).tokens == generate(model, ids, memory, mask, cfg).tokens
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_bad_decode_input(setup):
    """Empty or out-of-vocabulary decode input is a ValueError."""
    model, memory = setup
    ids, mask = random_prompt(model, 8)
    ctx = model.prefill(ids, memory, mask).context
    with pytest.raises(ValueError, match="token_ids"):
        model.decode(ctx, torch.empty(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        model.decode(ctx, torch.tensor([[10**6]]))
