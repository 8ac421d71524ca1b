"""Chunk pooling: per-document means of consecutive P-token chunks (digest 2.3).

Legend: B documents in a batch, T padded tokens, F features (Hkv * D), P chunk size,
C = ceil(T / P) chunks.

Each chunk's mean is accumulated in float32 over that chunk's own tokens (a per-segment sum,
not a difference of one long cumsum, which loses precision on long inputs). The last chunk of
a document may be partial and is divided by its real token count.
"""

from __future__ import annotations

import torch

__all__ = ["chunk_mean", "chunk_mean_ref", "num_chunks"]


def num_chunks(num_tokens: int, chunk_size: int) -> int:
    return -(-num_tokens // chunk_size)


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
    """Dispatcher for `chunk_mean_ref` semantics."""
    return chunk_mean_ref(x, lengths, chunk_size)
