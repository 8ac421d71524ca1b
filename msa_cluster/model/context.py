"""Per-request decode state: the fixed sparse context of every layer, outside the nn.Module.

Legend: S filled slots, Hkv kv heads, D head dim.

Each layer's buffer holds [template head, selected chunks (routing layers only), prompt,
generated tokens] as K/V slots. Decoding appends to it in place (capacity doubles when full)
instead of concatenating a new tensor every step as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from msa_cluster.types import ScoredDoc

__all__ = ["LayerContext", "SparseContext"]


class LayerContext:
    """K/V slots of one layer: keys/values [capacity, Hkv, D], the first `length` filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int = 0):
        S = keys.shape[0]
        self.keys = keys.new_empty(S + reserve, *keys.shape[1:])
        self.values = values.new_empty(S + reserve, *values.shape[1:])
        self.keys[:S] = keys
        self.values[:S] = values
        self.length = S

    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append [n, Hkv, D] slots; returns the slot indices [n] they took."""
        n = k.shape[0]
        if self.length + n > self.keys.shape[0]:
            cap = max(2 * self.keys.shape[0], self.length + n)
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_empty(cap, *old.shape[1:])
                new[: self.length] = old[: self.length]
                setattr(self, name, new)
        self.keys[self.length : self.length + n] = k
        self.values[self.length : self.length + n] = v
        slots = torch.arange(self.length, self.length + n)
        self.length += n
        return slots

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[: self.length], self.values[: self.length]


@dataclass
class SparseContext:
    """Everything decoding needs after a prefill: per-layer slots and the next global position."""

    layers: list[LayerContext]
    next_position: int
    num_tokens: int  # prompt + generated tokens so far
    selected: dict[int, list[ScoredDoc]] = field(default_factory=dict)
    version: int | None = None

    @property
    def chunks_per_layer(self) -> dict[int, int]:
        return {layer: len(docs) for layer, docs in self.selected.items()}
