"""The training forward of MSA: the inference functions, run with autograd.

Legend: T tokens, N documents of one example, C chunks, Hkv kv heads, D head dim.

One example is a haystack of documents plus one or more turns (the steps of a retrieval chain,
digest 2.8: "each retrieval chain is split into one training sample per retrieval step"). The
documents are encoded once, independently and at document-wise positions, by
`MSAForCausalLM.encode_pooled`, exactly as at ingestion. Each turn is a teacher-forced transcript
prefilled by `MSAForCausalLM.run_prefill` over a `GraphMemory`: a `MemorySnapshot` whose pooled
tensors are still in the autograd graph. Routing scores every document with the inference
scorer, keeps the scores for the routing loss, and selects the hard top-k exactly as inference
does; gradients reach the router only through the routing loss (no straight-through estimator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from msa_cluster.kernels.routing import doc_scores_ref, select_top_k
from msa_cluster.model.losses import TEMPERATURE, infonce_decouple, lm_loss, router_recall
from msa_cluster.model.modeling import MSAForCausalLM
from msa_cluster.types import DEFAULT_TENANT, Retrieval, RoutingQuery

__all__ = ["GraphMemory", "Turn", "Example", "ForwardStats", "training_forward"]


@dataclass(frozen=True)
class Turn:
    """One teacher-forced transcript: ids [T], routing flags [T], target flags [T], positive doc ids,
    and doc ids left out of the routing loss (documents already read, which the routing query quotes)."""

    ids: list[int]
    routing: list[bool]
    target: list[bool]
    positives: tuple[int, ...]
    ignored: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.routing) == len(self.target)):
            raise ValueError(f"a turn's ids, routing and target differ in length: {len(self.ids)}, {len(self.routing)}, {len(self.target)}")


@dataclass(frozen=True)
class Example:
    """A haystack (wrapped token ids of each document, with its id) and the turns over it."""

    documents: list[list[int]]
    doc_ids: list[int]
    turns: list[Turn]

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.documents) + sum(len(t.ids) for t in self.turns)


class GraphMemory:
    """A `MemorySnapshot` over pooled tensors that carry gradients; keeps each layer's doc scores [N]."""

    def __init__(self, pooled: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], doc_ids: Sequence[int],
                 routing_layers: Sequence[int], tenant: str = DEFAULT_TENANT):  # fmt: skip
        if len(pooled) != len(doc_ids) or len(set(doc_ids)) != len(doc_ids):
            raise ValueError(f"GraphMemory needs one pooled entry per unique doc id, got {len(pooled)} for {list(doc_ids)}")
        order = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i])  # ascending ids, as LayerIndex lays them out
        self.doc_ids = [int(doc_ids[i]) for i in order]
        self._pooled = [pooled[i] for i in order]
        self._layers = list(routing_layers)
        counts = torch.tensor([p[2].shape[1] for p in self._pooled], dtype=torch.int64)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        self.scores: dict[int, torch.Tensor] = {}  # routing layer -> [N] scores of the last retrieve
        self.version, self.tenant = 0, tenant

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        if query.batch_size != 1:
            raise ValueError(f"GraphMemory serves one query row, got {query.batch_size}")
        li = self._layers.index(layer)
        router_keys = torch.cat([p[2][li] for p in self._pooled])  # [C, Hkv, D]
        scores = doc_scores_ref(query, router_keys, self._offsets)[0]  # [N], differentiable
        self.scores[layer] = scores
        selected = select_top_k(scores.detach().unsqueeze(0), torch.tensor(self.doc_ids), top_k)
        if not selected[0]:
            empty = router_keys.new_empty(0, *router_keys.shape[1:])
            return Retrieval(selected=selected, keys=[empty], values=[empty])
        index = {d: i for i, d in enumerate(self.doc_ids)}
        keys = torch.cat([self._pooled[index[s.doc_id]][0][li] for s in selected[0]])
        values = torch.cat([self._pooled[index[s.doc_id]][1][li] for s in selected[0]])
        return Retrieval(selected=selected, keys=[keys], values=[values])

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        return {}  # training transcripts already hold the texts read

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class ForwardStats:
    """Summed LM loss and its target count, mean routing loss, recall per k, tokens processed."""

    lm_sum: torch.Tensor
    lm_count: int
    aux: torch.Tensor
    recall: dict[int, float] = field(default_factory=dict)
    tokens: int = 0


def training_forward(model: MSAForCausalLM, example: Example, recall_ks: Sequence[int] = (1, 5),
                     temperature: float = TEMPERATURE) -> ForwardStats:  # fmt: skip
    """Encode the haystack once, prefill every turn with grad; LM and routing losses of the example.

    The routing loss is averaged over (turn, routing layer) pairs of turns that have positives;
    recall@k likewise.
    """
    pooled = model.encode_pooled(example.documents)
    memory = GraphMemory(pooled, example.doc_ids, model.routing_layers)
    lm_sum, lm_count = torch.zeros((), device=model.device), 0
    aux_terms: list[torch.Tensor] = []
    recalls: list[dict[int, float]] = []
    for turn in example.turns:
        ids = torch.tensor([turn.ids], device=model.device)
        out = model.run_prefill(ids, memory, torch.tensor([turn.routing], device=model.device))
        loss, n = lm_loss(out.logits[0], ids[0], torch.tensor(turn.target, device=model.device))
        lm_sum, lm_count = lm_sum + loss, lm_count + n
        if not turn.positives or not any(turn.routing):
            continue
        positive = torch.tensor([d in turn.positives for d in memory.doc_ids], device=model.device)
        ignored = torch.tensor([d in turn.ignored and d not in turn.positives for d in memory.doc_ids], device=model.device)
        for layer in model.routing_layers:
            scores = memory.scores[layer].masked_fill(ignored, float("-inf"))  # -inf: neither positive nor negative
            aux_terms.append(infonce_decouple(scores, positive, temperature))
            recalls.append(router_recall(scores.detach().cpu(), positive.cpu(), recall_ks))
    aux = torch.stack(aux_terms).mean() if aux_terms else lm_sum * 0.0
    recall = {k: sum(r[k] for r in recalls) / len(recalls) for k in recall_ks} if recalls else {}
    return ForwardStats(lm_sum=lm_sum, lm_count=lm_count, aux=aux, recall=recall, tokens=example.num_tokens)
