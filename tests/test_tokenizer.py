"""The tokenizer: round trips, special tokens, chat rendering and masks, file formats."""
from __future__ import annotations

import copy
import pickle
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest
import regex
import tiktoken
import torch

from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_token_bytes, get_tokenizer,
                                iter_capped, validate_conversation)


@pytest.fixture(scope="module")
def shard_docs(shared_data) -> list[str]:
    """Real documents from the first training shard."""
    path = shared_data / "pretrain_openstax" / "base_data" / "shard_00000.parquet"
    docs = pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist()[:40]
    assert len(docs) >= 10 and all(docs)  # the tests below index and loop over them
    return docs


def _random_text(rng: random.Random, n: int) -> str:
    # draw from ASCII, Latin-1, Greek/Cyrillic, CJK, Hangul, emoji and combining marks;
    # surrogates (U+D800-DFFF) are left out: they are not valid in UTF-8 text
    ranges = [(0x20, 0x7E), (0x0A, 0x0D), (0xA0, 0xFF), (0x370, 0x4FF), (0x300, 0x36F),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("text", [
    "",
    "Hello, world! It's 2024; we'll've done 1,234,567.89 things.",
    "emoji 🙂👍🏽 👩‍👩‍👧‍👦 🇰🇷 flags and ZWJ sequences",
    "CJK 東京都 北京 日本語のテキスト, Hangul 한국어 문장입니다",
    "combining: e\u0301 a\u0308\u0323 Z\u0335\u0321\u0358 and precomposed é",
    "RTL: שלום עולם مرحبا بالعالم",
    "controls \x00\x01\x7f\t\r\n  \n\n\n   trailing   ",
    "\ufeffBOM, \u200b zero width, \U0010FFFF max code point",
])
def test_round_trip_unicode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert bool(ids) == bool(text)  # only the empty text encodes to nothing
    assert all(0 <= i < tiny_tokenizer.get_vocab_size() for i in ids)


def test_round_trip_random_strings(tiny_tokenizer):
    rng = random.Random(1234)
    for _ in range(200):
        text = _random_text(rng, rng.randint(0, 60))
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_surrogates_are_repaired_not_fatal(tiny_tokenizer):
    # a lone surrogate cannot be UTF-8 encoded: it becomes U+FFFD
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("a\ud800b")) == "a\ufffdb"
    # a surrogate pair (as produced by some JSON decoders) is joined into its character
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("x\ud83d\ude00y")) == "x😀y"
    assert tiny_tokenizer.encode(["a\udfffb"]) == [tiny_tokenizer.encode("a\ufffdb")]


def test_split_pattern_groups_digits_in_pairs(tiny_tokenizer):
    assert regex.findall(SPLIT_PATTERN, "12345 abc") == ["12", "34", "5", " abc"]
    assert tiny_tokenizer.enc._pat_str == SPLIT_PATTERN
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode("year 1987654")]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert "".join(digits) == "1987654" and all(len(d) <= 2 for d in digits)


def test_batch_encode_equals_single(tiny_tokenizer, shard_docs):
    rng = random.Random(7)
    texts = shard_docs + [_random_text(rng, 50) for _ in range(20)] + [""]
    single = [tiny_tokenizer.encode(t) for t in texts]
    assert tiny_tokenizer.encode(texts, num_threads=4) == single
    bos = tiny_tokenizer.get_bos_token_id()
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    assert tiny_tokenizer.encode(texts, prepend="<|bos|>", append=end) == [[bos] + s + [end] for s in single]
    assert tiny_tokenizer.encode(texts[0], prepend=bos, append="<|assistant_end|>") == [bos] + single[0] + [end]
    assert tiny_tokenizer(texts[1]) == single[1]
    with pytest.raises(ValueError, match="str or a list of str"):
        tiny_tokenizer.encode(b"bytes")


# ----------------------------------------------------------------------------- special tokens

