"""Compute kernels: each op has a readable `<op>_ref` and a dispatcher that picks by device.

`route_top_k` is the routing selection: exact (the canonical float64 scores of `doc_scores_ref`)
at the cost of the fp32 first pass (`doc_scores`).
"""

from msa_cluster.kernels.attention import gathered_attention, gathered_attention_ref
from msa_cluster.kernels.pooling import chunk_mean, chunk_mean_ref, num_chunks
from msa_cluster.kernels.routing import (
    doc_scores,
    doc_scores_ref,
    merge_top_k,
    normalize_heads,
    prepare_queries,
    select_top_k,
)
from msa_cluster.kernels.routing_exact import route_top_k

__all__ = [
    "chunk_mean",
    "chunk_mean_ref",
    "doc_scores",
    "doc_scores_ref",
    "gathered_attention",
    "gathered_attention_ref",
    "merge_top_k",
    "normalize_heads",
    "num_chunks",
    "prepare_queries",
    "route_top_k",
    "select_top_k",
]
