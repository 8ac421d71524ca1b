"""The shipped configs: the Serve config validates against Serve's own schema, its args and the
`msa serve` config validate as an AppConfig, and `serve run` of that config really serves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from msa_cluster.cluster.config import AppConfig, load_config
from msa_cluster.cluster.demo import free_port, post_json
from msa_cluster.cluster.keys import create_key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "serve"


def test_serve_config_validates_against_serve_schema_and_app_config():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (application,) = schema.applications
    assert application.import_path == "msa_cluster.cluster.serve_app:build_app"
    assert AppConfig.model_validate(application.args).cluster.start
    cfg = load_config(EXAMPLES / "app.yaml", environ={})
    assert cfg.deployment.num_replicas == "auto" and cfg.auth.keys_file and cfg.limits.max_tokens == 512


def _get(url: str, key: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@contextmanager
def _running(cmd: list[str], base: str, key: str, spec, log_path: Path):
    """Run a serving command until /readyz answers 200; on exit SIGINT it and clean Serve and the cluster up."""
    import ray
    from ray import serve

    from msa_cluster.cluster.placement import MemoryCluster

    log = open(log_path, "w")  # a file, not a pipe: a full pipe would block the server's logging
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + 240
        while _get(f"{base}/readyz", key) != 200:
            assert proc.poll() in (None, 0), log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(1)
        yield proc
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        assert ray.is_initialized()
        serve.shutdown()
        try:
            MemoryCluster.connect(spec).shutdown()
        except ValueError:
            pass


def _exercise(base: str, key: str) -> None:
    added = post_json(f"{base}/v1/memories", key, {"text": "The harbour master is Ines Varga.", "client_id": "hm"})
    assert added["data"][0]["client_id"] == "hm"
    hits = post_json(f"{base}/v1/memories/search", key, {"query": "Who is the harbour master?"})
    assert [h["id"] for h in hits["data"]] == [added["data"][0]["id"]]
    assert _get(f"{base}/v1/models", "msa-0-wrong") == 401


def test_serve_run_of_the_config_serves(ray_nodes, tmp_path):
    """`serve run CONFIG --address ...`: build_app starts the memory cluster and the app answers over HTTP."""
    exe = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if exe is None:
        pytest.skip("the `serve` command is not installed")
    key, _ = create_key(tmp_path / "keys.json", "acme")
    port = free_port()
    data = yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text())
    data["proxy_location"] = "HeadOnly"
    data["http_options"] = {"host": "127.0.0.1", "port": port}
    args = data["applications"][0]["args"]
    args.update(store=(tmp_path / "store").as_uri(), auth={"keys_file": str(tmp_path / "keys.json")})
    args["deployment"] = {"num_replicas": 1, "num_cpus": 0.25}
    args["cluster"] = {"name": "servecfg", "namespace": "msa-tests", "start": True, "num_shards": 1}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    base = f"http://127.0.0.1:{port}"
    spec = AppConfig.model_validate(args).cluster.spec()
    with _running([exe, "run", str(config), "--address", ray_nodes.address, "--non-blocking"], base, key, spec,
                  tmp_path / "serve.log"):
        _exercise(base, key)


def test_msa_serve_serves_until_interrupted(ray_nodes, tmp_path):
    """`msa serve --config app.yaml` with flags on top: starts the store and cluster, serves, and on SIGINT
    removes the app and the memory cluster it started."""
    import ray

    key, _ = create_key(tmp_path / "keys.json", "acme")
    port = free_port()
    cfg = yaml.safe_load((EXAMPLES / "app.yaml").read_text())
    cfg["deployment"] = {"num_replicas": 1, "num_cpus": 0.25}
    cfg["cluster"] = {"name": "msaserve", "namespace": "msa-tests", "start": False, "num_shards": 1}
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "msa_cluster.cluster.cli", "serve", "--config", str(config), "--store",
           (tmp_path / "store").as_uri(), "--keys-file", str(tmp_path / "keys.json"), "--port", str(port), "--start-cluster",
           "--create-store", "--address", ray_nodes.address, "--proxy-location", "HeadOnly"]
    base = f"http://127.0.0.1:{port}"
    spec = load_config(config, {"store": "x"}, environ={}).cluster.spec()
    log = tmp_path / "msa-serve.log"
    with _running(cmd, base, key, spec, log) as proc:
        _exercise(base, key)
        deadline = time.monotonic() + 60  # the app can answer a moment before serve.run returns and the line is printed
        while "serving msa-tiny at http://127.0.0.1:" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) in (0, 130)  # 130: the conventional status after Ctrl-C
    with pytest.raises(ValueError):
        ray.get_actor("msaserve-coordinator", namespace="msa-tests")  # the cluster it started is gone