def test_special_tokens_take_the_last_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.get_vocab_size() == 2048
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS) and len(SPECIAL_TOKENS) == 9
    first = tok.get_vocab_size() - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(first, tok.get_vocab_size()))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    assert tok.id_to_token(tok.get_bos_token_id()) == "<|bos|>"
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


def test_special_strings_in_text_stay_plain_text(tiny_tokenizer):
    special_ids = {tiny_tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    for s in SPECIAL_TOKENS:
        ids = tiny_tokenizer.encode(f"say {s} now")
        assert not special_ids & set(ids)
        assert tiny_tokenizer.decode(ids) == f"say {s} now"


def _special_counts(tok: Tokenizer, ids: list[int]) -> Counter:
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    return Counter(i for i in ids if i in special_ids)


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
@pytest.mark.parametrize("where", ["system", "user", "assistant", "python", "python_output"])
def test_conversation_injection_gets_no_special_token(tiny_tokenizer, special, where):
    """A message that spells a special token must render exactly like one that does not."""
    def conversation(payload: str) -> dict:
        sys_text = f"be nice {payload}" if where == "system" else "be nice"
        user_text = f"hi {payload}" if where == "user" else "hi"
        parts = [{"type": "text", "text": f"ok {payload}" if where == "assistant" else "ok"},
                 {"type": "python", "text": f"f('{payload}')" if where == "python" else "f()"},
                 {"type": "python_output", "text": f"{payload}" if where == "python_output" else "1"}]
        return {"messages": [{"role": "system", "content": sys_text}, {"role": "user", "content": user_text},
                             {"role": "assistant", "content": parts}]}

    injected, _ = tiny_tokenizer.render_conversation(conversation(special))
    clean, _ = tiny_tokenizer.render_conversation(conversation("x"))
    assert _special_counts(tiny_tokenizer, injected) == _special_counts(tiny_tokenizer, clean)
    assert special in tiny_tokenizer.decode(injected)
    # also a plain-string assistant message
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": special}]}
    ids, _ = tiny_tokenizer.render_conversation(plain)
    assert ids[-1 - len(tiny_tokenizer.encode(special)):-1] == tiny_tokenizer.encode(special)


# ----------------------------------------------------------------------------- chat rendering

def test_render_simple_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "It is 4."},
                         {"role": "user", "content": "Thanks!"},
                         {"role": "assistant", "content": "You're welcome."}]}
    ids, mask = tok.render_conversation(conv)
    u1, a1, u2, a2 = (tok.encode(m["content"]) for m in conv["messages"])
    expected = ([sp("<|bos|>"), sp("<|user_start|>")] + u1 + [sp("<|user_end|>"), sp("<|assistant_start|>")]
                + a1 + [sp("<|assistant_end|>"), sp("<|user_start|>")] + u2
                + [sp("<|user_end|>"), sp("<|assistant_start|>")] + a2 + [sp("<|assistant_end|>")])
    expected_mask = ([0] * (3 + len(u1)) + [0] + [1] * (len(a1) + 1) + [0] * (2 + len(u2)) + [0]
                     + [1] * (len(a2) + 1))
    assert ids == expected
    assert mask == expected_mask
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0


