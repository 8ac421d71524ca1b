"""MSA configuration: a Qwen3 config plus the nested, typed `msa_config` of MSA-4B's config.json.

`MSAConfig` reads and writes the published `config.json` (model_type "msa"). The nested
`msa_config` dict is validated against `MemoryConfig`: an unknown key is an error, not a
silently ignored `None`. Choices the reference hard-codes (the template-head length, the
routing similarity) are typed fields whose defaults reproduce the reference's behaviour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, cast

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

from msa_cluster.types import ChunkReduce, HeadReduce, ModelFingerprint, QueryReduce, RoutingSpec, Similarity

__all__ = ["MSAConfig", "MemoryConfig", "parse_router_layers"]

_HEAD_REDUCE = ("mean", "max")
_QUERY_REDUCE = ("max", "mean", "last")
_CHUNK_REDUCE = ("max", "mean")
_SIMILARITY = ("dot", "cosine")
_LOSS_METHODS = ("INFONCE", "INFONCE_DECOUPLE", "INFONCE_FOCAL", "INFONCE_DECOUPLE_FOCAL", "BCE")


def parse_router_layers(spec: Any, num_layers: int) -> tuple[int, ...]:
    """`"all"`, `"18,19,20"` or a list of ints -> sorted unique layer indices in [0, num_layers)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return tuple(range(num_layers))
        try:
            layers = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"router_layer_idx must be 'all' or comma-separated ints, got {spec!r}") from None
    elif isinstance(spec, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        layers = list(spec)
    else:
        raise ValueError(f"router_layer_idx must be 'all', a comma-separated string or a list of ints, got {spec!r}")
    if not layers:
        raise ValueError("router_layer_idx selects no layer")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"router_layer_idx has layers {bad} outside [0, {num_layers})")
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class MemoryConfig:
    """The `msa_config` block: every key of MSA-4B's config.json (digest 7.1) plus typed extras."""

    router_layer_idx: str | list[int] = "all"
    top_k_docs: int = 16
    pooling_kernel_size: int = 64
    decouple_router: bool = True
    head_reduce_method: str = "mean"
    query_reduce_method: str = "max"
    chunk_reduce_method: str = "max"
    decouple_pooling_mode: str = "mean"
    aux_loss: bool = False
    aux_loss_method: str = "INFONCE_DECOUPLE"
    infonce_loss_temp: float = 0.1
    lmloss_weigth: float = 1.0  # (sic) the published key
    auxloss_weight: float = 0.1
    recloss_weight: float = 0.0
    ansloss_weight: float = 1.0
    rewrite_position: bool = True
    # Typed extras; defaults reproduce the reference.
    template_head_len: int = 3
    similarity: str | None = None  # None: derived from aux_loss_method as the reference's inference does
    # Pooled chunks one query may gather at one layer (the reference has no cap, digest 2.5): a
    # request over more raises ContextTooLargeError before its context is allocated. 4096 chunks
    # = 256K document tokens at P = 64: k = 16 documents of 16K tokens each.
    max_chunks_per_query: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.top_k_docs, bool) or not isinstance(self.top_k_docs, int) or self.top_k_docs < 1:
            raise ValueError(f"msa_config.top_k_docs must be an int >= 1, got {self.top_k_docs!r}")
        if isinstance(self.pooling_kernel_size, bool) or not isinstance(self.pooling_kernel_size, int) or self.pooling_kernel_size < 1:
            raise ValueError(f"msa_config.pooling_kernel_size must be an int >= 1, got {self.pooling_kernel_size!r}")
        if isinstance(self.max_chunks_per_query, bool) or not isinstance(self.max_chunks_per_query, int) or self.max_chunks_per_query < 1:
            raise ValueError(f"msa_config.max_chunks_per_query must be an int >= 1, got {self.max_chunks_per_query!r}")
        if not isinstance(self.template_head_len, int) or self.template_head_len < 1:
            raise ValueError(f"msa_config.template_head_len must be an int >= 1, got {self.template_head_len!r}")
        for name, allowed in (
            ("head_reduce_method", _HEAD_REDUCE),
            ("query_reduce_method", _QUERY_REDUCE),
            ("chunk_reduce_method", _CHUNK_REDUCE),
            ("aux_loss_method", _LOSS_METHODS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"msa_config.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.similarity is not None and self.similarity not in _SIMILARITY:
            raise ValueError(f"msa_config.similarity must be one of {_SIMILARITY}, got {self.similarity!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MemoryConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown msa_config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_similarity(self) -> str:
        """The reference normalises only when aux_loss_method == "INFONCE" exactly (digest 2.4)."""
        if self.similarity is not None:
            return self.similarity
        return "cosine" if self.aux_loss_method == "INFONCE" else "dot"


@strict
class MSAConfig(Qwen3Config):
    """Qwen3 config + `msa_config`. Loads MSA-4B's config.json as published.

    Example:
        >>> cfg = MSAConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                 num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=300,
        ...                 msa_config={"router_layer_idx": "1", "top_k_docs": 2})
        >>> cfg.routing_layers
        (1,)
    """

    model_type = "msa"

    msa_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        memory = MemoryConfig.from_dict(self.msa_config)
        parse_router_layers(memory.router_layer_idx, self.num_hidden_layers)
        self.msa_config = memory.to_dict()

    @property
    def kv_heads(self) -> int:
        """num_key_value_heads as an int (Qwen3Config fills it from num_attention_heads when unset)."""
        return int(self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads)

    @property
    def memory(self) -> MemoryConfig:
        return MemoryConfig.from_dict(self.msa_config)

    @property
    def routing_layers(self) -> tuple[int, ...]:
        return parse_router_layers(self.memory.router_layer_idx, self.num_hidden_layers)

    def routing_spec(self) -> RoutingSpec:
        m = self.memory
        return RoutingSpec(  # MemoryConfig validated each of these against the allowed values
            similarity=cast(Similarity, m.resolved_similarity),
            head_reduce=cast(HeadReduce, m.head_reduce_method),
            query_reduce=cast(QueryReduce, m.query_reduce_method),
            chunk_reduce=cast(ChunkReduce, m.chunk_reduce_method),
            num_heads=self.num_attention_heads,
            num_kv_heads=self.kv_heads,
        )

    def routing_scale(self) -> float:
        """1/sqrt(d) for dot product, 1 for cosine (digest 2.4); ranking does not depend on it."""
        return 1.0 if self.memory.resolved_similarity == "cosine" else self.head_dim**-0.5

    def fingerprint(self, dtype: str) -> ModelFingerprint:
        """What encoded memory depends on: everything but the generation-only fields."""
        arch = {
            k: v
            for k, v in sorted(self.to_dict().items())
            if k
            not in {"transformers_version", "_name_or_path", "architectures", "dtype", "use_cache", "id2label", "label2id"}
        }
        mem = dict(arch.get("msa_config") or {})
        for k in ("top_k_docs", "max_chunks_per_query", "aux_loss", "infonce_loss_temp", "lmloss_weigth", "auxloss_weight", "recloss_weight", "ansloss_weight"):
            mem.pop(k, None)  # selection/training knobs do not change the encoded tensors
        arch["msa_config"] = mem
        blob = json.dumps(arch, sort_keys=True, default=str).encode()
        return ModelFingerprint(
            config_hash=hashlib.sha256(blob).hexdigest(),
            routing_layers=self.routing_layers,
            dtype=dtype,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            chunk_size=self.memory.pooling_kernel_size,
        )

