"""Ship a trained checkpoint as the bundled `msa-tiny` model, with the record that reproduces it.

    python scripts/ship_msa_tiny.py runs/msa-tiny/checkpoint --config examples/train/msa-tiny.yaml

Copies the weights (no optimizer state), config.json and the tokenizer into
msa_cluster/assets/msa-tiny, the learning curves up to the checkpoint's step (metrics.jsonl), and
writes training.json: the command that reproduces the checkpoint (`msa train --config ...
--steps N`: the learning rate is constant after warm-up, so a run stopped at step N equals a run
of N steps), the config, the data seed, the steps, the device class, torch's version and the
wall time.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory written by msa train")
    ap.add_argument("--config", type=Path, required=True, help="the YAML config the run used")
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
    config = yaml.safe_load(args.config.read_text())
    last = max((m for m in curve if "elapsed_s" in m), key=lambda m: m["step"])
    record = {
        "command": f"msa train --config {args.config.as_posix()} --steps {step}",
        "config": config,
        "data_seed": config.get("seed", 0),
        "steps": step,
        "device": f"{config.get('device', 'cpu')} ({_cpu_model()}), {config.get('threads') or 'default'} torch thread(s)",
        "torch": torch.__version__,
        "wall_time_s": last["elapsed_s"],
        "tokens_seen": last.get("tokens"),
        "note": args.device_note,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"shipped step {step} to {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
