"""The app's configuration: one pydantic model, merged from a YAML file, the environment and flags.

Precedence, lowest first: defaults < YAML file < environment (`MSA_<FIELD>`, nested fields with
`__`, e.g. `MSA_LIMITS__MAX_TOKENS=128`) < flags / explicit overrides. `msa serve`, `msa demo`,
`serve run` / `serve deploy` (through `build_app(args)`) and the operations commands all use it.
Unknown keys are errors, so a misspelt setting never passes silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from msa_cluster.cluster.placement import ClusterSpec

__all__ = ["AppConfig", "AuthConfig", "ClusterConfig", "ConfigError", "DeploymentConfig", "IngestConfig", "LimitsConfig", "load_config",
           "env_overrides", "merge"]

ENV_PREFIX = "MSA_"


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the setting and the reason, in one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AuthConfig(_Strict):
    keys_file: str | None = None  # API keys file (hashes only; `msa keys create`); required unless disabled
    disabled: bool = False  # no keys: every request is tenant `anonymous_tenant` (a laptop only; never exposed)
    anonymous_tenant: str = "default"
    public_health: bool = False  # /healthz and /readyz without a key (for load-balancer probes)
    reload_s: float = Field(default=2.0, ge=0)  # how often the keys file is checked for changes (revocations)

    @model_validator(mode="after")
    def _keys_or_disabled(self) -> AuthConfig:
        if not self.disabled and not self.keys_file:
            raise ValueError("auth.keys_file is required (create one with `msa keys create --tenant T --keys-file PATH`), "
                             "or set auth.disabled: true on a machine nobody else can reach")
        return self


class LimitsConfig(_Strict):
    """Every bound a client can hit; each has a default a laptop can serve."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # 413 over it
    max_prompt_tokens: int = Field(default=4096, ge=16)  # the conversation as the model reads it; 422 over it
    max_tokens: int = Field(default=512, ge=1)  # a request's max_tokens; 422 over it
    default_max_tokens: int = Field(default=128, ge=1)  # when a request does not say
    max_top_k: int = Field(default=64, ge=1)  # documents routed per layer (msa_top_k, search top_k); 422 over it
    max_rounds: int = Field(default=4, ge=1)  # memory-interleave reading rounds (msa_max_rounds); 422 over it
    max_chunks_per_query: int | None = Field(default=None, ge=1)  # gathered chunks per query; None: the model's own
    max_messages: int = Field(default=256, ge=1)
    max_stop: int = Field(default=4, ge=0)  # stop strings per request, as OpenAI
    max_documents_per_request: int = Field(default=256, ge=1)
    max_document_tokens: int | None = Field(default=None, ge=1)  # None: the model's position limit
    max_page_size: int = Field(default=1000, ge=1)
    max_documents_per_tenant: int | None = Field(default=1_000_000, ge=1)  # quota; 429 over it
    max_tokens_per_tenant: int | None = Field(default=500_000_000, ge=1)  # quota; 429 over it
    requests_per_minute: float | None = Field(default=600.0, gt=0)  # per API key, shared by all replicas; 429 over it
    burst: int = Field(default=60, ge=1)  # requests a key may make at once before the rate applies
    max_concurrent_requests: int = Field(default=8, ge=1)  # per replica; more wait up to queue_timeout_s
    queue_timeout_s: float = Field(default=10.0, gt=0)  # then 503 with Retry-After
    request_timeout_s: float = Field(default=120.0, gt=0)  # a request's whole run; then 503 with Retry-After
    retry_after_s: int = Field(default=2, ge=1)


