"""A writer killed with SIGKILL mid-segment-write or mid-commit leaves the last committed version intact."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from msa_cluster.storage_adapters import MemoryStore
from msa_cluster.storage_adapters._fs import StoreFS
from tests.storage_adapters.store_helpers import FP32, assert_same_doc, make_doc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

# The child commits versions 1 (ids 0-5 allocated) and 2 (documents 0-2), then starts a second insert and stops at the chosen point with
# half of the bytes written, says READY and waits to be killed.
_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.storage_adapters.store_helpers import FP32, make_doc
from msa_cluster.storage_adapters import MemoryStore, _fs
url, options, phase = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
store = MemoryStore.open(url, FP32, create=True, storage_options=options)
store.allocate_ids("default", count=6)
store.insert([make_doc(i) for i in range(3)])

def wait_for_kill():
    print("READY", flush=True)
    time.sleep(120)

def half_written_segment(self, rel, batch):
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    half = data[: len(data) // 2]
    if self.kind == "local":
        os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
        with open(self.path(rel), "wb") as f:
            f.write(half)
            f.flush()
            os.fsync(f.fileno())
    else:
        f = self.fs.open(self.path(rel), "wb")  # an upload that never completes
        f.write(half)
        f.flush()
    wait_for_kill()

def half_written_manifest(self, rel, data):
    if self.kind == "local":  # the temp file the local commit links into place
        tmp = os.path.join(os.path.dirname(self.path(rel)), ".tmp-killed")
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
    wait_for_kill()  # on S3 the conditional PUT of the manifest is never sent

if phase == "segment":
    _fs.StoreFS.write_ipc = half_written_segment
else:
    _fs.StoreFS.create_exclusive = half_written_manifest
store.insert([make_doc(i) for i in range(3, 6)])
print("NOT KILLED", flush=True)
"""


def _kill_mid_write(loc, phase: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, ROOT, loc.url, json.dumps(loc.storage_options), phase],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "READY", f"child did not reach the kill point: {line!r} {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["segment", "commit"])
def test_sigkill_mid_write_leaves_last_committed_version(shared_location, phase):
    """After SIGKILL mid-segment or mid-commit, reopening gives version 2 exactly, verified, and writable."""
    loc = shared_location
    _kill_mid_write(loc, phase)
    store = MemoryStore.open(loc.url, FP32, storage_options=loc.storage_options)
    assert store.latest_version() == 2
    snap = store.snapshot()
    assert snap.doc_ids("default") == [0, 1, 2]
    for d in snap.documents(tenant="default"):
        assert_same_doc(d, make_doc(d.doc_id))
    assert store.verify().documents == 3
    assert store.insert([make_doc(i) for i in range(3, 6)]).version == 3  # the re-run succeeds
    report = store.gc(grace_s=0, uncommitted_grace_s=0)
    fs = StoreFS(loc.url, loc.storage_options)
    leftovers = {f"{d}/{f.name}" for d in ("segments", "manifest") for f in fs.list(d)}
    assert leftovers == store.snapshot().manifest.files() | {"manifest/v000000000003.json"}
    if phase == "segment" and loc.protocol == "file":
        assert report.deleted_files  # the half-written segment file
    assert store.verify().documents == 6
