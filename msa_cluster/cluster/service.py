"""What the Serve app does, without HTTP: chat with citations, routing-only search, the memory API.

`MemoryService` is a plain class over a `Generator` (the model plus a ClusterMemory) and the
coordinator (a Ray handle or a plain Coordinator), so it is tested without Serve too; the Serve
deployment (`serve_app.py`) maps HTTP onto it and its errors onto status codes.

Citations (the `msa_citations` field of a chat response), one entry per (document, round):
- every document that routing selected in that round, at any routing layer. `score` is its
  routing score in that round, the maximum over the layers that selected it; `layers` lists
  those layers. `routed` is true.
- every document the model named in that round and whose text was then read (appended to the
  context) for the next round: `read` is true. A read document that routing did not select that
  round has `score` null and `layers` empty.
Entries come round by round; within a round, routed documents by score (desc) then id, then
documents only read, by id. A document of another tenant, or deleted, is never cited: routing is
tenant-filtered and texts are read only from the request's own pinned snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import TenantQuota
from msa_cluster.actors.generator import Generator
from msa_cluster.cluster.config import AppConfig
from msa_cluster.cluster.schemas import AddMemories, ChatRequest, Message, ReplaceMemory, SearchRequest
from msa_cluster.model import protocol as P
from msa_cluster.model.interleave import AnswerSampling, InterleaveConfig, InterleaveResult, RoundTrace
from msa_cluster.model.memory import MemorySnapshot
from msa_cluster.storage_adapters.snapshot import DocInfo
from msa_cluster.types import (
    ContextTooLargeError,
    EncodedDocument,
    LimitExceededError,
    QuotaExceededError,
    Retrieval,
    RoutingQuery,
    UnknownDocumentError,
)

__all__ = ["MemoryService", "ApiError", "ChatOutcome", "Cancelled", "citations_of", "render_question", "AnswerText"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status, for the app to return as is (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}


class Cancelled(Exception):
    """The request was abandoned (client gone, or past its timeout): generation stops at the next token."""


def _limit(name: str, maximum: int, requested: int, detail: str = "") -> LimitExceededError:
    return LimitExceededError(name, maximum, requested, detail)


# ---------------------------------------------------------------------------------------------- chat helpers
def render_question(messages: Sequence[Message]) -> str:
    """The server's chat template: the last user message is the question; earlier turns (system
    prompts included) come before it as `role: text` lines, so routing sees the conversation."""
    *history, last = messages
    lines = [f"{m.role}: {m.text.strip()}" for m in history if m.text.strip()]
    return "\n".join([*lines, last.text.strip()]) if lines else last.text.strip()


class AnswerText:
    """The answer's visible text as tokens arrive: text after the answer prefix, cut at a stop string.

    `feed(tokens)` returns the new text that is safe to show (never retracted: what could still
    become a stop string, trailing spaces and partial characters are held back) and whether a stop
    string was seen. `final(answer)` is the whole answer; streamed pieces are always its prefix.
    """

    def __init__(self, codec: P.Codec, stops: Sequence[str]):
        self.codec, self.stops = codec, [s for s in stops if s]
        self.shown = ""
        self.stopped = False
        self._body: str | None = None

    def _cut(self, body: str) -> str:
        hits = [i for i in (body.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return body[: min(hits)]
        return body

    def feed(self, tokens: Sequence[int]) -> tuple[str, bool]:
        text = self.codec.decode(tokens).split(P.IM_END, 1)[0]
        if P.ANSWER_PREFIX not in text:
            return "", False  # nothing is shown until the prefix is seen (or the answer ends)
        body = self._cut(text.split(P.ANSWER_PREFIX, 1)[1].lstrip())
        self._body = body
        safe = body if self.stopped else body.rstrip("\ufffd")
        if not self.stopped:
            for s in self.stops:  # hold back a tail that may still grow into a stop string
                for n in range(min(len(s) - 1, len(safe)), 0, -1):
                    if s.startswith(safe[-n:]):
                        safe = safe[:-n]
                        break
        safe = safe.rstrip()
        if not safe.startswith(self.shown):
            return "", self.stopped
        delta, self.shown = safe[len(self.shown) :], max(safe, self.shown, key=len)
        return delta, self.stopped

    def final(self, answer: str) -> tuple[str, str]:
        """(the whole answer, the part not shown yet)."""
        text = self._body.strip() if self.stopped and self._body is not None else self._cut(answer).strip()
        if not text.startswith(self.shown):  # cannot happen by construction; never contradict what was shown
            log.warning("answer %r does not extend the streamed text %r", text, self.shown)
            return self.shown, ""
        return text, text[len(self.shown) :]


def citations_of(result: InterleaveResult, infos: dict[int, DocInfo]) -> list[dict[str, Any]]:
    """The citations of an answer (see the module docstring); `infos` gives sources and client ids."""
    out: list[dict[str, Any]] = []
    for trace in result.rounds:
        best: dict[int, float] = {}
        layers: dict[int, list[int]] = {}
        for layer, ids in sorted(trace.selected.items()):
            for doc_id, score in zip(ids, trace.scores[layer]):
                best[doc_id] = max(score, best.get(doc_id, float("-inf")))
                layers.setdefault(doc_id, []).append(layer)
        read = set(trace.read)
        order = sorted(best, key=lambda d: (-best[d], d)) + sorted(read - set(best))
        for doc_id in order:
            info = infos.get(doc_id)
            out.append({
                "id": doc_id,
                "client_id": info.client_id if info else None,
                "source": info.source if info else "",
                "round": trace.round,
                "score": best.get(doc_id),
                "layers": layers.get(doc_id, []),
                "routed": doc_id in best,
                "read": doc_id in read,
            })
    return out


class BoundedSnapshot:
    """A request's pinned snapshot with its own top-k, a cap on gathered chunks, and timing per layer."""

    def __init__(self, snap: MemorySnapshot, *, top_k: int | None, max_chunks: int | None,
                 on_retrieve: Callable[[int, float, int], None] | None = None, cancelled: threading.Event | None = None):
        self.snap, self.top_k, self.max_chunks = snap, top_k, max_chunks
        self.version, self.tenant = snap.version, snap.tenant
        self.on_retrieve, self.cancelled = on_retrieve, cancelled
        self.retrieve_s, self.kv_bytes = 0.0, 0  # this request's routing + K/V fetches, all layers and rounds

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        if self.cancelled is not None and self.cancelled.is_set():
            raise Cancelled("the request was cancelled")
        t0 = time.perf_counter()
        r = self.snap.retrieve(layer, query, self.top_k or top_k)
        chunks = max((int(k.shape[0]) for k in r.keys), default=0)
        if self.max_chunks is not None and chunks > self.max_chunks:
            raise ContextTooLargeError("max_chunks_per_query", self.max_chunks, chunks,
                                       f"routing layer {layer} gathered {chunks} chunks; ask for fewer documents (msa_top_k)")
        took, nbytes = time.perf_counter() - t0, sum(k.nbytes + v.nbytes for k, v in zip(r.keys, r.values))
        self.retrieve_s += took
        self.kv_bytes += nbytes
        if self.on_retrieve is not None:
            self.on_retrieve(layer, took, nbytes)
        return r

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        return self.snap.texts(doc_ids)

    def close(self) -> None:
        self.snap.close()


