"""A loopback HTTP file server for tests, with scripted failures.

    with FileServer(root, faults={"/shard_00000.parquet": ["500", "drop", "truncate"]}) as srv:
        download_file(srv.url + "/shard_00000.parquet", dest)

Serves the files under `root` (GET only) on 127.0.0.1 at a free port, each request on
its own thread. `faults` maps a URL path to the failures its next requests get, in
order; once they are used up the file is served normally. Fault kinds:

    "500", "503", "429", ...  that HTTP status (503/429 carry "Retry-After: 0")
    "drop"                    close the connection without answering
    "truncate"                announce the full Content-Length, send half, close
    "slow"                    say nothing for `slow_seconds`, then answer normally
    "corrupt"                 200 with the right length but zeroed bytes
    "delay"                   wait `slow_seconds`, then answer normally (for lock tests)

`requests` records (path, fault or "ok" or "404") for every request, in order.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(self, root: str | Path, faults: dict[str, list[str]] | None = None, slow_seconds: float = 1.0):
        self.root = Path(root).resolve()
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.slow_seconds = slow_seconds
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FileServer":
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="test-http-server")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None, "use the server as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ bookkeeping
    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self.faults.get(path)
            fault = queue.pop(0) if queue else None
            return fault

    def _record(self, path: str, what: str) -> None:
        with self._lock:
            self.requests.append((path, what))


def _make_handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            target = (server.root / path.lstrip("/")).resolve()
            if server.root not in target.parents or not target.is_file():
                server._record(path, "404")
                self._status(404)
                return
            fault = server._next_fault(path)
            server._record(path, fault or "ok")
            data = target.read_bytes()
            try:
                if fault is None:
                    self._send(data)
                elif fault.isdigit():
                    self._status(int(fault), retry_after=fault in ("429", "503"))
                elif fault == "drop":
                    self.close_connection = True
                elif fault == "truncate":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif fault in ("slow", "delay"):
                    time.sleep(server.slow_seconds)
                    self._send(data)
                elif fault == "corrupt":
                    self._send(bytes(len(data)))
                else:
                    raise ValueError(f"unknown fault {fault!r}")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (e.g. after its timeout)

        def _send(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, retry_after: bool = False) -> None:
            body = f"status {code}\n".encode()
            self.send_response(code)
            if retry_after:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
