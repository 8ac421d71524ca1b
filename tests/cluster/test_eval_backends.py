"""`msa eval` through the Ray memory cluster gives the in-process numbers: same selections, answers and scores."""

from msa_cluster.cluster.evaluation import RayEvalMemory
from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.tokenizer import load_codec
from msa_cluster.training.memory_eval import SweepConfig, run_sweep


def test_ray_cluster_backend_equals_in_process(ray_nodes):
    model, codec = MSAForCausalLM.from_pretrained("msa-tiny-random"), load_codec("msa-tiny-random")
    cfg = SweepConfig(sizes=(2000,), tasks=("niah_multikey", "two_hop"), examples=1, max_answer_tokens=4)
    local = run_sweep(model, codec, cfg)
    with RayEvalMemory(model, num_shards=2, name="msa-eval-test") as memory:
        remote = run_sweep(model, codec, cfg, memory)
        assert memory.cluster.status().documents == local.sizes[0].documents - 16  # examples deleted again
    assert remote.sizes[0].records == local.sizes[0].records
    assert remote.sizes[0].scores == local.sizes[0].scores
    assert remote.sizes[0].tokens == local.sizes[0].tokens >= 2000
