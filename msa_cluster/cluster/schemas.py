"""What clients send, validated with pydantic: the OpenAI chat request and the memory API's bodies.

Every model forbids unknown fields. OpenAI parameters this model cannot honour are named in one
422 (`unsupported_parameters`); strings must be valid Unicode (no lone surrogates) and bounded.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

__all__ = ["ChatRequest", "Message", "DocumentIn", "AddMemories", "ReplaceMemory", "SearchRequest", "RequestError",
           "parse_body", "unsupported_parameters", "one_line"]

MAX_TEXT_CHARS = 4_000_000
MAX_INT = 2**31 - 1


class RequestError(ValueError):
    """A request body that is not what the route takes; `status` is 400 (not JSON) or 422."""

    def __init__(self, message: str, status: int = 422, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _unicode(v: Any) -> Any:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid UTF-8 text (it holds a lone surrogate)") from None
    return v


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("is blank")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]

    _u = field_validator("text")(classmethod(lambda cls, v: _unicode(v)))


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)] | list[TextPart]
    name: Annotated[str, StringConstraints(max_length=64)] | None = None

    _u = field_validator("content", "name")(classmethod(lambda cls, v: _unicode(v)))

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


# OpenAI parameters that this model cannot honour, and the value each may still take.
_UNSUPPORTED: dict[str, Any] = {
    "n": 1, "tools": None, "tool_choice": None, "functions": None, "function_call": None, "parallel_tool_calls": None,
    "logprobs": False, "top_logprobs": None, "logit_bias": None, "response_format": None, "presence_penalty": 0,
    "frequency_penalty": 0, "audio": None, "modalities": None, "prediction": None, "web_search_options": None,
    "reasoning_effort": None, "verbosity": None,
}


def unsupported_parameters(body: dict[str, Any]) -> list[str]:
    """The OpenAI parameters in `body` set to something other than their harmless value."""
    out = []
    for name, harmless in _UNSUPPORTED.items():
        if name not in body:
            continue
        v = body[name]
        if v is None or v == harmless or (name == "logit_bias" and v == {}) or (name == "modalities" and v == ["text"]):
            continue
        if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
            continue
        out.append(f"{name}={json.dumps(v, default=str)[:40]}")
    return out


class ChatRequest(_Strict):
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 0, greedy (a memory answers the same way twice)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    stop: Annotated[str, StringConstraints(min_length=1, max_length=256)] | list[
        Annotated[str, StringConstraints(min_length=1, max_length=256)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # MSA extensions (OpenAI clients pass them with extra_body)
    msa_mode: Literal["interleave", "one_round"] | None = None
    msa_top_k: int | None = Field(None, ge=1, le=MAX_INT)
    msa_max_rounds: int | None = Field(None, ge=1, le=MAX_INT)
    # accepted and ignored (they change nothing a client can observe here)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    _u = field_validator("model", "stop")(classmethod(lambda cls, v: [_unicode(s) for s in v] if isinstance(v, list)
                                                      else _unicode(v)))

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError(f"the last message must have role 'user', got {self.messages[-1].role!r}")
        if not self.messages[-1].text.strip():
            raise ValueError("the last user message is empty")
        return self


_ClientId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]*$")]
_Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
_Source = Annotated[str, StringConstraints(max_length=1024)]
_Meta = dict[Annotated[str, StringConstraints(min_length=1, max_length=128)],
             Annotated[str, StringConstraints(max_length=4096)] | int | float | bool]


class DocumentIn(_Strict):
    text: _Text
    client_id: _ClientId | None = None
    metadata: _Meta = Field(default_factory=dict, max_length=64)
    source: _Source = ""

    _u = field_validator("text", "client_id", "source")(classmethod(lambda cls, v: _unicode(v)))

    _b = field_validator("text")(classmethod(lambda cls, v: _not_blank(v)))

    @field_validator("client_id")
    @classmethod
    def _not_numeric(cls, v: str | None) -> str | None:
        if v is not None and v.isdigit():
            raise ValueError(f"must not be all digits ({v!r} would read as a document id in /v1/memories/{{id}})")
        return v

    @field_validator("metadata")
    @classmethod
    def _meta_unicode(cls, v: dict[str, Any]) -> dict[str, str]:
        return {_unicode(k): _unicode(x if isinstance(x, str) else json.dumps(x)) for k, x in v.items()}


class AddMemories(_Strict):
    documents: list[DocumentIn] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _single(cls, data: Any) -> Any:
        """A body that is one document ({"text": ...}) is a list of one."""
        if isinstance(data, dict) and "text" in data and "documents" not in data:
            return {"documents": [data]}
        return data

    @model_validator(mode="after")
    def _unique_client_ids(self) -> AddMemories:
        seen: set[str] = set()
        for i, d in enumerate(self.documents):
            if d.client_id is not None:
                if d.client_id in seen:
                    raise ValueError(f"documents.{i}.client_id {d.client_id!r} appears twice in this request")
                seen.add(d.client_id)
        return self


class ReplaceMemory(_Strict):
    text: _Text
    metadata: _Meta = Field(default_factory=dict, max_length=64)
    source: _Source = ""

    _u = field_validator("text", "source")(classmethod(lambda cls, v: _unicode(v)))
    _m = field_validator("metadata")(DocumentIn._meta_unicode.__func__)  # type: ignore[attr-defined]


class SearchRequest(_Strict):
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
    top_k: int | None = Field(None, ge=1, le=MAX_INT)
    include_text: bool = False

    _u = field_validator("query")(classmethod(lambda cls, v: _unicode(v)))

    _b = field_validator("query")(classmethod(lambda cls, v: _not_blank(v)))


def _loc(loc: tuple[int | str, ...]) -> str:
    """A field path without pydantic's union-member tags (`constrained-str`, `list[TextPart]`, ...)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.endswith("-str") or "-" in p)))


def one_line(e: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one line (the first problems, each with where it is), and the first field's path."""
    seen: dict[str, str] = {}
    for err in e.errors():
        loc = _loc(err["loc"])
        seen.setdefault(loc, err["msg"].removeprefix("Value error, "))
    parts = [f"{loc}: {msg}" if loc else msg for loc, msg in list(seen.items())[:3]]
    more = len(seen) - 3
    first = next(iter(seen), None) or None
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else ""), first


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Bytes -> validated model; RequestError (400 for bytes that are not UTF-8 JSON, else 422)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8 (byte {e.start})", 400) from None
    if not text.strip():
        raise RequestError("the request body is empty; send a JSON object", 400)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", 400) from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}", 400)
    if model is ChatRequest:
        bad = unsupported_parameters(data)
        if bad:
            raise RequestError(f"unsupported parameters: {', '.join(bad)} (this model returns one text choice, "
                               "without tools, logprobs or penalties)", 422, bad[0].split("=")[0])
        data = {k: v for k, v in data.items() if k not in _UNSUPPORTED}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = one_line(e)
        raise RequestError(msg, 422, param) from None
