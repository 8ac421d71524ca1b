"""Ray actors that hold a model: the generator and the encoder (kept apart from the shard actors,
so that shard processes never import the model stack)."""

from __future__ import annotations

from typing import Any

import ray
import torch

from msa_cluster.actors.encoder import Encoder
from msa_cluster.actors.generator import Generator
from msa_cluster.actors.memory import ClusterMemory

__all__ = ["GeneratorActor", "EncoderActor"]


@ray.remote
class GeneratorActor(Generator):
    """The model and a batching ClusterMemory; run with max_concurrency > 1 to batch requests."""

    def __init__(self, *, checkpoint: str, coordinator: str, batch_window_s: float = 0.002, timeout_s: float = 30.0,
                 retries: int = 3, dtype: Any = None, namespace: str | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        memory = ClusterMemory(ray.get_actor(coordinator, namespace=namespace), timeout_s=timeout_s,
                               batch_window_s=batch_window_s, retries=retries)
        base = Generator.from_checkpoint(checkpoint, memory, dtype=dtype, device=device)
        super().__init__(base.model, base.codec, memory)


@ray.remote
class EncoderActor(Encoder):
    def __init__(self, *, checkpoint: str, **kw: Any):
        base = Encoder.from_checkpoint(checkpoint, **kw)
        super().__init__(base.model, base.codec, max_tokens=base.max_tokens, batch_tokens=base.batch_tokens)
