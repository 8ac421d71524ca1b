"""Memory interleave (digest 6) as a small per-round state machine.

Each round prefills the transcript over one memory snapshot, routing on the question and (from
round 2) on the texts read last round, then generates. The round's output decides the next state:

    `<|object_ref_end|>` after `[i]` ids -> READ: append the named documents' raw texts, next round
    `<End-of-Retrieve>`                 -> ANSWER: feed the question block, generate the answer
    `<|im_end|>`                        -> done: the model answered without reading
    the round's token limit             -> done, finish reason "token_limit", no answer

`mode="one_round"` is the baseline that two-hop interleave is measured against: route once, then
answer from the routed memory alone (no text is read). Rounds and context are bounded, unlike the
reference: at most `max_rounds` reading rounds, and a transcript of at most `max_context_tokens`.
Finish reasons: "answered", "token_limit", "round_limit" (made to answer after max_rounds) and
"context_limit" (made to answer because no named text fit in the context budget).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from msa_cluster.model import protocol as P
from msa_cluster.model.generation import GenerationConfig, LogitsProcessor, continue_generation
from msa_cluster.model.memory import MemoryBackend, MemorySnapshot
from msa_cluster.model.modeling import MSAForCausalLM, PrefillOutput
from msa_cluster.model.protocol import Codec
from msa_cluster.types import DEFAULT_TENANT, Citation

__all__ = ["FINISH_REASONS", "AnswerSampling", "InterleaveConfig", "InterleaveResult", "RoundTrace", "RoutedIds", "answer_with_memory"]

AnswerHook = Callable[[list[int]], bool]

FINISH_REASONS = ("answered", "token_limit", "round_limit", "context_limit")
_MODES = ("interleave", "one_round")


@dataclass(frozen=True)
class InterleaveConfig:
    mode: Literal["interleave", "one_round"] = "interleave"
    max_rounds: int = 3  # reading rounds; round max_rounds + 1 must answer
    max_context_tokens: int = 8192
    max_round_tokens: int = 64
    max_answer_tokens: int = 256
    # "routed": a round may name only documents its routing layers selected (the only ones whose
    # memory the model saw in that round), so an id is never made up; "best": only the
    # `best_per_layer` best documents of each routing layer not read in an earlier round (the
    # model's own router decides what is worth reading, the LM whether and which of those);
    # "free": any id, as the reference.
    # "best" is the default: msa-tiny's router ranks the gold document first where its LM, free to
    # choose among every routed id, picks it by chance (EVALUATION.md).
    named_ids: Literal["routed", "best", "free"] = "best"
    best_per_layer: int = 1

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.named_ids not in ("routed", "best", "free"):
            raise ValueError(f"named_ids must be 'routed', 'best' or 'free', got {self.named_ids!r}")
        for name in ("max_rounds", "max_context_tokens", "max_round_tokens", "max_answer_tokens", "best_per_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class AnswerSampling:
    """How the answer is decoded: temperature 0 is greedy; `seed` makes sampling reproducible.

    Retrieval rounds (naming document ids) always decode greedily, so that what is read is
    deterministic; sampling applies to the answer only.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RoundTrace:
    """One round: what was prefilled and routed on, what was selected, said and read."""

    round: int
    prompt: list[int]  # the transcript prefilled this round
    routing_mask: list[bool]  # its routing-query tokens
    selected: dict[int, list[int]]  # routing layer -> selected doc ids, best first
    scores: dict[int, list[float]]
    generated: str = ""  # this round's output (ids, or the answer)
    named: list[int] = field(default_factory=list)  # ids the model named
    read: list[int] = field(default_factory=list)  # ids whose texts were appended


@dataclass
class InterleaveResult:
    answer: str  # only the answer text, "" when the model gave none
    citations: list[Citation]
    rounds: list[RoundTrace]
    finish_reason: str  # one of FINISH_REASONS
    version: int | None
    num_tokens: int
    transcript: str  # everything after the first prompt, for inspection
    generated_tokens: int = 0  # tokens the model generated, over all rounds and the answer
    answer_tokens: int = 0  # of those, the answer's (what a client is shown)
    prefill_s: float = 0.0  # wall time in prefills (routing and memory retrieval included), all rounds
    decode_s: float = 0.0  # wall time decoding, all rounds and the answer


