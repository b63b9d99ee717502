"""A tiny Chrome DevTools Protocol client over --remote-debugging-pipe (stdlib only).

Chromium reads NUL-terminated JSON commands from fd 3 and writes replies and events
to fd 4, so no port, no websocket library and no chromedriver are needed. The two
pipes are put on fds 3 and 4 by bash redirections (no preexec_fn, which is unsafe
with threads running, as they are while a test server is up).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
    "--mute-audio", "--hide-scrollbars", "--no-proxy-server", "--remote-debugging-pipe",
]


class CDPError(RuntimeError):
    pass


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless chromium with one page. Use as a context manager."""

    def __init__(self, executable: str = CHROMIUM, width: int = 1280, height: int = 860,
                 scale: float = 1.0, mobile: bool = False, timeout: float = 30.0):
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="nanochat-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # move the child's ends above fd 9 so the redirections to 3 and 4 cannot clobber them
        to_child_r, from_child_w = (_high_fd(to_child_r), _high_fd(from_child_w))
        script = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self.console: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.viewport(width, height, scale, mobile)

    # ------------------------------------------------------------------ plumbing

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                        if msg.get("method") == "Runtime.consoleAPICalled":
                            args = msg["params"].get("args", [])
                            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
                        if msg.get("method") == "Runtime.exceptionThrown":
                            self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])
                    self._cond.notify_all()

    def call(self, method: str, session: bool = False, **params) -> dict:
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise CDPError(f"{method}: no reply from chromium (exit code {self.proc.poll()}; "
                                   f"stderr: {b''.join(self._stderr)[-800:].decode(errors='replace')})")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # ------------------------------------------------------------------ page helpers

    def viewport(self, width: int, height: int, scale: float = 1.0, mobile: bool = False) -> None:
        """Emulate a screen (mobile: a touch phone, with its viewport meta honoured)."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=scale, mobile=mobile)
        self.call("Emulation.setTouchEmulationEnabled", session=True, enabled=mobile, maxTouchPoints=5)

    def goto(self, url: str) -> None:
        """Load `url` and wait for the new document (not the old one) to be complete."""
        self.js("window.__leaving = true")
        reply = self.call("Page.navigate", session=True, url=url)
        if reply.get("errorText"):
            raise CDPError(f"could not load {url}: {reply['errorText']}")
        self.wait_for("!window.__leaving && document.readyState === 'complete'")

    def js(self, expression: str) -> Any:
        """Evaluate `expression` in the page (promises are awaited); return its value."""
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Poll until `expression` is truthy in the page; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r}; console: {self.console[-5:]}")
            time.sleep(interval)

    def type_text(self, text: str) -> None:
        """Type into the focused element as a keyboard would (insertText, no key codes)."""
        self.call("Input.insertText", session=True, text=text)

    def press(self, key: str, code: str, key_code: int, modifiers: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            params = dict(type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                          nativeVirtualKeyCode=key_code, modifiers=modifiers)
            if key == "Enter" and kind == "keyDown":
                params["text"] = "\r"
            self.call("Input.dispatchKeyEvent", session=True, **params)

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element matched by `selector`."""
        box = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                      clickCount=1 if kind != "mouseMoved" else 0)

    def color_scheme(self, scheme: str) -> None:
        self.call("Emulation.setEmulatedMedia", session=True,
                  features=[{"name": "prefers-color-scheme", "value": scheme}])

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    os.write(self._to_child, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                except OSError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
