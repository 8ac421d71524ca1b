"""Per-request decode state: the fixed sparse context of every layer, outside the nn.Module.

Legend: S filled slots, Hkv kv heads, D head dim.

Each layer's buffer holds [template head, selected chunks (routing layers only), prompt,
generated tokens] as K/V slots. Prefill assembles it once: each part is copied straight into its
slots of one buffer sized for the prompt and the reserved decode steps (no `cat` and no second
copy). Decoding appends to it in place (capacity doubles when full) instead of concatenating a
new tensor every step as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from msa_cluster.types import ScoredDoc

__all__ = ["LayerContext", "SparseContext"]


class LayerContext:
    """K/V slots of one layer: keys/values [capacity, Hkv, D], the first `length` filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """keys, values: [capacity, Hkv, D] buffers whose first `length` slots are filled."""
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def assemble(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], reserve: int = 0) -> LayerContext:
        """One context from parts [n_i, Hkv, D] laid out in order, plus `reserve` free slots.

        Under no_grad / inference_mode each part is copied once, straight into its slots of one
        buffer. With grad enabled (training) the parts are concatenated instead, so that autograd
        sees a plain `cat` and no in-place write (`reserve` is then left to `append`'s growth).
        """
        S = sum(int(part.shape[0]) for part in keys)
        if torch.is_grad_enabled():
            return cls(torch.cat(list(keys)), torch.cat(list(values)), S)
        ctx = cls(keys[0].new_empty(S + reserve, *keys[0].shape[1:]), values[0].new_empty(S + reserve, *values[0].shape[1:]), 0)
        for k, v in zip(keys, values):
            n = int(k.shape[0])
            ctx.keys[ctx.length : ctx.length + n] = k
            ctx.values[ctx.length : ctx.length + n] = v
            ctx.length += n
        return ctx

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
