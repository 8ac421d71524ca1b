"""Session fixtures. One Ray cluster for the whole session: two nodes on loopback addresses.

Ray rewrites 127.0.0.1 to the machine's network address, but other loopback addresses are kept,
so the head runs on 127.0.0.2 and the worker on 127.0.0.3: all traffic stays on loopback.
Node processes are started with `ray start --block` in their own process groups and stopped
by pid at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

HEAD_IP = "127.0.0.2"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Notice a dead node within a couple of seconds instead of ~30 s.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _ray_cmd() -> list[str]:
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class RayNodes:
    address: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0

    def start_worker(self, ip: str, resources: dict, cpus: int = 4) -> None:
        cmd = _ray_cmd() + [
            "start", f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
            f"--resources={json.dumps(resources)}", "--object-store-memory=150000000", "--memory=2000000000",
            "--disable-usage-stats", "--block",
        ]
        self.procs[ip] = _spawn(cmd)

    def kill(self, ip: str) -> None:
        """SIGKILL a whole node (its raylet, workers, object store): a node crash."""
        _stop(self.procs.pop(ip), sig=signal.SIGKILL)

    def stop_all(self) -> None:
        for ip in list(self.procs)[::-1]:
            _stop(self.procs.pop(ip))


def _spawn(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, **RAY_ENV}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_nodes(ray, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(1 for node in ray.nodes() if node["Alive"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} Ray nodes came up")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_nodes():
    """A two-node Ray cluster on 127.0.0.2 (head) and 127.0.0.3, and a driver connected to it."""
    ray = pytest.importorskip("ray")
    os.environ.update(RAY_ENV)
    port = _free_port(HEAD_IP)
    nodes = RayNodes(address=f"{HEAD_IP}:{port}", port=port)
    head = _ray_cmd() + [
        "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--num-cpus=4",
        '--resources={"shard_slot": 4, "node_a": 100}', "--object-store-memory=150000000", "--memory=2000000000",
        "--include-dashboard=false", "--disable-usage-stats", "--block",
    ]
    nodes.procs[HEAD_IP] = _spawn(head)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.init(address=nodes.address, _node_ip_address=HEAD_IP, logging_level="WARNING", namespace="msa-tests")
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        nodes.start_worker("127.0.0.3", {"shard_slot": 4, "node_b": 100})
        _wait_nodes(ray, 2)
        yield nodes
    finally:
        ray.shutdown()
        nodes.stop_all()
