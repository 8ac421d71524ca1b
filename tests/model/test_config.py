"""MSAConfig reads MSA-4B's config.json as published and rejects bad msa_config values clearly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from msa_cluster.model import MSAConfig, MSAForCausalLM
from msa_cluster.model.config import parse_router_layers

DATA = Path(__file__).parent / "data"


def _msa4b() -> dict:
    return json.loads((DATA / "msa4b_config.json").read_text())


def test_loads_published_msa4b_config():
    """The MSA-4B config.json loads with routing layers 18..35, k=16, P=64 and dot-product routing."""
    cfg = MSAConfig.from_json_file(str(DATA / "msa4b_config.json"))
    assert cfg.routing_layers == tuple(range(18, 36))
    assert cfg.memory.top_k_docs == 16 and cfg.memory.pooling_kernel_size == 64
    assert cfg.memory.resolved_similarity == "dot" and cfg.routing_scale() == pytest.approx(128**-0.5)
    assert cfg.memory.template_head_len == 3
    assert cfg.rope_parameters["rope_theta"] == 5000000 and cfg.dtype == torch.bfloat16


def test_autoconfig_resolves_model_type_msa(tmp_path):
    """AutoConfig maps model_type 'msa' to MSAConfig."""
    (tmp_path / "config.json").write_text(json.dumps(_msa4b()))
    assert isinstance(AutoConfig.from_pretrained(str(tmp_path)), MSAConfig)


def test_msa4b_parameter_names_and_shapes():
    """The model built from MSA-4B's config has the published tensor names and shapes (on meta)."""
    with torch.device("meta"):
        model = MSAForCausalLM(MSAConfig(**_msa4b()))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.18.self_attn.router_q_proj.0.weight"] == (4096, 2560)
    assert shapes["model.layers.35.self_attn.router_k_proj.0.weight"] == (1024, 2560)
    assert "model.layers.17.self_attn.router_q_proj.0.weight" not in shapes
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 2560)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (128,)
    extra = sum(v.numel() for k, v in model.state_dict().items() if "router" in k)
    assert extra == 235_929_600  # digest 1: 0.236B router parameters


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"top_k_doc": 3}, "unknown msa_config keys"),
        ({"top_k_docs": 0}, "top_k_docs"),
        ({"pooling_kernel_size": 0}, "pooling_kernel_size"),
        ({"pooling_kernel_size": -64}, "pooling_kernel_size"),
        ({"router_layer_idx": "18,x"}, "router_layer_idx"),
        ({"router_layer_idx": "40"}, "outside"),
        ({"router_layer_idx": "first"}, "router_layer_idx"),
        ({"head_reduce_method": "sum"}, "head_reduce_method"),
        ({"similarity": "l2"}, "similarity"),
        ({"template_head_len": 0}, "template_head_len"),
        ({"max_chunks_per_query": 0}, "max_chunks_per_query"),
        ({"max_chunks_per_query": True}, "max_chunks_per_query"),
    ],
)
def test_bad_msa_config_is_a_clear_error(patch, message):
    """A typo or an out-of-range value in msa_config raises ValueError naming it."""
    data = _msa4b()
    data["msa_config"].update(patch)
    with pytest.raises(ValueError, match=message):
        MSAConfig(**data)


def test_similarity_default_follows_reference_inference():
    """aux_loss_method 'INFONCE' means cosine; anything else (the released INFONCE_DECOUPLE) dot product."""
    data = _msa4b()
    data["msa_config"]["aux_loss_method"] = "INFONCE"
    assert MSAConfig(**data).memory.resolved_similarity == "cosine"
    data["msa_config"]["similarity"] = "dot"
    assert MSAConfig(**data).memory.resolved_similarity == "dot"


def test_top_level_hf_keys_pass_through():
    """Unknown top-level Hugging Face keys (e.g. transformers_version) are accepted."""
    data = _msa4b()
    data["some_future_hf_key"] = 1
    assert MSAConfig(**data).routing_layers[0] == 18


def test_router_layer_forms():
    """'all', a comma list and a list of ints parse to sorted unique layers."""
    assert parse_router_layers("all", 3) == (0, 1, 2)
    assert parse_router_layers("2, 1,2", 3) == (1, 2)
    assert parse_router_layers([2, 0], 3) == (0, 2)


def test_json_round_trip_keeps_msa_config(tmp_path):
    """to_json_file / from_json_file keep every msa_config field."""
    cfg = MSAConfig(**_msa4b())
    cfg.to_json_file(str(tmp_path / "c.json"))
    back = MSAConfig.from_json_file(str(tmp_path / "c.json"))
    assert back.memory == cfg.memory and back.routing_layers == cfg.routing_layers


def test_fingerprint_ignores_selection_knobs_but_not_architecture():
    """top_k_docs and max_chunks_per_query do not change the fingerprint; the routing layers and head_dim do."""
    base = MSAConfig(**_msa4b()).fingerprint("bfloat16")
    data = _msa4b()
    data["msa_config"]["top_k_docs"] = 4
    data["msa_config"]["max_chunks_per_query"] = 7
    assert MSAConfig(**data).fingerprint("bfloat16") == base
    data["msa_config"]["router_layer_idx"] = "all"
    assert MSAConfig(**data).fingerprint("bfloat16") != base
