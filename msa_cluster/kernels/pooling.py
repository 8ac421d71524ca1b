"""Chunk pooling: per-document means of consecutive P-token chunks (digest 2.3).

Legend: B documents in a batch, T padded tokens, F features (Hkv * D), P chunk size,
C = ceil(T / P) chunks.

Each chunk's mean is accumulated in float32 over that chunk's own tokens (a per-segment sum,
not a difference of one long cumsum, which loses precision on long inputs). The last chunk of
a document may be partial and is divided by its real token count.
"""

from __future__ import annotations

import torch

from msa_cluster.kernels._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_tensor,
    next_power_of_2,
    require_triton,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["chunk_mean", "chunk_mean_ref", "chunk_mean_triton", "num_chunks"]

_BLOCK_T = 16  # tokens summed per step
_MAX_BLOCK_F = 128  # features per program


def num_chunks(num_tokens: int, chunk_size: int) -> int:
    """ceil(num_tokens / chunk_size): the chunk count of a document of num_tokens tokens."""
    return -(-num_tokens // chunk_size)


if HAS_TRITON:

    @triton.jit
    def _chunk_mean_kernel(  # type: ignore[no-untyped-def]  # Triton reads the signature
        x_ptr,  # [B, T, F]
        len_ptr,  # [B]
        out_ptr,  # [B, C, F] float32
        T,
        F,
        C,
        P,
        BLOCK_T: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        """One program: one chunk (b, c) and BLOCK_F features; sums the chunk's real tokens in fp32."""
        pid_bc = tl.program_id(0)  # b * C + c
        pid_f = tl.program_id(1)
        b = (pid_bc // C).to(tl.int64)
        c = pid_bc % C
        start = c * P
        count = tl.minimum(tl.load(len_ptr + b).to(tl.int32) - start, P)  # <= 0 past the row's end
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        for t0 in range(0, count, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            rows = b * T + start + offs_t  # int64: B * T * F may pass 2**31
            ok = (offs_t < count)[:, None] & f_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * F + offs_f[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(x, axis=0)
        mean = acc / tl.maximum(count, 1).to(tl.float32)
        tl.store(out_ptr + pid_bc.to(tl.int64) * F + offs_f, mean, mask=f_ok)


def chunk_mean_triton(x: torch.Tensor, lengths: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Triton launcher with `chunk_mean_ref` semantics; x on a CUDA device (or CPU under the
    Triton interpreter). Also requires 0 <= lengths <= T, which the reference does not check."""
    check_tensor("x", x, shape="[B, T, F]", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("lengths", lengths, shape="[B]", ndim=1, dtypes=INDEX_DTYPES, contiguous=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    B, T, F = x.shape
    if lengths.shape[0] != B:
        raise ValueError(f"lengths must have one entry per row of x (B={B}), got {lengths.shape[0]}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got min {int(lengths.min())}, max {int(lengths.max())}")
    C = num_chunks(T, chunk_size)
    out = torch.empty(B, C, F, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    require_triton()
    block_f = min(_MAX_BLOCK_F, max(16, next_power_of_2(F)))
    grid = (B * C, triton.cdiv(F, block_f))
    _chunk_mean_kernel[grid](
        x, lengths.to(x.device).contiguous(), out, T, F, C, chunk_size, BLOCK_T=_BLOCK_T, BLOCK_F=block_f
    )
    return out


def chunk_mean_ref(x: torch.Tensor, lengths: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """x: [B, T, F]; lengths: [B] int64 (real tokens per row, right padding) -> [B, C, F] float32.

    Chunks past a row's length are zero.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, F = x.shape
    C = num_chunks(T, chunk_size)
    pos = torch.arange(C * chunk_size, device=x.device)
    valid = pos.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)  # [B, C*P]
    padded = x.new_zeros(B, C * chunk_size, F)
    padded[:, :T] = x
    padded = padded.float() * valid.unsqueeze(-1)
    sums = padded.view(B, C, chunk_size, F).sum(dim=2)  # [B, C, F]
    counts = valid.view(B, C, chunk_size).sum(dim=2, keepdim=True)  # [B, C, 1]
    return sums / counts.clamp_min(1)


def chunk_mean(x: torch.Tensor, lengths: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-chunk means [B, C, F] float32 of x [B, T, F] with lengths [B] (see `chunk_mean_ref`).

    Triton on CUDA, the reference elsewhere. Example:
        >>> chunk_mean(torch.ones(1, 5, 2), torch.tensor([5]), 4).shape
        torch.Size([1, 2, 2])
    """
    if use_triton(x):
        return chunk_mean_triton(x.contiguous(), lengths, chunk_size)
    return chunk_mean_ref(x, lengths, chunk_size)
