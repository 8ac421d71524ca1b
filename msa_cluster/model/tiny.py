"""The bundled tiny random checkpoint, in the published MSA-4B layout at toy sizes.

Same config keys as MSA-4B's config.json (digest 1 and 7.1), same tensor names, tiny sizes,
float32, random weights from a fixed seed. It proves the plumbing, not the quality: its answers
are noise. `scripts/make_tiny_checkpoint.py` regenerates it byte for byte.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from msa_cluster.model.config import MSAConfig
from msa_cluster.model.protocol import ENDOFTEXT, IM_END
from msa_cluster.model.tokenizer import ByteTokenizer

__all__ = ["TINY_RANDOM", "tiny_config_dict", "write_tiny_random", "bundled_checkpoint", "resolve_checkpoint"]

TINY_RANDOM = "msa-tiny-random"


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """MSA-4B's config.json keys with tiny values (4 layers, routing in the upper half)."""
    tok = ByteTokenizer()
    cfg: dict[str, Any] = {
        "architectures": ["MSAForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_id(ENDOFTEXT),
        "eos_token_id": tok.token_id(IM_END),
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 262144,
        "max_window_layers": 4,
        "model_type": "msa",
        "msa_config": {
            "router_layer_idx": "2,3",
            "top_k_docs": 4,
            "pooling_kernel_size": 64,
            "decouple_router": True,
            "head_reduce_method": "mean",
            "query_reduce_method": "max",
            "chunk_reduce_method": "max",
            "decouple_pooling_mode": "mean",
            "aux_loss": False,
            "aux_loss_method": "INFONCE_DECOUPLE",
            "infonce_loss_temp": 0.1,
            "lmloss_weigth": 1.0,
            "auxloss_weight": 0.1,
            "recloss_weight": 0.0,
            "ansloss_weight": 1.0,
            "rewrite_position": True,
        },
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 5000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": tok.vocab_size,
    }
    msa = overrides.pop("msa_config", None)
    cfg.update(overrides)
    if msa:
        cfg["msa_config"] = {**cfg["msa_config"], **msa}
    return cfg


def write_tiny_random(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write config.json (published key layout), model.safetensors and the tokenizer to `path`."""
    from msa_cluster.model.modeling import MSAForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config_dict(**overrides)
    torch.manual_seed(seed)
    model = MSAForCausalLM(MSAConfig(**cfg))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    ByteTokenizer().save(path)
    return path


def bundled_checkpoint(name: str = TINY_RANDOM) -> Path:
    """Path of a checkpoint shipped inside the package."""
    return Path(str(resources.files("msa_cluster") / "assets" / name))


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a local path or the name of a bundled model (e.g. `msa-tiny-random`)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and "/" not in name_or_path and bundled_checkpoint(name_or_path).is_dir():
        return bundled_checkpoint(name_or_path)
    bundled = sorted(p.name for p in bundled_checkpoint("").iterdir() if p.is_dir())
    raise FileNotFoundError(f"{name_or_path!r} is neither a checkpoint directory nor a bundled model {bundled}")
