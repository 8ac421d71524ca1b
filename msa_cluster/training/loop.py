"""The training loop behind `msa train`: seeded, resumable, logging loss curves and router recall.

Determinism: the model is initialised from `seed`; example i of the run is a pure function of
(seed, i) (task, mode and content), so it does not depend on where a run was resumed; the
optimizer state is checkpointed whole. Two runs of the same config on one device class, or one
run stopped and resumed, give bit-identical weights (a CI test checks both on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msa_cluster.model import MSAConfig, MSAForCausalLM
from msa_cluster.model import protocol as P
from msa_cluster.model.losses import phase_weights
from msa_cluster.model.tiny import tiny_config_dict
from msa_cluster.model.tokenizer import BPECodec
from msa_cluster.model.trainable import Example, training_forward
from msa_cluster.training.bpe import tokenizer_corpus, train_bpe
from msa_cluster.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from msa_cluster.training.config import ModelSpec, TrainConfig
from msa_cluster.training.render import Mode, render
from msa_cluster.training.tasks import make_example

__all__ = ["train", "model_config", "tie_router_init", "training_batch", "learning_rate", "evaluate", "TrainResult", "RECALL_KS"]

log = logging.getLogger(__name__)
RECALL_KS = (1, 5)
CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    last: dict[str, Any]


def model_config(spec: ModelSpec, codec: BPECodec) -> MSAConfig:
    """An MSA config (MSA-4B's keys) of the given size; the upper half of the layers route, by cosine."""
    routing = ",".join(str(i) for i in range(spec.num_layers // 2, spec.num_layers))
    cfg = tiny_config_dict(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        max_window_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, vocab_size=codec.vocab_size, bos_token_id=codec.token_id(P.ENDOFTEXT),
        eos_token_id=codec.token_id(P.IM_END),
        msa_config={"router_layer_idx": routing, "top_k_docs": spec.top_k_docs,
                    "pooling_kernel_size": spec.pooling_kernel_size, "similarity": "cosine", "aux_loss": True,
                    "query_reduce_method": spec.query_reduce},
    )  # fmt: skip
    return MSAConfig(**cfg)


@torch.no_grad()
def tie_router_init(model: MSAForCausalLM) -> None:
    """Start every routing layer's router_q_proj equal to its router_k_proj: query head h copies kv head h // G.

    Routing scores then start as cosine similarities of one random projection of the hidden states,
    which keeps their geometry: a document sharing tokens with the question already scores higher
    at step 0. With independent random projections routing starts at chance and, measured on a
    key-lookup toy, stayed near it for hundreds of steps.
    """
    for layer in model.model.layers:
        attn = layer.self_attn
        if not attn.decoupled:
            continue
        wk = attn.router_k_proj[0].weight  # [Hkv * D, M]
        G, D = attn.num_heads // attn.num_kv_heads, attn.head_dim
        wq = wk.view(attn.num_kv_heads, 1, D, -1).expand(-1, G, -1, -1).reshape(attn.num_heads * D, -1)  # [H * D, M]
        attn.router_q_proj[0].weight.copy_(wq)


def training_batch(cfg: TrainConfig, codec: BPECodec, step: int, split: str = "train") -> list[Example]:
    """The examples of 0-based `step`: example i = step * batch_size + j, a pure function of (seed, i)."""
    names, weights = list(cfg.data.tasks), list(cfg.data.tasks.values())
    out = []
    for j in range(cfg.batch_size):
        index = step * cfg.batch_size + j
        rng = random.Random(f"mix/{split}/{cfg.seed}/{index}")
        task = rng.choices(names, weights)[0]
        mode: Mode = "one_round" if rng.random() < cfg.data.one_round_fraction else "interleave"
        out.append(render(make_example(task, split, cfg.seed, index, cfg.data.num_docs, cfg.data.id_digits), codec, mode, cfg.data.question_block_target))
    return out


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The main phase's learning rate at 0-based `step`: `lr`, or its cosine decay to `min_lr` from
    `decay_from` (default: the end of the warm-up) to `decay_to` (default: the last step). A pure
    function of the step, so a resumed run follows the same schedule."""
    start = cfg.warmup_steps if cfg.decay_from is None else cfg.decay_from
    end = cfg.steps if cfg.decay_to is None else cfg.decay_to
    if cfg.lr_decay == "constant" or step < start:
        return cfg.lr
    frac = min(1.0, (step - start) / max(1, end - 1 - start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))


def _step(model: MSAForCausalLM, opt: torch.optim.Optimizer, batch: list[Example], step: int, cfg: TrainConfig) -> dict[str, Any]:
    """One optimizer step; the LM loss is a mean over the batch's target tokens, the routing loss over examples."""
    w = phase_weights(step, cfg.warmup_steps)
    lr = cfg.warmup_lr if (w.phase == "warmup" and cfg.warmup_lr is not None) else learning_rate(cfg, step)
    for group in opt.param_groups:
        group["lr"] = lr
    targets = max(1, sum(sum(t.target) for ex in batch for t in ex.turns))
    opt.zero_grad(set_to_none=True)
    lm = aux = 0.0
    recalls: list[dict[int, float]] = []
    for ex in batch:  # one backward per example keeps one haystack's graph in memory at a time
        stats = training_forward(model, ex, RECALL_KS)
        loss = w.lm * stats.lm_sum / targets + w.aux * stats.aux / len(batch)
        loss.backward()
        lm += float(stats.lm_sum.detach()) / targets
        aux += float(stats.aux.detach()) / len(batch)
        recalls += [stats.recall] if stats.recall else []
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    out: dict[str, Any] = {"step": step + 1, "phase": w.phase, "lr": lr, "lm": lm, "aux": aux, "loss": w.lm * lm + w.aux * aux}
    out.update({f"recall@{k}": sum(r[k] for r in recalls) / len(recalls) for k in RECALL_KS} if recalls else {})
    return out


@torch.no_grad()
def evaluate(model: MSAForCausalLM, examples: list[Example]) -> dict[str, float]:
    """Teacher-forced LM loss per target token, routing loss and router recall on held-out examples."""
    was_training = model.training
    model.eval()
    lm_sum, count, aux, recalls = 0.0, 0, 0.0, []
    for ex in examples:
        stats = training_forward(model, ex, RECALL_KS)
        lm_sum, count, aux = lm_sum + float(stats.lm_sum), count + stats.lm_count, aux + float(stats.aux)
        recalls += [stats.recall] if stats.recall else []
    model.train(was_training)
    out = {"eval_lm": lm_sum / max(count, 1), "eval_aux": aux / max(len(examples), 1)}
    out.update({f"eval_recall@{k}": sum(r[k] for r in recalls) / len(recalls) for k in RECALL_KS} if recalls else {})
    return out


def _start(cfg: TrainConfig, out: Path, resume: bool) -> tuple[MSAForCausalLM, BPECodec, torch.optim.Optimizer, int]:
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        state = load_training_checkpoint(ckpt, cfg.device)
        if state.config.get("model") != cfg.model.model_dump(mode="json") or state.config.get("seed") != cfg.seed:
            raise ValueError(f"cannot resume {ckpt}: its model spec or seed differs from this config")
        model, codec = state.model, state.codec
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.load_state_dict(state.optimizer_state)
        log.info("resumed from %s at step %d", ckpt, state.step)
        return model, codec, opt, state.step
    if ckpt.exists():
        raise ValueError(f"{ckpt} exists: pass resume to continue it, or choose another output_dir")
    codec = train_bpe(tokenizer_corpus(cfg.seed, cfg.data.tokenizer_examples, cfg.data.num_docs, list(cfg.data.tasks), cfg.data.id_digits), cfg.model.vocab_size)
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = MSAForCausalLM(model_config(cfg.model, codec))
    if cfg.model.router_init == "tied":
        tie_router_init(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, codec, opt, 0


def train(cfg: TrainConfig, resume: bool = False, on_metrics: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or resume) to `cfg.steps`; checkpoints and `metrics.jsonl` go to `cfg.output_dir`."""
    if cfg.device == "cuda":
        _deterministic_cuda()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, codec, opt, start = _start(cfg, out, resume)
    metrics_path = _trim_metrics(out / METRICS, start)
    eval_set = [ex for i in range(cfg.data.eval_examples) for ex in _eval_example(cfg, codec, i)]
    last: dict[str, Any] = {"step": start}
    t0, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        batch = training_batch(cfg, codec, step)
        last = _step(model, opt, batch, step, cfg)
        tokens += sum(ex.num_tokens for ex in batch)
        done = step + 1
        if done % cfg.eval_every == 0 and eval_set:
            last.update(evaluate(model, eval_set))
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            last.update(tokens=tokens, elapsed_s=round(elapsed, 3), tokens_per_s=round(tokens / max(elapsed, 1e-9), 1))
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(last, sort_keys=True) + "\n")
            if on_metrics is not None:
                on_metrics(last)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_training_checkpoint(out / CHECKPOINT, model, codec, opt, done, cfg.model_dump(mode="json"))
    return TrainResult(step=max(start, cfg.steps), checkpoint=out / CHECKPOINT, last=last)


def _deterministic_cuda() -> None:
    """Same seed, same weights on one CUDA device class: deterministic kernels, no TF32, fixed cuBLAS workspace
    (the variable must be set before the process's first cuBLAS call, so `train` sets it before building the model)."""
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _eval_example(cfg: TrainConfig, codec: BPECodec, i: int) -> list[Example]:
    """Held-out example i: the eval split (disjoint entities and values), interleave form; its loss counts the
    ids and answers only (never the question block), so runs with and without `question_block_target` compare."""
    task = list(cfg.data.tasks)[i % len(cfg.data.tasks)]
    return [render(make_example(task, "eval", cfg.seed, i, cfg.data.num_docs, cfg.data.id_digits), codec, "interleave")]


def _trim_metrics(path: Path, step: int) -> Path:
    """Drop metric lines past `step` (a run that died after its last checkpoint is redone from there)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
    return path
