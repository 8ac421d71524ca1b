"""Generator: the model plus a MemoryBackend, answering questions with memory interleave.

Requests may run concurrently (threads of one actor); with a `ClusterMemory` backend their
routing calls are batched per layer. The model's modules hold no per-request state.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import torch

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.interleave import InterleaveConfig, InterleaveResult, answer_with_memory
from msa_cluster.model.memory import MemoryBackend, MemorySnapshot
from msa_cluster.model.tokenizer import Codec, load_codec
from msa_cluster.types import DEFAULT_TENANT

__all__ = ["Generator"]


class Generator:
    """Plain class; `actors.remote` wraps it. `memory` is any MemoryBackend.

    Example:
        >>> gen = Generator.from_checkpoint(path, memory)                 # doctest: +SKIP
        >>> gen.answer("When was the pier rebuilt?", tenant="acme").answer  # doctest: +SKIP
    """

    def __init__(self, model: MSAForCausalLM, codec: Codec, memory: MemoryBackend, threads: int | None = None):
        self.model, self.codec, self.memory = model, codec, memory
        if threads:
            torch.set_num_threads(threads)
        self._active = 0
        self._lock = threading.Lock()
        if hasattr(memory, "active_requests"):  # a batching backend: do not wait for a batch when alone
            memory.active_requests = lambda: self._active

    @classmethod
    def from_checkpoint(cls, path: str, memory: MemoryBackend, dtype: Any = None, device: str | None = None, **kw) -> Generator:
        model = MSAForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, load_codec(path), memory, **kw)

    @contextmanager
    def _request(self):
        """Count requests in flight (the batching backend waits for company only when there is some)."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def answer(self, question: str, tenant: str = DEFAULT_TENANT, config: InterleaveConfig | None = None, *,
               snapshot: MemorySnapshot | None = None, **kw: Any) -> InterleaveResult:
        """Answer with memory interleave; `snapshot` (default: a new one of `tenant`) pins the memory,
        `kw` goes to `answer_with_memory` (sampling, on_answer, processor)."""
        with self._request():
            memory = snapshot if snapshot is not None else self.memory
            return answer_with_memory(self.model, self.codec, memory, question, config or InterleaveConfig(), tenant=tenant, **kw)

    def prefill_selection(self, input_ids: list[int], routing_mask: list[bool], tenant: str = DEFAULT_TENANT) -> dict:
        """Selections and last-token logits of one prefill (for exactness checks and debugging)."""
        with self._request():
            out = self.model.prefill(torch.tensor([input_ids]), self.memory, torch.tensor([routing_mask]), tenant=tenant)
        return {"selected": out.selected, "scores": out.scores, "logits": out.logits[0].numpy(), "version": out.version}

    def stats(self) -> dict:
        return {"active_requests": self._active}