class DeploymentConfig(_Strict):
    """The Serve deployment of generator replicas (each holds the model and a ClusterMemory)."""

    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(default=1, ge=0)  # autoscaling bounds, used when num_replicas is "auto"
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)
    num_cpus: float = Field(default=0.5, gt=0)  # fractional, so the whole app fits a 2-core laptop
    num_gpus: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)  # Serve answers 503 beyond it; -1: unbounded
    batch_window_s: float = Field(default=0.002, ge=0)  # concurrent requests' routing calls share fan-outs

    def serve_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.num_replicas == "auto":
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ClusterConfig(_Strict):
    """How the app finds the memory cluster: by `name` in Ray `namespace`; `start` starts it when absent."""

    name: str = "msa"
    namespace: str = "msa"
    start: bool = False
    num_shards: int | None = Field(default=None, ge=1)
    cpus_per_actor: float = Field(default=0.25, gt=0)
    router_capacity_bytes: int | None = Field(default=None, ge=1)
    kv_budget_bytes: int = Field(default=1 << 30, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    write_timeout_s: float = Field(default=300.0, gt=0)
    poll_s: float = Field(default=2.0, ge=0)
    grace_s: float = Field(default=300.0, ge=0)

    def spec(self) -> ClusterSpec:
        return ClusterSpec(name=self.name, namespace=self.namespace, num_shards=self.num_shards,
                           cpus_per_actor=self.cpus_per_actor, router_capacity_bytes=self.router_capacity_bytes,
                           kv_budget_bytes=self.kv_budget_bytes, timeout_s=self.timeout_s,
                           write_timeout_s=self.write_timeout_s, poll_s=self.poll_s, grace_s=self.grace_s)


class IngestConfig(_Strict):
    """`msa ingest` / `msa reencode`: commit cadence, the encoder pool, long documents."""

    commit_every: int = Field(default=256, ge=1)  # documents per commit (a crash repeats at most one batch)
    commit_interval_s: float = Field(default=30.0, gt=0)  # or a commit at least this often
    long_documents: Literal["split", "reject"] = "split"  # over limits.max_document_tokens
    num_encoders: int = Field(default=1, ge=1)  # EncoderActors (one GPU each when the cluster has GPUs)
    encoder_cpus: float = Field(default=1.0, gt=0)
    encoder_gpus: float | None = Field(default=None, ge=0)  # None: 1 when the cluster has GPUs
    encode_timeout_s: float = Field(default=600.0, gt=0)
    progress_s: float = Field(default=5.0, gt=0)


class AppConfig(_Strict):
    store: str  # the memory store's URL (file://, s3://, any fsspec URL)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    create_store: bool = False  # create an empty store for the model when none exists
    model: str = "msa-tiny"  # a checkpoint directory or a bundled model name
    model_name: str | None = None  # the id in /v1/models and responses; default: the checkpoint's name
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = "/"
    app_name: str = "msa"
    mode: Literal["interleave", "one_round"] = "interleave"  # the default; a request may ask for the other
    max_round_tokens: int = Field(default=64, ge=1)
    max_context_tokens: int = Field(default=8192, ge=64)
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig(disabled=True))  # replaced by _auth_given
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig())
    cluster: ClusterConfig = Field(default_factory=lambda: ClusterConfig())
    ingest: IngestConfig = Field(default_factory=lambda: IngestConfig())

    @field_validator("store")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must be a URL, e.g. file:///data/memory or s3://bucket/memory")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _auth_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("auth") is None:
            raise ValueError("auth is required: auth.keys_file (create one with `msa keys create --tenant T "
                             "--keys-file PATH`), or auth.disabled: true on a machine nobody else can reach")
        return data

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, anything else in `over` replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`MSA_LIMITS__MAX_TOKENS=128` -> {"limits": {"max_tokens": 128}}; values are read as YAML scalars."""
    environ = os.environ if environ is None else environ
    fields = set(AppConfig.model_fields)
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in fields:  # other MSA_* variables (e.g. the test profile) are not config
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> AppConfig:
    """Defaults < YAML file at `path` < environment < `overrides` (flags), validated; ConfigError otherwise."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded or {}
    data = merge(merge(data, env_overrides(environ)), {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}" + (f" (got {json.dumps(err.get('input'), default=str)[:60]})"
                                                 if err["type"] != "missing" else ""))
    return "invalid config: " + "; ".join(parts)
