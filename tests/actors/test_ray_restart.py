"""Restarting the whole Ray cluster and pointing it at the same store restores everything committed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from msa_cluster.model import InProcessMemory
from tests.actors.helpers import corpus, store_with, tiny_model
from tests.model.helpers import random_prompt

ROOT = Path(__file__).resolve().parents[2]


def _probe(url: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "tests.actors.restart_probe", url, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_new_ray_cluster_restores_committed_memory(tmp_path):
    """Ray cluster 1 inserts documents through the coordinator and dies; Ray cluster 2 routes to all of them."""
    model = tiny_model()
    docs = corpus(model)
    url = f"file://{tmp_path}"
    store_with(model, docs[:10], url)
    first = _probe(url, "10")  # inserts docs[10:] through the cluster, then shuts Ray down
    second = _probe(url)  # a brand-new Ray cluster over the same store
    assert first == second and second["documents"] == len(docs)
    ids, mask = random_prompt(model, 12, seed=7)
    local = {t: {str(k): v for k, v in model.prefill(ids, InProcessMemory(docs), mask, tenant=t).selected.items()}
             for t in ("acme", "globex")}
    assert second["selected"] == local
