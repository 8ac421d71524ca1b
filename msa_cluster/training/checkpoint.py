"""Training checkpoints: the model in the published layout, its tokenizer, and the optimizer.

A checkpoint directory is a loadable model (`config.json`, `model.safetensors`, `tokenizer.json`;
`msa demo --model DIR` runs it) plus `optimizer.safetensors` (every optimizer state tensor, keyed
`{param index}.{name}`) and `trainer_state.json` (step, seed, optimizer hyper-parameters, the
training config). No pickle anywhere. A checkpoint is written beside the old one and swapped in
by rename, so a crash mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from msa_cluster.model.modeling import MSAForCausalLM
from msa_cluster.model.tokenizer import BPECodec

__all__ = ["TrainingState", "save_training_checkpoint", "load_training_checkpoint"]

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainingState:
    model: MSAForCausalLM
    codec: BPECodec
    optimizer_state: dict[str, Any]  # torch's optimizer state_dict layout
    step: int  # optimizer steps done
    config: dict[str, Any]


def save_training_checkpoint(path: Path, model: MSAForCausalLM, codec: BPECodec, optimizer: torch.optim.Optimizer,
                             step: int, config: dict[str, Any]) -> Path:  # fmt: skip
    """Write the checkpoint to `path` (replacing an older one there only once the new one is whole)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    codec.save(tmp)
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, "config": config}
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_training_checkpoint(path: Path, device: str = "cpu") -> TrainingState:
    """Read a checkpoint written by `save_training_checkpoint` (model in train mode on `device`)."""
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    meta = json.loads((path / STATE_FILE).read_text())
    model = MSAForCausalLM.from_pretrained(path, device=device).train()
    tensors = load_file(str(path / OPTIMIZER_FILE), device=device)
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for v in state.values():  # AdamW keeps `step` on the CPU
        if isinstance(v.get("step"), torch.Tensor):
            v["step"] = v["step"].cpu()
    opt_state = {"state": state, "param_groups": meta["param_groups"]}
    return TrainingState(model, BPECodec.load(path), opt_state, int(meta["step"]), meta["config"])
