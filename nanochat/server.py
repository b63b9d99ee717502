"""
The chat server: a FastAPI app over a pool of model replicas.

Endpoints
    GET  /                      the chat web UI (nanochat/ui.html, self-contained)
    POST /chat/completions      the reference's streaming API: SSE lines
                                `data: {"token": str, "gpu": int, "part": str}` then
                                `data: {"done": true, "finish_reason": ..., "usage": {...}}`
    POST /v1/chat/completions   OpenAI-compatible chat completions (streaming or not)
    GET  /v1/models             OpenAI-compatible model list (one model)
    GET  /health                replica status (never needs the API key)
    GET  /stats                 queue length, requests, tokens served, tokens/s

Concurrency model. Each replica is one copy of the model on one device with its own
single worker thread. A request takes a free replica from an asyncio queue (waiting in
line if all are busy, bounded by `max_queue`, else 503 + Retry-After), and the
token-by-token generation runs in that replica's thread so the event loop stays free to
answer other requests. Tokens travel back to the loop through an asyncio.Queue. The
replica is handed back by the worker thread's completion callback, i.e. only once the
thread really stopped touching the model, whether the request finished, failed, was
cancelled by a client that went away, or by shutdown.

Text handling. Message text is always encoded as ordinary text (Tokenizer.encode), so
"<|assistant_end|>" typed by a user is a handful of ordinary tokens, never the special
token. Generated tokens are decoded incrementally with a UTF-8 decoder (a multi-byte
character split over two tokens is emitted once complete). The tool-call special tokens
are reported as "marker" pieces; in the OpenAI API they appear inline in the content as
their literal names (as the reference's decode shows them), and assistant messages sent
back with such well-formed python/output blocks are turned back into tool-call parts.

Differences from the OpenAI API, on purpose: `top_p` other than 1, penalties,
`logit_bias`, `logprobs`, `tools` and non-text content parts are rejected with a 400
saying so (rather than silently ignored); `top_k` is accepted as an extension; unknown
fields are ignored; `model` may be any string (there is one model).
"""
from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("nanochat.server")

# Special tokens that end an assistant turn, and the tool-call markers with the part
# kind that follows each: python code, then the tool's output, then text again.
TERMINATORS = ("<|assistant_end|>", "<|bos|>")
MARKERS = {
    "<|python_start|>": "python",
    "<|python_end|>": "text",
    "<|output_start|>": "python_output",
    "<|output_end|>": "text",
}
PART_KINDS = ("text", "python", "python_output", "marker")


# ---------------------------------------------------------------------------------------
# Settings

@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Anything outside gets a 400 naming the limit."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    temperature_range: tuple[float, float] = (0.0, 2.0)
    top_k_range: tuple[int, int] = (0, 200)        # 0 = no top-k filtering
    max_tokens_range: tuple[int, int] = (1, 4096)
    max_choices: int = 4                            # OpenAI `n`
    max_stop: int = 4                               # OpenAI allows up to 4 stop strings
    max_stop_chars: int = 64

    @property
    def max_body_bytes(self) -> int:
        # JSON may spend up to 6 bytes per character (\uXXXX escapes), plus structure
        return 6 * self.max_total_chars + 256 * self.max_messages + 65536


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "nanochat"
    limits: Limits = field(default_factory=Limits)
    temperature: float = 0.8          # defaults when a request does not say
    top_k: int = 50
    max_tokens: int = 512
    api_key: str | None = None        # when set, API endpoints need `Authorization: Bearer <key>`
    max_queue: int = 16               # requests allowed to wait for a busy replica
    shutdown_timeout: float = 10.0    # seconds to let in-flight generations finish on shutdown
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        lim = self.limits
        problems = [f"default {name}={value} is outside its allowed range {bounds}"
                    for name, value, bounds in (("temperature", self.temperature, lim.temperature_range),
                                                ("top_k", self.top_k, lim.top_k_range),
                                                ("max_tokens", self.max_tokens, lim.max_tokens_range))
                    if not bounds[0] <= value <= bounds[1]]
        if self.max_queue < 0:
            problems.append(f"max_queue must be 0 or more, got {self.max_queue}")
        if problems:
            raise ValueError("server settings: " + "; ".join(problems))


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


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------------------------------
# Replicas and the pool