class _Interleave:
    """The state of one request; `run` steps it round by round."""

    def __init__(self, model: MSAForCausalLM, codec: Codec, snap: MemorySnapshot, question: str,
                 cfg: InterleaveConfig, processor: LogitsProcessor | None, tenant: str,
                 sampling: AnswerSampling | None = None, on_answer: AnswerHook | None = None):  # fmt: skip
        self.model, self.codec, self.snap, self.cfg = model, codec, snap, cfg
        self.processor, self.tenant, self.question = processor, tenant, question
        self.sampling, self.on_answer = sampling or AnswerSampling(), on_answer
        self.generated = self.answered = 0
        self.prefill_s = self.decode_s = 0.0
        self.tr = P.first_prompt(codec, question)
        head = model.config.memory.template_head_len
        if len(P.template_head(codec)) != head:
            raise ValueError(f"this codec's template head is {len(P.template_head(codec))} tokens; the model expects {head}")
        if len(self.tr) > cfg.max_context_tokens:
            raise ValueError(f"the prompt is {len(self.tr)} tokens, over max_context_tokens={cfg.max_context_tokens}")
        self.prompt_len = len(self.tr)
        self.question_mask = list(self.tr.routing)
        self.doc_end, self.im_end = codec.token_id(P.DOC_END), codec.token_id(P.IM_END)
        self.eor = P.end_of_retrieve(codec)
        self.block = P.question_block(codec, question)
        self.reserve = cfg.max_round_tokens + len(self.eor) + len(self.block) + cfg.max_answer_tokens
        self.rounds: list[RoundTrace] = []
        self.citations: list[Citation] = []
        self.version: int | None = None

    def run(self) -> InterleaveResult:
        for rnd in range(1, self.cfg.max_rounds + 2):
            pre, trace = self._prefill(rnd)
            if self.cfg.mode == "one_round":
                self.citations = _routed_citations(pre)
                self.tr.add(self.eor)
                return self._answer(pre, list(self.eor), "answered")
            toks, stopped = self._generate(pre, self.cfg.max_round_tokens, (self.doc_end, self.im_end), eor=True)
            trace.generated = self.codec.decode(toks)
            self.tr.add(toks)
            if not stopped:
                return self._finish("", "token_limit")
            if toks[-len(self.eor) :] == self.eor:
                return self._answer(pre, toks[-1:], "answered")
            if toks[-1] == self.im_end:
                self.answered = len(toks)
                return self._finish(P.extract_answer(trace.generated), "answered")
            trace.named = P.parse_doc_ids(trace.generated)
            if rnd > self.cfg.max_rounds:
                return self._forced_answer(pre, toks[-1], "round_limit")
            if not self._read(trace):
                return self._forced_answer(pre, toks[-1], "context_limit")
        raise AssertionError("unreachable: round max_rounds + 1 always finishes")

    def _prefill(self, rnd: int) -> tuple[PrefillOutput, RoundTrace]:
        ids, mask = torch.tensor([self.tr.ids]), torch.tensor([self.tr.routing])
        t0 = time.perf_counter()
        pre = self.model.prefill(ids, self.snap, mask, tenant=self.tenant, last_logits_only=True, reserve=self.reserve)
        self.prefill_s += time.perf_counter() - t0
        self.version = pre.version
        trace = RoundTrace(rnd, list(self.tr.ids), list(self.tr.routing), pre.selected, pre.scores)
        self.rounds.append(trace)
        return pre, trace

    def _generate(self, pre: PrefillOutput, limit: int, stops: tuple[int, ...], *, eor: bool = False,
                  logits: torch.Tensor | None = None) -> tuple[list[int], bool]:  # fmt: skip
        """Tokens until a stop token (or `<End-of-Retrieve>` when `eor`); (tokens, stopped).

        Retrieval rounds (`eor`) are greedy; the answer (`logits` given) is decoded with `sampling`
        and reported token by token to `on_answer`, which may end it early by returning True.
        """
        eor_ids = self.eor
        stop: Callable[[list[int]], bool] | None = None
        processor = self.processor
        if eor:
            gen_cfg = GenerationConfig(max_new_tokens=limit, stop_token_ids=stops)
            stop = lambda toks: toks[-len(eor_ids) :] == eor_ids
            if self.cfg.named_ids != "free":
                processor = RoutedIds(self.codec, self._nameable(pre), self.processor)
        else:
            s = self.sampling
            gen_cfg = GenerationConfig(max_new_tokens=limit, stop_token_ids=stops, temperature=s.temperature,
                                       top_p=s.top_p, seed=s.seed)
            stop = self.on_answer
        first = pre.logits[0, -1] if logits is None else logits
        t0 = time.perf_counter()
        toks, why = continue_generation(self.model, pre.context, first, gen_cfg, processor, stop=stop)
        self.decode_s += time.perf_counter() - t0
        self.generated += len(toks)
        return toks, why == "stop"

    def _nameable(self, pre: PrefillOutput) -> set[str]:
        """The ids this round may name: every routed one, or each routing layer's best unread ones."""
        if self.cfg.named_ids == "routed":
            return {str(i) for ids in pre.selected.values() for i in ids}
        read = {i for trace in self.rounds for i in trace.read}
        n = self.cfg.best_per_layer
        return {str(i) for ids in pre.selected.values() for i in [i for i in ids if i not in read][:n]}

    def _read(self, trace: RoundTrace) -> bool:
        """Append the named documents' texts that fit; False when some were visible but none fit."""
        texts = self.snap.texts(trace.named)  # drops deleted and other tenants' documents
        best = _best_scores(trace)
        appended: list[int] = []
        for doc_id in trace.named:
            if doc_id not in texts:
                continue
            piece = P.read_text(self.codec, doc_id, texts[doc_id])
            if len(self.tr) + len(appended) + len(piece) + 1 > self.cfg.max_context_tokens:
                break
            appended += piece
            trace.read.append(doc_id)
        if not trace.read and any(i in texts for i in trace.named):
            return False
        self.citations += [Citation(doc_id=i, round=trace.round, score=best.get(i)) for i in trace.read]
        # The next round routes on the question and the newest texts only (digest 6.3).
        self.tr.routing = self.question_mask + [False] * (len(self.tr) - len(self.question_mask))
        self.tr.add(appended, routing=True).add([self.doc_end])
        return True

    def _forced_answer(self, pre: PrefillOutput, last: int, reason: str) -> InterleaveResult:
        self.tr.add(self.eor)
        return self._answer(pre, [last, *self.eor], reason)

    def _answer(self, pre: PrefillOutput, feed: list[int], reason: str) -> InterleaveResult:
        """Feed `feed` (tokens not yet in the context) and the question block, then answer."""
        self.tr.add(self.block)
        t0 = time.perf_counter()
        logits = self.model.decode(pre.context, torch.tensor([feed + self.block]))[0, -1]
        self.decode_s += time.perf_counter() - t0
        toks, stopped = self._generate(pre, self.cfg.max_answer_tokens, (self.im_end,), logits=logits)
        self.answered = len(toks)
        self.tr.add(toks)
        text = self.codec.decode(toks)
        self.rounds[-1].generated += text
        return self._finish(P.extract_answer(text), reason if stopped else "token_limit")

    def _finish(self, answer: str, reason: str) -> InterleaveResult:
        return InterleaveResult(
            answer=answer,
            citations=self.citations,
            rounds=self.rounds,
            finish_reason=reason,
            version=self.version,
            num_tokens=len(self.tr),
            transcript=self.codec.decode(self.tr.ids[self.prompt_len :]),
            generated_tokens=self.generated,
            answer_tokens=self.answered,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
        )


