"""The wire protocol of both APIs: request bodies (pydantic), validation against the
limits, error bodies, prompt building and the SSE/usage helpers.

Message text is always encoded as ordinary text (Tokenizer.encode), so
"<|assistant_end|>" typed by a user is a handful of ordinary tokens, never the special
token. In the OpenAI API, tool calls appear inline in the content as their markers'
literal names (as the reference's decode shows them), and assistant messages sent back
with such well-formed python/output blocks are turned back into tool-call parts.

Differences from the OpenAI API, on purpose: `top_p` other than 1, penalties,
`logit_bias`, `logprobs`, `tools` and non-text content parts are rejected with a 400
saying so (rather than silently ignored); `top_k` is accepted as an extension; unknown
fields are ignored; `model` may be any string (there is one model).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from nanochat.server.settings import Limits, ServerSettings


# ---------------------------------------------------------------------------------------
# Errors

class ApiError(Exception):
    """A request the server refuses; rendered as JSON with the given HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------------------------------
# Request bodies

class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "python", "python_output"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: str
    content: str | list[_Part]


class ChatRequest(BaseModel):
    """Body of POST /chat/completions (the reference's API, plus `seed`)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    messages: list[_Message]
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class _OAContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class _OAMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[_OAContentPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    """Body of POST /v1/chat/completions. Unknown fields are ignored, as OpenAI
    clients send many optional ones."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    messages: list[_OAMessage]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object with a 'messages' list")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}); send a JSON object with a 'messages' list")
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not a JSON {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise bad_request(*_explain(e)) from None


# loc entries pydantic adds for the members of a union ("str", "list[_Part]", ...)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|_\w+|literal\[.*\])$", re.I)


def _explain(e: ValidationError) -> tuple[str, str | None]:
    """One readable message for the field that failed (all union alternatives of that
    field folded together), and the field's dotted path."""
    errors = e.errors(include_url=False)
    by_field: dict[str, list[dict]] = {}
    for err in errors:
        path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        by_field.setdefault(path, []).append(err)
    # the most specific field: for a list of parts that is the bad part, not "not a str"
    path, errs = max(by_field.items(), key=lambda item: len(item[1][0]["loc"]))
    msgs = list(dict.fromkeys(err["msg"] for err in errs))
    first = errs[0]
    value = "" if first["type"] == "missing" else f", got {_short(first.get('input'))}"
    more = f" ({len(by_field) - 1} more field(s) also wrong)" if len(by_field) > 1 else ""
    return f"{path or 'body'}: {' or '.join(msgs)}{value}{more}", path or None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------
# Validation and prompt building (shared by both APIs)

@dataclass
class Sampling:
    temperature: float
    top_k: int | None
    max_tokens: int
    seed: int
    num_samples: int = 1
    stop: tuple[str, ...] = ()


def _check_range(value: float, bounds: tuple[float, float], name: str) -> None:
    lo, hi = bounds
    if not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
        raise bad_request(f"{name} must be between {lo} and {hi}, got {value}", param=name)


def check_messages(messages: list[dict], limits: Limits) -> None:
    """Message count and length limits; `messages` are {"role", "content"} with str or
    list-of-parts content."""
    if not messages:
        raise bad_request("messages is empty: send at least one user message", param="messages")
    if len(messages) > limits.max_messages:
        raise bad_request(f"too many messages: {len(messages)}, the limit is {limits.max_messages}; "
                          "drop older turns", param="messages")
    total = 0
    for i, m in enumerate(messages):
        content = m["content"]
        n = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if n > limits.max_message_chars:
            raise bad_request(f"messages[{i}] is {n} characters long, the limit is {limits.max_message_chars} "
                              "per message; shorten it", param=f"messages.{i}.content")
        total += n
    if total > limits.max_total_chars:
        raise bad_request(f"the conversation is {total} characters long, the limit is {limits.max_total_chars}; "
                          "drop older turns or shorten messages", param="messages")


def sampling_from(settings: ServerSettings, *, temperature, top_k, max_tokens, seed,
                  n=None, stop=None) -> Sampling:
    lim = settings.limits
    temperature = settings.temperature if temperature is None else temperature
    _check_range(temperature, lim.temperature_range, "temperature")
    top_k = settings.top_k if top_k is None else top_k
    _check_range(top_k, lim.top_k_range, "top_k")
    max_tokens = settings.max_tokens if max_tokens is None else max_tokens
    _check_range(max_tokens, lim.max_tokens_range, "max_tokens")
    n = 1 if n is None else n
    _check_range(n, (1, lim.max_choices), "n")
    stops: list[str] = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > lim.max_stop:
        raise bad_request(f"stop has {len(stops)} strings, the limit is {lim.max_stop}", param="stop")
    for s in stops:
        if not s or len(s) > lim.max_stop_chars:
            raise bad_request(f"each stop string must be 1 to {lim.max_stop_chars} characters, got {s!r}", param="stop")
    if seed is None:
        seed = random.randrange(2**31)
    elif not (0 <= seed < 2**63):
        raise bad_request(f"seed must be between 0 and {2**63 - 1}, got {seed}", param="seed")
    # the engine wants top_k=None for "no filtering"
    return Sampling(temperature=float(temperature), top_k=top_k or None, max_tokens=max_tokens,
                    seed=seed, num_samples=n, stop=tuple(stops))


def build_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for the assistant's next reply, via the tokenizer's chat rendering
    (system message folded into the first user turn; message text encoded as plain
    text). `messages` must alternate user/assistant after an optional system message
    and end with a user message."""
    if messages[-1]["role"] != "user":
        raise bad_request(f"the last message must be from the user (it is {messages[-1]['role']!r}): "
                          "the server writes the assistant's next reply", param="messages")
    conversation = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    try:
        return tokenizer.render_for_completion(conversation)
    except ValueError as e:
        raise bad_request(str(e).replace("conversation message", "messages"), param="messages") from None


def fit_context(prompt_len: int, sampling: Sampling, context_len: int | None) -> None:
    """The prompt must fit the model's context; the reply is cut to what is left."""
    if context_len is None:
        return
    room = context_len - prompt_len
    if room < 1:
        raise bad_request(f"the conversation is {prompt_len} tokens, which does not fit the model's "
                          f"{context_len}-token context; drop older turns", param="messages")
    sampling.max_tokens = min(sampling.max_tokens, room)


_TOOL_BLOCK = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>(?:<\|output_start\|>(.*?)<\|output_end\|>)?", re.S)


def parts_from_marked_text(text: str) -> str | list[dict]:
    """An assistant message as the OpenAI API returns it (tool calls inline between
    their literal markers) back into the tokenizer's parts; plain text stays a str."""
    if "<|python_start|>" not in text:
        return text
    parts: list[dict] = []
    pos = 0
    for m in _TOOL_BLOCK.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        if m.group(2) is not None:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def chat_messages(req: ChatRequest) -> list[dict]:
    """The reference API's messages as the tokenizer's conversation messages; tool-call
    parts are allowed in assistant messages only."""
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else [p.model_dump() for p in m.content]} for m in req.messages]
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be 'user', 'assistant' or 'system', got {m['role']!r}",
                              param=f"messages.{i}.role")
        if not isinstance(m["content"], str) and m["role"] != "assistant":
            raise bad_request(f"messages[{i}]: only assistant messages may hold tool-call parts",
                              param=f"messages.{i}.content")
        if (m["content"] if isinstance(m["content"], str) else "x") == "":
            raise bad_request(f"messages[{i}] has empty content", param=f"messages.{i}.content")
    return messages


