"""The chunk-pooling reference against per-chunk means written out, and the launcher's checks.

Legend: B documents, T padded tokens, F features, P chunk size, C = ceil(T / P) chunks.
"""

from __future__ import annotations

import pytest
import torch

from msa_cluster.kernels import pooling
from msa_cluster.kernels.pooling import chunk_mean, chunk_mean_ref, num_chunks
from tests.kernels.helpers import assert_close

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5

CASES = [  # (T, P, lengths): awkward lengths against the chunk size
    (1, 4, [1]),  # one token, shorter than one chunk
    (37, 8, [37, 1, 0, 8]),  # T not a multiple of P; empty and one-chunk documents
    (16, 16, [16, 15]),  # exactly one chunk
    (10, 1, [10, 3]),  # one token per chunk
    (5, 64, [5, 2]),  # every document shorter than one chunk
    (0, 4, [0, 0]),  # no tokens: C = 0
]


def _dense_chunk_mean(x: torch.Tensor, lengths: list[int], P: int) -> torch.Tensor:
    """Each chunk's mean over its own real tokens, one chunk at a time; zeros past the end."""
    B, T, F = x.shape
    out = torch.zeros(B, num_chunks(T, P), F, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for c in range(num_chunks(n, P)):
            out[b, c] = x[b, c * P : min((c + 1) * P, n)].double().mean(dim=0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, P, lengths", CASES)
def test_chunk_mean_ref_matches_per_chunk_means(dtype, T, P, lengths):
    """chunk_mean_ref gives each chunk's mean over its real tokens in fp32, zeros past the end."""
    g = torch.Generator().manual_seed(T * 31 + P)
    x = torch.randn(len(lengths), T, 6, generator=g).to(dtype)
    got = chunk_mean_ref(x, torch.tensor(lengths), P)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), num_chunks(T, P), 6)
    assert_close(got, _dense_chunk_mean(x, lengths, P), rtol=FP32_RTOL, atol=FP32_ATOL)


def test_chunk_mean_ref_is_exact_on_long_constant_documents():
    """A per-chunk sum (not a cumsum difference) keeps a constant document's means exact."""
    x = torch.full((1, 4096, 2), 1e4 + 0.1)
    got = chunk_mean_ref(x, torch.tensor([4096]), 64)
    assert torch.equal(got, torch.full_like(got, float(x[0, 0, 0])))


def test_cpu_dispatch_matches_plain_chunk_means_and_never_runs_triton(monkeypatch):
    """On CPU, chunk_mean takes the reference path and equals the mean of each chunk's real tokens."""
    monkeypatch.setattr(pooling, "chunk_mean_triton", lambda *a, **k: pytest.fail("Triton ran for CPU tensors"))
    x = torch.randn(2, 9, 4)
    lengths = torch.tensor([9, 4])
    got = chunk_mean(x, lengths, 4)
    assert got.shape == (2, 3, 4)
    for b in range(2):
        for c in range(3):
            real = x[b, c * 4 : min((c + 1) * 4, int(lengths[b]))]
            want = real.mean(0) if len(real) else torch.zeros(4)
            assert torch.allclose(got[b, c], want, atol=1e-6)


@pytest.mark.parametrize(
    "x, lengths, chunk_size, error, match",
    [
        ([[1.0]], [1], 4, TypeError, "x must be a torch.Tensor"),
        (torch.zeros(2, 5, 3, dtype=torch.float64), [5, 5], 4, TypeError, "x dtype"),
        (torch.zeros(5, 3), [5], 4, ValueError, "x must be 3-D"),
        (torch.zeros(2, 3, 5).transpose(1, 2), [5, 5], 4, ValueError, "x must be contiguous"),
        (torch.zeros(2, 5, 3), [5], 4, ValueError, "one entry per row"),
        (torch.zeros(2, 5, 3), [5, 6], 4, ValueError, r"lengths must lie in \[0, T=5\]"),
        (torch.zeros(2, 5, 3), [5, -1], 4, ValueError, "lengths must lie"),
        (torch.zeros(2, 5, 3), [5.0, 5.0], 4, TypeError, "lengths dtype"),
        (torch.zeros(2, 5, 3), [5, 5], 0, ValueError, "chunk_size must be an int >= 1"),
    ],
)
def test_chunk_mean_launcher_rejects_bad_inputs(x, lengths, chunk_size, error, match):
    """The Triton launcher names the bad input before launching anything."""
    with pytest.raises(error, match=match):
        pooling.chunk_mean_triton(x, torch.tensor(lengths), chunk_size)
