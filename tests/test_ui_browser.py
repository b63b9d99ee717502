"""The chat page in a real headless chromium (Debian's /usr/bin/chromium, driven over the
DevTools protocol on a pipe): send, watch the reply stream in, regenerate, edit, stop,
and screenshots (desktop, phone, dark) under $NANOCHAT_ARTIFACTS or tests/artifacts/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser.cdp import CHROMIUM, Browser
from serve_utils import load_tiny, request, start_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)"),
]

STEP_DELAY = 0.015  # seconds per token, so the page can be seen mid-stream
ARTIFACTS = Path(os.environ.get("NANOCHAT_ARTIFACTS") or Path(__file__).parent / "artifacts")

LAST_REPLY = "(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop(); return m ? m.querySelector('.content').innerText : null })()"


@pytest.fixture(scope="module")
def live(tiny_base_checkpoint):
    model, tok = load_tiny(tiny_base_checkpoint)
    server = start_server(model, tok, step_delay=STEP_DELAY, max_tokens=48, model_name="nanochat-tiny")
    yield server
    server.server.stop()


STREAMING = "!!document.querySelector('.msg.assistant[aria-busy=true] .content p')"
ENDED = "Number(document.body.dataset.replies || 0)"


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def open_page(b: Browser, url: str, width: int = 1280, height: int = 860, scale: float = 1.0,
              mobile: bool = False, scheme: str = "light") -> Browser:
    """A fresh page load with a clean localStorage, at the given screen size."""
    b.viewport(width, height, scale, mobile)
    b.color_scheme(scheme)
    b.goto(url)
    b.js("localStorage.clear()")
    b.goto(url)
    return b


def send(b: Browser, text: str) -> None:
    b.click("#input")
    b.type_text(text)
    b.press("Enter", "Enter", 13)


def wait_reply(b: Browser, ended_before: int) -> bool:
    """Wait until one more reply has ended; True if part of it was seen while it streamed."""
    seen = b.wait_for(f"{STREAMING} ? 'streaming' : ({ENDED} > {ended_before} ? 'ended' : '')") == "streaming"
    b.wait_for(f"{ENDED} > {ended_before}")
    return seen


def test_chat_page_streams_regenerates_edits_and_stops(live, browser):
    b = open_page(browser, live.url + "/")
    assert b.js("document.title") == "nanochat"
    assert b.js("document.querySelector('#model').textContent") == "nanochat-tiny"
    assert b.js("document.querySelectorAll('.chip').length") == 4

    # Shift+Enter is a newline, Enter sends; HTML typed by the user is shown as text
    b.click("#input")
    b.type_text("Hello <b>there</b>")
    b.press("Enter", "Enter", 13, modifiers=8)
    assert b.js("document.querySelector('#input').value") == "Hello <b>there</b>\n"
    b.type_text("What is the sun?")
    b.press("Enter", "Enter", 13)
    streamed = [wait_reply(b, 0)]
    assert b.js("document.querySelector('.msg.user .bubble').textContent") == "Hello <b>there</b>\nWhat is the sun?"
    assert b.js("document.querySelector('.msg.user .bubble b')") is None
    first = b.js(LAST_REPLY)
    assert first and first.strip()
    assert "tok/s" in b.js("document.querySelector('.msg.assistant .info').textContent")
    requests_before = request(live.url + "/stats").json()["requests"]

    # regenerate replaces the reply with a new one
    b.click("[data-action=regenerate]")
    streamed.append(wait_reply(b, 1))
    assert b.js("document.querySelectorAll('.msg.assistant').length") == 1
    assert b.js(LAST_REPLY).strip()
    assert request(live.url + "/stats").json()["requests"] == requests_before + 1
    assert len(live.spies[0].prompts[-1]) == len(live.spies[0].prompts[-2])  # same conversation re-asked

    # a second turn, then a screenshot of the conversation
    send(b, "Tell me more.")
    streamed.append(wait_reply(b, 2))
    assert b.js("document.querySelectorAll('.msg.assistant').length") == 2
    # the replies streamed in: text was on the page before they were complete
    assert any(streamed)
    shot = b.screenshot(ARTIFACTS / "ui_desktop.png")
    assert shot.stat().st_size > 10_000

    # edit the first message: the conversation is cut there and continues from the edit
    b.js("document.querySelectorAll('.msg.user')[0].querySelector('[data-action=edit]').click()")
    b.wait_for("!!document.querySelector('.edit textarea')")
    b.js("(() => { const t = document.querySelector('.edit textarea'); t.value = 'Edited question'; })()")
    # a DOM click, like the edit button's above: a coordinate click could land before the
    # freshly laid-out button was there on a loaded machine (seen twice in CI)
    b.wait_for("!!document.querySelector('[data-action=save-edit]')")
    b.js("document.querySelector('[data-action=save-edit]').click()")
    wait_reply(b, 3)
    assert b.js("[...document.querySelectorAll('.msg.user .bubble')].map(e => e.textContent)") == ["Edited question"]
    assert b.js("document.querySelectorAll('.msg.assistant').length") == 1

    # stop: Esc aborts the fetch mid-stream; the partial reply stays, marked as stopped
    live.spies[0].step_delay = 0.1  # a slower reply leaves time to stop it
    try:
        for _attempt in range(3):  # the tiny model may end a reply after a token or two
            ended = b.js(ENDED)
            send(b, "One more thing")
            if b.wait_for(f"{STREAMING} ? 'streaming' : ({ENDED} > {ended} ? 'ended' : '')") == "streaming":
                break
        b.press("Escape", "Escape", 27)
        b.wait_for("!!document.querySelector('.stopped')")
    finally:
        live.spies[0].step_delay = STEP_DELAY
    assert b.js("document.querySelector('#send').getAttribute('aria-label')") == "Send"
    partial = b.js(LAST_REPLY)
    assert partial.strip(), "the partial reply is kept"

    # new chat empties the page
    b.click("#new-chat")
    assert b.js("document.querySelectorAll('.msg').length") == 0
    assert not any(c.startswith("exception") for c in b.console), b.console


def test_errors_are_shown_to_the_user(live, browser):
    b = open_page(browser, live.url + "/", width=1000, height=700)
    # a request the server refuses (temperature outside the allowed range)
    b.js("settings.temperature = 9")
    send(b, "hi")
    b.wait_for("!!document.querySelector('.error')")
    assert "temperature must be between" in b.js("document.querySelector('.error-text').textContent")
    b.js("settings.temperature = 0.5")
    assert b.js(ENDED) == 1
    b.click(".error .btn")  # retry
    wait_reply(b, 1)
    assert b.js("document.querySelector('.error')") is None


def test_phone_width_and_dark_screenshots(live, browser):
    b = open_page(browser, live.url + "/", width=390, height=844, scale=2, mobile=True)
    b.screenshot(ARTIFACTS / "ui_phone_empty.png")
    send(b, "What is the capital of France?")
    wait_reply(b, 0)
    # nothing wider than the screen: no horizontal scrolling on a phone
    assert b.js("document.documentElement.scrollWidth <= window.innerWidth")
    assert b.js("document.querySelector('.avatar').offsetParent === null")  # avatars hidden
    b.screenshot(ARTIFACTS / "ui_phone.png")
    b = open_page(browser, live.url + "/", scheme="dark")
    send(b, "Good evening")
    wait_reply(b, 0)
    bg = b.js("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(19, 19, 24)", bg  # the dark palette is in use
    b.screenshot(ARTIFACTS / "ui_dark.png")
