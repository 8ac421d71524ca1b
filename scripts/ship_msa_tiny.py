"""Ship a trained checkpoint as the bundled `msa-tiny` model, with the record that reproduces it.

    python scripts/ship_msa_tiny.py runs/msa-tiny/checkpoint --config examples/train/msa-tiny.yaml
    python scripts/ship_msa_tiny.py runs/msa-tiny/checkpoint \
        --config examples/train/msa-tiny.yaml:4000 --config examples/train/msa-tiny-copy.yaml:6000 \
        --config examples/train/msa-tiny-quote.yaml:6500 --config examples/train/msa-tiny-mix.yaml

Copies the weights (no optimizer state), config.json and the tokenizer into
msa_cluster/assets/msa-tiny, the learning curves up to the checkpoint's step (metrics.jsonl), and
writes training.json: the commands that reproduce the checkpoint, one per stage (`msa train
--config ... --steps N`, later stages with `--resume`; a stage whose learning rate is constant
after warm-up, stopped at step N, equals a run of N steps, and a cosine stage fixes its horizon
with `decay_to`, so the same holds for it), each stage's config and last step,
the data seed, the steps, the device class, torch's version and the wall time (summed over the
stages' processes).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
import yaml

ASSETS = Path(__file__).resolve().parent.parent / "msa_cluster" / "assets"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stages(specs: list[str], step: int) -> list[tuple[Path, int]]:
    """[(config, last step)] from PATH[:STEP] arguments; the last stage ends at the checkpoint's step."""
    out = []
    for i, spec in enumerate(specs):
        head, _, tail = spec.rpartition(":")
        path, until = (head, tail) if head and tail.isdigit() else (spec, "")
        last = i == len(specs) - 1
        if not last and not until:
            raise SystemExit(f"--config {spec}: every stage but the last needs :LAST_STEP")
        out.append((Path(path), step if last else int(until)))
    if any(b <= a for (_, a), (_, b) in zip(out, out[1:])):
        raise SystemExit(f"stage steps must increase, got {[u for _, u in out]}")
    return out


def _totals(curve: list[dict]) -> tuple[float, int]:
    """Wall seconds and tokens over every process of the run: each resumed process restarts its counters."""
    wall = tokens = 0.0
    seg_wall = seg_tokens = 0.0
    for m in (m for m in curve if "elapsed_s" in m):
        if m["elapsed_s"] < seg_wall:  # a new process
            wall, tokens = wall + seg_wall, tokens + seg_tokens
        seg_wall, seg_tokens = m["elapsed_s"], m.get("tokens", 0)
    return round(wall + seg_wall, 3), int(tokens + seg_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory written by msa train")
    ap.add_argument("--config", action="append", required=True,
                    help="the YAML config the run used; for a run in stages, one per stage in order as PATH:LAST_STEP (the last stage's step is the checkpoint's)")
    ap.add_argument("--name", default="msa-tiny")
    ap.add_argument("--metrics", type=Path, help="the run's metrics.jsonl (default: beside the checkpoint directory)")
    ap.add_argument("--device-note", default="", help="what else ran on the machine during the run")
    args = ap.parse_args()
    state = json.loads((args.checkpoint / "trainer_state.json").read_text())
    step = int(state["step"])
    metrics = [json.loads(line) for line in (args.metrics or args.checkpoint.parent / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [m for m in metrics if m.get("step", 0) <= step]
    out = ASSETS / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(args.checkpoint / name, out / name)
    (out / "metrics.jsonl").write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in curve))
    stages = _stages(args.config, step)
    config = yaml.safe_load(stages[-1][0].read_text())
    wall_s, tokens = _totals(curve)
    commands = [f"msa train --config {path.as_posix()} --steps {until}" + (" --resume" if i else "") for i, (path, until) in enumerate(stages)]
    record = {
        "command": " && ".join(commands),
        "stages": [{"config": path.as_posix(), "until_step": until, "settings": yaml.safe_load(path.read_text())} for path, until in stages],
        "config": config,
        "data_seed": config.get("seed", 0),
        "steps": step,
        "device": f"{config.get('device', 'cpu')} ({_cpu_model()}), {config.get('threads') or 'default'} torch thread(s)",
        "torch": torch.__version__,
        "wall_time_s": wall_s,
        "tokens_seen": tokens,
        "note": args.device_note,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"shipped step {step} to {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
