"""Accuracy against memory size: held-out task examples answered over memories of 16K to 100M tokens.

RULER's recipe at memory scale. One background haystack of distinct filler documents (eval split,
seeded) grows to each size in turn and is encoded once; each example's own documents (its facts
and its 16-document haystack) are then added with ids the memory allocates, the question is
answered through the public API (`answer_with_memory`), and the documents are deleted again. So
every example is asked over a memory of the stated size, ids look like a real store's (0..N-1,
the example's last), and the background is shared, as RULER shares its essay haystack.

Scores per (size, task), means over examples:
- `string_match`: RULER's string match (`string_match_all`): the share of the reference values
  that appear in the answer, case-insensitively; `exact`: the whole answer equals the reference.
- `router_recall`: the first hop's gold documents among each routing layer's top-k in round 1,
  per layer (`router_recall_layers`) and for any layer (`router_recall_any`);
- `bm25_recall`: the same gold among BM25's top-k over the same memory, for the same question;
- `citation_recall` / `citation_precision`, and the finish reasons.
`two_hop` is answered twice: with interleave, and in one round (`two_hop_one_round`), the baseline
that interleave has to beat.

The memory is anything with `allocate_ids`, `add`, `delete` and `backend` (`EvalMemory`): the
in-process memory here, the Ray cluster in `cluster/evaluation.py`.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import torch

from msa_cluster.model import InProcessMemory, MSAForCausalLM
from msa_cluster.model import protocol as P
from msa_cluster.model.generation import LogitsProcessor
from msa_cluster.model.interleave import InterleaveConfig, InterleaveResult, answer_with_memory
from msa_cluster.model.memory import MemoryBackend
from msa_cluster.model.protocol import Codec
from msa_cluster.training.bm25 import InvertedBM25
from msa_cluster.training.tasks import TASKS, Document, TaskExample, filler_texts, make_example
from msa_cluster.types import EncodedDocument

__all__ = [
    "EvalMemory",
    "InProcessEvalMemory",
    "SweepConfig",
    "SweepResult",
    "parse_size",
    "format_size",
    "string_match",
    "run_sweep",
    "remap",
    "markdown_table",
    "goal_lines",
]

EVAL_TENANT = "eval"
ONE_ROUND = "two_hop_one_round"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Tokens of a memory size: '16K' = 16,384, '1M' = 1,048,576, '500' = 500 (binary units, as RULER's)."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"a memory size is a positive number with an optional K, M or G suffix (16K, 1M), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(tokens: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= scale and tokens % (scale >> 4) == 0:
            return f"{tokens / scale:g}{unit}"
    return str(tokens)


def string_match(answer: str, reference: str) -> float:
    """RULER's string_match_all: the share of the reference's comma-separated values found in the answer."""
    refs = [r.strip().lower() for r in reference.split(",") if r.strip()]
    low = answer.lower()
    return sum(r in low for r in refs) / len(refs) if refs else 0.0


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class EvalMemory(Protocol):
    """A memory the sweep can grow and shrink, and answer over."""

    backend: MemoryBackend

    def allocate_ids(self, count: int) -> list[int]: ...

    def add(self, docs: Sequence[EncodedDocument]) -> None: ...

    def delete(self, doc_ids: Sequence[int]) -> None: ...


class InProcessEvalMemory:
    """The in-process memory, one tenant, its router arena on the model's device."""

    def __init__(self, model: MSAForCausalLM):
        self.memory = InProcessMemory(routing_layers=model.config.routing_layers, device=model.device)
        self.backend: MemoryBackend = self.memory

    def allocate_ids(self, count: int) -> list[int]:
        return self.memory.allocate_ids(EVAL_TENANT, count=count)

    def add(self, docs: Sequence[EncodedDocument]) -> None:
        self.memory.add(docs)

    def delete(self, doc_ids: Sequence[int]) -> None:
        self.memory.delete(doc_ids, tenant=EVAL_TENANT)


