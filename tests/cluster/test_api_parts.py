"""The Serve API's parts without a server: config merging, API keys, request validation, the
streamed answer view and the citation rule."""

import json
import os
import stat

import pytest

from msa_cluster.cluster.config import ConfigError, load_config
from msa_cluster.cluster.keys import KeyRing, KeysFileError, create_key, list_keys, revoke_key
from msa_cluster.cluster.schemas import AddMemories, ChatRequest, ReplaceMemory, RequestError, SearchRequest, parse_body
from msa_cluster.cluster.service import AnswerText, citations_of, render_question
from msa_cluster.model import protocol as P
from msa_cluster.model.interleave import InterleaveResult, RoundTrace
from msa_cluster.model.tokenizer import ByteTokenizer
from msa_cluster.storage_adapters.snapshot import DocInfo

BASE = {"store": "memory://x", "auth": {"keys_file": "/k.json"}}


# ---------------------------------------------------------------------------------------------- config
def test_config_precedence_yaml_env_flags(tmp_path):
    """Defaults < YAML < MSA_* environment < flags; nested fields through `__`; other MSA_ variables ignored."""
    cfg_file = tmp_path / "app.yaml"
    cfg_file.write_text("store: file:///from-yaml\nport: 9000\nauth: {keys_file: /k}\nlimits: {max_tokens: 100, max_top_k: 9}\n")
    env = {"MSA_PORT": "9100", "MSA_LIMITS__MAX_TOKENS": "200", "MSA_PROPERTY_PROFILE": "long"}
    cfg = load_config(cfg_file, {"port": 9200, "model": None}, environ=env)
    assert (cfg.store, cfg.port, cfg.limits.max_tokens, cfg.limits.max_top_k) == ("file:///from-yaml", 9200, 200, 9)
    assert cfg.model == "msa-tiny" and cfg.served_model_name == "msa-tiny"
    assert load_config(cfg_file, environ={}).port == 9000


@pytest.mark.parametrize("over, words", [
    ({"limits": {"max_tokenz": 1}}, "limits.max_tokenz: Extra inputs"),
    ({"limits": {"max_tokens": 0}}, "limits.max_tokens"),
    ({"port": 70000}, "port"),
    ({"auth": None}, "auth is required"),
    ({"auth": {}}, "auth.keys_file is required"),
    ({"route_prefix": "v1"}, "route_prefix must start"),
])
def test_bad_config_is_one_clear_line(over, words):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config(overrides={**BASE, **over}, environ={})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml", environ={})
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml", environ={})


