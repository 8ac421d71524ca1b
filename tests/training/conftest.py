"""A tiny training config shared by the training tests (seconds per run on 2 cores)."""

import pytest
import torch

from msa_cluster.training.config import TrainConfig

TINY = {
    "seed": 3, "steps": 24, "batch_size": 2, "threads": 1, "lr": 3e-3, "warmup_steps": 12,
    "log_every": 4, "eval_every": 12, "checkpoint_every": 12,
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
              "intermediate_size": 64, "vocab_size": 400, "top_k_docs": 2, "pooling_kernel_size": 8},
    "data": {"num_docs": 6, "eval_examples": 2, "tokenizer_examples": 60},
}  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path):
    def make(name: str = "run", **overrides) -> TrainConfig:
        return TrainConfig.model_validate({**TINY, "output_dir": str(tmp_path / name), **overrides})

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Training tests use one torch thread: on a shared 2-core box two threads oversubscribe (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