@dataclass(frozen=True)
class SweepConfig:
    sizes: tuple[int, ...] = (1 << 14,)  # memory sizes in tokens
    tasks: tuple[str, ...] = TASKS
    examples: int = 20  # per task and size
    seed: int = 0
    num_docs: int = 16  # each example's own haystack
    max_rounds: int = 3
    max_answer_tokens: int = 128
    named_ids: Literal["routed", "best", "free"] = "best"  # InterleaveConfig.named_ids
    encode_batch_docs: int = 4096  # background documents encoded (and added) per batch

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be positive token counts, got {self.sizes}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be from {TASKS}, got {list(self.tasks)}")
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1, got {self.examples}")


@dataclass
class TaskScores:
    examples: int = 0
    string_match: float = 0.0
    exact: float = 0.0
    router_recall_any: float = 0.0
    router_recall_layers: dict[int, float] = field(default_factory=dict)
    bm25_recall: float = 0.0
    citation_recall: float = 0.0
    citation_precision: float = 0.0
    finish: dict[str, int] = field(default_factory=dict)


@dataclass
class SizeResult:
    size: int  # the memory size asked for, in tokens
    tokens: int  # tokens in memory while the examples were answered (the least over examples; >= size)
    documents: int  # documents in memory likewise
    encode_s: float  # time to encode this size's new background documents
    answer_s: float  # time to answer all of its examples
    scores: dict[str, TaskScores]
    records: list[dict[str, Any]]  # one per answered example: what was asked, said and selected


