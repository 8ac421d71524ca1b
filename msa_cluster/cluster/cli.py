"""The `msa` command line. The CLI owns output and logging set-up."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _load_corpus(path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SystemExit(f"{path}:{n}: each line must be a JSON object with a string 'text'")
        rows.append(row)
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole system on this machine over HTTP: local Ray, a store, the memory cluster, the Serve app."""
    from msa_cluster.cluster.demo import SAMPLE_QUESTIONS, run_demo

    rows = None if args.corpus is None else _load_corpus(args.corpus)  # None: the sample corpus, whose answers are known
    questions = args.question or (list(SAMPLE_QUESTIONS) if args.corpus is None else [SAMPLE_QUESTIONS[0]])
    return run_demo(args.model, questions, max_tokens=args.max_tokens, max_rounds=args.max_rounds, mode=args.mode,
                    keep=args.keep, corpus=rows)


def _app_config(args: argparse.Namespace) -> Any:
    """The AppConfig of a command: --config YAML < MSA_* environment < flags."""
    from msa_cluster.cluster.config import load_config

    flags: dict[str, Any] = {"store": args.store, "model": args.model, "host": getattr(args, "host", None),
                             "port": getattr(args, "port", None)}
    if getattr(args, "keys_file", None):
        flags["auth"] = {"keys_file": args.keys_file}
    if getattr(args, "start_cluster", False):
        flags["cluster"] = {"start": True}
    if getattr(args, "create_store", False):
        flags["create_store"] = True
    return load_config(args.config, flags)


def recorded_ray_alive(timeout_s: float = 2.0) -> bool | None:
    """Whether the Ray cluster that `ray.init(address="auto")` would join (RAY_ADDRESS, else the address
    the last `ray start` on this machine recorded) accepts a TCP connection; None when there is none
    or it cannot be told. Ray itself retries a dead recorded address for a long while."""
    import socket

    try:
        from ray._private.services import get_ray_address_from_environment

        recorded = get_ray_address_from_environment("auto", None)
    except Exception:  # a private Ray API: if it moves, fall back to Ray's own behaviour
        return None
    host, _, port = str(recorded or "").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _connect_ray(address: str | None) -> bool:
    """Connect to `address` (or a running cluster found by Ray), else start a local one; True if started here."""
    import ray

    from msa_cluster.cluster.demo import start_local_ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING, namespace="msa")
        return False
    if recorded_ray_alive() is False:  # a cluster that died left its address behind: don't wait on it
        start_local_ray()
        return True
    try:
        ray.init(address="auto", logging_level=logging.WARNING, namespace="msa")
        return False
    except ConnectionError:
        start_local_ray()
        return True


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the Serve app (and the memory cluster with --start-cluster) and serve until interrupted."""
    import signal
    import threading

    import ray
    from ray import serve

    from msa_cluster.cluster.serve_app import build_app, ensure_cluster

    cfg = _app_config(args)
    local = _connect_ray(args.address)
    started = False
    try:
        started = ensure_cluster(cfg)
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=args.proxy_location)
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        print(f"serving {cfg.served_model_name} at http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1 "
              f"(store {cfg.store}); Ctrl-C stops", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        try:
            serve.delete(cfg.app_name)
        except Exception as e:  # already gone, or Serve never started
            logging.getLogger(__name__).info("serve.delete: %s", e)
        if started and not args.keep_cluster:
            from msa_cluster.cluster.placement import MemoryCluster

            MemoryCluster.connect(cfg.cluster.spec()).shutdown()
        if local:
            serve.shutdown()
            ray.shutdown()


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    if not args.api_key:
        raise ValueError("an API key is needed: --api-key or MSA_API_KEY (create one with `msa keys create`)")
    return OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, timeout=args.timeout, max_retries=1)


def cmd_query(args: argparse.Namespace) -> int:
    """Ask a running app a question; print the answer (streamed) and its citations."""
    from msa_cluster.cluster.demo import _show_citations

    client = _client(args)
    model = args.model or client.models.list().data[0].id
    extra: dict[str, Any] = {}
    if args.top_k:
        extra["msa_top_k"] = args.top_k
    if args.max_rounds:
        extra["msa_max_rounds"] = args.max_rounds
    if args.mode:
        extra["msa_mode"] = args.mode
    kw = dict(model=model, messages=[{"role": "user", "content": args.question}], max_tokens=args.max_tokens,
              temperature=args.temperature, extra_body=extra)
    if args.json:
        resp = client.chat.completions.create(**kw)
        print(resp.model_dump_json(indent=1))
        return 0
    cites, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
            cites = (chunk.model_extra or {}).get("msa_citations", [])
    print(f"\n[finish: {finish}]\ncitations:\n    {_show_citations(cites)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Routing only: the documents a running app's memory selects for a query, with their scores."""
    from msa_cluster.cluster.demo import post_json

    if not args.api_key:
        raise ValueError("an API key is needed: --api-key or MSA_API_KEY (create one with `msa keys create`)")
    body: dict[str, Any] = {"query": args.query, "include_text": args.text}
    if args.top_k:
        body["top_k"] = args.top_k
    hits = post_json(args.url.rstrip("/") + "/v1/memories/search", args.api_key, body, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(hits, indent=1))
        return 0
    for h in hits["data"]:
        text = f"  {h['text']!r:.100}" if args.text else ""
        print(f"[{h['id']}] {h.get('client_id') or ''} score={h['score']:.6f} layers={h['layers']} {h.get('source') or ''}{text}")
    return 0


