"""Training losses of MSA (digest 2.8): LM loss on the targets, the auxiliary routing loss.

Legend: T tokens, V vocab, N documents of one sample.

- LM loss: next-token cross-entropy on target tokens only: the named document ids and their
  `<|object_ref_end|>` (generative retrieval), `<End-of-Retrieve>`, and the answer.
- Routing loss, InfoNCE "decouple" (paper Eq. 5): each positive document competes against the
  negatives only, never against the other positives:
      L = -(1/|P|) sum_{i in P} log( e^{s_i/tau} / (e^{s_i/tau} + sum_{j not in P} e^{s_j/tau}) )
  on the document scores of every routing layer, averaged over layers. tau = 0.1 (frozen).
- Schedule: a warm-up weighted toward routing (0.1 LM + 1.0 aux), then the main phase
  (1.0 LM + 0.1 aux), as in the paper's warm-up and continued pre-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossWeights", "WARMUP", "MAIN", "phase_weights", "lm_loss", "infonce_decouple", "router_recall"]

TEMPERATURE = 0.1


@dataclass(frozen=True)
class LossWeights:
    lm: float
    aux: float
    phase: str


WARMUP = LossWeights(lm=0.1, aux=1.0, phase="warmup")
MAIN = LossWeights(lm=1.0, aux=0.1, phase="main")


def phase_weights(step: int, warmup_steps: int) -> LossWeights:
    """The loss weights of 0-based `step`: WARMUP for the first `warmup_steps` steps, then MAIN."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    return WARMUP if step < warmup_steps else MAIN


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    logits: [T, V] (position t predicts token t + 1); ids: [T]; target: [T] bool, True on the
    tokens to predict (token 0 cannot be a target). Sum, not mean, so that a batch can be
    normalised by its total number of target tokens.
    """
    if logits.dim() != 2 or ids.shape != target.shape or logits.shape[0] != ids.shape[0]:
        raise ValueError(f"lm_loss needs logits [T, V], ids [T], target [T]; got {tuple(logits.shape)}, {tuple(ids.shape)}, {tuple(target.shape)}")
    if bool(target[0]):
        raise ValueError("token 0 cannot be a target: nothing precedes it")
    pick = target[1:]
    n = int(pick.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[:-1][pick].float(), ids[1:][pick], reduction="sum"), n


def infonce_decouple(scores: torch.Tensor, positive: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Decoupled InfoNCE of document scores [N] with positives [N] bool (see the module docstring).

    Scores of -inf (documents that cannot be routed to) count as absent negatives. Zero when
    there is no positive; each positive's term is zero when there is no negative.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if scores.dim() != 1 or positive.shape != scores.shape:
        raise ValueError(f"scores and positive must both be [N], got {tuple(scores.shape)} and {tuple(positive.shape)}")
    if not bool(positive.any()):
        return scores.sum() * 0.0
    logits = scores.float() / temperature
    negatives = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=0)
    pos = logits[positive]
    return (torch.logaddexp(pos, negatives) - pos).mean()


def router_recall(scores: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of positives among the top-k scores [N], normalised by min(|P|, k) as the reference logs it.

    Ties are broken toward the lower index, as top-k selection breaks them toward the lower doc id.
    """
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("router_recall needs at least one positive document")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    out = {}
    for k in ks:
        hits = sum(bool(positive[i]) for i in order[:k])
        out[k] = hits / min(n_pos, k)
    return out
