"""`msa train`'s YAML config, validated at the edge with pydantic; bad values name themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msa_cluster.training.tasks import TASKS, TRAINING_TASKS

__all__ = ["ModelSpec", "DataSpec", "TrainConfig", "load_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    hidden_size: int = Field(128, ge=8, le=4096, description="width M of the residual stream")
    num_layers: int = Field(4, ge=2, le=64, description="decoder layers; the upper half route")
    num_heads: int = Field(4, ge=1, le=64, description="query heads H")
    num_kv_heads: int = Field(2, ge=1, le=64, description="key/value heads Hkv; must divide num_heads")
    head_dim: int = Field(32, ge=4, le=256, description="head dim D (even, for RoPE)")
    intermediate_size: int = Field(256, ge=8, le=16384, description="MLP width")
    top_k_docs: int = Field(4, ge=1, le=64, description="documents selected per routing layer")
    pooling_kernel_size: int = Field(16, ge=1, le=256, description="tokens per pooled chunk P")
    vocab_size: int = Field(1024, ge=262, le=65536, description="BPE vocabulary, special tokens included")
    router_init: Literal["tied", "random"] = Field(
        "tied", description="tied: router_q_proj starts equal to router_k_proj (per GQA group), so routing starts as "
        "cosine matching of one projection; random: independent, as MSA-4B's routers on a pretrained backbone"
    )
    query_reduce: Literal["max", "mean"] = Field(
        "max", description="how routing-token scores reduce to a chunk score (MSA-4B: max); training and inference both use it"
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        return self


class DataSpec(_Strict):
    tasks: dict[str, float] = Field(
        default_factory=lambda: {t: 1.0 for t in TASKS}, description=f"task -> sampling weight; tasks from {TRAINING_TASKS}"
    )
    num_docs: int = Field(16, ge=2, le=512, description="documents per haystack")
    id_digits: int = Field(0, ge=0, le=12, description="0: ids 0..num_docs-1; d: distinct random ids of 1..d digits, "
                           "so the model learns to read ids from memory of any size (training/tasks.py)")
    one_round_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of examples in one-round (baseline) form")
    question_block_target: bool = Field(
        False, description="also train on the question block after <End-of-Retrieve>: inference feeds it, but "
        "predicting it (a copy of the question) gives every example copying to learn, which the answers need")
    eval_examples: int = Field(16, ge=0, le=10000, description="held-out eval-split examples scored at each eval")
    tokenizer_examples: int = Field(2000, ge=10, le=100000, description="training-split examples the BPE is trained on")

    @model_validator(mode="after")
    def _tasks(self) -> DataSpec:
        unknown = sorted(set(self.tasks) - set(TRAINING_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"data.tasks must name tasks from {TRAINING_TASKS}, got {sorted(self.tasks)}")
        if any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError(f"data.tasks weights must be >= 0 with a positive sum, got {self.tasks}")
        return self


class TrainConfig(_Strict):
    seed: int = Field(0, ge=0, description="seeds model init, data and tokenizer")
    steps: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps in all")
    batch_size: int = Field(4, ge=1, le=1024, description="examples per optimizer step")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of the main phase")
    warmup_lr: float | None = Field(None, gt=0, le=1.0, description="learning rate of the warm-up phase (default: lr)")
    warmup_steps: int = Field(100, ge=0, description="steps weighted toward the routing loss (0.1 LM + 1.0 aux)")
    lr_decay: Literal["constant", "cosine"] = Field(
        "constant", description="main-phase schedule: constant lr, or cosine from lr at decay_from to min_lr at decay_to")
    decay_from: int | None = Field(None, ge=0, description="step the cosine decay starts at (default: warmup_steps)")
    decay_to: int | None = Field(None, ge=1, description="step the cosine decay ends at (default: steps); set it so "
                                 "that a run stopped early (--steps N) follows the same schedule as the full one")
    min_lr: float = Field(0.0, ge=0, le=1.0, description="learning rate the cosine decay ends at")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    device: Literal["cpu", "cuda"] = Field("cpu", description="device class; determinism holds per device class")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: torch's)")
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    eval_every: int = Field(100, ge=1, description="steps between held-out evaluations")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and at the end)")
    output_dir: Path = Field(Path("runs/msa-tiny"), description="where checkpoints and metrics.jsonl go")
    model: ModelSpec = Field(default_factory=ModelSpec)  # type: ignore[arg-type]
    data: DataSpec = Field(default_factory=DataSpec)  # type: ignore[arg-type]


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read and validate a YAML config; `overrides` (non-None) replace top-level keys."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(raw)
