"""The OpenAI-compatible API, driven by the official `openai` package and raw HTTP, on
the tiny real checkpoint; plus the incremental decoder and stop strings."""
from __future__ import annotations

import openai
import pytest

from nanochat.server import Limits, RowDecoder, parts_from_marked_text
from serve_utils import load_tiny, post, request, sse_events, start_server

KEY = "test-key"
HI = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sun."}]


@pytest.fixture(scope="module")
def tiny(tiny_base_checkpoint):
    return load_tiny(tiny_base_checkpoint)


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    server = start_server(model, tok, api_key=KEY, model_name="nanochat-tiny", max_tokens=32,
                          limits=Limits(max_tokens_range=(1, 48), max_choices=3))
    yield server
    server.server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_completion_with_the_openai_client(client, live, tiny):
    _, tok = tiny
    resp = client.chat.completions.create(model="nanochat-tiny", messages=HI, max_tokens=16, seed=7)
    assert resp.object == "chat.completion" and resp.model == "nanochat-tiny" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # the system message is folded into the first user turn, as the tokenizer renders it
    expected = tok.render_for_completion({"messages": [*HI, {"role": "assistant", "content": ""}]})
    assert live.spies[0].prompts[-1] == expected
    assert resp.usage.prompt_tokens == len(expected)
    assert 1 <= resp.usage.completion_tokens <= 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_completion_equals_the_unstreamed_one(client):
    kw = dict(model="whatever", messages=HI, max_tokens=20, seed=11, temperature=0.9)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_share_one_prompt(client, live):
    before = len(live.spies[0].prompts)
    resp = client.chat.completions.create(model="m", messages=HI, n=3, max_tokens=8, temperature=0.0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    contents = {c.message.content for c in resp.choices}
    assert len(contents) == 1 and "" not in contents  # greedy: all the same
    assert len(live.spies[0].prompts) == before + 1  # one engine call, num_samples=3
    stream = list(client.chat.completions.create(model="m", messages=HI, n=2, max_tokens=6, stream=True, seed=3))
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert set(texts) == set(finished) == {0, 1} and all(texts.values()), (texts, finished)


def test_stop_strings_cut_the_reply(client):
    base = client.chat.completions.create(model="m", messages=HI, max_tokens=24, temperature=0.0)
    text = base.choices[0].message.content
    if len(text) < 6:
        pytest.skip(f"the tiny model's greedy reply is too short to cut: {text!r}")
    stop = text[3:6]
    expect = text[:text.index(stop)]
    cut = client.chat.completions.create(model="m", messages=HI, max_tokens=24, temperature=0.0, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == expect and cut.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="m", messages=HI, max_tokens=24, temperature=0.0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expect


def test_max_tokens_and_max_completion_tokens(client):
    for kw in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        resp = client.chat.completions.create(model="m", messages=HI, temperature=1.0, top_p=1, seed=5, **kw)
        assert resp.usage.completion_tokens <= 3
        if resp.choices[0].finish_reason == "length":
            assert resp.usage.completion_tokens == 3


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["nanochat-tiny"]


@pytest.mark.parametrize("kw, param, words", [
    ({"temperature": 3.0}, "temperature", "between"),
    ({"top_p": 0.5}, "top_p", "not supported"),
    ({"n": 4}, "n", "between 1 and 3"),
    ({"max_tokens": 49}, "max_tokens", "between 1 and 48"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "limit is 4"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "disagree"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "only text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages.1.role", "only supported at the start"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "last message must be from the user"),
])
def test_openai_errors_are_shaped_like_openai(client, kw, param, words):
    kw = {"model": "m", "messages": HI, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def test_raw_http_errors_auth_and_content_parts(live):
    url = live.url + "/v1/chat/completions"
    r = post(url, {"messages": HI})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(url, raw=b"{nope", headers=auth())
    assert r.status == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(url, {"messages": [{"role": "user", "content": 5}]}, headers=auth())
    assert r.status == 400 and r.json()["error"]["param"] == "messages.0.content"
    assert request(live.url + "/v1/nothing", headers=auth()).json()["error"]["code"] == "not_found"
    # text content parts and consecutive user messages are joined
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]},
             {"role": "user", "content": "Please."}]
    r = post(url, {"messages": parts, "max_tokens": 2, "stream": True}, headers=auth())
    events = sse_events(r.body)
    assert r.status == 200 and events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"]
    tok = live.spies[0]
    assert tok.prompts[-1] == live.pool.tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": "Tell me a story.\n\nPlease."}, {"role": "assistant", "content": ""}]})


def test_assistant_tool_calls_round_trip():
    text = "Let me check. <|python_start|>2+2<|python_end|><|output_start|>4<|output_end|> So 4."
    assert parts_from_marked_text(text) == [
        {"type": "text", "text": "Let me check. "}, {"type": "python", "text": "2+2"},
        {"type": "python_output", "text": "4"}, {"type": "text", "text": " So 4."}]
    assert parts_from_marked_text("plain <|assistant_end|>") == "plain <|assistant_end|>"


# ---------------------------------------------------------------------------------------
# the incremental decoder (real tokenizer)

def _decode_all(tok, ids, stop=()):
    dec = RowDecoder(tok, stop)
    pieces = []
    for t in ids:
        pieces += dec.push(t)
        if dec.stopped:
            break
    pieces += dec.finish()
    return pieces, dec


def test_decoder_keeps_multibyte_characters_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "naïve café — 東京 🎉 done"
    ids = tok.encode(text)
    pieces, dec = _decode_all(tok, ids)
    assert "".join(t for _, t in pieces) == text == dec.text
    assert all("\ufffd" not in t for _, t in pieces)


def test_decoder_tool_markers_and_stop_strings(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    ids = (tok.encode("x is ") + [sp("<|python_start|>")] + tok.encode("6*7") + [sp("<|python_end|>"), sp("<|output_start|>")]
           + tok.encode("42") + [sp("<|output_end|>")] + tok.encode(" so forty-two. END and more"))
    pieces, dec = _decode_all(tok, ids)
    kinds = [k for k, _ in pieces]
    assert "python" in kinds and "python_output" in kinds and kinds.count("marker") == 4
    assert "".join(t for k, t in pieces if k == "python") == "6*7"
    assert "".join(t for k, t in pieces if k == "python_output") == "42"
    full = dec.text
    assert full.startswith("x is <|python_start|>6*7<|python_end|>")
    # a stop string spanning several tokens cuts exactly before it
    pieces, dec = _decode_all(tok, ids, stop=["y-two. E"])
    assert dec.stopped and dec.text == full[:full.index("y-two. E")]
    # stop strings never seen leave the text intact and release what was held back
    pieces, dec = _decode_all(tok, ids, stop=["zzz", "more!"])
    assert not dec.stopped and dec.text == full
