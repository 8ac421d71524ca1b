"""Token generation over a fixed sparse context: prefill once, then decode (no re-routing).

`LogitsProcessor` is a callable (generated_ids, logits [V] float32) -> logits [V]; it can
constrain or script the output (the interleave tests force tokens with one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from msa_cluster.model.context import SparseContext
from msa_cluster.model.memory import MemoryBackend, MemorySnapshot
from msa_cluster.model.modeling import MSAForCausalLM, PrefillOutput
from msa_cluster.types import DEFAULT_TENANT

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "continue_generation", "LogitsProcessor"]

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens >= 1; temperature 0 is greedy; stop_token_ids end generation (kept in output)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationOutput:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token) or "length"
    prefill: PrefillOutput | None
    context: SparseContext


def _pick(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> int:
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def continue_generation(
    model: MSAForCausalLM,
    context: SparseContext,
    next_logits: torch.Tensor,
    cfg: GenerationConfig,
    processor: LogitsProcessor | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> tuple[list[int], str]:
    """Decode from `next_logits` [V] (the logits after the context's last token).

    Returns (tokens, reason). The last returned token has not been fed to the context yet.
    `stop(tokens)` ends generation early (reason "stop"), e.g. on a multi-token stop string.
    """
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    stops = set(cfg.stop_token_ids)
    out: list[int] = []
    logits = next_logits
    while True:
        if processor is not None:
            logits = processor(out, logits)
        tok = _pick(logits, cfg, gen)
        out.append(tok)
        if tok in stops or (stop is not None and stop(out)):
            return out, "stop"
        if len(out) >= cfg.max_new_tokens:
            return out, "length"
        logits = model.decode(context, torch.tensor([[tok]]))[0, -1]


def generate(
    model: MSAForCausalLM,
    input_ids: torch.Tensor,
    memory: MemoryBackend | MemorySnapshot,
    routing_mask: torch.Tensor,
    cfg: GenerationConfig = GenerationConfig(),
    processor: LogitsProcessor | None = None,
    tenant: str = DEFAULT_TENANT,
) -> GenerationOutput:
    """Prefill `input_ids` [1, T] over memory, then decode up to cfg.max_new_tokens tokens."""
    pre = model.prefill(input_ids, memory, routing_mask, tenant=tenant, last_logits_only=True, reserve=cfg.max_new_tokens)
    tokens, reason = continue_generation(model, pre.context, pre.logits[0, -1], cfg, processor)
    return GenerationOutput(tokens=tokens, finish_reason=reason, prefill=pre, context=pre.context)
