"""The Ray Serve application: an OpenAI-compatible chat API with citations, and a memory API.

Run it with `msa serve --config app.yaml`, with `serve run` / `serve deploy` of a Serve config
whose application has `import_path: msa_cluster.cluster.serve_app:build_app` and an AppConfig as
`args` (examples/serve/), or from Python: `serve.run(build_app(config))`.

One deployment, `MSAGenerator`: each replica holds the model and a `ClusterMemory` (routing goes
from the replica straight to the router shards of the view the coordinator hands out) and serves
the FastAPI ingress. Replicas take fractional CPUs and scale with `deployment.num_replicas: auto`.
The memory cluster is found by name (`cluster.name`, `cluster.namespace`); `build_app` starts it
when `cluster.start` is true and none is running.

Routes (all need `Authorization: Bearer <key>`; a key maps to a tenant, see `cluster/keys.py`):
    POST /v1/chat/completions      OpenAI chat; `stream: true` for server-sent events; `msa_citations`
    GET  /v1/models, /v1/models/{model}
    POST /v1/memories              add documents: {"documents": [{"text", "client_id", "metadata", "source"}]}
    GET  /v1/memories?limit=&after= a page of the tenant's documents (by id, ascending)
    GET  /v1/memories/{ref}        one document; `ref` is its id (all digits) or its client id
    PUT  /v1/memories/{ref}        replace its text, metadata and source (same id and client id)
    DELETE /v1/memories/{ref}
    POST /v1/memories/search       routing only: {"query", "top_k"} -> documents and scores
    GET  /healthz, /readyz          (without a key when auth.public_health)
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and every response
carries an `x-request-id` header, also written to the access log (logger `msa_cluster.access`).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime, through Serve's wrapper.
import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from msa_cluster.cluster import replica_state
from msa_cluster.cluster.config import AppConfig, ConfigError, load_config
from msa_cluster.cluster.keys import KeyRing
from msa_cluster.cluster.schemas import AddMemories, ChatRequest, ReplaceMemory, RequestError, SearchRequest, parse_body
from msa_cluster.cluster.service import ApiError, Cancelled, ChatOutcome, MemoryService
from msa_cluster.types import (
    DocumentExistsError,
    LimitExceededError,
    MemoryFullError,
    QuotaExceededError,
    ShardUnavailableError,
    SnapshotGoneError,
    UnknownDocumentError,
)

__all__ = ["build_app", "MSAGenerator", "RateLimiter", "ensure_cluster", "error_status"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("msa_cluster.access")

app = FastAPI(title="msa-cluster", description="Long-term LLM memory with Memory Sparse Attention", docs_url=None,
              redoc_url=None, openapi_url=None)


# ---------------------------------------------------------------------------------------------- errors
def error_status(e: BaseException) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, error type, extra headers) of an exception the service raised."""
    retry = {"Retry-After": "2"}
    if isinstance(e, ApiError):
        return e.status, e.kind, e.headers
    if isinstance(e, RequestError):
        return e.status, "invalid_request_error", {}
    if isinstance(e, UnknownDocumentError):
        return 404, "not_found_error", {}
    if isinstance(e, DocumentExistsError):
        return 409, "conflict_error", {}
    if isinstance(e, QuotaExceededError):
        return 429, "quota_exceeded", {}
    if isinstance(e, LimitExceededError):
        return 422, "limit_exceeded", {}
    if isinstance(e, MemoryFullError):
        return 507, "memory_full", {}
    if isinstance(e, (ShardUnavailableError, SnapshotGoneError, TimeoutError, Cancelled)):
        return 503, "unavailable", retry
    if isinstance(e, ValueError):
        return 422, "invalid_request_error", {}
    return 500, "internal_error", {}


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message.splitlines()[0] if message else kind, "type": kind, "param": param, "code": code}}