def test_render_tool_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    parts = [{"type": "text", "text": "Let me compute. "},
             {"type": "python", "text": "12*34"},
             {"type": "python_output", "text": "408"},
             {"type": "text", "text": " So 408."}]
    conv = {"messages": [{"role": "user", "content": "12*34?"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    t1, py, out, t2 = (tok.encode(p["text"]) for p in parts)
    u = tok.encode("12*34?")
    prefix = [sp("<|bos|>"), sp("<|user_start|>")] + u + [sp("<|user_end|>"), sp("<|assistant_start|>")]
    body = (t1 + [sp("<|python_start|>")] + py + [sp("<|python_end|>"), sp("<|output_start|>")] + out
            + [sp("<|output_end|>")] + t2 + [sp("<|assistant_end|>")])
    body_mask = [1] * (len(t1) + 1 + len(py) + 1) + [0] * (1 + len(out) + 1) + [1] * (len(t2) + 1)
    assert ids == prefix + body
    assert mask == [0] * len(prefix) + body_mask


def test_system_message_merges_into_first_user_turn(tiny_tokenizer):
    with_system = {"messages": [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello."}]}
    before = copy.deepcopy(with_system)
    merged = {"messages": [{"role": "user", "content": "You are terse.\n\nHi"},
                           {"role": "assistant", "content": "Hello."}]}
    assert tiny_tokenizer.render_conversation(with_system) == tiny_tokenizer.render_conversation(merged)
    assert with_system == before  # the caller's conversation is untouched


def test_truncation(tiny_tokenizer, shard_docs):
    conv = {"messages": [{"role": "user", "content": shard_docs[0][:3000]},
                         {"role": "assistant", "content": shard_docs[1][:3000]}]}
    full_ids, full_mask = tiny_tokenizer.render_conversation(conv, max_tokens=None)
    assert len(full_ids) > 100
    ids, mask = tiny_tokenizer.render_conversation(conv, max_tokens=100)
    assert ids == full_ids[:100] and mask == full_mask[:100]
    default_ids, _ = tiny_tokenizer.render_conversation(conv)
    assert default_ids == full_ids[:2048]


def test_render_for_completion(tiny_tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris."}]}
    before = copy.deepcopy(conv)
    ids = tiny_tokenizer.render_for_completion(conv)
    prompt_ids, _ = tiny_tokenizer.render_conversation({"messages": conv["messages"][:2]})
    assert ids == prompt_ids + [tiny_tokenizer.encode_special("<|assistant_start|>")]
    assert conv == before
    with pytest.raises(ValueError, match="last message .*must be the assistant"):
        tiny_tokenizer.render_for_completion({"messages": conv["messages"][:2]})


def test_visualize_tokenization(tiny_tokenizer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tiny_tokenizer.render_conversation(conv)
    shown = tiny_tokenizer.visualize_tokenization(ids, mask, with_token_id=True)
    assert "<|assistant_end|>" in shown and f"({ids[0]})" in shown
    assert shown.count("|\033") >= len(ids) - 1


@pytest.mark.parametrize("conversation, fragment", [
    ([{"role": "user", "content": "x"}], "dict with a 'messages' list"),
    ({"turns": []}, "dict with a 'messages' list"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0: role 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "message 1: role 'user' where 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "c"}]}, "message 2: role 'system' where 'user'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "message 0: a system message must be followed"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 1: role 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, r"message 0 \(user\): content must be a str"),
    ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "u"}]},
     r"message 0 \(system\): content must be a str, got NoneType"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": 42}]},
     r"message 1 \(assistant\): content must be a str or a list of parts"),
    ({"messages": [{"role": "user", "content": "u"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "message 1 .*part 0"),
    ({"messages": [{"role": "user", "content": "u"},
                   {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "python"}]}]},
     "message 1 .*part 1"),
    ({"messages": ["hello"]}, "message 0: expected a dict with 'role' and 'content'"),
    ({"messages": [{"role": "user"}]}, "message 0: expected a dict"),
])
def test_invalid_conversations_are_rejected(tiny_tokenizer, conversation, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_conversation(conversation)
    with pytest.raises(ValueError, match=fragment):
        tiny_tokenizer.render_conversation(conversation)


# ----------------------------------------------------------------------------- files

def test_saved_tokenizer_loads_like_the_reference(tiny_tokenizer_dir, tiny_tokenizer, shard_docs):
    """The reference reads tokenizer.pkl with plain pickle and uses the Encoding directly."""
    with open(tiny_tokenizer_dir / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == "rustbpe" and enc.n_vocab == 2048
    for doc in shard_docs[:10]:
        assert enc.encode_ordinary(doc) == tiny_tokenizer.encode(doc)
    assert enc.encode_ordinary_batch(shard_docs, num_threads=2) == tiny_tokenizer.encode(shard_docs)
    assert enc.encode_single_token("<|assistant_end|>") == tiny_tokenizer.encode_special("<|assistant_end|>")
    assert enc.encode("<|bos|>hi", allowed_special="all") == [tiny_tokenizer.get_bos_token_id()] + enc.encode_ordinary("hi")
    with open(tiny_tokenizer_dir / "tokenizer" / "token_bytes.pt", "rb") as f:
        saved = torch.load(f)
    assert saved.dtype == torch.int32 and torch.equal(saved, tiny_tokenizer.token_bytes())


def test_token_bytes_are_raw_byte_lengths(tiny_tokenizer_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    tb = get_token_bytes(tiny_tokenizer_dir)
    assert tb.shape == (tok.get_vocab_size(),) and tb.dtype == torch.int32
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    not_utf8 = []
    for i in range(tok.get_vocab_size()):
        if i in special_ids:
            assert tb[i] == 0
            continue
        raw = tok.enc.decode_single_token_bytes(i)
        assert tb[i] == len(raw), i
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(i)
    # e.g. the lone byte 0xE4 (first byte of many CJK characters): 1 byte, although
    # decoding it to str gives U+FFFD, which is 3 bytes in UTF-8
    e4 = tok.enc.encode_single_token(b"\xe4")
    assert e4 in not_utf8 and tb[e4] == 1
    assert len(tok.decode([e4]).encode("utf-8")) == 3
    # and the counts add up on real text with multi-byte characters
    text = "naïve 東京 🙂 text"
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_save_is_atomic_and_overwrites(tmp_path, tiny_tokenizer, monkeypatch):
    target = tmp_path / "tok"
    tiny_tokenizer.save(target)
    first = (target / "tokenizer.pkl").read_bytes()
    tiny_tokenizer.save(target)  # overwriting works
    assert sorted(p.name for p in target.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    # a failure half-way leaves the previous files untouched and no temporaries behind
    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_tokenizer.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    assert (target / "tokenizer.pkl").read_bytes() == first
    assert Tokenizer.from_directory(target).encode("check") == tiny_tokenizer.encode("check")


def test_missing_files_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat tok-train"):
        get_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nanochat tok-train"):
        get_token_bytes(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump({"not": "an encoding"}, f)
    with pytest.raises(ValueError, match="not a pickled tiktoken.Encoding"):
        get_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- training, pretrained

def test_train_small_and_vocab_limits(shard_docs):
    tok = Tokenizer.train_from_iterator(iter(shard_docs[:5]), 300)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode(shard_docs[0])) == shard_docs[0]
    # learned merges make real text shorter than its bytes
    assert len(tok.encode(shard_docs[0])) < len(shard_docs[0].encode("utf-8"))
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(iter(shard_docs), 264)


def test_from_pretrained_offline():
    gpt2 = Tokenizer.from_pretrained("gpt2")
    assert gpt2.get_vocab_size() == 50257
    assert gpt2.get_bos_token_id() == gpt2.encode_special("<|endoftext|>") == 50256
    assert gpt2.decode(gpt2.encode("Hello world")) == "Hello world"
    gpt4 = Tokenizer.from_pretrained("cl100k_base")
    tb = gpt4.token_bytes()  # cl100k_base has unused ids between its merges and specials
    assert tb.shape == (gpt4.get_vocab_size(),) and tb[gpt4.get_bos_token_id()] == 0
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        Tokenizer.from_pretrained("gpt-17")


def test_from_pretrained_unavailable_says_set_cache_dir(tmp_path, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("no network")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded earlier
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer.from_pretrained("gpt2")


def test_iter_capped():
    texts = ["a" * 10, "b" * 10, "c" * 10]
    assert list(iter_capped(texts, max_chars=25, doc_cap=8)) == ["a" * 8, "b" * 8, "c" * 8]
    assert list(iter_capped(texts, max_chars=12, doc_cap=8)) == ["a" * 8, "b" * 4]
    assert list(iter_capped(texts, max_chars=100, doc_cap=100)) == texts
