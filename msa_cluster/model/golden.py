"""Fixed-seed reference outputs of the bundled tiny checkpoint (STYLE 15: refactors keep numbers).

The same function produces the stored golden file and the values the test compares with it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch

__all__ = ["golden_outputs"]

QUESTION = "When was the father of the lighthouse logbook keeper born?"


def golden_outputs() -> dict[str, Any]:
    """Selections, pooled-key checksums and last-token logits of one prefill over the golden corpus (the first sample corpus)."""
    from msa_cluster.model import InProcessMemory, MSAForCausalLM, protocol
    from msa_cluster.model.tiny import bundled_checkpoint
    from msa_cluster.model.tokenizer import load_codec

    path = bundled_checkpoint()
    model = MSAForCausalLM.from_pretrained(path)
    codec = load_codec(path)
    text = (resources.files("msa_cluster") / "assets" / "golden_corpus.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    wrapped = [protocol.encode_document(codec, r["id"], r["text"]) for r in rows]
    memory = InProcessMemory.from_documents(model, wrapped, texts=[r["text"] for r in rows], doc_ids=[r["id"] for r in rows])
    prompt = protocol.first_prompt(codec, QUESTION)
    ids, mask = torch.tensor([prompt.ids]), torch.tensor([prompt.routing])
    out = model.prefill(ids, memory, mask)
    last = out.logits[0, -1]
    layer = model.config.routing_layers[-1]
    return {
        "selected": {str(k): v for k, v in out.selected.items()},
        "scores": {str(k): v for k, v in out.scores.items()},
        "pooled_key_sums": [float(memory.pooled(i, layer)[0].double().sum()) for i in range(len(rows))],
        "last_logits_head": last[:16].tolist(),
        "last_logits_sum": float(last.double().sum()),
        "argmax": int(last.argmax()),
    }
