"""Shared test helpers for the kernels (torch.testing.assert_close is avoided: importing it pulls
in torch.distributed, several seconds on a 2-core machine)."""

from __future__ import annotations

import math

import torch

ROUTING_SPECS = [  # (similarity, head_reduce, query_reduce, chunk_reduce)
    ("dot", "mean", "max", "max"),  # the released MSA-4B configuration
    ("cosine", "mean", "max", "max"),
    ("dot", "max", "max", "max"),
    ("dot", "mean", "mean", "max"),
    ("dot", "mean", "mean", "mean"),
    ("cosine", "max", "last", "mean"),
    ("dot", "mean", "last", "max"),
    ("dot", "max", "max", "mean"),
]


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> None:
    """|got - want| <= atol + rtol * |want| elementwise, same shape, nan where want is nan."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double().cpu(), want.double().cpu()
    if torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        return
    err = (got - want).abs().nan_to_num(nan=float("inf"))
    worst = int(err.flatten().argmax())
    raise AssertionError(
        f"not close (rtol={rtol}, atol={atol}): max |diff| {float(err.max()):.3g} at flat index {worst}: "
        f"got {float(got.flatten()[worst])}, want {float(want.flatten()[worst])}"
    )


def triton_mode() -> str | None:
    """How this process can run the Triton kernels: "interpreter" (CPU, TRITON_INTERPRET=1 set
    before triton was imported), "cuda" (a GPU), or None.

    The interpreter is chosen when triton is imported, not when a kernel runs: triton.language's
    own helpers (tl.zeros, tl.sum) are jitted at import. So a process that imported triton
    without the variable (any test importing transformers does) cannot switch later; the
    kernel tests then run in a fresh process (test_triton_interpreter.py).
    """
    from msa_cluster.kernels._common import HAS_TRITON

    if not HAS_TRITON:
        return None
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from msa_cluster.kernels import attention, pooling, routing

    jitted = (
        tl.zeros,
        pooling._chunk_mean_kernel,
        attention._gathered_attention_kernel,
        routing._chunk_score_kernel,
        routing._doc_reduce_kernel,
    )
    if all(isinstance(fn, InterpretedFunction) for fn in jitted):
        return "interpreter"
    if torch.cuda.is_available():
        return "cuda"
    return None


def dense_doc_scores(q, mask, keys, offsets, spec, scale: float) -> torch.Tensor:
    """The digest's formula written out per head in float64: [B, N]."""
    q, k = q.double(), keys.double()
    if spec.similarity == "cosine":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    per_head = torch.einsum("bthd,chd->btch", q * scale, k.repeat_interleave(spec.group, dim=1))  # [B, T, C, H]
    s = per_head.mean(-1) if spec.head_reduce == "mean" else per_head.amax(-1)  # [B, T, C]
    B, _, C = s.shape
    chunk = torch.full((B, C), -math.inf, dtype=torch.float64)
    for b in range(B):
        tokens = mask[b].nonzero().flatten()
        if tokens.numel() == 0:
            continue
        rows = s[b, tokens]  # [n, C]
        chunk[b] = {"max": rows.amax(0), "mean": rows.mean(0), "last": rows[-1]}[spec.query_reduce]
    docs = [chunk[:, offsets[n] : offsets[n + 1]] for n in range(len(offsets) - 1)]
    reduce = (lambda x: x.amax(1)) if spec.chunk_reduce == "max" else (lambda x: x.mean(1))
    return torch.stack([reduce(d) for d in docs], dim=1)