def answer_with_memory(
    model: MSAForCausalLM,
    codec: Codec,
    memory: MemoryBackend | MemorySnapshot,
    question: str,
    cfg: InterleaveConfig = InterleaveConfig(),
    tenant: str = DEFAULT_TENANT,
    processor: LogitsProcessor | None = None,
    sampling: AnswerSampling | None = None,
    on_answer: AnswerHook | None = None,
) -> InterleaveResult:
    """Answer `question` over one memory snapshot (see the module docstring).

    `sampling` decodes the answer (greedy by default). `on_answer(tokens)` is called with the
    answer's tokens so far after each answer token (for streaming); returning True ends the answer
    there (a stop string). An exception it raises aborts the request (a cancelled client).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question is empty: {question!r}")
    snap = memory.snapshot(tenant) if isinstance(memory, MemoryBackend) else memory
    return _Interleave(model, codec, snap, question, cfg, processor, tenant, sampling, on_answer).run()


class RoutedIds:
    """A logits processor for a retrieval round: once the output starts naming ids (`[`), only ids in
    `allowed` can be written, and `<|object_ref_end|>` only after a complete `[i]`.

    Only tokens made of `[`, `]` and digits can continue such an output, so each step checks those
    few tokens (found once per codec), not the vocabulary. Output that does not start with `[`
    (`<End-of-Retrieve>`, or an answer) is left alone. `base` (a caller's processor) runs first.
    """

    _pieces: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()

    def __init__(self, codec: Codec, allowed: set[str], base: LogitsProcessor | None = None):
        self.codec, self.allowed, self.base = codec, allowed, base
        self.doc_end = codec.token_id(P.DOC_END)

    def _id_pieces(self, vocab: int) -> dict[int, str]:
        """Tokens whose text is made only of `[`, `]` and digits (the only ones that can write ids)."""
        pieces = RoutedIds._pieces.get(self.codec)
        if pieces is None:
            specials = {self.codec.token_id(t) for t in P.SPECIAL_TOKENS if _has(self.codec, t)}
            pieces = {}
            for t in range(vocab):
                piece = "" if t in specials else self.codec.decode([t])
                if piece and set(piece) <= set("[]0123456789"):
                    pieces[t] = piece
            RoutedIds._pieces[self.codec] = pieces
        return pieces

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            logits = self.base(generated, logits)
        text = self.codec.decode(list(generated)) if generated else ""
        if text and not text.startswith("["):
            return logits
        pieces = self._id_pieces(logits.shape[-1])
        ok = [t for t, piece in pieces.items() if (text + piece).startswith("[") and P.names_only(text + piece, self.allowed)]
        if text:  # naming ids: nothing else may follow, and the round closes after a complete id
            if text.endswith("]") and P.names_only(text, self.allowed):
                ok.append(self.doc_end)
            keep = torch.full_like(logits, float("-inf"))
            keep[ok] = 0.0
            return logits + keep
        # the first token: free, except that a token starting an id must start an allowed one
        good = set(ok)
        bad = [t for t, piece in pieces.items() if piece.startswith("[") and t not in good]
        out = logits.clone()
        out[bad] = float("-inf")
        return out


def _has(codec: Codec, token: str) -> bool:
    try:
        codec.token_id(token)
        return True
    except KeyError:
        return False


def _best_scores(trace: RoundTrace) -> dict[int, float]:
    best: dict[int, float] = {}
    for layer, ids in trace.selected.items():
        for doc_id, s in zip(ids, trace.scores[layer]):
            best[doc_id] = max(s, best.get(doc_id, float("-inf")))
    return best


def _routed_citations(pre: PrefillOutput) -> list[Citation]:
    """One-round mode reads no text: it cites the documents routing attended to, best score first."""
    trace = RoundTrace(1, [], [], pre.selected, pre.scores)
    best = _best_scores(trace)
    return [Citation(doc_id=i, round=1, score=s) for i, s in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]
