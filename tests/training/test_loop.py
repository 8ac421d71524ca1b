"""`msa train`'s loop: bit-identical reruns, resume equals a straight run, metrics, config errors."""

import json

import pytest
from safetensors.torch import load_file

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.tokenizer import load_codec
from msa_cluster.training.config import TrainConfig
from msa_cluster.training.loop import learning_rate, train


def _weights(result):
    return load_file(str(result.checkpoint / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_runs_give_identical_weights(tiny_config):
    """Two runs of the same config (24 steps) end with bit-identical weights and optimizer state."""
    a, b = train(tiny_config("a")), train(tiny_config("b"))
    assert _same(_weights(a), _weights(b))
    assert _same(load_file(str(a.checkpoint / "optimizer.safetensors")), load_file(str(b.checkpoint / "optimizer.safetensors")))
    c = train(tiny_config("c", seed=4))
    assert not _same(_weights(a), _weights(c))  # the seed matters


def test_resume_equals_a_straight_run(tiny_config):
    """12 steps, stop, resume to 24 gives the same weights as 24 steps straight; metrics are not duplicated."""
    straight = train(tiny_config("straight"))
    train(tiny_config("resumed", steps=12))
    resumed = train(tiny_config("resumed"), resume=True)
    assert resumed.step == 24 and _same(_weights(straight), _weights(resumed))
    steps = [json.loads(line)["step"] for line in (resumed.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]


def test_metrics_and_checkpoint_are_usable(tiny_config):
    """metrics.jsonl logs losses, router recall and tokens/s; the checkpoint loads as a model with its codec."""
    res = train(tiny_config())
    lines = [json.loads(line) for line in (res.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"lm", "aux", "loss", "recall@1", "recall@5", "tokens_per_s", "phase"} <= set(lines[-1])
    assert "eval_recall@1" in lines[2] and lines[0]["phase"] == "warmup" and lines[-1]["phase"] == "main"
    model = MSAForCausalLM.from_pretrained(res.checkpoint)
    assert model.config.vocab_size == load_codec(res.checkpoint).vocab_size == 400


def test_refuses_to_overwrite_and_bad_configs(tiny_config):
    """A second fresh run into a used output_dir, or a bad config value, is a ValueError naming it."""
    train(tiny_config(steps=1))
    with pytest.raises(ValueError, match="exists"):
        train(tiny_config(steps=1))
    with pytest.raises(ValueError, match="num_kv_heads"):
        TrainConfig.model_validate({"model": {"num_heads": 3, "num_kv_heads": 2}})
    with pytest.raises(ValueError, match="niah_nope"):
        TrainConfig.model_validate({"data": {"tasks": {"niah_nope": 1.0}}})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.model_validate({"batch_size": 0})


def test_routing_loss_falls_on_a_toy_task(tiny_config):
    """Forty warm-up steps of `train` on 6-document niah_single haystacks cut the routing loss 10x."""
    data = {"num_docs": 6, "eval_examples": 0, "tokenizer_examples": 60, "tasks": {"niah_single": 1.0}, "one_round_fraction": 0.0}
    res = train(tiny_config(steps=40, warmup_steps=40, log_every=1, data=data))
    aux = [json.loads(line)["aux"] for line in (res.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(aux) == 40 and sum(aux[-8:]) / 8 < 0.1 * sum(aux[:8]) / 8


def test_model_spec_reaches_the_model_config():
    """Sizes, top-k, pooling and the routing query reduction in the YAML model spec are what the model is built with."""
    from msa_cluster.training.bpe import tokenizer_corpus, train_bpe
    from msa_cluster.training.config import ModelSpec
    from msa_cluster.training.loop import model_config

    codec = train_bpe(tokenizer_corpus(0, 60), 400)
    cfg = model_config(ModelSpec(num_layers=4, top_k_docs=3, pooling_kernel_size=8, query_reduce="mean"), codec)
    assert cfg.routing_layers == (2, 3) and cfg.memory.top_k_docs == 3 and cfg.memory.pooling_kernel_size == 8
    assert cfg.memory.query_reduce_method == "mean" and cfg.memory.resolved_similarity == "cosine" and cfg.vocab_size == 400


def test_tied_router_init_copies_kv_heads_into_query_heads():
    """router_init 'tied': query head h of router_q_proj starts as kv head h // G of router_k_proj; 'random' does not."""
    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.training.bpe import tokenizer_corpus, train_bpe
    from msa_cluster.training.config import ModelSpec
    from msa_cluster.training.loop import model_config, tie_router_init

    spec = ModelSpec(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=16, intermediate_size=32)
    model = MSAForCausalLM(model_config(spec, train_bpe(tokenizer_corpus(0, 60), 400)))
    attn = model.model.layers[1].self_attn
    wq, wk = attn.router_q_proj[0].weight, attn.router_k_proj[0].weight
    assert not wq[8:16].equal(wk[0:8])
    tie_router_init(model)
    for h in range(4):
        assert wq[h * 8 : (h + 1) * 8].equal(wk[(h // 2) * 8 : (h // 2 + 1) * 8])


def test_cosine_decay_schedule_and_resume(tiny_config):
    """lr_decay=cosine holds lr through the warm-up and decay_from, then falls to min_lr at the last step;
    the metrics log it, and a resumed run with the schedule still equals a straight one."""
    cfg = tiny_config(lr_decay="cosine", decay_from=15, min_lr=1e-4, log_every=1)
    lrs = [learning_rate(cfg, s) for s in range(cfg.steps)]
    assert lrs[:16] == [cfg.lr] * 16 and lrs[-1] == pytest.approx(1e-4) and lrs[19] == pytest.approx((cfg.lr + 1e-4) / 2)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(tiny_config(), 23) == tiny_config().lr  # the default stays constant
    early = tiny_config(steps=20, lr_decay="cosine", decay_from=15, decay_to=24, min_lr=1e-4)
    assert [learning_rate(early, s) for s in range(20)] == lrs[:20]  # decay_to: stopping early keeps the schedule
    straight = train(cfg)
    logged = [json.loads(line)["lr"] for line in (straight.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert logged[12:] == lrs[12:]  # the warm-up phase logs warmup_lr's default, lr
    train(tiny_config("resumed", steps=12, lr_decay="cosine", decay_from=15, min_lr=1e-4))
    resumed = train(tiny_config("resumed", lr_decay="cosine", decay_from=15, min_lr=1e-4), resume=True)
    assert _same(_weights(straight), _weights(resumed))
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig.model_validate({"lr_decay": "linear"})
