"""Strict safetensors checkpoints in the published MSA-4B layout.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Loading is strict: a missing or unexpected tensor, or one of the
wrong shape, is a `ValueError` naming it. A tied `lm_head.weight` may be absent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msa_cluster.model.config import MSAConfig

__all__ = ["load_checkpoint", "save_checkpoint", "CheckpointError"]

log = logging.getLogger(__name__)
# Hub arguments that AutoModelForCausalLM passes along; a local directory does not need them.
_IGNORED_KWARGS = {
    "trust_remote_code", "_from_auto", "_commit_hash", "adapter_kwargs", "torch_dtype", "low_cpu_mem_usage",
    "cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "subfolder",
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


def _weight_files(root: Path) -> list[Path]:
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    raise FileNotFoundError(f"{root} has neither model.safetensors nor model.safetensors.index.json")


def load_checkpoint(
    cls: Any, path: str | os.PathLike[str], *, dtype: Any = None, device: Any = None, config: MSAConfig | None = None, **kwargs: Any
) -> Any:
    """Load a checkpoint directory, or a bundled model by name, strictly (see the module docstring)."""
    unknown = set(kwargs) - _IGNORED_KWARGS
    if unknown:
        raise TypeError(f"from_pretrained got unsupported arguments {sorted(unknown)}")
    if dtype is None and "torch_dtype" in kwargs:
        dtype = kwargs["torch_dtype"]
    from msa_cluster.model.tiny import resolve_checkpoint

    root = resolve_checkpoint(path) / (kwargs.get("subfolder") or "")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} is not a local checkpoint directory (no config.json)")
    if config is None:
        config = MSAConfig.from_json_file(str(root / "config.json"))
    if config.model_type != "msa":
        raise CheckpointError(f"{root}/config.json has model_type {config.model_type!r}, expected 'msa'")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype in (None, "auto"):
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    tied = bool(config.tie_word_embeddings)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(root):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                state[name] = fh.get_tensor(name)
    if tied:
        state.pop("lm_head.weight", None)
    required = {k for k in expected if not (tied and k == "lm_head.weight")}
    missing, unexpected = sorted(required - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root} does not match the config: missing tensors {missing}, unexpected tensors {unexpected}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in required if state[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"checkpoint {root} has tensors of the wrong shape: {bad}")
    model.to_empty(device=device or "cpu")
    model.to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (RoPE inverse frequencies) are not in the file: rebuild them.
    rope = type(model.model.rotary_emb)(config).to(device or "cpu")
    model.model.rotary_emb = rope
    model.eval()
    log.info("loaded %s (%d tensors, %s)", root, len(state), dtype)
    return model


def save_checkpoint(model: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = ["MSAForCausalLM"]
    config.dtype = model.dtype
    config.to_json_file(str(root / "config.json"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
