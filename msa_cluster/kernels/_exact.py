"""Float64 arithmetic in one fixed order, and rigorous bounds on an fp32 inner product's error.

Legend: P pairs (query token, chunk), W inner-product width, T tokens, C chunks.

Why a hand-written order: a BLAS or a torch reduction picks its summation order from the thread
count, the vector width and the device, so the same sum can round differently on two shards.
Elementwise IEEE operations round the same everywhere. `fixed_sum` is therefore built from
elementwise adds only: pairwise halving over the length padded with zeros to a power of two.
Padding further with zeros never changes the result (the first halvings add exact zeros), so a
query row padded to a longer T in a batch sums exactly as it does alone.

The product of two fp32 numbers (24-bit significands) fits a float64 significand exactly, so with
fp32 queries and fp32/bf16/fp16 keys only the additions round, and they do so in this fixed order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msa_cluster.kernels._common import next_power_of_2

__all__ = ["fixed_sum", "fixed_norm", "norm_upper", "fp32_dot_error", "bound", "upper", "lower", "round_up_fp32", "round_down_fp32",
           "gamma", "UNIT_FP32"]

UNIT_FP32 = 2.0**-24  # unit roundoff of fp32 (round to nearest)
_SLACK = 1.001  # covers the float64 rounding of the bound's own arithmetic (relative 1e-13 at most)
_TINY = 2.0**-140  # absolute cover for fp32 underflow (subnormal products lose at most 2^-150 each)
_INF = torch.tensor(float("inf"))


def fixed_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over `dim` by pairwise halving (fixed order, elementwise adds only); -0.0 comes out as +0.0."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    width = next_power_of_2(n)
    if width != n:
        x = F.pad(x, (0, width - n))
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    return x[..., 0] + 0.0


def fixed_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of the last axis in float64, in the fixed order: [..., W] -> [...] float64."""
    x = x.double()
    return fixed_sum(x * x).sqrt()


def norm_upper(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of the L2 norm of the last axis, fast: the fp32 norm (any order; relative error
    below gamma_{W+2}) inflated by twice that, plus an absolute 2^-50 for squares that underflow.
    [..., W] -> [...] float64. For bounds only: it is not reproducible across devices."""
    width = x.shape[-1]
    n: torch.Tensor = torch.linalg.vector_norm(x.float(), dim=-1).double()
    return n * (1 + 2 * gamma(width + 2)) + 2.0**-50


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): relative error bound of any n-term fp32 sum (Higham, Thm. 3.4)."""
    nu = n * UNIT_FP32
    if nu >= 0.5:
        raise ValueError(f"an fp32 sum of {n} terms has no useful error bound")
    return nu / (1 - nu)


def fp32_dot_error(width: int, tokens: int, key_error: float = 0.0) -> float:
    """Coefficient c such that |fp32 score - exact score| <= c * |q| * |k| + _TINY for a score that is
    a W-wide fp32 inner product (any summation order, FMA or not), optionally reduced over up to
    `tokens` tokens by an fp32 max (exact) or mean (a sum and a division, both in fp32).

    Cauchy-Schwarz bounds sum |q_i k_i| by |q| |k|, so per-token and per-chunk norms are enough.
    key_error: a relative elementwise error of the keys the first pass used (fast cosine
    normalisation) against the canonical ones; it adds key_error * |q| |k| (|k| of either).
    """
    rounding = (gamma(width) + gamma(max(tokens, 1)) + 2 * UNIT_FP32) * (1 + gamma(width))
    return _SLACK * (rounding + key_error) * (1 + key_error) * (1 + rounding)


def bound(coef: float, q_norm: torch.Tensor, k_norm: torch.Tensor) -> torch.Tensor:
    """The absolute bound coef * |q| * |k| + tiny, broadcast, in fp32 (its own three roundings, 3u
    relative, are far inside coef's slack; a product that overflows gives inf, a trivial bound)."""
    return coef * q_norm.float() * k_norm.float() + _TINY


def upper(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """An fp32 >= x + e for fp32 x, e: the rounded sum moved one ulp up (the rounding error is
    below one ulp of the result, also where the result is a power of two)."""
    return torch.nextafter(x + e, _INF.to(x.device))


def lower(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """An fp32 <= x - e for fp32 x, e (see `upper`)."""
    return torch.nextafter(x - e, -_INF.to(x.device))


def round_up_fp32(x: torch.Tensor) -> torch.Tensor:
    """An fp32 >= x, at most 1 ulp above the smallest (float64 in, float32 out; -inf gives the
    lowest finite fp32: mask -inf separately). Two elementwise ops: it runs on every chunk."""
    return torch.nextafter(x.float(), _INF.to(x.device))


def round_down_fp32(x: torch.Tensor) -> torch.Tensor:
    """An fp32 <= x, at most 1 ulp below the largest (see `round_up_fp32`)."""
    return torch.nextafter(x.float(), -_INF.to(x.device))
