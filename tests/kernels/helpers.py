"""Shared test helpers for the kernels (torch.testing.assert_close is avoided: importing it pulls
in torch.distributed, several seconds on a 2-core machine)."""

from __future__ import annotations

import torch


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