def openai_messages(req: OpenAIChatRequest) -> list[dict]:
    """OpenAI messages → the tokenizer's conversation messages. Leading system (or
    developer) messages become one system message; consecutive messages of the same
    role are joined, since the chat format alternates user and assistant."""
    out: list[dict] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role {m.role!r} is not supported; use system, user or assistant "
                              "(this model has no function/tool messages)", param=f"messages.{i}.role")
        if isinstance(m.content, list):
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise bad_request(f"messages[{i}].content[{j}] is of type {p.type!r}; only text parts are "
                                      "supported", param=f"messages.{i}.content")
            content = "".join(p.text or "" for p in m.content)
        elif m.content is None:
            raise bad_request(f"messages[{i}].content is missing", param=f"messages.{i}.content")
        else:
            content = m.content
        if role == "system" and any(o["role"] != "system" for o in out):
            raise bad_request(f"messages[{i}]: a system message is only supported at the start of the "
                              "conversation", param=f"messages.{i}.role")
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    for m in out:
        if m["role"] == "assistant":
            m["content"] = parts_from_marked_text(m["content"])
    return out


_UNSUPPORTED = (  # (field, neutral value, what to do instead)
    ("top_p", 1.0, "top_p sampling is not implemented; leave top_p out (or 1) and use top_k"),
    ("presence_penalty", 0.0, "penalties are not implemented; leave presence_penalty out (or 0)"),
    ("frequency_penalty", 0.0, "penalties are not implemented; leave frequency_penalty out (or 0)"),
    ("logprobs", False, "logprobs are not implemented; leave logprobs out"),
    ("top_logprobs", 0, "logprobs are not implemented; leave top_logprobs out"),
)


def check_unsupported(req: OpenAIChatRequest) -> None:
    for name, neutral, hint in _UNSUPPORTED:
        value = getattr(req, name)
        if value is not None and value != neutral:
            raise bad_request(f"{name}={value} is not supported: {hint}", param=name)
    for name in ("logit_bias", "tools", "functions"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported by this model; leave it out", param=name)
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format {fmt!r} is not supported; only plain text", param="response_format")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send only one", param="max_completion_tokens")


# ---------------------------------------------------------------------------------------
# Response pieces shared by both APIs

def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