@dataclass
class SweepResult:
    config: dict[str, Any]
    sizes: list[SizeResult]

    def as_dict(self, records: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not records:
            for s in out["sizes"]:
                s.pop("records")
        return out


def _wrapped_len(codec: Codec, doc_id: int, text: str) -> int:
    return len(P.encode_document(codec, doc_id, text))


def _token_bound(text: str) -> int:
    """An upper bound of a wrapped document's tokens without tokenizing it: a byte-level BPE token
    spans at least one byte, and the wrapping adds 2 tokens and `[i]. ` / `[i]` with ids far past
    any eval memory's. Any upper bound selects the same background documents (each is added only
    while the tokens before it are under the budget), so the bound only saves a tokenization."""
    return len(text.encode()) + 2 + 2 * len("[1000000000]") + 2


def _encode(model: MSAForCausalLM, codec: Codec, ids: Sequence[int], texts: Sequence[str]) -> list[EncodedDocument]:
    tokens = P.encode_documents(codec, ids, texts)
    with torch.inference_mode():
        batch_tokens = 65536 if model.device.type == "cuda" else 8192  # a GPU wants fewer, larger forwards
        return model.encode_documents(tokens, texts=list(texts), doc_ids=list(ids), tenants=[EVAL_TENANT] * len(ids),
                                      batch_tokens=batch_tokens)  # fmt: skip


def _score(example: TaskExample, result: InterleaveResult, idmap: dict[int, int], top_k: int, bm25: list[int]) -> dict[str, Any]:
    first = {idmap[d] for d in example.hops[0]}
    gold = {idmap[d] for d in example.gold}
    selected = result.rounds[0].selected if result.rounds else {}
    layers = {layer: len(first & set(ids)) / len(first) for layer, ids in selected.items()}
    union = set().union(*selected.values()) if selected else set()
    cited = {c.doc_id for c in result.citations}
    return {
        "string_match": string_match(result.answer, example.answer),
        "exact": float(_norm(result.answer) == _norm(example.answer)),
        "router_recall_any": len(first & union) / len(first),
        "router_recall_layers": layers,
        "bm25_recall": len(first & set(bm25[:top_k])) / len(first),
        "citation_recall": len(gold & cited) / len(gold),
        "citation_precision": len(gold & cited) / len(cited) if cited else 0.0,
    }


def _mean_scores(rows: list[dict[str, Any]]) -> TaskScores:
    out = TaskScores(examples=len(rows))
    for name in ("string_match", "exact", "router_recall_any", "bm25_recall", "citation_recall", "citation_precision"):
        setattr(out, name, statistics.fmean(r[name] for r in rows))
    layers = sorted({layer for r in rows for layer in r["router_recall_layers"]})
    out.router_recall_layers = {layer: statistics.fmean(r["router_recall_layers"].get(layer, 0.0) for r in rows) for layer in layers}
    out.finish = dict(Counter(r["finish"] for r in rows))
    return out


class _Background:
    """The shared filler haystack, grown to a token budget and kept in memory and in the BM25 index."""

    def __init__(self, model: MSAForCausalLM, codec: Codec, memory: EvalMemory, bm25: InvertedBM25, cfg: SweepConfig):
        self.model, self.codec, self.memory, self.bm25, self.cfg = model, codec, memory, bm25, cfg
        self.texts: Iterator[str] = filler_texts(cfg.seed, "eval")
        self.tokens = self.documents = 0

    def grow(self, budget: int) -> None:
        """Add filler documents until the background holds at least `budget` tokens."""
        while self.tokens < budget:
            batch: list[str] = []
            tokens = 0
            while self.tokens + tokens < budget and len(batch) < self.cfg.encode_batch_docs:
                text = next(self.texts)
                batch.append(text)
                tokens += _token_bound(text)
            ids = self.memory.allocate_ids(len(batch))
            docs = _encode(self.model, self.codec, ids, batch)
            self.memory.add(docs)
            for d in docs:
                self.bm25.add(d.doc_id, d.text or "")
            self.tokens += sum(d.num_tokens for d in docs)
            self.documents += len(docs)


def remap(example: TaskExample, idmap: dict[int, int]) -> TaskExample:
    """The example with its documents under the ids a memory gave them."""
    docs = tuple(Document(idmap[d.doc_id], d.text) for d in example.documents)
    hops = tuple(tuple(sorted(idmap[d] for d in hop)) for hop in example.hops)
    return replace(example, documents=docs, hops=hops)


def run_sweep(model: MSAForCausalLM, codec: Codec, cfg: SweepConfig, memory: EvalMemory | None = None,
              progress: Callable[[str], None] | None = None,
              processor: Callable[[TaskExample, str], LogitsProcessor] | None = None,
              on_size: Callable[[SweepResult], None] | None = None) -> SweepResult:  # fmt: skip
    """Answer `cfg.examples` held-out examples per task at each memory size, smallest size first.

    `processor(example, mode)`, for tests, gives a logits processor per question (the example
    under its memory ids, and "interleave" or "one_round"). `on_size(result so far)` is called
    after each size, so that a long sweep's finished sizes are kept if it is stopped.
    """
    say = progress or (lambda _msg: None)
    model.eval()
    memory = memory or InProcessEvalMemory(model)
    bm25 = InvertedBM25()
    background = _Background(model, codec, memory, bm25, cfg)
    examples = [make_example(task, "eval", cfg.seed, i, cfg.num_docs) for task in cfg.tasks for i in range(cfg.examples)]
    # A lower bound of each example's tokens (one-digit ids), so that every example is asked over >= size tokens.
    example_tokens = min(sum(_wrapped_len(codec, 0, d.text) for d in ex.documents) for ex in examples)
    top_k = model.config.memory.top_k_docs
    icfg = InterleaveConfig(max_rounds=cfg.max_rounds, max_answer_tokens=cfg.max_answer_tokens, named_ids=cfg.named_ids)
    out: list[SizeResult] = []
    for size in sorted(set(cfg.sizes)):
        t0 = time.perf_counter()
        background.grow(max(0, size - example_tokens))
        encode_s = time.perf_counter() - t0
        say(f"{format_size(size)}: background {background.documents:,} documents, {background.tokens:,} tokens "
            f"(+{encode_s:.1f} s to encode)")  # fmt: skip
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        records: list[dict[str, Any]] = []
        held_tokens: list[int] = []
        t1 = time.perf_counter()
        for n, ex in enumerate(examples):
            ids = memory.allocate_ids(len(ex.documents))
            idmap = {d.doc_id: new for d, new in zip(ex.documents, ids)}
            docs = _encode(model, codec, ids, [d.text for d in ex.documents])
            memory.add(docs)
            for d in docs:
                bm25.add(d.doc_id, d.text or "")
            held_tokens.append(background.tokens + sum(d.num_tokens for d in docs))
            try:
                ranked = bm25.top_k(ex.question, top_k)
                modes: list[tuple[str, InterleaveConfig]] = [(ex.task, icfg)]
                if ex.task == "two_hop":
                    modes.append((ONE_ROUND, InterleaveConfig(mode="one_round", max_answer_tokens=cfg.max_answer_tokens)))
                for name, mcfg in modes:
                    proc = processor(remap(ex, idmap), mcfg.mode) if processor is not None else None
                    result = answer_with_memory(model, codec, memory.backend, ex.question, mcfg, tenant=EVAL_TENANT, processor=proc)
                    row = _score(ex, result, idmap, top_k, ranked) | {"finish": result.finish_reason}
                    rows[name].append(row)
                    records.append({"task": name, "index": n, "question": ex.question, "reference": ex.answer,
                                    "answer": result.answer, "gold": sorted(idmap[d] for d in ex.gold),
                                    "first_hop": sorted(idmap[d] for d in ex.hops[0]),
                                    "selected": {str(k): v for k, v in (result.rounds[0].selected if result.rounds else {}).items()},
                                    "citations": [c.doc_id for c in result.citations], **row})  # fmt: skip
            finally:
                memory.delete(ids)
                for i in ids:
                    bm25.remove(i)
        answer_s = time.perf_counter() - t1
        scores = {name: _mean_scores(r) for name, r in rows.items()}
        scores["all"] = _mean_scores([r for name, rs in rows.items() if name != ONE_ROUND for r in rs])
        out.append(SizeResult(size, min(held_tokens), background.documents + cfg.num_docs,
                              encode_s, answer_s, scores, records))  # fmt: skip
        say(f"{format_size(size)}: " + ", ".join(f"{k} {v.string_match:.2f}" for k, v in scores.items()) + f" ({answer_s:.1f} s)")
        if on_size is not None:
            on_size(SweepResult(config=asdict(cfg), sizes=list(out)))
    return SweepResult(config=asdict(cfg), sizes=out)


def markdown_table(result: SweepResult) -> str:
    """One row per (size, task): string match, exact, router recall (any layer, per layer), BM25 recall."""
    layers = sorted({layer for s in result.sizes for v in s.scores.values() for layer in v.router_recall_layers})
    head = ["memory", "task", "n", "string match", "exact", "router recall@k (any)", *[f"layer {layer}" for layer in layers],
            "BM25 recall@k", "citation recall"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result.sizes:
        for task, v in s.scores.items():
            per_layer = [f"{v.router_recall_layers.get(layer, 0.0):.2f}" for layer in layers]
            lines.append(f"| {format_size(s.size)} ({s.tokens:,} tok) | {task} | {v.examples} | {v.string_match:.3f} | {v.exact:.3f} | "
                         f"{v.router_recall_any:.2f} | " + " | ".join(per_layer) + f" | {v.bm25_recall:.2f} | {v.citation_recall:.2f} |")  # fmt: skip
    return "\n".join(lines)



def goal_lines(result: SweepResult) -> list[str]:
    """The issue's quality goals, read off a sweep: what was measured against what was asked."""
    sizes = sorted(result.sizes, key=lambda s: s.size)
    lines = []
    first, last = sizes[0], sizes[-1]
    if "niah_single" in first.scores:
        em0 = first.scores["niah_single"].string_match
        lines.append(f"niah_single string match at {format_size(first.size)}: {em0:.3f} (goal >= 0.95)")
        if len(sizes) > 1 and "niah_single" in last.scores:
            em1 = last.scores["niah_single"].string_match
            drop = (em0 - em1) / em0 if em0 > 0 else float("nan")
            lines.append(f"niah_single relative degradation {format_size(first.size)} -> {format_size(last.size)}: "
                         f"{drop:+.1%} (goal <= 9%)")  # fmt: skip
    for s in sizes:
        if "two_hop" in s.scores and ONE_ROUND in s.scores:
            gain = 100 * (s.scores["two_hop"].string_match - s.scores[ONE_ROUND].string_match)
            lines.append(f"two_hop at {format_size(s.size)}: interleave {s.scores['two_hop'].string_match:.3f} vs one round "
                         f"{s.scores[ONE_ROUND].string_match:.3f}: {gain:+.1f} points (goal >= +15)")  # fmt: skip
        v = s.scores["all"]
        lines.append(f"router recall@k (any layer) at {format_size(s.size)}: {v.router_recall_any:.3f} vs BM25 recall@k "
                     f"{v.bm25_recall:.3f} (goal: router >= BM25)")  # fmt: skip
    return lines