def _keys_file(args: argparse.Namespace) -> str:
    if args.keys_file:
        return str(args.keys_file)
    if args.config:
        from msa_cluster.cluster.config import load_config

        path = load_config(args.config, {"store": "unused://"}).auth.keys_file
        if path:
            return path
    raise ValueError("which keys file? --keys-file PATH, or --config with auth.keys_file")


def cmd_keys(args: argparse.Namespace) -> int:
    """Manage API keys (the keys file holds only their hashes)."""
    from msa_cluster.cluster.keys import create_key, list_keys, revoke_key

    path = _keys_file(args)
    if args.keys_command == "create":
        key, entry = create_key(path, args.tenant, name=args.name or "")
        print(key)
        print(f"key {entry.id} for tenant {entry.tenant!r} added to {path}; the key is shown only now", file=sys.stderr)
    elif args.keys_command == "revoke":
        entry = revoke_key(path, args.key_id)
        print(f"key {entry.id} of tenant {entry.tenant!r} revoked")
    else:
        for k in list_keys(path):
            state = "revoked" if k.revoked else "active"
            print(f"{k.id}  {k.tenant}  {state}  {k.name}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train an MSA model on the synthetic memory tasks from a YAML config."""
    from msa_cluster.training.config import load_config
    from msa_cluster.training.loop import train

    cfg = load_config(args.config, output_dir=args.output_dir, steps=args.steps, device=args.device)
    print(f"training {cfg.model.num_layers}x{cfg.model.hidden_size} (vocab {cfg.model.vocab_size}) for {cfg.steps} steps "
          f"on {cfg.device} into {cfg.output_dir}")  # fmt: skip

    def show(m: dict) -> None:
        recall = " ".join(f"{k}={m[k]:.2f}" for k in sorted(m) if "recall" in k)
        print(f"step {m['step']} [{m['phase']}] loss={m['loss']:.4f} lm={m['lm']:.4f} aux={m['aux']:.4f} {recall} "
              f"tokens/s={m['tokens_per_s']:.0f}", flush=True)  # fmt: skip

    result = train(cfg, resume=args.resume, on_metrics=show)
    print(f"checkpoint: {result.checkpoint} (step {result.step}); metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


def _torch_device(name: str) -> Any:
    """A torch device that exists here, or a ValueError naming the one asked for."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy against memory size (training/memory_eval.py), through the public Python API."""
    import torch

    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.model.tokenizer import load_codec
    from msa_cluster.training.memory_eval import (
        EvalMemory,
        SweepConfig,
        SweepResult,
        goal_lines,
        markdown_table,
        parse_size,
        run_sweep,
    )
    from msa_cluster.training.tasks import TASKS

    tasks = TASKS if args.tasks == "all" else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    cfg = SweepConfig(sizes=tuple(parse_size(s) for s in args.sizes.split(",") if s.strip()), tasks=tasks,
                      examples=args.examples, seed=args.seed, max_answer_tokens=args.max_answer_tokens,
                      named_ids=args.named_ids)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "ray" and args.device != "cpu":
        raise ValueError(f"--device {args.device} is for the in-process backend; the Ray backend's actors place their own tensors")
    device = _torch_device(args.device)
    model = MSAForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    codec = load_codec(args.model)
    print(f"evaluating {args.model} on {args.backend} ({device}): sizes {args.sizes}, {len(tasks)} tasks x {args.examples} examples", flush=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731

    def save(result: SweepResult) -> None:  # after every size: a stopped sweep keeps what it finished
        if args.out:
            out = {"model": str(args.model), "backend": args.backend, **result.as_dict()}
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    if args.backend == "ray":
        from msa_cluster.cluster.evaluation import RayEvalMemory

        with RayEvalMemory(model, num_shards=args.shards) as ray_memory:
            memory: EvalMemory = ray_memory
            result = run_sweep(model, codec, cfg, memory, progress=say, on_size=save)
    else:
        result = run_sweep(model, codec, cfg, progress=say, on_size=save)
    if args.out:
        print(f"results: {args.out}")
    print(markdown_table(result))
    print("\n".join(goal_lines(result)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="msa", description="msa-cluster: long-term LLM memory with Memory Sparse Attention")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole system locally over HTTP and ask the sample questions",
                          description="Start Ray on loopback, encode a corpus into a store, start the memory cluster and "
                                      "the Serve app on 127.0.0.1, ask questions with the openai client, print answers "
                                      "with citations, and shut everything down.")
    demo.add_argument("--model", help="MSA checkpoint directory or bundled model name (default: msa-tiny)")
    demo.add_argument("--corpus", help="a .jsonl file with one {'text', optional 'client_id'} object per line (default: bundled sample)")
    demo.add_argument("--question", action="append", help="a question to ask (repeatable; default: the sample questions)")
    demo.add_argument("--max-rounds", type=int, default=3, help="memory-interleave reading rounds (default 3)")
    demo.add_argument("--max-tokens", type=int, default=64, help="answer tokens")
    demo.add_argument("--mode", choices=["interleave", "one_round"], default="interleave",
                      help="one_round: route once and answer from routed memory without reading texts")
    demo.add_argument("--keep", action="store_true", help="keep the temporary store and keys file")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser("serve", help="start the Serve app (OpenAI-compatible chat + memory API) from a config",
                         description="Start the Serve app and serve until interrupted. Settings: --config YAML < MSA_* "
                                     "environment variables (MSA_LIMITS__MAX_TOKENS=...) < flags.")
    srv.add_argument("--config", help="YAML AppConfig (see examples/serve/app.yaml)")
    srv.add_argument("--store", help="memory store URL (file://, s3://, ...)")
    srv.add_argument("--model", help="checkpoint directory or bundled model name")
    srv.add_argument("--keys-file", help="API keys file (msa keys create)")
    srv.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    srv.add_argument("--address", help="Ray cluster address (default: a running cluster, else a local one)")
    srv.add_argument("--start-cluster", action="store_true", help="start the memory cluster when none is running")
    srv.add_argument("--create-store", action="store_true", help="create an empty store when none exists")
    srv.add_argument("--keep-cluster", action="store_true", help="leave a memory cluster started here running on exit")
    srv.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly", "Disabled"],
                     help="where Serve runs HTTP proxies")
    srv.set_defaults(func=cmd_serve)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("MSA_URL", "http://127.0.0.1:8000"), help="the app's URL (or MSA_URL)")
        p.add_argument("--api-key", default=os.environ.get("MSA_API_KEY"), help="API key (or MSA_API_KEY)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
        p.add_argument("--top-k", type=int, help="documents routed per layer")
        p.add_argument("--json", action="store_true", help="print the raw JSON response")

    q = sub.add_parser("query", help="ask a running app a question; prints the answer and its citations")
    q.add_argument("question")
    client_args(q)
    q.add_argument("--model", help="model id (default: the app's only model)")
    q.add_argument("--max-tokens", type=int, default=128)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--max-rounds", type=int, help="memory-interleave reading rounds")
    q.add_argument("--mode", choices=["interleave", "one_round"])
    q.set_defaults(func=cmd_query)

    se = sub.add_parser("search", help="routing only: the documents a running app's memory selects for a query")
    se.add_argument("query")
    client_args(se)
    se.add_argument("--text", action="store_true", help="print the documents' texts too")
    se.set_defaults(func=cmd_search)

    keys = sub.add_parser("keys", help="create, revoke and list API keys (each maps to one tenant)")
    keys.add_argument("--keys-file", help="the keys file (default: auth.keys_file of --config)")
    keys.add_argument("--config", help="YAML AppConfig whose auth.keys_file to use")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant; prints the key once")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", help="a label for the key")
    kr = ksub.add_parser("revoke", help="revoke a key by its id (msa keys list)")
    kr.add_argument("key_id")
    ksub.add_parser("list", help="list keys: id, tenant, state, label (never the keys)")
    keys.set_defaults(func=cmd_keys)

    tr = sub.add_parser("train", help="train an MSA model on synthetic memory tasks from a YAML config")
    tr.add_argument("--config", required=True, help="YAML training config (see examples/train/msa-tiny.yaml)")
    tr.add_argument("--output-dir", help="override the config's output_dir")
    tr.add_argument("--steps", type=int, help="override the config's steps")
    tr.add_argument("--device", choices=["cpu", "cuda"], help="override the config's device")
    tr.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="accuracy against memory size: held-out task examples over memories of 16K to 100M tokens")
    ev.add_argument("--model", default="msa-tiny", help="a bundled model name or a checkpoint directory (default: msa-tiny)")
    ev.add_argument("--sizes", default="16K", help="comma-separated memory sizes in tokens, K/M/G binary units (e.g. 16K,128K,1M)")
    ev.add_argument("--tasks", default="all", help="comma-separated tasks, or all")
    ev.add_argument("--examples", type=int, default=20, help="held-out examples per task and size (default 20)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the examples and the background haystack")
    ev.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess",
                    help="in-process memory, or a local Ray memory cluster (store + coordinator + shards)")
    ev.add_argument("--shards", type=int, default=2, help="shard pairs of the Ray backend (default 2)")
    ev.add_argument("--max-answer-tokens", type=int, default=128, help="answer token limit (default 128)")
    ev.add_argument("--named-ids", choices=["routed", "best", "free"], default="best",
                    help="best: a round names only each routing layer's best unread document (default); routed: any "
                         "document it routed; free: any id, as the reference")
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ev.add_argument("--device", default="cpu",
                    help="where the model and the in-process router arena run: cpu (default) or cuda[:N]")
    ev.add_argument("--out", help="write every score and per-example record as JSON here")
    ev.set_defaults(func=cmd_eval)

    from msa_cluster.cluster import cli_ops

    cli_ops.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.verbose:
            raise
        print(f"msa: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError, KeyError)) else 1


def _one_line(e: BaseException) -> str:
    """An error as one line: the server's message for HTTP errors, the type and message otherwise."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        try:
            msg = json.loads(e.read() or b"{}").get("error", {}).get("message") or e.reason
        except ValueError:
            msg = e.reason
        return f"HTTP {e.code}: {msg}"
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        from msa_cluster.cluster.schemas import one_line

        return f"invalid {e.title}: {one_line(e)[0]}"
    body = getattr(e, "body", None)  # openai.APIStatusError
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"HTTP {getattr(e, 'status_code', '?')}: {body['message']}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (ValueError, FileNotFoundError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
