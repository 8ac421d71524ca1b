"""`ray job submit -- msa ingest ...` against a real local Ray cluster with a dashboard, on loopback:
the job is killed with SIGKILL mid-way and submitted again; the store ends with every document
exactly once, and every document is placed on a router shard.

This module starts its own Ray head on 127.0.0.4 (the session cluster runs without a dashboard,
which `ray job submit` needs) and stops it by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fsspec
import pytest

from msa_cluster.cluster.ops import open_store
from tests.cluster.ingest_helpers import MODEL, stored, texts, write_corpus
from tests.conftest import RAY_ENV, _free_port, _ray_cmd

HEAD = "127.0.0.4"
REPO = str(Path(__file__).resolve().parents[2])
N_DOCS = 160


def _env() -> dict[str, str]:
    """This process's environment without what a connected driver (the session's) set: a clean Ray client."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **RAY_ENV}


@pytest.fixture(scope="module")
def dashboard():
    """A one-node Ray head with a dashboard on 127.0.0.4; yields the dashboard's URL."""
    port, dash = _free_port(HEAD), _free_port(HEAD)
    # the job agent's ports are fixed by default: another Ray on this machine (the session's) holds them
    agent = [f"--dashboard-agent-listen-port={_free_port(HEAD)}", f"--dashboard-agent-grpc-port={_free_port(HEAD)}",
             f"--metrics-export-port={_free_port(HEAD)}", f"--runtime-env-agent-port={_free_port(HEAD)}"]
    proc = subprocess.Popen(_ray_cmd() + [
        "start", "--head", f"--node-ip-address={HEAD}", f"--port={port}", f"--dashboard-host={HEAD}",
        f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2", "--memory=3000000000",
        "--object-store-memory=100000000", "--disable-usage-stats", "--block", *agent,
    ], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{HEAD}:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the Ray dashboard did not come up at {url}") from None
                time.sleep(0.5)
        yield url
    finally:
        _stop_head(proc)


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL it after 5 s (Ray's graceful stop can take 20 s)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _submit(dashboard: str, job_id: str, args: list[str], wait: bool) -> subprocess.CompletedProcess:
    env = _env()
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": REPO, **RAY_ENV}})
    cmd = _ray_cmd() + ["job", "submit", f"--address={dashboard}", f"--submission-id={job_id}",
                        f"--runtime-env-json={runtime_env}"] + ([] if wait else ["--no-wait"])
    cmd += ["--", sys.executable, "-m", "msa_cluster.cluster.cli", *args]
    deadline = time.monotonic() + 90
    while True:  # the dashboard answers before its job agent is up
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def _job_pids(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker` (the job's unique store path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "msa_cluster.cluster.cli" in cmdline and "job submit" not in cmdline:
            pids.append(int(entry.name))
    return pids


def _live_count(url: str) -> int:
    try:
        return len(open_store(url).snapshot().doc_ids("acme"))
    except Exception:  # no store yet, or a manifest being written
        return 0


def test_ingest_job_killed_with_sigkill_and_resubmitted_holds_every_document_once(dashboard, tmp_path):
    """SIGKILL mid-job, submit again: exact count, no duplicate client ids, all verified and all placed on shards."""
    docs = texts(N_DOCS, seed=11)
    write_corpus(fsspec.filesystem("file"), f"{tmp_path}/src", "jsonl", docs)
    url = f"file://{tmp_path}/store-job"
    args = ["ingest", f"file://{tmp_path}/src", "--store", url, "--model", MODEL, "--tenant", "acme",
            "--commit-every", "2", "--encoder-cpus", "0.5", "--json"]
    out = _submit(dashboard, "ingest-first", args, wait=False)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 180
    while _live_count(url) == 0:
        assert time.monotonic() < deadline, "the job committed nothing within 180 s"
        time.sleep(0.05)
    pids = _job_pids(str(tmp_path))
    assert pids, "the job's driver process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    at_kill = _live_count(url)
    assert 0 < at_kill < N_DOCS, f"the job was not killed mid-way ({at_kill} of {N_DOCS} committed)"

    out = _submit(dashboard, "ingest-again", args, wait=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"inserted"')][-1])
    assert summary["skipped"] >= at_kill and summary["inserted"] + summary["skipped"] == N_DOCS
    assert summary["rejected"] == []

    store = open_store(url)
    got = stored(store, "acme")
    assert len(got) == N_DOCS and sorted(got.values()) == sorted(docs)
    assert store.verify().documents >= N_DOCS

    from msa_cluster.model import MSAForCausalLM
    from tests.actors.helpers import plain_cluster

    coord, routers, _ = plain_cluster(store, MSAForCausalLM.from_pretrained(MODEL), shards=2)
    live = set(store.snapshot().doc_ids("acme"))
    assert set(coord.placement()) == live
    assert set().union(*(set(r.doc_ids()) for r in routers)) == live
