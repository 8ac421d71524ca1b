"""Fixed-seed reference outputs of the bundled tiny checkpoint (STYLE 15: refactors keep numbers).

The same function produces the stored golden file and the values the test compares with it.
"""

from __future__ import annotations

import json
from importlib import resources

import torch

__all__ = ["golden_outputs"]

QUESTION = "When was the father of the lighthouse logbook keeper born?"


def golden_outputs() -> dict:
    """Selections, pooled-key checksums and last-token logits of one prefill over the sample corpus."""
    from msa_cluster.model import InProcessMemory, MSAForCausalLM
    from msa_cluster.model.interleave import InterleaveConfig
    from msa_cluster.model.tiny import bundled_checkpoint
    from msa_cluster.model.tokenizer import load_codec

    path = bundled_checkpoint()
    model = MSAForCausalLM.from_pretrained(path)
    codec = load_codec(path)
    text = (resources.files("msa_cluster") / "assets" / "sample_corpus.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    wrapped = [codec.encode(f"<|im_start|>[{r['id']}]. {r['text']}[{r['id']}]<|im_end|>") for r in rows]
    memory = InProcessMemory.from_documents(model, wrapped, texts=[r["text"] for r in rows], doc_ids=[r["id"] for r in rows])
    cfg = InterleaveConfig()
    head = codec.encode(cfg.template_head)
    question = codec.encode(cfg.instruction + QUESTION + "\n" + cfg.return_docs)
    tail = codec.encode(cfg.prompt_end + cfg.response_head)
    ids = torch.tensor([head + question + tail])
    mask = torch.tensor([[False] * len(head) + [True] * len(question) + [False] * len(tail)])
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