def test_deployment_options_are_fractional_and_autoscale():
    cfg = load_config(overrides={**BASE, "deployment": {"num_replicas": "auto", "max_replicas": 3, "num_cpus": 0.25}}, environ={})
    opts = cfg.deployment.serve_options()
    assert opts["ray_actor_options"]["num_cpus"] == 0.25 and opts["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in opts


# ---------------------------------------------------------------------------------------------- keys
def test_keys_file_holds_only_hashes_and_maps_keys_to_tenants(tmp_path):
    path = tmp_path / "keys.json"
    key_a, entry_a = create_key(path, "acme", name="ci")
    key_b, _ = create_key(path, "globex")
    raw = path.read_text()
    assert key_a not in raw and key_a.split("-", 2)[2] not in raw and entry_a.sha256 in raw
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring = KeyRing(path, reload_s=0)
    assert ring.tenant_of(key_a) == "acme" and ring.tenant_of(key_b) == "globex"
    for bad in (None, "", key_a + "x", key_a[:-1], "msa-" + entry_a.id + "-wrong", "Bearer " + key_a, key_b.replace("msa", "xyz")):
        assert ring.tenant_of(bad) is None, bad
    assert [(k.tenant, k.revoked is None) for k in list_keys(path)] == [("acme", True), ("globex", True)]


def test_revoked_key_stops_working_without_a_restart(tmp_path):
    path = tmp_path / "keys.json"
    key, entry = create_key(path, "acme")
    ring = KeyRing(path, reload_s=0)
    assert ring.tenant_of(key) == "acme"
    revoke_key(path, entry.id)
    assert ring.tenant_of(key) is None
    with pytest.raises(KeysFileError, match="no key 'nope'"):
        revoke_key(path, "nope")


def test_bad_keys_files_are_named(tmp_path):
    with pytest.raises(KeysFileError, match="does not exist"):
        KeyRing(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{\"keys\": 3}")
    with pytest.raises(KeysFileError, match="malformed"):
        KeyRing(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a valid tenant"):
        create_key(tmp_path / "k.json", "bad tenant!")


# ---------------------------------------------------------------------------------------------- validation
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("raw, status, words", [
    (b"\xff\xfe{}", 400, "not valid UTF-8"),
    (b"{bad", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({**CHAT, "messages": []}).encode(), 422, "messages"),
    (json.dumps({**CHAT, "messages": [{"role": "robot", "content": "x"}]}).encode(), 422, "messages.0.role"),
    (json.dumps({**CHAT, "messages": [{"role": "tool", "content": "x"}]}).encode(), 422, "messages.0.role"),
    (json.dumps({**CHAT, "messages": [{"role": "assistant", "content": "x"}]}).encode(), 422, "last message must have role 'user'"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "  "}]}).encode(), 422, "empty"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": 5}]}).encode(), 422, "messages.0.content"),
    (json.dumps({**CHAT, "max_tokens": -1}).encode(), 422, "max_tokens"),
    (json.dumps({**CHAT, "max_tokens": 10**30}).encode(), 422, "max_tokens"),
    (json.dumps({**CHAT, "temperature": "hot"}).encode(), 422, "temperature"),
    (json.dumps({**CHAT, "temperature": 7}).encode(), 422, "temperature"),
    (json.dumps({**CHAT, "top_p": 0}).encode(), 422, "top_p"),
    (json.dumps({**CHAT, "n": 2, "tools": [{"type": "function"}], "logprobs": True}).encode(), 422, "n=2, tools=[{"),
    (json.dumps({**CHAT, "presence_penalty": 0.5}).encode(), 422, "presence_penalty"),
    (json.dumps({**CHAT, "response_format": {"type": "json_object"}}).encode(), 422, "response_format"),
    (json.dumps({**CHAT, "bogus": 1}).encode(), 422, "bogus: Extra inputs"),
    (json.dumps({**CHAT, "stop": ["a", ""]}).encode(), 422, "stop"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', 422, "messages.0.content"),
])
def test_chat_request_validation(raw, status, words):
    with pytest.raises(RequestError) as e:
        parse_body(raw, ChatRequest)
    assert e.value.status == status and words in str(e.value) and "\n" not in str(e.value)


def test_chat_request_accepts_openai_shapes():
    req = parse_body(json.dumps({**CHAT, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "n": 1, "logprobs": False, "stop": "x", "user": "u",
        "response_format": {"type": "text"}, "stream_options": {"include_usage": True}, "seed": 3}).encode(), ChatRequest)
    assert req.messages[-1].text == "ab" and req.stops == ["x"] and req.seed == 3
    assert render_question(req.messages) == "system: be brief\nab"


@pytest.mark.parametrize("model, body, words", [
    (AddMemories, {"documents": []}, "documents"),
    (AddMemories, {"documents": [{"text": ""}]}, "documents.0.text"),
    (AddMemories, {"documents": [{"text": "  "}]}, "is blank"),
    (AddMemories, {"text": "a", "client_id": "42"}, "must not be all digits"),
    (AddMemories, {"documents": [{"text": "a", "client_id": "x"}, {"text": "b", "client_id": "x"}]}, "appears twice"),
    (AddMemories, {"text": "a", "metadata": {"k": [1]}}, "metadata"),
    (AddMemories, {"text": "a", "id": 3}, "id: Extra inputs"),
    (ReplaceMemory, {"text": 3}, "text"),
    (SearchRequest, {"query": "q", "top_k": 0}, "top_k"),
    (SearchRequest, {}, "query"),
])
def test_memory_request_validation(model, body, words):
    with pytest.raises(RequestError) as e:
        parse_body(json.dumps(body).encode(), model)
    assert e.value.status == 422 and words in str(e.value)


def test_single_document_body_and_metadata_as_strings():
    req = parse_body(b'{"text": "t", "client_id": "c", "metadata": {"n": 1, "ok": true, "s": "v"}, "source": "s3://x"}', AddMemories)
    assert req.documents[0].metadata == {"n": "1", "ok": "true", "s": "v"} and req.documents[0].source == "s3://x"


# ---------------------------------------------------------------------------------------------- the answer as it streams
TOK = ByteTokenizer()


def _stream(text: str, stops=()):
    """Feed `text`'s tokens one at a time; return (pieces shown, final answer, rest, stopped)."""
    toks = TOK.encode(text)
    view, shown = AnswerText(TOK, stops), []
    for n in range(1, len(toks) + 1):
        delta, stop = view.feed(toks[:n])
        shown.append(delta)
        if stop:
            break
    final, rest = view.final(P.extract_answer(TOK.decode(toks)))
    return "".join(shown), final, rest, view.stopped


def test_streamed_answer_is_a_prefix_of_the_final_answer():
    shown, final, rest, stopped = _stream(f"{P.ANSWER_PREFIX} 3 March 1931 ")
    assert final == "3 March 1931" and shown + rest == final and shown and not stopped
    shown, final, rest, _ = _stream("no prefix here")  # nothing can be shown before the end
    assert shown == "" and final == rest == "no prefix here"
    shown, final, _, _ = _stream(f"blah {P.ANSWER_PREFIX} x {P.ANSWER_PREFIX} y")  # the first prefix counts
    assert final == f"x {P.ANSWER_PREFIX} y" and final.startswith(shown)


def test_stop_strings_cut_the_answer_and_are_never_shown():
    shown, final, rest, stopped = _stream(f"{P.ANSWER_PREFIX} one two. three", stops=["."])
    assert stopped and final == "one two" and shown + rest == final
    shown, final, rest, stopped = _stream(f"{P.ANSWER_PREFIX} abcEN", stops=["END"])  # a partial stop is held back
    assert not stopped and final == "abcEN" and "E" not in shown and shown + rest == final


# ---------------------------------------------------------------------------------------------- citations
def _info(i):
    return DocInfo(i, "t", f"src{i}", {}, 10, 1, "seg", True, f"c{i}")


def test_citations_are_routed_documents_per_round_plus_documents_read():
    """Routed: score = max over the layers that selected it in that round; read: named and read."""
    r1 = RoundTrace(1, [], [], {2: [5, 7], 3: [7, 9]}, {2: [0.5, 0.4], 3: [0.6, 0.1]}, read=[7, 11])
    r2 = RoundTrace(2, [], [], {2: [11], 3: [11]}, {2: [0.3], 3: [0.2]})
    res = InterleaveResult("a", [], [r1, r2], "answered", 3, 10, "")
    got = citations_of(res, {i: _info(i) for i in (5, 7, 9, 11)})
    assert [(c["id"], c["round"], c["score"], c["layers"], c["routed"], c["read"]) for c in got] == [
        (7, 1, 0.6, [2, 3], True, True), (5, 1, 0.5, [2], True, False), (9, 1, 0.1, [3], True, False),
        (11, 1, None, [], False, True), (11, 2, 0.3, [2, 3], True, False)]
    assert got[0]["source"] == "src7" and got[0]["client_id"] == "c7"
