"""MSAForCausalLM: document encoding, sparse prefill over routed memory, and decode.

Legend: B batch, T tokens, H query heads, Hkv kv heads, D head dim, M hidden size,
V vocab, C pooled chunks, P chunk size (pooling_kernel_size), k top_k_docs.

One code path for inference and training: `encode_pooled` and `run_prefill` are plain functions
that autograd can run through (training calls them with grad enabled); `encode_documents` and
`prefill` are the inference entry points that run the same functions under `inference_mode`.
With grad enabled the pure-PyTorch kernel references are used (the Triton kernels have no
backward); on CPU that is what inference runs too.

Positions (digest 3): a memory document is encoded alone at positions 0..len-1. A prompt's
template head (the first `template_head_len` tokens, `<|im_start|>user\\n` for MSA-4B) takes
positions 0..2; prompt token i >= 3 takes 3 + k + (i - 3), whatever the number of chunks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

from msa_cluster.kernels import chunk_mean, gathered_attention, num_chunks, prepare_queries
from msa_cluster.kernels.attention import gathered_attention_ref
from msa_cluster.kernels.pooling import chunk_mean_ref
from msa_cluster.model.config import MSAConfig
from msa_cluster.model.context import LayerContext, SparseContext
from msa_cluster.model.layers import MSADecoderLayer
from msa_cluster.model.memory import MemoryBackend, MemorySnapshot
from msa_cluster.types import DEFAULT_TENANT, ContextTooLargeError, EncodedDocument, ModelFingerprint, ScoredDoc

__all__ = ["MSAModel", "MSAForCausalLM", "PrefillOutput"]


@dataclass
class PrefillOutput:
    """logits: [1, T, V] float32 (or [1, 1, V] for the last token only); selected: routing layer ->
    selected document ids, best first; scores: the same layout with their fp32 scores."""

    logits: torch.Tensor
    selected: dict[int, list[int]]
    scores: dict[int, list[float]]
    context: SparseContext
    version: int | None


class MSAModel(nn.Module):
    def __init__(self, config: MSAConfig):
        super().__init__()
        routing = set(config.routing_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MSADecoderLayer(config, i, routing=i in routing) for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)


class MSAForCausalLM(PreTrainedModel):
    """An MSA model. Single device; talks to memory only through `MemoryBackend`.

    Example:
        >>> model = MSAForCausalLM.from_pretrained("path/to/msa-tiny")                 # doctest: +SKIP
        >>> memory = InProcessMemory.from_documents(model, [[1, 5, 6], [1, 7, 8, 9]])  # doctest: +SKIP
        >>> out = model.prefill(ids, memory, routing_mask)                             # doctest: +SKIP
        >>> out.selected[model.config.routing_layers[0]]                               # doctest: +SKIP
    """

    config_class = MSAConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["MSADecoderLayer"]

    def __init__(self, config: MSAConfig):
        super().__init__(config)
        self.model = MSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Qwen3RMSNorm):
            nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ helpers
    @property
    def routing_layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.config.routing_layers)

    def fingerprint(self) -> ModelFingerprint:
        fp: ModelFingerprint = self.config.fingerprint(str(self.dtype).removeprefix("torch."))
        return fp

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.rotary_emb(x, positions)
        return cos, sin

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.model.norm(x))
        return out.float()

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{what} has token ids outside [0, {self.config.vocab_size})")

    # ------------------------------------------------------------------ stage 1: encoding
    @torch.inference_mode()
    def encode_documents(
        self,
        docs: Sequence[Sequence[int]],
        texts: Sequence[str | None] | None = None,
        tenants: Sequence[str] | None = None,
        doc_ids: Sequence[int] | None = None,
        sources: Sequence[str] | None = None,
        batch_tokens: int = 8192,
    ) -> list[EncodedDocument]:
        """Encode each document alone (positions from 0, causal within it) -> pooled K/V/router K.

        docs: already-wrapped token id lists. Returns one EncodedDocument per doc, in input order,
        with tensors [R, C, Hkv, D] in the model dtype, C = ceil(len / P).
        """
        n = len(docs)
        for name, seq in (("texts", texts), ("tenants", tenants), ("doc_ids", doc_ids), ("sources", sources)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} documents")
        ids = list(range(n)) if doc_ids is None else [int(i) for i in doc_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("doc_ids must be unique")
        for i, d in enumerate(docs):
            if len(d) == 0:
                raise ValueError(f"document {ids[i]} is empty")
        order = sorted(range(n), key=lambda i: len(docs[i]))
        out: list[EncodedDocument | None] = [None] * n
        start = 0
        while start < n:
            end = start + 1  # greedy batches of similar length under a padded-token budget
            while end < n and (end - start + 1) * len(docs[order[end]]) <= batch_tokens:
                end += 1
            batch = order[start:end]
            for i, (k, v, rk) in zip(batch, self.encode_pooled([docs[i] for i in batch])):
                out[i] = EncodedDocument(
                    doc_id=ids[i],
                    keys=k,
                    values=v,
                    router_keys=rk,
                    num_tokens=len(docs[i]),
                    routing_layers=self.routing_layers,
                    text=None if texts is None else texts[i],
                    tenant=DEFAULT_TENANT if tenants is None else tenants[i],
                    source="" if sources is None else sources[i],
                )
            start = end
        return out  # type: ignore[return-value]

    def encode_pooled(self, docs: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Pooled (K, V, router K) of each document, each [R, C, Hkv, D], differentiable.

        One right-padded batch [B, T]: padding sits after every real token, so causal attention
        never lets a real token see it. Stops after the last routing layer's projections."""
        dev = self.device
        B, T = len(docs), max(len(d) for d in docs)
        ids = torch.zeros(B, T, dtype=torch.long)  # built and checked on the host, sent to the device once
        for b, d in enumerate(docs):
            ids[b, : len(d)] = torch.as_tensor(list(d), dtype=torch.long)
        self._check_ids(ids, "a document")
        ids = ids.to(dev)
        lengths = torch.tensor([len(d) for d in docs], device=dev)
        P = self.config.memory.pooling_kernel_size
        x = self.model.embed_tokens(ids)
        cos, sin = self._rope(x, torch.arange(T, device=dev).expand(B, T))
        routing, last = set(self.routing_layers), max(self.routing_layers)
        pool = chunk_mean_ref if torch.is_grad_enabled() else chunk_mean
        pooled: list[list[torch.Tensor]] = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = attn.qkv(h, cos, sin)
            if i in routing:
                feats = [t.reshape(B, T, -1) for t in (k, v, attn.router_k(h, k))]
                pooled.append([pool(f, lengths, P).to(x.dtype) for f in feats])
            if i == last:
                break
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=attn.scaling, enable_gqa=True
            )
            x = layer.finish(x, o.transpose(1, 2))
        Hkv, D = self.config.num_key_value_heads, self.config.head_dim
        # [B, R, chunks, Hkv, D] per kind, stacked once; each document then takes one copy per kind
        stacked = [torch.stack([p[j] for p in pooled], dim=1).unflatten(-1, (Hkv, D)) for j in range(3)]
        results = []
        for b, d in enumerate(docs):
            C = num_chunks(len(d), P)
            k, v, rk = (s[b, :, :C].clone() for s in stacked)
            results.append((k, v, rk))
        return results

    # ------------------------------------------------------------------ stage 2: prefill
    def prompt_positions(self, num_tokens: int, start: int = 0) -> torch.Tensor:
        """Global positions of prompt tokens start..start+num_tokens-1 (digest 3)."""
        tmpl, k = self.config.memory.template_head_len, self.config.memory.top_k_docs
        i = torch.arange(start, start + num_tokens, device=self.device)
        return torch.where(i < tmpl, i, i + k)

    def _validate_prompt(self, input_ids: torch.Tensor, routing_mask: torch.Tensor) -> None:
        tmpl = self.config.memory.template_head_len
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be a LongTensor [1, T], got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.shape[1] <= tmpl:
            raise ValueError(
                f"input_ids must hold the {tmpl}-token template head and at least one prompt token, got {input_ids.shape[1]}"
            )
        if not isinstance(routing_mask, torch.Tensor) or routing_mask.shape != input_ids.shape:
            raise ValueError(f"routing_mask must be a BoolTensor of shape {tuple(input_ids.shape)}")
        if routing_mask[:, :tmpl].any():
            raise ValueError("routing_mask must be False on the template head")
        self._check_ids(input_ids, "input_ids")

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        memory: MemoryBackend | MemorySnapshot,
        routing_mask: torch.Tensor,
        *,
        tenant: str = DEFAULT_TENANT,
        last_logits_only: bool = False,
        reserve: int = 0,
    ) -> PrefillOutput:
        """Prefill a prompt over routed memory.

        input_ids: [1, T] starting with the template head; routing_mask: [1, T] bool, True on the
        routing-query tokens. At each routing layer the top min(k, N) documents of `tenant` are
        selected and every prompt token attends to [template head, their chunks, prompt <= itself].
        `reserve` pre-allocates decode slots.
        """
        return self.run_prefill(
            input_ids, memory, routing_mask, tenant=tenant, last_logits_only=last_logits_only, reserve=reserve
        )

    def run_prefill(
        self,
        input_ids: torch.Tensor,
        memory: MemoryBackend | MemorySnapshot,
        routing_mask: torch.Tensor,
        *,
        tenant: str = DEFAULT_TENANT,
        last_logits_only: bool = False,
        reserve: int = 0,
    ) -> PrefillOutput:
        """`prefill` without `inference_mode`: differentiable when grad is enabled (training)."""
        self._validate_prompt(input_ids, routing_mask)
        snap = memory.snapshot(tenant) if hasattr(memory, "snapshot") else memory
        dev = self.device
        input_ids, routing_mask = input_ids.to(dev), routing_mask.to(dev).bool()
        T = input_ids.shape[1]
        tmpl, top_k = self.config.memory.template_head_len, self.config.memory.top_k_docs
        spec, scale = self.config.routing_spec(), self.config.routing_scale()
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(x, self.prompt_positions(T).unsqueeze(0))
        route = bool(routing_mask.any())
        attend = gathered_attention_ref if torch.is_grad_enabled() else gathered_attention
        layers: list[LayerContext] = []
        selected: dict[int, list[ScoredDoc]] = {}
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = attn.qkv(h, cos, sin)
            ck = cv = k.new_empty(0, *k.shape[2:])
            if attn.routing:
                docs: list[ScoredDoc] = []
                if route:
                    query = prepare_queries(attn.router_q(h, q), routing_mask, spec, scale)
                    got = snap.retrieve(i, query, top_k)
                    docs = got.selected[0]
                    if docs:
                        ck, cv = self._check_chunks(got.keys[0], got.values[0], i, len(docs))
                selected[i] = docs
            C = ck.shape[0]
            ctx = LayerContext.assemble([k[0, :tmpl], ck, k[0, tmpl:]], [v[0, :tmpl], cv, v[0, tmpl:]], reserve)
            slots = torch.arange(T, device=dev)
            slots = torch.where(slots < tmpl, slots, slots + C)
            keys, values = ctx.view()
            o = attend(q[0], keys, values, slots, attn.scaling)
            x = layer.finish(x, o.unsqueeze(0))
            layers.append(ctx)
        logits = self._logits(x[:, -1:] if last_logits_only else x)
        context = SparseContext(
            layers=layers,
            next_position=int(self.prompt_positions(1, start=T)[0]),
            num_tokens=T,
            selected=selected,
            version=getattr(snap, "version", None),
        )
        return PrefillOutput(
            logits=logits,
            selected={layer: [d.doc_id for d in s] for layer, s in selected.items()},
            scores={layer: [d.score for d in s] for layer, s in selected.items()},
            context=context,
            version=context.version,
        )

    def _check_chunks(self, keys: torch.Tensor, values: torch.Tensor, layer: int, docs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered chunks [C, Hkv, D] of `docs` documents, checked (shape, and C against
        max_chunks_per_query: ContextTooLargeError before the context is allocated)."""
        want = (self.config.num_key_value_heads, self.config.head_dim)
        if keys.dim() != 3 or tuple(keys.shape[1:]) != want or keys.shape != values.shape:
            raise ValueError(f"memory returned chunks of shape {tuple(keys.shape)} at layer {layer}; expected [C, {want[0]}, {want[1]}]")
        cap = self.config.memory.max_chunks_per_query
        if keys.shape[0] > cap:
            raise ContextTooLargeError(
                "max_chunks_per_query", cap, int(keys.shape[0]),
                detail=f"layer {layer} selected {docs} documents of {keys.shape[0]} pooled chunks in all; "
                "select fewer or shorter documents, or raise msa_config.max_chunks_per_query",
            )  # fmt: skip
        return keys.to(self.device, self.dtype), values.to(self.device, self.dtype)

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode(self, context: SparseContext, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed tokens [1, n] after a prefill; returns logits [1, n, V] float32.

        The sparse context is fixed (no re-routing). Several tokens at once attend causally.
        """
        if token_ids.dim() != 2 or token_ids.shape[0] != 1 or token_ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [1, n>0], got {tuple(token_ids.shape)}")
        self._check_ids(token_ids, "token_ids")
        n = token_ids.shape[1]
        x = self.model.embed_tokens(token_ids.to(self.device))
        positions = torch.arange(context.next_position, context.next_position + n, device=self.device)
        cos, sin = self._rope(x, positions.unsqueeze(0))
        for layer, ctx in zip(self.model.layers, context.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
            slots = ctx.append(k[0], v[0]).to(self.device)
            keys, values = ctx.view()
            x = layer.finish(x, gathered_attention(q[0], keys, values, slots, attn.scaling).unsqueeze(0))
        context.next_position += n
        context.num_tokens += n
        return self._logits(x)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike[str], *args: Any, dtype: Any = None, device: Any = None, **kwargs: Any
    ) -> MSAForCausalLM:
        """Load an MSA-format checkpoint (config.json + safetensors), strictly, from a local
        directory or by the name of a bundled model (`msa-tiny-random`)."""
        from msa_cluster.model.checkpoint import load_checkpoint

        model: MSAForCausalLM = load_checkpoint(cls, path, dtype=dtype, device=device, config=kwargs.pop("config", None), **kwargs)
        return model

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:  # type: ignore[override]
        """Write config.json and model.safetensors (tied lm_head omitted, as published)."""
        from msa_cluster.model.checkpoint import save_checkpoint

        save_checkpoint(self, path, **kwargs)
