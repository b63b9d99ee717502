"""Serve a chat model: web UI at / and an OpenAI-compatible API (FastAPI + uvicorn).

  nanochat serve                         # newest chat model (rl or sft), http://127.0.0.1:8000
  nanochat serve -i sft -g d20 --port 8080
  NANOCHAT_API_KEY=secret nanochat serve --host 0.0.0.0   # reachable from other machines

One model replica per GPU (or one on CPU); requests wait for a free replica, at most
--max-queue of them, beyond which the server answers 503 with Retry-After. Endpoints:
GET / (chat UI), POST /chat/completions (the reference's streaming API),
POST /v1/chat/completions and GET /v1/models (OpenAI-compatible), GET /health, GET /stats.
With an API key (--api-key or $NANOCHAT_API_KEY) every API endpoint but /health wants
`Authorization: Bearer <key>`. Ctrl-C (or SIGTERM) stops accepting connections, lets
in-flight replies finish for --shutdown-timeout seconds, then cancels them.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.serve")

SOURCES = ("sft", "rl", "base")


@dataclass
class Config:
    source: Literal["sft", "rl", "base"] | None = option(
        None, "model to serve: sft, rl or base; automatic = the newest chat model (rl or sft)", short="-i")
    tag: str | None = option(None, "checkpoint tag, e.g. d20; automatic = the largest model", short="-g")
    step: int | None = option(None, "checkpoint step; automatic = the last", short="-s")
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 makes the server reachable from other machines")
    port: int = option(8000, "port to listen on (0 picks a free one)", short="-p")
    num_workers: int | None = option(None, "model replicas; automatic = one per GPU on CUDA, 1 otherwise")
    api_key: str | None = option(None, "require `Authorization: Bearer <key>` on the API; "
                                       "automatic = $NANOCHAT_API_KEY, no key when unset")
    max_queue: int = option(16, "requests that may wait for a busy replica; more get 503 + Retry-After")
    temperature: float = option(0.8, "default sampling temperature", short="-t")
    top_k: int = option(50, "default top-k (0: no top-k filtering)", short="-k")
    max_tokens: int = option(512, "default reply length limit in tokens", short="-m")
    temperature_range: tuple[float, float] = option((0.0, 2.0), "allowed temperature range: MIN MAX")
    top_k_range: tuple[int, int] = option((0, 200), "allowed top-k range: MIN MAX")
    max_tokens_range: tuple[int, int] = option((1, 4096), "allowed max_tokens range: MIN MAX")
    max_messages: int = option(500, "most messages in one request")
    max_message_chars: int = option(8000, "most characters in one message")
    max_total_chars: int = option(32000, "most characters in one conversation")
    max_choices: int = option(4, "most replies per request (the OpenAI API's n)")
    shutdown_timeout: float = option(10.0, "seconds in-flight replies may take to finish on shutdown")
    cors_origins: list[str] = option(help="origins allowed to call the API from other web pages ('*': any)",
                                     factory=list)
    model_name: str | None = option(None, "model id reported by the API; automatic = nanochat-<source>[-<tag>]")
    access_log: bool = option(True, "log one line per HTTP request")
    compile: bool = option(False, "decode through torch.compile graphs; one reply's is compiled at startup "
                                  "(~40 s on a small CPU; n > 1 compiles one more per n and power-of-two reply "
                                  "length; see nanochat/engine.py)")

    def validate(self) -> None:
        p = []
        if not 0 <= self.port <= 65535:
            p.append(f"--port must be between 0 and 65535, got {self.port}")
        if self.num_workers is not None and self.num_workers < 1:
            p.append(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.max_queue < 0:
            p.append(f"--max-queue must be 0 or more, got {self.max_queue}")
        for name in ("max_messages", "max_message_chars", "max_total_chars", "max_choices"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name, default, floor in (("temperature_range", self.temperature, 0),
                                     ("top_k_range", self.top_k, 0), ("max_tokens_range", self.max_tokens, 1)):
            flag = "--" + name.replace("_", "-")
            bounds = tuple(getattr(self, name))
            if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < floor:
                p.append(f"{flag} takes MIN MAX with {floor} <= MIN <= MAX, got {' '.join(map(str, bounds))}")
            elif not bounds[0] <= default <= bounds[1]:
                default_flag = "--" + name.removesuffix("_range").replace("_", "-")
                p.append(f"{default_flag} {default} is outside {flag} {bounds[0]} {bounds[1]}")
        if self.shutdown_timeout < 0:
            p.append(f"--shutdown-timeout must be 0 or more, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            p.append("--api-key is empty; leave it out to serve without a key")
        check(p)


# -----------------------------------------------------------------------------

def newest_chat_source(base_dir: Path) -> str:
    """'rl' or 'sft', whichever holds the most recently completed checkpoint."""
    from nanochat.checkpoint import complete_steps, meta_path, stage_root

    best: tuple[float, str] | None = None
    for source in ("rl", "sft"):
        root = stage_root(base_dir, source)
        tags = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
        for tag_dir in tags:
            for step in complete_steps(tag_dir):
                mtime = meta_path(tag_dir, step).stat().st_mtime
                if best is None or mtime > best[0]:
                    best = (mtime, source)
    if best is None:
        raise MissingInputError(f"no chat model (sft or rl checkpoint) under {base_dir}: train one with "
                                "`nanochat sft`, or serve the base model with `-i base`")
    return best[1]


def replica_devices(runtime: Runtime, num_workers: int | None) -> list[torch.device]:
    if runtime.device_type == "cuda":
        available = torch.cuda.device_count()
        n = available if num_workers is None else num_workers
        if n > available:
            raise UserError(f"--num-workers {n} asks for more replicas than the {available} visible GPU(s); "
                            f"use at most {available} (one replica per GPU)")
        return [torch.device("cuda", i) for i in range(n)]
    n = 1 if num_workers is None else num_workers
    if runtime.device_type == "mps" and n > 1:
        raise UserError("--num-workers > 1 needs several GPUs; on mps use 1")
    # several CPU replicas share the cores; they only help with many small requests
    return [runtime.device] * n


def make_loader(config: Config, source: str, runtime: Runtime, devices: list[torch.device]):
    """A function that loads one replica per device."""
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    from nanochat.server import Replica

    def load():
        replicas = []
        for index, device in enumerate(devices):
            model, tokenizer, meta = load_model(source, runtime.base_dir, device, runtime.dtype,
                                                tag=config.tag, step=config.step)
            model.eval()
            engine = Engine(model, tokenizer, compile=config.compile)
            engine.precompile()  # before the port opens: the first request does not wait for the compiler
            replicas.append(Replica(index=index, engine=engine, tokenizer=tokenizer,
                                    device=device, context_len=context_length(model, meta)))
            log.info("replica %d: %s step %s on %s", index, source, meta.get("step", "?"), device)
        return replicas
    return load


def context_length(model, meta: dict) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "sequence_len", None):
        return int(cfg.sequence_len)
    return (meta.get("model_config") or {}).get("sequence_len")


def server_settings(config: Config, model_name: str):
    from nanochat.server import Limits, ServerSettings

    limits = Limits(max_messages=config.max_messages, max_message_chars=config.max_message_chars,
                    max_total_chars=config.max_total_chars,
                    temperature_range=tuple(map(float, config.temperature_range)),
                    top_k_range=tuple(map(int, config.top_k_range)),
                    max_tokens_range=tuple(map(int, config.max_tokens_range)),
                    max_choices=config.max_choices)
    api_key = config.api_key if config.api_key is not None else (os.environ.get("NANOCHAT_API_KEY") or None)
    return ServerSettings(model_name=model_name, limits=limits, temperature=config.temperature,
                          top_k=config.top_k, max_tokens=config.max_tokens, api_key=api_key,
                          max_queue=config.max_queue, shutdown_timeout=config.shutdown_timeout,
                          cors_origins=tuple(config.cors_origins))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(config: Config, runtime: Runtime) -> dict:
    import uvicorn

    from nanochat.server import create_app

    source = config.source or newest_chat_source(runtime.base_dir)
    model_name = config.model_name or "-".join(["nanochat", source] + ([config.tag] if config.tag else []))
    settings = server_settings(config, model_name)
    if not _is_loopback(config.host) and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(set NANOCHAT_API_KEY to require one)", config.host)
    devices = replica_devices(runtime, config.num_workers)
    # load before uvicorn starts, so a missing checkpoint is one clear CLI error
    replicas = make_loader(config, source, runtime, devices)()
    app = create_app(settings, lambda: replicas)
    server = make_uvicorn_server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=logging.getLevelName(log.getEffectiveLevel()).lower(),
        access_log=config.access_log, timeout_graceful_shutdown=config.shutdown_timeout,
        timeout_keep_alive=5), on_exit=lambda: _start_draining(app))
    server.run()
    pool = getattr(app.state, "pool", None)
    if pool is None:
        raise RuntimeError("the server did not start (see the log above)")
    return {k: v for k, v in pool.stats().items() if k not in ("busy_replicas", "available_replicas", "queue_length")}


def make_uvicorn_server(uv_config, on_exit=None):
    """A uvicorn.Server whose SIGINT/SIGTERM handling ends `run()` normally.

    Stock uvicorn re-raises the signal after its graceful shutdown, so the process dies
    of it; for `nanochat serve` a signal is the normal way to stop, so run() returns
    and the CLI exits 0 after logging what was served. `on_exit` is called as soon as
    the signal arrives (the app stops handing replicas to queued requests)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield  # signals can only be caught in the main thread
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    return Server(uv_config)


def _start_draining(app) -> None:
    pool = getattr(app.state, "pool", None)
    if pool is not None:
        pool.draining = True