def _error_response(e: BaseException, request_id: str) -> JSONResponse:
    status, kind, headers = error_status(e)
    if status == 500:
        log.exception("request %s failed", request_id, exc_info=e)
        message = f"internal error (request {request_id}); the server log has the details"
    else:
        message = str(e) or type(e).__name__
    param = getattr(e, "param", None)
    code = getattr(e, "code", None) or (getattr(e, "limit", None) if isinstance(e, LimitExceededError) else None)
    return JSONResponse(_error_body(message, kind, param, code), status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown paths and methods: 401 without a valid key (nothing is revealed), else 404 / 405."""
    server = replica_state.server
    if server is not None and server.keys is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or server.keys.tenant_of(token.strip()) is None:
            return JSONResponse(_error_body("a valid API key is required: send 'Authorization: Bearer <key>'",
                                            "authentication_error", code="invalid_api_key"), 401,
                                headers={"WWW-Authenticate": "Bearer"})
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(_error_body(f"{exc.detail}: {request.method} {request.url.path}", kind), exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return JSONResponse(_error_body(f"invalid request: {exc.errors()[0].get('msg', 'bad input')}", "invalid_request_error"), 422)


# ---------------------------------------------------------------------------------------------- rate limits
@ray.remote(num_cpus=0)
class RateLimiter:
    """Token buckets per API key, shared by every replica of an app (a named actor)."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)

    def take(self, key_id: str, per_s: float, burst: int) -> float:
        """0.0 if the request may go now, else the seconds until it may."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key_id, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * per_s)
        if tokens >= 1.0:
            self.buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self.buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / per_s


# ---------------------------------------------------------------------------------------------- the deployment


@app.middleware("http")
async def _request_context(request: Request, call_next: Callable[[Request], Any]) -> Response:
    """Request id (Serve's proxy passes the client's X-Request-ID, or makes one), access log line, metrics."""
    given = request.headers.get("x-request-id", "")
    request_id = given[:128] if given.isprintable() and given.strip() else uuid.uuid4().hex
    request.state.request_id, request.state.tenant = request_id, "-"
    t0 = time.perf_counter()
    response: Response = await call_next(request)
    response.headers["x-request-id"] = request_id
    route = _route_name(request)
    seconds = time.perf_counter() - t0
    server = replica_state.server
    if server is not None and server.metrics is not None:
        server.metrics.request(route, response.status_code, request.state.tenant, seconds)
    access_log.info("%s %s %s %d tenant=%s %.1fms", request_id, request.method, request.url.path, response.status_code,
                    request.state.tenant, seconds * 1000)
    return response


def _route_name(request: Request) -> str:
    r = request.scope.get("route")
    return getattr(r, "path", None) or "unmatched"


def _int_param(raw: str | None, name: str, default: int, lowest: int) -> int:
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d{1,18}", raw) or int(raw) < lowest:
        raise RequestError(f"query parameter {name} must be an integer >= {lowest}, got {raw[:40]!r}", param=name)
    return int(raw)


def _usage(out: ChatOutcome) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


@serve.deployment(name="MSAGenerator")
@serve.ingress(app)
class MSAGenerator:
    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from msa_cluster.actors.generator import Generator
        from msa_cluster.actors.memory import ClusterMemory
        from msa_cluster.cluster.metrics import ApiMetrics

        cfg = self.cfg = AppConfig.model_validate(config)
        torch.set_num_threads(cfg.deployment.torch_threads)
        coordinator = ray.get_actor(f"{cfg.cluster.name}-coordinator", namespace=cfg.cluster.namespace)
        memory = ClusterMemory(coordinator, timeout_s=cfg.cluster.timeout_s, batch_window_s=cfg.deployment.batch_window_s)
        gen = Generator.from_checkpoint(cfg.model, memory)
        self.metrics: ApiMetrics | None = ApiMetrics()
        self.service = MemoryService(cfg, gen, coordinator, observer=self.metrics.observer())
        self.keys = None if cfg.auth.disabled else KeyRing(cfg.auth.keys_file or "", cfg.auth.reload_s)
        self.limiter = RateLimiter.options(  # type: ignore[attr-defined]
            name=f"{cfg.app_name}-rate-limiter", namespace=cfg.cluster.namespace, get_if_exists=True, lifetime="detached",
        ).remote() if cfg.limits.requests_per_minute else None
        self.slots = asyncio.Semaphore(cfg.limits.max_concurrent_requests)
        self.pool = ThreadPoolExecutor(max_workers=cfg.limits.max_concurrent_requests + 4, thread_name_prefix="msa-req")
        replica_state.server = self

    # ------------------------------------------------------------------ the common path of every route
    async def _admit(self, request: Request, *, public: bool = False) -> str:
        """The request's tenant: checks the key (401) and the key's rate (429)."""
        if self.keys is None:
            request.state.tenant = self.cfg.auth.anonymous_tenant
            return request.state.tenant
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        tenant = self.keys.tenant_of(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            if public:
                return ""
            self._count_error("unauthorized")
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", kind="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.tenant = tenant
        await self._rate(self.keys.key_id_of(token.strip()))
        return tenant

    async def _rate(self, key_id: str) -> None:
        lim = self.cfg.limits
        if self.limiter is None or lim.requests_per_minute is None:
            return
        try:
            wait = await asyncio.wait_for(self.limiter.take.remote(key_id, lim.requests_per_minute / 60.0, lim.burst), 2.0)
        except Exception as e:  # the limiter is down or slow: serve rather than fail every request
            log.warning("rate limiter unavailable (%s); request admitted", type(e).__name__)
            return
        if wait > 0:
            self._count_error("rate_limited")
            raise ApiError(429, f"requests_per_minute={lim.requests_per_minute:g} exceeded for this API key (burst "
                                f"{lim.burst}); retry in {wait:.1f} s", kind="rate_limit_exceeded", code="requests_per_minute",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"max_body_bytes={limit} exceeded: the body is {declared} bytes", code="max_body_bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"max_body_bytes={limit} exceeded: the body is over {limit} bytes", code="max_body_bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _slot(self) -> None:
        lim = self.cfg.limits
        try:
            await asyncio.wait_for(self.slots.acquire(), lim.queue_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(503, f"overloaded: no request slot freed within queue_timeout_s={lim.queue_timeout_s:g} s "
                                f"({lim.max_concurrent_requests} requests running); retry later", kind="overloaded",
                           headers={"Retry-After": str(lim.retry_after_s)}) from None

    async def _run(self, fn: Callable[[], Any], cancelled: threading.Event | None = None) -> Any:
        """Run blocking work on the request pool, holding a slot, within request_timeout_s."""
        lim = self.cfg.limits
        await self._slot()
        try:
            fut = asyncio.get_running_loop().run_in_executor(self.pool, fn)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), lim.request_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                if cancelled is not None:
                    cancelled.set()
                raise ApiError(503, f"request_timeout_s={lim.request_timeout_s:g} exceeded; retry later", kind="timeout",
                               headers={"Retry-After": str(lim.retry_after_s)}) from None
        finally:
            self.slots.release()

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.error(kind)

    async def _handle(self, request: Request, work: Callable[[str], Any], *, status: int = 200, public: bool = False) -> Response:
        """Admit, run `work(tenant)` (a coroutine function), and map its errors onto HTTP."""
        try:
            tenant = await self._admit(request, public=public)
            result = await work(tenant)
            if isinstance(result, Response):
                return result
            return JSONResponse(result, status_code=status)
        except Exception as e:
            status_code, kind, _ = error_status(e)
            if not isinstance(e, ApiError) or status_code >= 500:
                self._count_error(type(e).__name__)
            elif kind not in ("authentication_error", "rate_limit_exceeded"):
                self._count_error(kind)
            return _error_response(e, request.state.request_id)

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            req = parse_body(await self._body(request), ChatRequest)
            if req.stream:
                self.service.plan_chat(req)  # a request that cannot run is refused before the stream's 200
                return await self._stream(req, tenant)
            cancelled = threading.Event()
            out: ChatOutcome = await self._run(lambda: self.service.chat(tenant, req, cancelled=cancelled), cancelled)
            return self._completion(out, req)

        return await self._handle(request, work)

    def _completion(self, out: ChatOutcome, req: ChatRequest) -> dict[str, Any]:
        return {
            "id": out.id, "object": "chat.completion", "created": out.created, "model": self.cfg.served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason,
                         "logprobs": None}],
            "usage": _usage(out),
            "msa_citations": out.citations,
            "msa": {"finish_reason": out.msa_finish_reason, "rounds": out.rounds, "version": out.version, "timing": out.timing},
        }

    async def _stream(self, req: ChatRequest, tenant: str) -> StreamingResponse:
        """Server-sent events: a role chunk, content deltas, then a last chunk with finish_reason and
        msa_citations (and usage when stream_options.include_usage), then `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        created, cid, model = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}", self.cfg.served_model_name
        await self._slot()  # before the 200: an overloaded server still answers 503
        started = threading.Event()

        def release_unstarted() -> None:  # a client gone before the first byte: the stream never ran
            if not started.is_set():
                started.set()
                self.slots.release()

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        def produce() -> None:
            try:
                def on_delta(d: str) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", d))

                out = self.service.chat(tenant, req, on_delta=on_delta, cancelled=cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", out))
            except BaseException as e:  # delivered to the stream as an error event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        async def events() -> AsyncIterator[str]:
            if started.is_set():
                return
            started.set()
            deadline = time.monotonic() + self.cfg.limits.request_timeout_s
            fut = loop.run_in_executor(self.pool, produce)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        kind, item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.001))
                    except (asyncio.TimeoutError, TimeoutError):
                        cancelled.set()
                        kind, item = "error", ApiError(503, f"request_timeout_s={self.cfg.limits.request_timeout_s:g} "
                                                            "exceeded; retry later", kind="timeout")
                    if kind == "delta":
                        yield chunk({"content": item})
                        continue
                    if kind == "error":
                        status, etype, _ = error_status(item)
                        self._count_error(etype if status < 500 else type(item).__name__)
                        if status >= 500 and not isinstance(item, ApiError):
                            log.error("stream %s failed: %s: %s", cid, type(item).__name__, item)
                        msg = str(item) if status < 500 or isinstance(item, ApiError) else f"internal error ({cid})"
                        yield f"data: {json.dumps(_error_body(msg, etype, code=str(status)))}\n\n"
                        break
                    out: ChatOutcome = item
                    last = {"msa_citations": out.citations,
                            "msa": {"finish_reason": out.msa_finish_reason, "rounds": out.rounds, "version": out.version, "timing": out.timing}}
                    yield chunk({}, out.finish_reason, **last)
                    if req.stream_options is not None and req.stream_options.include_usage:
                        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": _usage(out)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client that went away stops the generation at its next token
                fut.add_done_callback(lambda _: self.slots.release())

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release_unstarted))

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            return {"object": "list", "data": [self._model_card()]}

        return await self._handle(request, work)

    @app.get("/v1/models/{model:path}")
    async def model(self, request: Request, model: str) -> Response:
        async def work(tenant: str) -> Any:
            if model != self.cfg.served_model_name:
                raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found", param="model")
            return self._model_card()

        return await self._handle(request, work)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "msa-cluster"}

    # ------------------------------------------------------------------ memory API
    @app.post("/v1/memories")
    async def add_memories(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            req = parse_body(await self._body(request), AddMemories)
            return await self._run(lambda: self.service.add(tenant, req))

        return await self._handle(request, work, status=201)

    @app.get("/v1/memories")
    async def list_memories(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            q = request.query_params
            unknown = sorted(set(q) - {"limit", "after"})
            if unknown:
                raise RequestError(f"unknown query parameters: {', '.join(unknown)} (use limit and after)")
            limit = _int_param(q.get("limit"), "limit", 100, 1)
            after = _int_param(q.get("after"), "after", -1, -1)
            return await self._run(lambda: self.service.list(tenant, after, limit))

        return await self._handle(request, work)

    @app.post("/v1/memories/search")
    async def search_memories(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            req = parse_body(await self._body(request), SearchRequest)
            return await self._run(lambda: self.service.search(tenant, req))

        return await self._handle(request, work)

    @app.get("/v1/memories/{ref}")
    async def get_memory(self, request: Request, ref: str) -> Response:
        async def work(tenant: str) -> Any:
            return await self._run(lambda: self.service.get(tenant, ref))

        return await self._handle(request, work)

    @app.put("/v1/memories/{ref}")
    async def replace_memory(self, request: Request, ref: str) -> Response:
        async def work(tenant: str) -> Any:
            req = parse_body(await self._body(request), ReplaceMemory)
            return await self._run(lambda: self.service.replace(tenant, ref, req))

        return await self._handle(request, work)

    @app.delete("/v1/memories/{ref}")
    async def delete_memory(self, request: Request, ref: str) -> Response:
        async def work(tenant: str) -> Any:
            return await self._run(lambda: self.service.delete(tenant, ref))

        return await self._handle(request, work)

    # ------------------------------------------------------------------ health
    @app.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            return {"status": "ok"}

        return await self._handle(request, work, public=self.cfg.auth.public_health)

    @app.get("/readyz")
    async def readyz(self, request: Request) -> Response:
        async def work(tenant: str) -> Any:
            try:
                version = await asyncio.get_running_loop().run_in_executor(self.pool, self.service.ready)
            except Exception as e:
                raise ApiError(503, f"the memory cluster is not answering: {type(e).__name__}: {e}", kind="unavailable",
                               headers={"Retry-After": str(self.cfg.limits.retry_after_s)}) from None
            if version < 0:
                raise ApiError(503, "the memory cluster is starting or recovering", kind="unavailable",
                               headers={"Retry-After": str(self.cfg.limits.retry_after_s)})
            return {"status": "ready", "version": version}

        return await self._handle(request, work, public=self.cfg.auth.public_health)


# ---------------------------------------------------------------------------------------------- building the app
def ensure_cluster(cfg: AppConfig) -> bool:
    """Find the memory cluster by name; start it when `cluster.start` (returns True if started)."""
    from msa_cluster.cluster.placement import MemoryCluster

    name = f"{cfg.cluster.name}-coordinator"
    try:
        ray.get_actor(name, namespace=cfg.cluster.namespace)
        return False
    except ValueError:
        if not cfg.cluster.start:
            raise ConfigError(f"no memory cluster {name!r} in Ray namespace {cfg.cluster.namespace!r}; start one "
                              "(cluster.start: true, or `msa serve --start-cluster`)") from None
    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.storage_adapters import MemoryStore

    fingerprint = MSAForCausalLM.from_pretrained(cfg.model).fingerprint()
    MemoryStore.open(cfg.store, fingerprint, create=cfg.create_store, storage_options=cfg.storage_options).close()
    MemoryCluster.start(cfg.store, fingerprint, cfg.cluster.spec(), storage_options=cfg.storage_options or None)
    return True


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Any:
    """The Serve application for `serve run` / `serve deploy` (`args`: an AppConfig as a dict, merged
    over the environment's MSA_* settings) or for `serve.run(build_app(cfg))`."""
    cfg = args if isinstance(args, AppConfig) else load_config(overrides=args or {})
    ensure_cluster(cfg)
    return MSAGenerator.options(**cfg.deployment.serve_options()).bind(cfg.model_dump())  # type: ignore[attr-defined]
