"""End-to-end evaluation on held-out task examples: answers, citations and routing, per task.

Each example's haystack is encoded into its own in-process memory (ids 0..N-1) and answered by
`answer_with_memory` in the given mode, exactly as a user would run it. Reported per task:
exact match of the answer, recall of the gold documents among the citations and the share of
citations that are gold (one-round mode cites every routed document, so read recall with
precision), round-1 router
recall (gold documents of the first hop among each routing layer's selection, averaged over
layers), BM25's recall@k on the question for the same hop (the lexical baseline), and the
finish reasons.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from msa_cluster.model import InProcessMemory, MSAForCausalLM
from msa_cluster.model import protocol as P
from msa_cluster.model.generation import LogitsProcessor
from msa_cluster.model.interleave import InterleaveConfig, InterleaveResult, answer_with_memory
from msa_cluster.model.protocol import Codec
from msa_cluster.training.bm25 import BM25
from msa_cluster.training.tasks import TaskExample

__all__ = ["TaskScores", "evaluate_answers", "score_example"]


@dataclass
class TaskScores:
    """Means over a task's examples."""

    examples: int = 0
    exact_match: float = 0.0
    citation_recall: float = 0.0
    citation_precision: float = 0.0
    router_recall: float = 0.0
    bm25_recall: float = 0.0
    finish: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "exact_match": self.exact_match, "citation_recall": self.citation_recall,
                "citation_precision": self.citation_precision, "router_recall": self.router_recall, "bm25_recall": self.bm25_recall, "finish": dict(self.finish)}  # fmt: skip


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def score_example(example: TaskExample, result: InterleaveResult, top_k: int) -> dict[str, float]:
    """Scores of one answered example (see the module docstring)."""
    gold, first = set(example.gold), set(example.hops[0])
    cited = {c.doc_id for c in result.citations}
    selections = result.rounds[0].selected.values() if result.rounds else []
    router = [len(first & set(sel)) / len(first) for sel in selections]
    bm25 = BM25([d.text for d in example.documents]).top_k(example.question, top_k)
    return {
        "exact_match": float(_norm(result.answer) == _norm(example.answer)),
        "citation_recall": len(gold & cited) / len(gold),
        "citation_precision": len(gold & cited) / len(cited) if cited else 0.0,
        "router_recall": sum(router) / len(router) if router else 0.0,
        "bm25_recall": len(first & set(bm25)) / len(first),
    }


def evaluate_answers(model: MSAForCausalLM, codec: Codec, examples: Sequence[TaskExample], cfg: InterleaveConfig | None = None,
                     processor: LogitsProcessor | None = None) -> dict[str, TaskScores]:  # fmt: skip
    """Answer every example over its own memory; per-task mean scores (key "all" for the total)."""
    cfg = cfg or InterleaveConfig()
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    out: dict[str, TaskScores] = defaultdict(TaskScores)
    k = model.config.memory.top_k_docs
    for ex in examples:
        docs = [P.encode_document(codec, d.doc_id, d.text) for d in ex.documents]
        memory = InProcessMemory.from_documents(model, docs, texts=[d.text for d in ex.documents], doc_ids=[d.doc_id for d in ex.documents])
        result = answer_with_memory(model, codec, memory, ex.question, cfg, processor=processor)
        for key in (ex.task, "all"):
            for name, value in score_example(ex, result, k).items():
                sums[key][name] += value
            out[key].examples += 1
            out[key].finish[result.finish_reason] += 1
    for key, scores in out.items():
        for name, total in sums[key].items():
            setattr(scores, name, total / scores.examples)
    return dict(out)
