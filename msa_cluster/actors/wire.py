"""What crosses Ray on a routing layer: the query once, and each shard's answer with its K/V, as numpy.

Legend: B query rows, T tokens, Hr routing heads, Hkv kv heads, D head dim, C chunks.

Ray moves numpy arrays through the shared-memory object store without a pickle copy (a reader
gets a read-only view), while torch tensors are pickled through bytes: 2.6x slower for K/V.
numpy has no bfloat16, so bf16 travels as its int16 bit pattern and the dtype's name beside it.
In one process (plain shards, tests) the arrays are views of the shard's tensors: nothing is copied
until the generator assembles a row's context once, in `assemble`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msa_cluster.types import RoutingQuery, RoutingSpec, ScoredDoc

__all__ = ["WireQuery", "ShardAnswer", "to_numpy", "assemble"]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16 as its int16 bits); a copy only when `t` is not contiguous."""
    t = t.detach().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


@dataclass(frozen=True)
class WireQuery:
    """A RoutingQuery as numpy: vectors [B, T, Hr, D] float32 and mask [B, T] bool."""

    vectors: np.ndarray
    mask: np.ndarray
    spec: RoutingSpec
    folded: bool

    @classmethod
    def of(cls, query: RoutingQuery) -> WireQuery:
        return cls(to_numpy(query.vectors), query.mask.detach().contiguous().numpy(), query.spec, query.folded)

    def query(self) -> RoutingQuery:
        """Back to torch; arrays Ray handed over read-only are copied (the query is small: B * T * Hr * D floats)."""
        vec, mask = (a if a.flags.writeable else a.copy() for a in (self.vectors, self.mask))
        return RoutingQuery(torch.from_numpy(vec), torch.from_numpy(mask), self.spec, self.folded)


@dataclass(frozen=True)
class ShardAnswer:
    """One router shard's reply to one round: its local top-k per row and those documents' K/V.

    selected[b]: local top-k of row b, best first. kv[(doc_id, version)] = (K, V), each
    [C, Hkv, D] numpy in `dtype` (bf16 as int16 bits), of every document in `selected` at the
    version its row pinned. Local candidates that lose the global merge travel too: at most
    (shards - 1) * top_k documents per row more than the winners.
    """

    selected: list[list[ScoredDoc]]
    kv: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    dtype: str

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


def assemble(
    rows: Sequence[list[ScoredDoc]], versions: Sequence[int], answers: Sequence[ShardAnswer]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each row's K, V [sum C, Hkv, D] in the order of its documents, copied once into a new buffer.

    versions[b]: the version row b pinned. An empty row gets empty tensors (as InProcessMemory gives).
    """
    found: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for a in answers:
        found.update(a.kv)
    dtype = _dtype(answers[0].dtype) if answers else torch.float32
    keys, values = [], []
    for row, version in zip(rows, versions):
        pieces = [found[(d.doc_id, version)] for d in row]
        keys.append(_concat([k for k, _ in pieces], dtype))
        values.append(_concat([v for _, v in pieces], dtype))
    return keys, values


def _concat(parts: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """One tensor [sum C, Hkv, D] of `dtype`, filled by one copy of each part."""
    if not parts:
        return torch.empty(0)
    out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype)
    dst = to_numpy(out)  # a view of `out`: the copies below fill the tensor
    start = 0
    for p in parts:
        dst[start : start + p.shape[0]] = p
        start += p.shape[0]
    return out