@dataclass
class ChatOutcome:
    id: str
    text: str
    finish_reason: str  # OpenAI's: "stop" or "length"
    msa_finish_reason: str  # the interleave's: answered, token_limit, round_limit, context_limit, stop
    citations: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    version: int | None
    rounds: int
    timing: dict[str, float] = field(default_factory=dict)  # where the request's time went, in seconds
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class ChatPlan:
    question: str
    config: InterleaveConfig
    sampling: AnswerSampling
    top_k: int | None


@dataclass
class Observer:
    """Where the service reports what it measures (the Serve app points these at Prometheus metrics)."""

    retrieve: Callable[[int, float, int], None] | None = None  # layer, seconds, K/V bytes fetched
    rounds: Callable[[int], None] | None = None
    tokens: Callable[[str, int, int], None] | None = None  # tenant, tokens in, tokens out


# ---------------------------------------------------------------------------------------------- the service
class MemoryService:
    def __init__(self, cfg: AppConfig, generator: Generator, coordinator: Any, observer: Observer | None = None):
        self.cfg, self.gen, self.coordinator = cfg, generator, coordinator
        self.model, self.codec = generator.model, generator.codec
        self.observer = observer or Observer()
        lim = cfg.limits
        self.quota = TenantQuota(lim.max_documents_per_tenant, lim.max_tokens_per_tenant)
        mem_cfg = self.model.config.memory
        model_cap = getattr(mem_cfg, "max_chunks_per_query", None)
        caps = [c for c in (lim.max_chunks_per_query, model_cap) if c is not None]
        self.max_chunks = min(caps) if caps else None
        self.max_doc_tokens = lim.max_document_tokens or int(self.model.config.max_position_embeddings)
        self.default_top_k = int(mem_cfg.top_k_docs)

    # ------------------------------------------------------------------ calls to the coordinator
    def _call(self, method: str, *args: Any, write: bool = False, **kw: Any) -> Any:
        c = self.cfg.cluster
        return call(self.coordinator, method, *args, timeout_s=c.write_timeout_s if write else c.timeout_s, **kw)

    def ready(self) -> int:
        version: int = self._call("ready")
        return version

    # ------------------------------------------------------------------ chat
    def _check_top_k(self, top_k: int | None, what: str) -> int | None:
        if top_k is not None and top_k > self.cfg.limits.max_top_k:
            raise _limit("max_top_k", self.cfg.limits.max_top_k, top_k, f"{what} asks for {top_k} documents per layer")
        return top_k

    def _snapshot(self, tenant: str, top_k: int | None, cancelled: threading.Event | None) -> BoundedSnapshot:
        snap = self.gen.memory.snapshot(tenant)
        return BoundedSnapshot(snap, top_k=top_k, max_chunks=self.max_chunks, on_retrieve=self.observer.retrieve,
                               cancelled=cancelled)

    def plan_chat(self, req: ChatRequest) -> ChatPlan:
        """Every check a chat request can fail before it runs (so a stream is refused before its 200)."""
        lim = self.cfg.limits
        if req.model != self.cfg.served_model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.cfg.served_model_name!r}",
                           param="model", code="model_not_found")
        if len(req.messages) > lim.max_messages:
            raise _limit("max_messages", lim.max_messages, len(req.messages))
        if len(req.stops) > lim.max_stop:
            raise _limit("max_stop", lim.max_stop, len(req.stops), "stop strings")
        max_tokens = req.answer_tokens or min(lim.default_max_tokens, lim.max_tokens)
        if max_tokens > lim.max_tokens:
            raise _limit("max_tokens", lim.max_tokens, max_tokens)
        rounds = req.msa_max_rounds or min(3, lim.max_rounds)
        if rounds > lim.max_rounds:
            raise _limit("max_rounds", lim.max_rounds, rounds, "msa_max_rounds")
        top_k = self._check_top_k(req.msa_top_k, "msa_top_k")
        question = render_question(req.messages)
        prompt_len = len(P.first_prompt(self.codec, question))
        if prompt_len > lim.max_prompt_tokens:
            raise _limit("max_prompt_tokens", lim.max_prompt_tokens, prompt_len, "the conversation as the model reads it")
        icfg = InterleaveConfig(mode=req.msa_mode or self.cfg.mode, max_rounds=rounds, max_round_tokens=self.cfg.max_round_tokens,
                                max_context_tokens=max(self.cfg.max_context_tokens, prompt_len + 1), max_answer_tokens=max_tokens)
        sampling = AnswerSampling(temperature=req.temperature or 0.0, top_p=req.top_p or 1.0, seed=req.seed)
        return ChatPlan(question, icfg, sampling, top_k)

    def chat(self, tenant: str, req: ChatRequest, on_delta: Callable[[str], None] | None = None,
             cancelled: threading.Event | None = None) -> ChatOutcome:
        plan = self.plan_chat(req)
        question, icfg, sampling, top_k = plan.question, plan.config, plan.sampling, plan.top_k
        view = AnswerText(self.codec, req.stops)

        def on_answer(tokens: list[int]) -> bool:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("the request was cancelled")
            delta, stopped = view.feed(tokens)
            if delta and on_delta is not None:
                on_delta(delta)
            return stopped

        snap = self._snapshot(tenant, top_k, cancelled)
        t0 = time.perf_counter()
        try:
            result = self.gen.answer(question, tenant, icfg, snapshot=snap, sampling=sampling, on_answer=on_answer)
        finally:
            snap.close()
        total = time.perf_counter() - t0
        # retrieve: routing + K/V fetch (the fan-out on a cluster); prefill: the rest of the prefills
        # (attention, MLPs); decode: every generated token; other: bookkeeping between them.
        timing = {"retrieve_s": snap.retrieve_s, "prefill_s": max(result.prefill_s - snap.retrieve_s, 0.0),
                  "decode_s": result.decode_s, "total_s": total, "kv_bytes": float(snap.kv_bytes)}
        text, rest = view.final(result.answer)
        if rest and on_delta is not None:
            on_delta(rest)
        cited = {c for t in result.rounds for ids in t.selected.values() for c in ids} | {c for t in result.rounds for c in t.read}
        infos = self._call("infos", sorted(cited), tenant, result.version) if cited else {}
        stopped = view.stopped
        finish = "length" if result.finish_reason == "token_limit" and not stopped else "stop"
        if self.observer.rounds is not None:
            self.observer.rounds(len(result.rounds))
        # What the client sees as completion is the answer; retrieval rounds and texts read count as prompt.
        prompt_tokens = result.num_tokens - result.answer_tokens
        if self.observer.tokens is not None:
            self.observer.tokens(tenant, prompt_tokens, result.answer_tokens)
        return ChatOutcome(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", text=text, finish_reason=finish,
                           msa_finish_reason="stop" if stopped else result.finish_reason,
                           citations=citations_of(result, infos), prompt_tokens=prompt_tokens,
                           completion_tokens=result.answer_tokens, version=result.version, rounds=len(result.rounds),
                           timing=timing)

    # ------------------------------------------------------------------ search (routing only)
    def search(self, tenant: str, req: SearchRequest) -> dict[str, Any]:
        top_k = self._check_top_k(req.top_k, "top_k") or self.default_top_k
        prompt = P.first_prompt(self.codec, req.query)
        if len(prompt) > self.cfg.limits.max_prompt_tokens:
            raise _limit("max_prompt_tokens", self.cfg.limits.max_prompt_tokens, len(prompt), "the query as the model reads it")
        snap = self._snapshot(tenant, top_k, None)
        try:
            with self.gen._request(), torch.inference_mode():
                out = self.model.prefill(torch.tensor([prompt.ids]), snap, torch.tensor([prompt.routing]), tenant=tenant,
                                         last_logits_only=True)
            trace = RoundTrace(1, [], [], out.selected, out.scores)
            routed = InterleaveResult(answer="", citations=[], rounds=[trace], finish_reason="answered", version=out.version,
                                      num_tokens=len(prompt), transcript="")
            ids = {d for v in out.selected.values() for d in v}
            infos: dict[int, DocInfo] = self._call("infos", sorted(ids), tenant, out.version) if ids else {}
            results = [{"id": c["id"], "client_id": c["client_id"], "source": c["source"], "score": c["score"],
                        "layers": c["layers"], "metadata": dict(infos[c["id"]].metadata) if c["id"] in infos else {}}
                       for c in citations_of(routed, infos)]
            if req.include_text and results:
                texts = snap.texts([r["id"] for r in results])
                for r in results:
                    r["text"] = texts.get(r["id"])
        finally:
            snap.close()
        return {"object": "list", "data": results, "version": out.version, "top_k": top_k}

    # ------------------------------------------------------------------ memory API
    def resolve(self, tenant: str, ref: str) -> int:
        """A path's document reference: all digits is a document id, anything else a client id."""
        if ref.isdigit():
            if len(ref) > 18:
                raise UnknownDocumentError(f"document {ref} is not a document of tenant {tenant!r}")
            return int(ref)
        found: dict[str, int] = self._call("resolve", [ref], tenant)
        if ref not in found:
            raise UnknownDocumentError(f"document {ref!r} is not a document of tenant {tenant!r}")
        return found[ref]

    def _encode(self, tenant: str, doc_ids: Sequence[int], docs: Sequence[Any], client_ids: Sequence[str | None]) -> list[EncodedDocument]:
        tokens = []
        for i, (doc_id, d) in enumerate(zip(doc_ids, docs)):
            toks = P.encode_document(self.codec, doc_id, d.text)
            if len(toks) > self.max_doc_tokens:
                raise _limit("max_document_tokens", self.max_doc_tokens, len(toks), f"document {i} of this request")
            tokens.append(toks)
        with self.gen._request():
            encoded = self.model.encode_documents(tokens, texts=[d.text for d in docs], tenants=[tenant] * len(docs),
                                                  doc_ids=list(doc_ids), sources=[d.source for d in docs])
        return [replace(e, metadata=dict(d.metadata), client_id=c) for e, d, c in zip(encoded, docs, client_ids)]

    def _precheck(self, docs: Sequence[Any]) -> None:
        """Document sizes before any id is allocated (the wrapper adds at least 2 tokens; the exact count follows)."""
        for i, d in enumerate(docs):
            if len(d.text) > 8 * self.max_doc_tokens:  # no tokenizer makes fewer than one token per 8 characters
                raise _limit("max_document_tokens", self.max_doc_tokens, len(d.text) // 8, f"document {i}: at least that many")
            n = len(self.codec.encode(d.text)) + 2
            if n > self.max_doc_tokens:
                raise _limit("max_document_tokens", self.max_doc_tokens, n, f"document {i}: at least that many")

    def _quota_precheck(self, tenant: str, docs: Sequence[Any], named: list[str]) -> None:
        """The tenant's quotas before ids are allocated (the coordinator checks again, atomically, at commit)."""
        q = self.quota
        if q.max_documents is None and q.max_tokens is None:
            return
        have_docs, have_tokens = self._call("usage", tenant)
        known = self._call("resolve", named, tenant) if named else {}
        new = sum(1 for d in docs if d.client_id is None or d.client_id not in known)
        tokens = sum(len(self.codec.encode(d.text)) for d in docs if d.client_id is None or d.client_id not in known)
        for limit, maximum, value in (("max_documents_per_tenant", q.max_documents, have_docs + new),
                                      ("max_tokens_per_tenant", q.max_tokens, have_tokens + tokens)):
            if maximum is not None and value > maximum:
                raise QuotaExceededError(limit, maximum, value, f"tenant {tenant!r} would hold at least {value}; nothing was written")

    def add(self, tenant: str, req: AddMemories) -> dict[str, Any]:
        lim = self.cfg.limits
        if len(req.documents) > lim.max_documents_per_request:
            raise _limit("max_documents_per_request", lim.max_documents_per_request, len(req.documents))
        self._precheck(req.documents)
        named = [d.client_id for d in req.documents if d.client_id is not None]
        self._quota_precheck(tenant, req.documents, named)
        by_client: dict[str, int] = dict(zip(named, self._call("allocate_ids", tenant, client_ids=named, write=True))) if named else {}
        unnamed = sum(1 for d in req.documents if d.client_id is None)
        fresh = iter(self._call("allocate_ids", tenant, count=unnamed, write=True) if unnamed else [])
        ids = [by_client[d.client_id] if d.client_id is not None else next(fresh) for d in req.documents]
        docs = self._encode(tenant, ids, req.documents, [d.client_id for d in req.documents])
        result = self._call("insert", docs, replace=False, quota=self.quota, write=True)
        return {"object": "list", "version": result.version,
                "data": [_record(d) for d in docs]}

    def get(self, tenant: str, ref: str) -> dict[str, Any]:
        info, text = self._call("document", self.resolve(tenant, ref), tenant)
        return {**_info(info), "text": text}

    def replace(self, tenant: str, ref: str, req: ReplaceMemory) -> dict[str, Any]:
        doc_id = self.resolve(tenant, ref)
        self._precheck([req])
        info, _ = self._call("document", doc_id, tenant)
        docs = self._encode(tenant, [doc_id], [req], [info.client_id])
        result = self._call("update", docs, quota=self.quota, write=True)
        return {**_record(docs[0]), "version": result.version}

    def list(self, tenant: str, after: int, limit: int) -> dict[str, Any]:
        lim = self.cfg.limits.max_page_size
        if limit > lim:
            raise _limit("max_page_size", lim, limit, "limit")
        infos: list[DocInfo] = self._call("documents", tenant, after=after, limit=limit + 1)
        page = infos[:limit]
        return {"object": "list", "data": [_info(i) for i in page], "has_more": len(infos) > limit,
                "next_after": page[-1].doc_id if len(infos) > limit else None}

    def delete(self, tenant: str, ref: str) -> dict[str, Any]:
        doc_id = self.resolve(tenant, ref)
        result = self._call("delete", [doc_id], tenant=tenant, write=True)
        return {"id": doc_id, "object": "memory", "deleted": True, "version": result.version}


def _record(d: EncodedDocument) -> dict[str, Any]:
    return {"id": d.doc_id, "object": "memory", "client_id": d.client_id, "source": d.source, "metadata": dict(d.metadata),
            "tokens": d.num_tokens, "chunks": d.num_chunks}


def _info(i: DocInfo) -> dict[str, Any]:
    return {"id": i.doc_id, "object": "memory", "client_id": i.client_id, "source": i.source, "metadata": dict(i.metadata),
            "tokens": i.num_tokens, "chunks": i.num_chunks}
