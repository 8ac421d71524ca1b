"""Encoder: the model's stage-1 document encoding for ingestion, on the GPU when there is one.

Input rows are dicts with `id`, `text` and optionally `tenant`, `source`, `metadata`; each text is
wrapped and tokenised by `model.protocol.encode_documents` (`<|im_start|>[id]. text[id]<|im_end|>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.protocol import encode_documents, wrap_document
from msa_cluster.model.tokenizer import Codec, load_codec
from msa_cluster.types import DEFAULT_TENANT, EncodedDocument, ModelFingerprint

__all__ = ["Encoder", "wrap_document"]


class Encoder:
    """Plain class; `actors.remote` wraps it.

    Example:
        >>> enc = Encoder.from_checkpoint(path)                         # doctest: +SKIP
        >>> docs = enc.encode([{"id": 1, "text": "hello", "tenant": "acme"}])  # doctest: +SKIP
    """

    def __init__(self, model: MSAForCausalLM, codec: Codec, max_tokens: int = 65536, batch_tokens: int = 8192):
        self.model, self.codec = model, codec
        self.max_tokens, self.batch_tokens = max_tokens, batch_tokens

    @classmethod
    def from_checkpoint(cls, path: str, device: str | None = None, dtype: Any = None, **kw) -> Encoder:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(MSAForCausalLM.from_pretrained(path, dtype=dtype, device=device), load_codec(path), **kw)

    def describe(self) -> tuple[ModelFingerprint, int]:
        """(fingerprint, position limit) of the model: what an ingestion driver needs without loading it."""
        return self.model.fingerprint(), int(self.model.config.max_position_embeddings)

    def encode(self, rows: Sequence[dict]) -> list[EncodedDocument]:
        ids, texts = [], []
        for n, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise ValueError(f"row {n} needs a non-empty string 'text', got {row!r:.120}")
            doc_id = row.get("id")
            if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id < 0:
                raise ValueError(f"row {n} needs a non-negative int 'id', got {doc_id!r}")
            ids.append(doc_id)
            texts.append(row["text"])
        tokens = encode_documents(self.codec, ids, texts)
        for doc_id, toks in zip(ids, tokens):
            if len(toks) > self.max_tokens:
                raise ValueError(f"document {doc_id} is {len(toks)} tokens, over max_tokens={self.max_tokens}")
        docs = self.model.encode_documents(
            tokens, texts=texts, doc_ids=ids,
            tenants=[str(r.get("tenant", DEFAULT_TENANT)) for r in rows],
            sources=[str(r.get("source", "")) for r in rows],
            batch_tokens=self.batch_tokens,
        )
        return [_with_metadata(d, r.get("metadata")) for d, r in zip(docs, rows)]


def _with_metadata(doc: EncodedDocument, metadata: Any) -> EncodedDocument:
    if not metadata:
        return doc
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata of document {doc.doc_id} must be a dict of strings")
    from dataclasses import replace

    return replace(doc, metadata={str(k): str(v) for k, v in metadata.items()})
