"""Run in a fresh process: start a whole new local Ray cluster, a memory cluster over a store,
optionally insert documents through it, print the routing selections as JSON, shut Ray down.

Used by test_ray_restart.py to show that nothing committed lives only in Ray.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})

import ray  # noqa: E402

from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster  # noqa: E402
from tests.actors.helpers import allocate_like, corpus, tiny_model  # noqa: E402
from tests.model.helpers import random_prompt  # noqa: E402


def main(url: str, insert_from: int | None) -> None:
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        model = tiny_model()
        cluster = MemoryCluster.start(url, model.fingerprint(), ClusterSpec(name="restart", num_shards=2, timeout_s=60))
        if insert_from is not None:
            new = corpus(model)[insert_from:]
            allocate_like(cluster, new)
            cluster.insert(new)
        ids, mask = random_prompt(model, 12, seed=7)
        out = {t: model.prefill(ids, cluster.memory(), mask, tenant=t).selected for t in ("acme", "globex")}
        docs = sum(ray.get(r.stats.remote())["documents"] for r in cluster.routers)
        cluster.shutdown()
        print("RESULT " + json.dumps({"selected": {t: {str(k): v for k, v in s.items()} for t, s in out.items()}, "documents": docs}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
