"""`msa eval` on the Ray memory cluster: the sweep's memory as a store served by a `MemoryCluster`.

Every write goes through the coordinator (store commit, then served by every shard before it
returns), and every question through `ClusterMemory`, the backend a Serve replica uses: the same
path as production, on a local Ray node on loopback. The numbers must equal the in-process ones.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.memory import MemoryBackend
from msa_cluster.training.memory_eval import EVAL_TENANT
from msa_cluster.types import EncodedDocument

__all__ = ["RayEvalMemory"]


class RayEvalMemory:
    """A store in a temporary folder, served by a memory cluster of `num_shards` pairs; a context manager."""

    def __init__(self, model: MSAForCausalLM, num_shards: int = 2, name: str = "msa-eval"):
        import ray

        from msa_cluster.cluster.demo import start_local_ray
        from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster
        from msa_cluster.storage_adapters import MemoryStore

        self.work = Path(tempfile.mkdtemp(prefix="msa-eval-"))
        self.started_ray = not ray.is_initialized()
        store_url = (self.work / "store").as_uri()
        MemoryStore.open(store_url, model.fingerprint(), create=True).close()
        start_local_ray()
        spec = ClusterSpec(name=name, namespace=name, num_shards=num_shards, poll_s=1.0)
        self.cluster = MemoryCluster.start(store_url, model.fingerprint(), spec)
        self.backend: MemoryBackend = self.cluster.memory()

    def allocate_ids(self, count: int) -> list[int]:
        return self.cluster.allocate_ids(EVAL_TENANT, count=count)

    def add(self, docs: Sequence[EncodedDocument]) -> None:
        self.cluster.insert(docs)

    def delete(self, doc_ids: Sequence[int]) -> None:
        self.cluster.delete(doc_ids, tenant=EVAL_TENANT)

    def close(self) -> None:
        import ray

        try:
            self.cluster.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> RayEvalMemory:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
