"""Memory interleave (digest 6): the model names documents, reads their raw text, routes again.

Round r: prefill the transcript, routing on the question (and, from round 2, on the texts
appended last round); generate until `<|object_ref_end|>` (document ids were named),
`<End-of-Retrieve>` (go answer), EOS or the round's token limit. Named ids are parsed with
`\\[(\\d+)\\]`, deduplicated, sorted, and filtered to documents visible in the request's
snapshot (same tenant, not deleted); their raw texts `[i]. text\\n` are appended, closed by
`<|object_ref_end|>`. After `<End-of-Retrieve>` the question block is fed causally and the model
answers. Unlike the reference, rounds and context are bounded: `max_rounds` retrieval rounds,
and a transcript of at most `max_context_tokens` tokens before each prefill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from msa_cluster.model.generation import GenerationConfig, LogitsProcessor, continue_generation
from msa_cluster.model.memory import MemoryBackend, MemorySnapshot
from msa_cluster.model.modeling import MSAForCausalLM
from msa_cluster.model.tokenizer import Codec
from msa_cluster.types import DEFAULT_TENANT, Citation

__all__ = ["InterleaveConfig", "InterleaveResult", "RoundTrace", "answer_with_memory"]

_ID = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class InterleaveConfig:
    max_rounds: int = 3
    max_context_tokens: int = 8192
    max_round_tokens: int = 64
    max_answer_tokens: int = 256
    template_head: str = "<|im_start|>user\n"
    instruction: str = "\nPlease answer the question based on the above historical document information\n\n"
    return_docs: str = "Please return all documents related to the question\n"
    prompt_end: str = "<|im_end|>\n"
    response_head: str = "<|im_start|>"
    doc_end: str = "<|object_ref_end|>"
    end_of_retrieve: str = "<End-of-Retrieve>"
    question_block: str = "<|im_start|>The user's question is: {question}\n<|object_ref_end|>"
    answer_prefix: str = "The answer to the question is:"
    eos: str = "<|im_end|>"

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_context_tokens", "max_round_tokens", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RoundTrace:
    round: int
    selected: dict[int, list[int]]  # routing layer -> selected doc ids in this round's prefill
    generated: str
    named: list[int] = field(default_factory=list)  # ids the model emitted
    appended: list[int] = field(default_factory=list)  # ids whose text was appended


@dataclass
class InterleaveResult:
    answer: str
    text: str  # everything after the prompt: generated tokens and appended texts
    citations: list[Citation]
    rounds: list[RoundTrace]
    finish_reason: str  # "answer", "eos", "length", "max_rounds" or "context_budget"
    version: int | None
    num_tokens: int


class _Transcript:
    """Token ids with their routing flags; the prompt length is remembered for `text`."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.routing: list[bool] = []
        self.prompt_len = 0

    def add(self, ids: list[int], routing: bool) -> None:
        self.ids += ids
        self.routing += [routing] * len(ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([self.ids]), torch.tensor([self.routing])


def answer_with_memory(
    model: MSAForCausalLM,
    codec: Codec,
    memory: MemoryBackend | MemorySnapshot,
    question: str,
    cfg: InterleaveConfig = InterleaveConfig(),
    tenant: str = DEFAULT_TENANT,
    processor: LogitsProcessor | None = None,
) -> InterleaveResult:
    """Answer `question` with multi-round retrieval over one memory snapshot. Greedy decoding."""
    if not question.strip():
        raise ValueError("question is empty")
    snap = memory.snapshot(tenant) if hasattr(memory, "snapshot") else memory
    head = codec.encode(cfg.template_head)
    tmpl = model.config.memory.template_head_len
    if len(head) != tmpl:
        raise ValueError(f"template head {cfg.template_head!r} is {len(head)} tokens; the model expects {tmpl}")
    tr = _Transcript()
    tr.add(head, False)
    question_ids = codec.encode(cfg.instruction + question + "\n" + cfg.return_docs)
    tr.add(question_ids, True)
    tr.add(codec.encode(cfg.prompt_end + cfg.response_head), False)
    if len(tr.ids) > cfg.max_context_tokens:
        raise ValueError(f"the prompt is {len(tr.ids)} tokens, over max_context_tokens={cfg.max_context_tokens}")
    question_mask = list(tr.routing)
    tr.prompt_len = len(tr.ids)
    doc_end, eos = codec.token_id(cfg.doc_end), codec.token_id(cfg.eos)
    eor = codec.encode(cfg.end_of_retrieve)
    block = codec.encode(cfg.question_block.format(question=question))
    reserve = cfg.max_round_tokens + len(eor) + len(block) + cfg.max_answer_tokens
    rounds: list[RoundTrace] = []
    citations: list[Citation] = []
    done = lambda toks: cfg.end_of_retrieve in codec.decode(toks)  # noqa: E731

    for rnd in range(1, cfg.max_rounds + 2):
        ids, mask = tr.tensors()
        pre = model.prefill(ids, snap, mask, tenant=tenant, last_logits_only=True, reserve=reserve)
        best = _best_scores(pre.scores, pre.selected)
        round_cfg = GenerationConfig(max_new_tokens=cfg.max_round_tokens, stop_token_ids=(doc_end, eos))
        toks, _ = continue_generation(model, pre.context, pre.logits[0, -1], round_cfg, processor, stop=done)
        text = codec.decode(toks)
        trace = RoundTrace(round=rnd, selected=pre.selected, generated=text)
        rounds.append(trace)
        tr.add(toks, False)

        def finish(prefix: list[int], reason: str) -> InterleaveResult:
            feed = toks[-1:] + prefix + block  # the last generated token is not in the context yet
            logits = model.decode(pre.context, torch.tensor([feed]))[0, -1]
            tr.add(prefix + block, False)
            ans_cfg = GenerationConfig(max_new_tokens=cfg.max_answer_tokens, stop_token_ids=(eos,))
            ans, why = continue_generation(model, pre.context, logits, ans_cfg, processor)
            tr.add(ans, False)
            final = "answer" if reason == "answer" and why == "stop" else (reason if reason != "answer" else "length")
            return _result(codec, cfg, tr, ans, citations, rounds, final, pre.version)

        if cfg.end_of_retrieve in text:
            return finish([], "answer")
        if toks[-1] != doc_end:  # EOS or the round's token limit: the text is the answer
            reason = "eos" if toks[-1] == eos else "length"
            return _result(codec, cfg, tr, toks, citations, rounds, reason, pre.version)
        trace.named = sorted({int(m) for m in _ID.findall(text)})
        if rnd > cfg.max_rounds:
            return finish(eor, "max_rounds")
        texts = snap.texts(trace.named)  # drops deleted and other tenants' documents
        appended, kept = [], []
        for doc_id in trace.named:
            if doc_id not in texts:
                continue
            piece = codec.encode(f"[{doc_id}]. {texts[doc_id]}\n")
            if len(tr.ids) + len(appended) + len(piece) + 1 > cfg.max_context_tokens:
                break
            appended += piece
            kept.append(doc_id)
        if trace.named and not kept and any(i in texts for i in trace.named):
            return finish(eor, "context_budget")
        trace.appended = kept
        citations += [Citation(doc_id=i, round=rnd, score=best.get(i)) for i in kept]
        tr.routing = question_mask + [False] * (len(tr.ids) - len(question_mask))  # route on question + newest texts
        tr.add(appended, True)
        tr.add([doc_end], False)
    raise AssertionError("unreachable: the loop returns by max_rounds + 1")


def _best_scores(scores: dict[int, list[float]], selected: dict[int, list[int]]) -> dict[int, float]:
    best: dict[int, float] = {}
    for layer, ids in selected.items():
        for doc_id, s in zip(ids, scores[layer]):
            best[doc_id] = max(s, best.get(doc_id, float("-inf")))
    return best


def _result(codec, cfg, tr, answer_ids, citations, rounds, reason, version) -> InterleaveResult:
    text = codec.decode(answer_ids)
    if cfg.answer_prefix in text:
        text = text.rsplit(cfg.answer_prefix, 1)[1]
    answer = text.replace(cfg.eos, "").strip()
    return InterleaveResult(
        answer=answer,
        text=codec.decode(tr.ids[tr.prompt_len :]),
        citations=citations,
        rounds=rounds,
        finish_reason=reason,
        version=version,
        num_tokens=len(tr.ids),
    )
