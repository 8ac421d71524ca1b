"""Checkpoints: strict safetensors loading, bit-exact round trips, the bundled tiny checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from msa_cluster.model import InProcessMemory, MSAForCausalLM
from msa_cluster.model.checkpoint import CheckpointError
from msa_cluster.model.tiny import bundled_checkpoint, write_tiny_random
from tests.model.helpers import make_model, random_docs, random_prompt


def _logits(model, memory, seed=3):
    ids, mask = random_prompt(model, 12, seed=seed)
    return model.prefill(ids, memory, mask).logits


def test_save_load_round_trip_is_bit_exact(tmp_path):
    """save_pretrained then from_pretrained reproduces prefill logits bit for bit."""
    model = make_model(seed=11)
    memory = InProcessMemory.from_documents(model, random_docs([9, 40, 70], 256))
    model.save_pretrained(tmp_path)
    back = MSAForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(model, memory), _logits(back, memory))
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied, not loaded twice


def test_auto_model_resolves_msa(tmp_path):
    """AutoModelForCausalLM.from_pretrained on a local MSA checkpoint returns MSAForCausalLM."""
    write_tiny_random(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(tmp_path)), MSAForCausalLM)


def test_missing_tensor_is_named(tmp_path):
    """A checkpoint without a router tensor fails naming it."""
    write_tiny_random(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.3.self_attn.router_k_proj.0.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.3.self_attn.router_k_proj.0.weight'\]"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    """A checkpoint with a router tensor in a non-routing layer fails naming it."""
    write_tiny_random(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.router_q_proj.0.weight"] = torch.zeros(64, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors.*layers.0.self_attn.router_q_proj"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    """A tensor of the wrong shape fails naming it and both shapes."""
    write_tiny_random(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: \(3,\) vs \(64,\)"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint_directory(tmp_path):
    """A directory without config.json is a FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    """Weights split over shards with model.safetensors.index.json load like one file."""
    write_tiny_random(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    a = MSAForCausalLM.from_pretrained(tmp_path)
    b = MSAForCausalLM.from_pretrained(bundled_checkpoint())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bundled_checkpoint_is_reproducible(tmp_path):
    """scripts/make_tiny_checkpoint.py's generator rebuilds the bundled weights and config exactly."""
    write_tiny_random(tmp_path)
    ours = load_file(str(tmp_path / "model.safetensors"))
    shipped = load_file(str(bundled_checkpoint() / "model.safetensors"))
    assert ours.keys() == shipped.keys() and all(torch.equal(ours[k], shipped[k]) for k in ours)
    assert (tmp_path / "config.json").read_text() == (bundled_checkpoint() / "config.json").read_text()


def test_bundled_checkpoint_uses_published_keys():
    """The bundled config.json has exactly MSA-4B's top-level and msa_config keys."""
    from pathlib import Path

    ours = json.loads((bundled_checkpoint() / "config.json").read_text())
    published = json.loads((Path(__file__).parent / "data" / "msa4b_config.json").read_text())
    assert set(ours) == set(published)
    assert set(ours["msa_config"]) == set(published["msa_config"])


def test_dtype_override(tmp_path):
    """from_pretrained(dtype=torch.bfloat16) loads a float32 checkpoint in bf16."""
    write_tiny_random(tmp_path)
    assert MSAForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
