"""The FastAPI app: routes, the chat page, error rendering, the body-size limit, and
BackgroundServer (uvicorn in a thread, for tests and notebooks).

Endpoints
    GET  /                      the chat web UI (nanochat/server/ui.html, self-contained)
    POST /chat/completions      the reference's streaming API: SSE lines
                                `data: {"token": str, "gpu": int, "part": str}` then
                                `data: {"done": true, "finish_reason": ..., "usage": {...}}`
    POST /v1/chat/completions   OpenAI-compatible chat completions (streaming or not)
    GET  /v1/models             OpenAI-compatible model list (one model)
    GET  /health                replica status (never needs the API key)
    GET  /stats                 queue length, requests, tokens served, tokens/s
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nanochat.server.generation import Delta, Finish, Generation
from nanochat.server.pool import PoolBusy, Replica, ReplicaPool
from nanochat.server.protocol import (ApiError, ChatRequest, OpenAIChatRequest, Sampling, build_prompt,
                                      chat_messages, check_messages, check_unsupported, fit_context,
                                      openai_messages, parse_body, sampling_from, sse, usage)
from nanochat.server.settings import ServerSettings

log = logging.getLogger("nanochat.server")


def _ui_html(settings: ServerSettings) -> str:
    html = resources.files("nanochat.server").joinpath("ui.html").read_text(encoding="utf-8")
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
        req: ChatRequest = parse_body(await request.body(), ChatRequest)
        pool = pool_of(request)
        messages = chat_messages(req)
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
                        yield sse({"token": ev.text, "gpu": replica.index, "part": ev.kind})
                    elif isinstance(ev, Finish):
                        yield sse({"done": True, "finish_reason": ev.reason,
                                   "usage": usage(len(prompt), ev.tokens)})
                    else:
                        yield sse({"error": ev.message})
            finally:
                gen.cancel()  # no-op when finished; frees the replica when the client left

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- the OpenAI API

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        authorize(request)
        req: OpenAIChatRequest = parse_body(await request.body(), OpenAIChatRequest)
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
                         "usage": usage(prompt_len, sum(counts))})


async def _openai_stream(gen: Generation, head: dict, prompt_len: int, n: int,
                         include_usage: bool) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
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
                    yield sse(ApiError(503, "the generation was cancelled (the server is shutting down)",
                                       type="server_error", code="cancelled").openai_body())
                    continue
                yield chunk(ev.row, {}, ev.reason)
            else:
                yield sse(ApiError(500, ev.message, type="server_error", code="generation_failed").openai_body())
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_len, total)})
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
