"""The gathered-attention reference against dense softmax attention with the mask written out,
and the launcher's checks.

Legend: Tq query tokens, S context slots, H query heads, Hkv kv heads, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from msa_cluster.kernels import attention
from msa_cluster.kernels.attention import gathered_attention, gathered_attention_ref
from tests.kernels.helpers import assert_close

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5
LOWP_RTOL = 1e-2  # bf16 / fp16 outputs
LOWP_ATOL = 1e-2

HEADS = [(4, 4), (4, 2), (4, 1)]  # GQA ratios 1, 2, 4


def _dense_attention(q, k, v, q_slots: list[int], scale: float) -> torch.Tensor:
    """Softmax attention in float64, one head at a time, with the slot mask built entry by entry."""
    Tq, H, D = q.shape
    S, Hkv, _ = k.shape
    mask = torch.zeros(Tq, S, dtype=torch.bool)
    for t in range(Tq):
        for j in range(S):
            mask[t, j] = j <= q_slots[t]
    out = torch.empty(Tq, H, D, dtype=torch.float64)
    for h in range(H):
        kv = h // (H // Hkv)
        logits = q[:, h].double() @ k[:, kv].double().T * scale  # [Tq, S]
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        out[:, h] = probs @ v[:, kv].double()
    return out


def _msa_slots(template: int, chunks: int, prompt: int) -> list[int]:
    """Query slots of an MSA prefill: template 0..template-1, then chunks, then the prompt."""
    return list(range(template)) + [template + chunks + i for i in range(prompt)]


CASES = [  # (q_slots, S)
    ([0], 1),  # one query, one slot
    (_msa_slots(3, 5, 4), 12),  # template + chunks + prompt prefill
    ([40], 41),  # one decode step over a longer context
    ([5, 2, 9, 0], 10),  # slots in any order
    ([30, 7], 8),  # a slot past the end sees everything
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("q_slots, S", CASES)
def test_gathered_attention_ref_matches_dense_masked_softmax(dtype, heads, q_slots, S):
    """gathered_attention_ref equals per-head dense softmax attention with the slot mask, every GQA ratio."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(S * 7 + len(q_slots))
    q = torch.randn(len(q_slots), H, 8, generator=g).to(dtype)
    k = torch.randn(S, Hkv, 8, generator=g).to(dtype)
    v = torch.randn(S, Hkv, 8, generator=g).to(dtype)
    got = gathered_attention_ref(q, k, v, torch.tensor(q_slots), 8**-0.5)
    assert got.dtype == dtype
    tol = (FP32_RTOL, FP32_ATOL) if dtype == torch.float32 else (LOWP_RTOL, LOWP_ATOL)
    assert_close(got, _dense_attention(q, k, v, q_slots, 8**-0.5), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("heads", HEADS)
def test_blocked_reference_bounds_its_logits_and_equals_dense(heads, monkeypatch):
    """Over many query and slot blocks (MSA prefill and decode slots), the reference equals dense
    attention, and no matmul it runs produces more than one BLOCK_Q x BLOCK_S block per kv head."""
    monkeypatch.setattr(attention, "BLOCK_Q", 4)
    monkeypatch.setattr(attention, "BLOCK_S", 8)
    H, Hkv = heads
    largest = []
    matmul = torch.matmul

    def spy(a, b):
        out = matmul(a, b)
        largest.append(out.numel())
        return out

    g = torch.Generator().manual_seed(5)
    for q_slots, S in ((_msa_slots(3, 21, 30), 54), ([60], 61)):
        q = torch.randn(len(q_slots), H, 8, generator=g)
        k, v = torch.randn(S, Hkv, 8, generator=g), torch.randn(S, Hkv, 8, generator=g)
        monkeypatch.setattr(torch, "matmul", spy)
        got = gathered_attention_ref(q, k, v, torch.tensor(q_slots), 0.3)
        monkeypatch.setattr(torch, "matmul", matmul)
        assert_close(got, _dense_attention(q, k, v, q_slots, 0.3), rtol=FP32_RTOL, atol=FP32_ATOL)
    assert largest and max(largest) <= Hkv * (4 * H // Hkv) * 8  # Hkv x (BLOCK_Q * G rows) x BLOCK_S


def test_prompt_token_sees_all_chunks_template_and_earlier_prompt_only():
    """With the MSA layout, changing a later prompt slot never changes an earlier token's output."""
    slots = torch.tensor(_msa_slots(3, 4, 3))
    q, k, v = torch.randn(6, 2, 4), torch.randn(10, 1, 4), torch.randn(10, 1, 4)
    base = gathered_attention_ref(q, k, v, slots, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[9], v2[9] = 5.0, 5.0  # the last prompt token's slot
    moved = gathered_attention_ref(q, k2, v2, slots, 0.5)
    assert torch.equal(moved[:5], base[:5]) and not torch.equal(moved[5], base[5])


def test_cpu_dispatch_matches_per_query_softmax_and_never_runs_triton(monkeypatch):
    """On CPU, gathered_attention takes the reference path and equals softmax attention written per query and head."""
    monkeypatch.setattr(attention, "gathered_attention_triton", lambda *a, **k: pytest.fail("Triton ran for CPU tensors"))
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    slots = torch.tensor([3, 4, 5])
    got = gathered_attention(q, k, v, slots, 0.3)
    for t in range(3):
        for h in range(4):
            visible = slice(0, int(slots[t]) + 1)  # slot-causal: keys up to the query's own slot
            weights = torch.softmax((k[visible, h // 2] @ q[t, h]) * 0.3, dim=0)
            assert torch.allclose(got[t, h], weights @ v[visible, h // 2], atol=1e-6)


def _qkv(Tq=2, H=4, S=5, Hkv=2, D=8, dtype=torch.float32):
    return torch.zeros(Tq, H, D, dtype=dtype), torch.zeros(S, Hkv, D, dtype=dtype), torch.zeros(S, Hkv, D, dtype=dtype)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, transposed memory layout."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v, s: (q.double(), k, v, s), TypeError, "q dtype"),
        (lambda q, k, v, s: (q, k.half(), v.half(), s), TypeError, "share one dtype"),
        (lambda q, k, v, s: (q[0], k, v, s), ValueError, "q must be 3-D"),
        (lambda q, k, v, s: (q, _non_contiguous(k), v, s), ValueError, "k must be contiguous"),
        (lambda q, k, v, s: (q, k, v[:4], s), ValueError, "v shape"),
        (lambda q, k, v, s: (q, k[..., :6].contiguous(), v[..., :6].contiguous(), s), ValueError, "head dim"),
        (lambda q, k, v, s: (q[:, :3].contiguous(), k, v, s), ValueError, "multiple of kv heads"),
        (lambda q, k, v, s: (q, k, v, s[:1]), ValueError, "one slot per query"),
        (lambda q, k, v, s: (q, k, v, s.float()), TypeError, "q_slots dtype"),
        (lambda q, k, v, s: (q, k, v, [0, 1]), TypeError, "q_slots must be a torch.Tensor"),
    ],
)
def test_gathered_attention_launcher_rejects_bad_inputs(change, error, match):
    """The Triton launcher names the bad input before launching anything."""
    q, k, v = _qkv()
    args = change(q, k, v, torch.tensor([3, 4]))
    with pytest.raises(error, match=match):
        attention.gathered_attention_triton(*args, 0.5)
