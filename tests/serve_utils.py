"""Helpers shared by the serving tests: a live server on 127.0.0.1 over the tiny real
checkpoint, and small stdlib HTTP/SSE clients (no third-party HTTP library needed)."""
from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch

from nanochat.server import BackgroundServer, Limits, Replica, ServerSettings, create_app


def load_tiny(base_dir):
    """(model, tokenizer) of the session's tiny base checkpoint, on CPU in fp32."""
    from nanochat.checkpoint import load_model

    model, tokenizer, _meta = load_model("base", base_dir, torch.device("cpu"), torch.float32)
    model.eval()
    return model, tokenizer


class SpyEngine:
    """The real Engine, plus a record of every prompt it was given and an optional
    pause after each step (so a test can act while a reply is still streaming)."""

    def __init__(self, engine, step_delay: float = 0.0):
        self.engine = engine
        self.step_delay = step_delay
        self.prompts: list[list[int]] = []

    def generate(self, tokens, **kwargs):
        self.prompts.append(list(tokens))
        for step in self.engine.generate(tokens, **kwargs):
            yield step
            if self.step_delay:
                time.sleep(self.step_delay)


@dataclass
class Live:
    server: BackgroundServer
    spies: list[SpyEngine] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pool(self):
        return self.server.app.state.pool


def start_server(model, tokenizer, *, replicas: int = 1, step_delay: float = 0.0, context_len=None,
                 **settings) -> Live:
    from nanochat.engine import Engine

    limits = settings.pop("limits", Limits())
    settings.setdefault("model_name", "nanochat-test")
    spies = [SpyEngine(Engine(model, tokenizer), step_delay) for _ in range(replicas)]
    if context_len is None:
        context_len = model.config.sequence_len

    def load():
        return [Replica(index=i, engine=spy, tokenizer=tokenizer, context_len=context_len)
                for i, spy in enumerate(spies)]
    app = create_app(ServerSettings(limits=limits, **settings), load)
    return Live(BackgroundServer(app).start(), spies)


# ---------------------------------------------------------------------------------------
# HTTP

@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(url: str, method: str = "GET", body=None, headers: dict | None = None,
            raw: bytes | None = None, timeout: float = 60.0) -> Reply:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, parts.path or "/", body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def post(url: str, body=None, **kw) -> Reply:
    return request(url, "POST", body, **kw)


def sse_events(body: bytes) -> list:
    """`data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a str)."""
    out = []
    for block in body.decode().split("\n\n"):
        block = block.strip()
        if block.startswith("data:"):
            payload = block[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Stream:
    """An SSE response read event by event; `close()` hangs up mid-stream."""

    def __init__(self, url: str, body: dict, headers: dict | None = None, timeout: float = 60.0):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.conn.request("POST", parts.path, body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def events(self):
        buf = b""
        while True:
            line = self.resp.readline()
            if not line:
                return
            if line.strip() == b"":
                if buf.startswith(b"data:"):
                    payload = buf[5:].strip().decode()
                    yield payload if payload == "[DONE]" else json.loads(payload)
                buf = b""
            else:
                buf += line

    def close(self) -> None:
        self.conn.close()


def run_threads(fn, n: int) -> list:
    """Run fn(i) for i in range(n) all at once; results in order."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # reported by the caller's assertions
            results[i] = e
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results