@dataclass(eq=False)
class Replica:
    """One model copy on one device, used by one thread at a time."""
    index: int
    engine: Any                      # nanochat.engine.Engine
    tokenizer: Any                   # nanochat.tokenizer.Tokenizer
    device: torch.device = torch.device("cpu")
    context_len: int | None = None   # prompt + completion must fit (the trained sequence length)
    busy: bool = False
    requests: int = 0
    errors: int = 0
    executor: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nanochat-replica{self.index}")


class PoolBusy(Exception):
    pass


class ReplicaPool:
    """Free replicas in an asyncio queue; at most `max_queue` requests wait for one."""

    def __init__(self, replicas: Sequence[Replica], max_queue: int):
        if not replicas:
            raise ValueError("the server needs at least one model replica")
        self.replicas = list(replicas)
        self.max_queue = max_queue
        self.waiting = 0
        self.draining = False
        self.active: set[Generation] = set()
        self._free: asyncio.Queue[Replica] = asyncio.Queue()
        for r in self.replicas:
            self._free.put_nowait(r)
        # counters for /stats
        self.started_at = time.time()
        self.requests = 0
        self.rejected = 0
        self.cancelled = 0
        self.failed = 0
        self.tokens = 0
        self.busy_seconds = 0.0
        self.recent: list[tuple[float, int]] = []   # (finish time, tokens) of the last minute

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def context_len(self) -> int | None:
        return self.replicas[0].context_len

    def available(self) -> int:
        return self._free.qsize()

    async def acquire(self) -> Replica:
        if self.draining:
            raise PoolBusy("the server is shutting down")
        if self._free.empty() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise PoolBusy(f"all {len(self.replicas)} replica(s) are busy and {self.waiting} request(s) "
                           f"are already waiting (max_queue={self.max_queue}); retry shortly")
        self.waiting += 1
        try:
            replica = await self._free.get()
        finally:
            self.waiting -= 1
        if self.draining:
            self.release(replica)
            raise PoolBusy("the server is shutting down")
        replica.busy = True
        return replica

    def release(self, replica: Replica) -> None:
        assert replica.busy or self.draining, "released a replica that was not taken"
        replica.busy = False
        self._free.put_nowait(replica)

    def start(self, replica: Replica, gen: "Generation") -> None:
        """Run `gen` on `replica`'s thread; the replica returns to the pool when the
        thread is done with it."""
        loop = asyncio.get_running_loop()
        replica.requests += 1
        self.requests += 1
        self.active.add(gen)
        future = loop.run_in_executor(replica.executor, gen.run, replica)

        def done(_):
            self.active.discard(gen)
            self._account(gen, replica)
            self.release(replica)
        future.add_done_callback(done)
        gen.future = future

    def _account(self, gen: "Generation", replica: Replica) -> None:
        self.tokens += gen.generated
        self.busy_seconds += gen.elapsed
        now = time.time()
        self.recent = [(t, n) for t, n in self.recent if now - t < 60.0] + [(now, gen.generated)]
        if gen.error is not None:
            self.failed += 1
            replica.errors += 1
        elif gen.cancelled:
            self.cancelled += 1
        outcome = "failed" if gen.error else "cancelled" if gen.cancelled else "done"
        log.info("replica %d: %s, prompt %d tokens, generated %d in %.2fs (%.1f tok/s)", replica.index, outcome,
                 len(gen.tokens), gen.generated, gen.elapsed, gen.generated / max(gen.elapsed, 1e-9))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one average generation."""
        finished = max(1, self.requests - len(self.active))
        return max(1, min(60, math.ceil(self.busy_seconds / finished)))

    def stats(self) -> dict:
        now = time.time()
        recent = sum(n for t, n in self.recent if now - t < 60.0)
        return {
            "replicas": len(self.replicas),
            "busy_replicas": sum(r.busy for r in self.replicas),
            "available_replicas": self.available(),
            "queue_length": self.waiting,
            "max_queue": self.max_queue,
            "requests": self.requests,
            "active_requests": len(self.active),
            "rejected_requests": self.rejected,
            "cancelled_requests": self.cancelled,
            "failed_requests": self.failed,
            "tokens_served": self.tokens,
            # decode speed while generating, and served throughput over the last minute
            "tokens_per_second": round(self.tokens / self.busy_seconds, 2) if self.busy_seconds > 0 else 0.0,
            "tokens_per_second_last_minute": round(recent / 60.0, 2),
            "uptime_seconds": round(now - self.started_at, 1),
        }

    async def close(self, timeout: float) -> None:
        """Refuse new work, give in-flight generations `timeout` seconds, cancel the
        rest, and wait for every replica thread to let go of its model."""
        self.draining = True
        pending = [g.future for g in self.active if g.future is not None]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for gen in list(self.active):
                gen.cancel()
            if still:
                await asyncio.wait(still, timeout=max(5.0, timeout))
        for r in self.replicas:
            r.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Decoding one row of generated tokens into text pieces, with stop strings

Piece = tuple[str, str]  # (kind, text); kind in PART_KINDS


class RowDecoder:
    """Turns one sample's token ids into (kind, text) pieces, incrementally.

    Ordinary tokens are decoded through an incremental UTF-8 decoder, so a character
    split across tokens is emitted whole. Tool-call special tokens become ("marker",
    name) pieces and switch the kind of the text that follows. With stop strings, text
    that could be the beginning of a stop string is held back until it is not; once one
    matches, everything from the match on is dropped and `stopped` is set."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._markers = {tokenizer.encode_special(m): (m, kind) for m, kind in MARKERS.items()
                         if m in tokenizer.get_special_tokens()}
        self._specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.kind = "text"
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._held: list[Piece] = []
        self.text = ""  # everything emitted so far (OpenAI content)

    def push(self, token: int) -> list[Piece]:
        if self.stopped:
            return []
        if token in self._markers:
            name, next_kind = self._markers[token]
            pieces = self._flush_utf8() + [("marker", name)]
            self.kind = next_kind
        elif token in self._specials:
            pieces = []  # another special token mid-reply carries no text
        else:
            text = self._utf8.decode(self._token_bytes(token))
            pieces = [(self.kind, text)] if text else []
        return self._through_stop(pieces)

    def finish(self) -> list[Piece]:
        """Flush what is still held back (the reply ended)."""
        if self.stopped:
            return []
        out = self._through_stop(self._flush_utf8())
        if not self.stopped:  # held-back text can no longer become a stop string
            out += self._held
            self.text += "".join(t for _, t in self._held)
            self._held = []
        return out

    def _flush_utf8(self) -> list[Piece]:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return [(self.kind, text)] if text else []

    def _through_stop(self, pieces: list[Piece]) -> list[Piece]:
        if not self.stop:
            self.text += "".join(t for _, t in pieces)
            return pieces
        self._held.extend(pieces)
        joined = "".join(t for _, t in self._held)
        cut = min((i for i in (joined.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, _ = _split_pieces(self._held, cut)
            self._held = []
            self.stopped = True
        else:
            keep = max(_overlap(joined, s) for s in self.stop)
            out, self._held = _split_pieces(self._held, len(joined) - keep)
        self.text += "".join(t for _, t in out)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _split_pieces(pieces: list[Piece], n_chars: int) -> tuple[list[Piece], list[Piece]]:
    head: list[Piece] = []
    tail: list[Piece] = []
    left = n_chars
    for kind, text in pieces:
        if left >= len(text):
            head.append((kind, text))
            left -= len(text)
        elif left > 0:
            head.append((kind, text[:left]))
            tail.append((kind, text[left:]))
            left = 0
        else:
            tail.append((kind, text))
    return [p for p in head if p[1]], [p for p in tail if p[1]]


# ---------------------------------------------------------------------------------------
# One generation request, run on a replica's thread

@dataclass
class Delta:
    row: int
    kind: str
    text: str


@dataclass
class Finish:
    row: int
    reason: str  # stop | length | cancelled
    tokens: int


@dataclass
class Failure:
    message: str


class Generation:
    """Samples `num_samples` replies to one prompt on a replica thread and streams
    Delta/Finish/Failure events to the event loop. `cancel()` (any thread) stops it
    at the next token."""

    _END = object()

    def __init__(self, tokens: list[int], *, num_samples: int, max_tokens: int, temperature: float,
                 top_k: int | None, seed: int, stop: Sequence[str] = ()):
        self.tokens = tokens
        self.num_samples = num_samples
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.stop = list(stop)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.cancelled = False
        self.error: str | None = None
        self.generated = 0
        self.elapsed = 0.0
        self.future: asyncio.Future | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def run(self, replica: Replica) -> None:
        """The worker-thread body. Never raises; failures become a Failure event."""
        t0 = time.perf_counter()
        tok = replica.tokenizer
        terminators = {tok.encode_special(t) for t in TERMINATORS if t in tok.get_special_tokens()}
        rows = [RowDecoder(tok, self.stop) for _ in range(self.num_samples)]
        counts = [0] * self.num_samples
        finished = [False] * self.num_samples

        def finish(row: int, reason: str) -> None:
            for kind, text in rows[row].finish():
                self._post(Delta(row, kind, text))
            finished[row] = True
            self._post(Finish(row, reason, counts[row]))

        try:
            if replica.device.type == "cuda":
                torch.cuda.set_device(replica.device)  # the current device is per thread
            if self._cancel.is_set():
                self.cancelled = True
            else:
                # grad mode is thread-local: this thread needs its own inference_mode
                with torch.inference_mode():
                    stream = replica.engine.generate(
                        self.tokens, num_samples=self.num_samples, max_tokens=self.max_tokens,
                        temperature=self.temperature, top_k=self.top_k, seed=self.seed)
                    try:
                        for column, _forced in stream:
                            if self._cancel.is_set():
                                self.cancelled = True
                                break
                            for row, token in enumerate(column):
                                if finished[row]:
                                    continue
                                counts[row] += 1
                                if token in terminators:
                                    finish(row, "stop")
                                    continue
                                for kind, text in rows[row].push(int(token)):
                                    self._post(Delta(row, kind, text))
                                if rows[row].stopped:
                                    finish(row, "stop")
                            if all(finished):
                                break
                    finally:
                        stream.close()
            for row in range(self.num_samples):
                if not finished[row]:
                    finish(row, "cancelled" if self.cancelled else "length")
        except Exception as e:  # a replica failure must not take the server down
            log.exception("generation failed on replica %d", replica.index)
            self.error = f"generation failed: {type(e).__name__}: {e}"
            self._post(Failure(self.error))
        finally:
            self.generated = sum(counts)
            self.elapsed = time.perf_counter() - t0
            self._post(self._END)

    async def events(self) -> AsyncIterator[Delta | Finish | Failure]:
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            yield item


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


def _parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object with a 'messages' list")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON ({e}); send a JSON object with a 'messages' list")
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, not a JSON {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _bad(*_explain(e)) from None


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
        raise _bad(f"{name} must be between {lo} and {hi}, got {value}", param=name)


def check_messages(messages: list[dict], limits: Limits) -> None:
    """Message count and length limits; `messages` are {"role", "content"} with str or
    list-of-parts content."""
    if not messages:
        raise _bad("messages is empty: send at least one user message", param="messages")
    if len(messages) > limits.max_messages:
        raise _bad(f"too many messages: {len(messages)}, the limit is {limits.max_messages}; "
                   "drop older turns", param="messages")
    total = 0
    for i, m in enumerate(messages):
        content = m["content"]
        n = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if n > limits.max_message_chars:
            raise _bad(f"messages[{i}] is {n} characters long, the limit is {limits.max_message_chars} "
                       "per message; shorten it", param=f"messages.{i}.content")
        total += n
    if total > limits.max_total_chars:
        raise _bad(f"the conversation is {total} characters long, the limit is {limits.max_total_chars}; "
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
        raise _bad(f"stop has {len(stops)} strings, the limit is {lim.max_stop}", param="stop")
    for s in stops:
        if not s or len(s) > lim.max_stop_chars:
            raise _bad(f"each stop string must be 1 to {lim.max_stop_chars} characters, got {s!r}", param="stop")
    if seed is None:
        seed = random.randrange(2**31)
    elif not (0 <= seed < 2**63):
        raise _bad(f"seed must be between 0 and {2**63 - 1}, got {seed}", param="seed")
    # the engine wants top_k=None for "no filtering"
    return Sampling(temperature=float(temperature), top_k=top_k or None, max_tokens=max_tokens,
                    seed=seed, num_samples=n, stop=tuple(stops))


def build_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for the assistant's next reply, via the tokenizer's chat rendering
    (system message folded into the first user turn; message text encoded as plain
    text). `messages` must alternate user/assistant after an optional system message
    and end with a user message."""
    if messages[-1]["role"] != "user":
        raise _bad(f"the last message must be from the user (it is {messages[-1]['role']!r}): "
                   "the server writes the assistant's next reply", param="messages")
    conversation = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    try:
        return tokenizer.render_for_completion(conversation)
    except ValueError as e:
        raise _bad(str(e).replace("conversation message", "messages"), param="messages") from None


def fit_context(prompt_len: int, sampling: Sampling, context_len: int | None) -> None:
    """The prompt must fit the model's context; the reply is cut to what is left."""
    if context_len is None:
        return
    room = context_len - prompt_len
    if room < 1:
        raise _bad(f"the conversation is {prompt_len} tokens, which does not fit the model's "
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


def openai_messages(req: OpenAIChatRequest) -> list[dict]:
    """OpenAI messages → the tokenizer's conversation messages. Leading system (or
    developer) messages become one system message; consecutive messages of the same
    role are joined, since the chat format alternates user and assistant."""
    out: list[dict] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role {m.role!r} is not supported; use system, user or assistant "
                       "(this model has no function/tool messages)", param=f"messages.{i}.role")
        if isinstance(m.content, list):
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise _bad(f"messages[{i}].content[{j}] is of type {p.type!r}; only text parts are "
                               "supported", param=f"messages.{i}.content")
            content = "".join(p.text or "" for p in m.content)
        elif m.content is None:
            raise _bad(f"messages[{i}].content is missing", param=f"messages.{i}.content")
        else:
            content = m.content
        if role == "system" and any(o["role"] != "system" for o in out):
            raise _bad(f"messages[{i}]: a system message is only supported at the start of the "
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
            raise _bad(f"{name}={value} is not supported: {hint}", param=name)
    for name in ("logit_bias", "tools", "functions"):
        if getattr(req, name):
            raise _bad(f"{name} is not supported by this model; leave it out", param=name)
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise _bad(f"response_format {fmt!r} is not supported; only plain text", param="response_format")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise _bad("max_tokens and max_completion_tokens disagree; send only one", param="max_completion_tokens")


# ---------------------------------------------------------------------------------------
# The app

def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _ui_html(settings: ServerSettings) -> str:
    html = resources.files("nanochat").joinpath("ui.html").read_text(encoding="utf-8")
    lim = settings.limits
    cfg = {
        "model": settings.model_name,
        "authRequired": settings.api_key is not None,
        "defaults": {"temperature": settings.temperature, "top_k": settings.top_k, "max_tokens": settings.max_tokens},
        "limits": {"temperature": list(lim.temperature_range), "top_k": list(lim.top_k_range),
                   "max_tokens": list(lim.max_tokens_range), "max_message_chars": lim.max_message_chars},
    }
    # "<" escaped so no string in the JSON can close the <script> element
    blob = json.dumps(cfg).replace("<", "\\u003c")
    return html.replace("/*NANOCHAT_CONFIG*/{}", blob, 1)


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 before parsing."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message
        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        err = ApiError(413, f"the request body is over {self.max_bytes} bytes; send a shorter conversation",
                       code="request_too_large")
        await _error_response(scope.get("path", ""), err)(scope, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive():
    return {"type": "http.disconnect"}


def _error_response(path: str, err: ApiError) -> JSONResponse:
    body = err.openai_body() if path.startswith("/v1/") else {"detail": err.message}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def create_app(settings: ServerSettings, load_replicas: Callable[[], Sequence[Replica]]) -> FastAPI:
    """The FastAPI app. `load_replicas` is called once at startup, in a thread (model
    loading is slow and blocking); the server answers requests once it returns."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        replicas = await asyncio.to_thread(load_replicas)
        app.state.pool = ReplicaPool(replicas, settings.max_queue)
        log.info("serving %s on %d replica(s): %s", settings.model_name, len(replicas),
                 ", ".join(str(r.device) for r in replicas))
        try:
            yield
        finally:
            log.info("shutting down: waiting up to %.0fs for %d generation(s)",
                     settings.shutdown_timeout, len(app.state.pool.active))
            await app.state.pool.close(settings.shutdown_timeout)
            log.info("all replicas released")

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_BodyLimit, max_bytes=settings.limits.max_body_bytes)
    ui_page = _ui_html(settings)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error_response(request.url.path, err)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc):
        return _error_response(request.url.path, ApiError(404, f"no such endpoint: {request.url.path}",
                                                          code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, _exc):
        return _error_response(request.url.path, ApiError(
            405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def pool_of(request: Request) -> ReplicaPool:
        return request.app.state.pool

    async def acquire(pool: ReplicaPool) -> Replica:
        try:
            return await pool.acquire()
        except PoolBusy as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy",
                           headers={"Retry-After": str(pool.retry_after())}) from None

    async def start(pool: ReplicaPool, prompt: list[int], s: Sampling) -> tuple[Generation, Replica]:
        replica = await acquire(pool)
        try:
            gen = Generation(prompt, num_samples=s.num_samples, max_tokens=s.max_tokens, temperature=s.temperature,
                             top_k=s.top_k, seed=s.seed, stop=s.stop)
            pool.start(replica, gen)
        except BaseException:
            pool.release(replica)
            raise
        return gen, replica

    # -------------------------------------------------------------- pages and status

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(ui_page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health(request: Request):
        pool = pool_of(request)
        return {
            "status": "draining" if pool.draining else "ok",
            "ready": not pool.draining,
            "model": settings.model_name,
            "replicas": [{"id": r.index, "device": str(r.device), "busy": r.busy,
                          "requests": r.requests, "errors": r.errors} for r in pool.replicas],
            "available_replicas": pool.available(),
            "queue_length": pool.waiting,
        }

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        return pool_of(request).stats()

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        pool = pool_of(request)
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": int(pool.started_at),
            "owned_by": "nanochat", "context_length": pool.context_len}]}

    # -------------------------------------------------------------- the reference API

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req: ChatRequest = _parse_body(await request.body(), ChatRequest)
        pool = pool_of(request)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else [p.model_dump() for p in m.content]} for m in req.messages]
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise _bad(f"messages[{i}].role must be 'user', 'assistant' or 'system', got {m['role']!r}",
                           param=f"messages.{i}.role")
            if not isinstance(m["content"], str) and m["role"] != "assistant":
                raise _bad(f"messages[{i}]: only assistant messages may hold tool-call parts",
                           param=f"messages.{i}.content")
            if (m["content"] if isinstance(m["content"], str) else "x") == "":
                raise _bad(f"messages[{i}] has empty content", param=f"messages.{i}.content")
        check_messages(messages, settings.limits)
        s = sampling_from(settings, temperature=req.temperature, top_k=req.top_k,
                          max_tokens=req.max_tokens, seed=req.seed)
        prompt = build_prompt(pool.tokenizer, messages)
        fit_context(len(prompt), s, pool.context_len)
        gen, replica = await start(pool, prompt, s)

        async def stream():
            try:
                async for ev in gen.events():
                    if isinstance(ev, Delta):
                        yield _sse({"token": ev.text, "gpu": replica.index, "part": ev.kind})
                    elif isinstance(ev, Finish):
                        yield _sse({"done": True, "finish_reason": ev.reason,
                                    "usage": _usage(len(prompt), ev.tokens)})
                    else:
                        yield _sse({"error": ev.message})
            finally:
                gen.cancel()  # no-op when finished; frees the replica when the client left

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- the OpenAI API

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        authorize(request)
        req: OpenAIChatRequest = _parse_body(await request.body(), OpenAIChatRequest)
        pool = pool_of(request)
        check_unsupported(req)
        messages = openai_messages(req)
        check_messages(messages, settings.limits)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        s = sampling_from(settings, temperature=req.temperature, top_k=req.top_k, max_tokens=max_tokens,
                          seed=req.seed, n=req.n, stop=req.stop)
        prompt = build_prompt(pool.tokenizer, messages)
        fit_context(len(prompt), s, pool.context_len)
        gen, _replica = await start(pool, prompt, s)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": ident, "created": created, "model": settings.model_name, "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_openai_stream(gen, head, len(prompt), s.num_samples, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _openai_complete(request, gen, head, len(prompt), s.num_samples)

    return app


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    """Cancel `gen` if the client hangs up before its (non-streamed) answer is ready."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


async def _openai_complete(request: Request, gen: Generation, head: dict, prompt_len: int, n: int) -> Response:
    texts = [""] * n
    reasons = ["length"] * n
    counts = [0] * n
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        async for ev in gen.events():
            if isinstance(ev, Delta):
                texts[ev.row] += ev.text
            elif isinstance(ev, Finish):
                reasons[ev.row], counts[ev.row] = ev.reason, ev.tokens
            else:
                raise ApiError(500, ev.message, type="server_error", code="generation_failed")
    finally:
        watcher.cancel()
        gen.cancel()
    if gen.cancelled:
        raise ApiError(503, "the generation was cancelled (the server is shutting down or the client left)",
                       type="server_error", code="cancelled")
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "finish_reason": reasons[i], "logprobs": None} for i in range(n)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": _usage(prompt_len, sum(counts))})


async def _openai_stream(gen: Generation, head: dict, prompt_len: int, n: int,
                         include_usage: bool) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        return _sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                          "logprobs": None}], **extra})
    total = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in gen.events():
            if isinstance(ev, Delta):
                yield chunk(ev.row, {"content": ev.text})
            elif isinstance(ev, Finish):
                total += ev.tokens
                if ev.reason == "cancelled":
                    yield _sse(ApiError(503, "the generation was cancelled (the server is shutting down)",
                                        type="server_error", code="cancelled").openai_body())
                    continue
                yield chunk(ev.row, {}, ev.reason)
            else:
                yield _sse(ApiError(500, ev.message, type="server_error", code="generation_failed").openai_body())
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_len, total)})
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()


# ---------------------------------------------------------------------------------------
# Running the app in a background thread (tests, notebooks)

class BackgroundServer:
    """Serve `app` with uvicorn from a daemon thread, on a socket bound before start so
    port 0 (any free port) works and there is no race for the port.

        with BackgroundServer(app) as server:
            urllib.request.urlopen(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0):
        import socket

        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        # like `nanochat serve`: in-flight replies get the settings' shutdown_timeout to finish
        grace = app.state.settings.shutdown_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=grace, timeout_keep_alive=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._startup_timeout = startup_timeout

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {self._startup_timeout:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
