"""What one routing round pays Ray for moving bytes, apart from scoring (issue 12).

N actors (default 2) are called in parallel, as a fan-out calls its router shards; every variant
is the median of interleaved repeats (`_common.interleaved`), so machine noise hits them alike:

    empty              one parallel call that carries and returns nothing (the fan-out's floor)
    query put          the same call with a B=1 routing query (T=64 x Hkv 8 x D 128 float32, 256 KiB)
                       put in the object store once and passed by reference, as `fan_out` does
    query by value     the same query passed by value (pickled into each call)
    answer 2 MiB       each actor returns 16 documents' K/V of one layer (16 x 128 KiB numpy,
                       bf16 bits), as a one-round answer at 1M tokens does
    answer 40 KiB      a small answer, under Ray's 100 KiB inline limit
    answer as refs     each actor returns object refs of K/V it put once beforehand, and the caller
                       gets all 16 (the alternative design: K/V kept as Ray objects on the shard)

    python bench/bench_wire_costs.py [--actors N] [--reps R]
    RAY_max_direct_call_object_size=4194304 python bench/bench_wire_costs.py   # Ray's inline limit at 4 MiB

Prints each variant's median and its extra over the empty call last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray socket on 127.0.0.1
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
from _common import interleaved  # noqa: E402

DOC_BYTES = 128 * 1024  # one 2,048-token document's K and V at one layer: 32 chunks x 8 x 128 x bf16 x 2
DOCS = 16


@ray.remote(num_cpus=0.25)
class _Shard:
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.kv = [rng.integers(-(2**15), 2**15, DOC_BYTES // 2, dtype=np.int16) for _ in range(DOCS)]
        self.refs = [ray.put(a) for a in self.kv]
        self.small = np.zeros(20 * 1024, np.int16)

    def empty(self, query=None) -> None:
        return None

    def answer(self, query=None) -> dict[int, np.ndarray]:
        return dict(enumerate(self.kv))

    def answer_small(self, query=None) -> np.ndarray:
        return self.small

    def answer_refs(self, query=None) -> list:
        return list(self.refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", namespace="msa-bench")
    try:
        shards = [_Shard.remote() for _ in range(args.actors)]  # type: ignore[attr-defined]
        ray.get([s.empty.remote() for s in shards], timeout=60)
        query = np.zeros((1, 64, 8, 128), np.float32)

        def call(method: str, q=None, get_refs: bool = False):
            def run():
                out = ray.get([getattr(s, method).remote(q) for s in shards], timeout=60)
                if get_refs:
                    ray.get([r for refs in out for r in refs[: DOCS // args.actors]], timeout=60)
            return run

        variants = {
            "empty": call("empty"),
            "query put": lambda: call("empty", ray.put(query))(),
            "query by value": call("empty", query),
            "answer 2 MiB": call("answer"),
            "answer 40 KiB": call("answer_small"),
            "answer as refs": call("answer_refs", get_refs=True),
        }
        t = interleaved(variants, args.reps)
    finally:
        ray.shutdown()
    limit = os.environ.get("RAY_max_direct_call_object_size", "102400 (default)")
    print(f"{args.actors} actors in parallel (Ray inline limit {limit} B), query {query.nbytes // 1024} KiB, answers {DOCS} x {DOC_BYTES // 1024} KiB; median ms")
    for name, s in t.items():
        print(f"  {name:16s} {s * 1e3:7.2f} ms  extra over empty {(s - t['empty']) * 1e3:+6.2f} ms")


if __name__ == "__main__":
    main()
