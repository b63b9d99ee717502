"""The inference engine: KV-cached decoding matches the plain forward pass, sampling is
seeded and per-row, and the calculator tool's output is forced into the right rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nanochat.attention import KVCache
from nanochat.engine import Engine, sample_next_token
from nanochat.gpt import GPTConfig, build_model


def _random_gpt(dtype: torch.dtype = torch.float32, sequence_len: int = 512, vocab_size: int = 300) -> nn.Module:
    """A tiny GPT whose weights are random but not degenerate (the real init zeroes the
    output projections, which would make every position predict the same thing)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SSL")  # "S" = 128 positions at sequence_len 512
    model = build_model(config, "cpu", dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        model.smear_lambda.fill_(0.5)  # exercise the smear state the cache carries
    return model.eval()


@pytest.fixture(scope="module")
def gpt() -> nn.Module:
    return _random_gpt()


PROMPT = [1, 7, 42, 99, 3, 250, 17, 64, 128, 5]


# -----------------------------------------------------------------------------
# Against the uncached model

def test_cached_greedy_decode_equals_uncached_forward(gpt):
    # a 140-token prompt then 16 tokens: prefill and decode both run past the 128-token
    # sliding window of the "S" layers (windowed prefill mask, sliced decode keys)
    assert min(gpt.window_sizes) == 128
    prompt = torch.randint(0, 300, (140,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = list(gpt.generate(prompt, max_tokens=16, temperature=0.0))
    engine = Engine(gpt, None)
    got = [column[0] for column, _ in engine.generate(prompt, max_tokens=16, temperature=0.0)]
    assert got == reference
    assert len(set(reference)) > 3  # a real continuation, not one token repeated
    # several rows from one prefill: every row is the same greedy continuation
    seqs, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=8, temperature=0.0)
    assert seqs == [prompt + reference[:8]] * 3
    assert masks == [[0] * len(prompt) + [1] * 8] * 3
    # and from a short prompt (the cache smaller than a window)
    reference = list(gpt.generate(PROMPT, max_tokens=12, temperature=0.0))
    assert [c[0] for c, _ in engine.generate(PROMPT, max_tokens=12, temperature=0.0)] == reference


def test_static_cache_decodes_like_the_growing_cache(gpt):
    # the fixed-shape decode step (what compiled decoding runs) against the sliced one:
    # the same logits up to rounding, past the 128-token window of the "S" layers, in a
    # cache longer than the model's sequence_len, after a batch-1 prefill and spread
    # over rows (prefill copies the prompt; a static cache shares no prefix)
    prompt = torch.randint(0, 300, (1, 140), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        growing, static = gpt.make_kv_cache(1, 200), gpt.make_kv_cache(1, 1024, static=True)
        assert static.static and static.layout == "bhtd" and static.max_seq_len == 1024
        a, b = gpt.decode_logits(prompt, growing), gpt.decode_logits(prompt, static)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        for _ in range(40):
            ids = a.argmax(-1, keepdim=True)
            a, b = gpt.decode_logits(ids, growing), gpt.decode_logits(ids, static)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert static.get_pos() == growing.get_pos() == 180 and static.position.tolist() == [180]
        # positions past the current one are masked, not read: garbage there changes nothing
        static.k_cache[:, :, :, 181:] = 1e4
        ids = a.argmax(-1, keepdim=True)
        torch.testing.assert_close(gpt.decode_logits(ids, static), gpt.decode_logits(ids, growing), rtol=0, atol=1e-5)
        # rows continuing it share it (its unwritten tail masked), or get copies of it
        shared = gpt.make_kv_cache(3, 181 + 192, prefix=growing)
        rows = gpt.make_kv_cache(3, 181 + 192, prefix=static, static=True)
        assert rows.prefix is static and rows.max_seq_len == 181 + 192
        assert rows.position.tolist() == [rows.get_pos()] == [181] and rows.own_position.tolist() == [0]
        copies = gpt.make_kv_cache(3, 512, static=True)
        copies.prefill(static)
        assert copies.prefix is None and copies.position.tolist() == copies.own_position.tolist() == [181]
        ids = torch.tensor([[5], [6], [7]])
        for _ in range(150):  # past the 128-token window, which then starts inside the rows' own keys
            expected = gpt.decode_logits(ids, shared)
            torch.testing.assert_close(gpt.decode_logits(ids, rows), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gpt.decode_logits(ids, copies), expected, rtol=1e-5, atol=1e-5)
            ids = expected.argmax(-1, keepdim=True)
        assert rows.own_position.tolist() == [150] and rows.position.tolist() == [331]
        rows.reset()
        assert rows.get_pos() == 0 and rows.position.tolist() == rows.own_position.tolist() == [0]
    with pytest.raises(ValueError, match="static"):
        KVCache(1, 2, 8, 16, 1, "cpu", torch.float32, layout="bthd", static=True)
    with pytest.raises(ValueError, match="static"):  # a static cache's rows read a static prefix, and only they
        KVCache(3, 2, 8, 16, 3, "cpu", torch.float32, layout="bhtd", prefix=growing, static=True)
    with pytest.raises(ValueError, match="static"):
        KVCache(3, 2, 8, 16, 3, "cpu", torch.float32, layout="bhtd", prefix=static)
    # a full static cache refuses the next token before anything is written past its end
    with torch.inference_mode():
        full = gpt.make_kv_cache(1, 10, static=True)
        gpt.decode_logits(prompt[:, :10], full)
        with pytest.raises(ValueError, match="holds 10 positions; 10 are used"):
            gpt.decode_logits(prompt[:, 10:11], full)
        assert full.get_pos() == 10 and full.position.tolist() == [10]


def test_static_cache_runs_on_sdpa_where_fa3_is_the_backend(gpt, monkeypatch):
    # on a Hopper GPU FA3 serves the model, but a static cache (masked, fixed-shape
    # attention for compiled decoding) is SDPA's from the prefill on
    from nanochat import attention, gpt as gpt_module

    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        cache = gpt.make_kv_cache(1, 64, static=True)
        expected = [gpt.decode_logits(prompt, cache), gpt.decode_logits(torch.tensor([[9]]), cache)]

    def no_fa3(*args, **kwargs):
        raise AssertionError("FA3 called for a static cache")

    monkeypatch.setattr(gpt_module, "select_backend", lambda device, dtype: (True, "fa3 (pretend)"))
    monkeypatch.setattr(attention, "_use_fa3", lambda q: True)
    monkeypatch.setattr(attention, "_load_fa3", lambda: (no_fa3, "pretend"))
    assert gpt.make_kv_cache(1, 64).layout == "bthd"  # what FA3 would read
    with torch.inference_mode():
        cache = gpt.make_kv_cache(1, 64, static=True)
        assert cache.layout == "bhtd"
        got = [gpt.decode_logits(prompt, cache), gpt.decode_logits(torch.tensor([[9]]), cache)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _graphs() -> int:
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_decoding_matches_eager_in_one_graph_for_every_turn(gpt):
    # Engine(compile=True): torch.compile of the decode step (inductor, C++ wrapper,
    # frozen weights), compiled at the first step; the same tokens as eager decoding
    compiled, eager = Engine(gpt, None, compile=True), Engine(gpt, None)
    prompt = torch.randint(0, 300, (140,), generator=torch.Generator().manual_seed(1)).tolist()
    before = _graphs()
    got = [c[0] for c, _ in compiled.generate(prompt, max_tokens=24, temperature=0.0)]
    assert got == [c[0] for c, _ in eager.generate(prompt, max_tokens=24, temperature=0.0)]
    assert _graphs() == before + 1 and compiled._step is not None and not compiled._compile_failed
    # later turns of other lengths, greedy or sampled, reuse that graph: the cache is
    # sized in whole multiples of sequence_len (512 here) and every step has one shape
    for tokens, kwargs in ((PROMPT, dict(max_tokens=40, temperature=0.0)),
                           (prompt[:60], dict(max_tokens=30, temperature=1.0, top_k=20, seed=3))):
        assert list(compiled.generate(tokens, **kwargs)) == list(eager.generate(tokens, **kwargs))
    assert _graphs() == before + 1
    # a turn longer than sequence_len needs a bigger cache: one more graph, and it says so
    from logcapture import capture_log

    with capture_log("nanochat.engine") as log:
        assert list(compiled.generate(prompt, max_tokens=400, temperature=0.0)) == \
            list(eager.generate(prompt, max_tokens=400, temperature=0.0))
    assert _graphs() == before + 2 and "a 1024-position cache" in log.text
    # several samples of one prompt: one more graph per row count, where the rows share
    # the prompt's static cache and keep their own keys (in powers of two) in another; prompts of
    # other lengths reuse it
    for tokens, seed in ((prompt, 5), (prompt[:50], 6)):
        assert (compiled.generate_batch(tokens, num_samples=3, max_tokens=40, temperature=1.0, seed=seed)
                == eager.generate_batch(tokens, num_samples=3, max_tokens=40, temperature=1.0, seed=seed))
    assert _graphs() == before + 3


def test_several_samples_size_their_own_keys_in_powers_of_two(gpt, monkeypatch):
    # a compiled step's shapes for n > 1 rows: the prompt's cache in sequence_len
    # multiples, each row's own keys in powers of two from 64 by the reply's length, so
    # replies of 70 and 120 tokens share one graph and 140 needs the next (torch.compile
    # stands in as the identity: the shapes and tokens are what is under test)
    assert [Engine._own_capacity(s) for s in (1, 2, 65, 66, 129, 130, 513)] == [64, 64, 64, 128, 128, 256, 512]
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    compiled, eager = Engine(gpt, None, compile=True), Engine(gpt, None)
    for max_tokens in (70, 120, 140):
        kwargs = dict(num_samples=2, max_tokens=max_tokens, temperature=1.0, seed=max_tokens)
        assert compiled.generate_batch(PROMPT, **kwargs) == eager.generate_batch(PROMPT, **kwargs)
    assert compiled._graph_shapes == {(2, 512, 128), (2, 512, 256)}


def test_a_failed_compile_falls_back_to_eager_decoding(gpt, monkeypatch):
    # torch.compile stands in for a compiler that cannot build the graph (no C++
    # toolchain, say): the reply loses speed, not tokens, and the warning says so once
    from logcapture import capture_log

    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(kwargs)
            raise RuntimeError("C++ compile error\nno compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(gpt, None, compile=True)
    with capture_log("nanochat.engine") as log:
        for _ in range(2):
            got = [c[0] for c, _ in engine.generate(PROMPT, max_tokens=12, temperature=0.0)]
            assert got == list(gpt.generate(PROMPT, max_tokens=12, temperature=0.0))
    assert len(calls) == 1 and calls[0]["dynamic"] is False  # tried once, then eager for good
    assert log.text.count("compiling the decode step failed (RuntimeError: C++ compile error); decoding eagerly") == 1
    # a request's own error is not taken for the compiler's
    with pytest.raises(ValueError, match="rotary"):
        with torch.inference_mode():
            cache = gpt.make_kv_cache(1, 8, static=True)
            cache.pos = gpt.cos.size(1)
            Engine(gpt, None, compile=True)._last_logits(torch.tensor([[1]]), cache)


def test_kv_cache_sized_and_typed_for_the_generation():
    model = _random_gpt(torch.bfloat16)
    made: list[KVCache] = []
    original = model.make_kv_cache

    def spy(batch_size, seq_len, prefix=None):
        made.append(original(batch_size, seq_len, prefix=prefix))
        return made[-1]

    model.make_kv_cache = spy
    seqs, _ = Engine(model, None).generate_batch(PROMPT, num_samples=4, max_tokens=6, temperature=1.0)
    # the last sampled token is never fed back, so the cache is one slot shorter than the sequence
    assert [(c.batch_size, c.max_seq_len) for c in made] == [(1, len(PROMPT)), (4, len(PROMPT) + 5)]
    assert all(c.dtype == torch.bfloat16 for c in made)
    assert made[-1].get_pos() == len(PROMPT) + 5
    assert [len(s) for s in seqs] == [len(PROMPT) + 6] * 4


# -----------------------------------------------------------------------------
# Sampling

def test_rows_differ_when_sampling_and_agree_when_greedy(gpt):
    engine = Engine(gpt, None)
    hot, _ = engine.generate_batch(PROMPT, num_samples=8, max_tokens=12, temperature=1.0)
    assert len({tuple(s) for s in hot}) == 8
    first_tokens = {s[len(PROMPT)] for s in hot}
    assert len(first_tokens) > 1  # each row samples its own first token from the shared prefill
    cold, _ = engine.generate_batch(PROMPT, num_samples=8, max_tokens=12, temperature=0.0)
    assert len({tuple(s) for s in cold}) == 1


def test_seed_reproduces_and_different_seeds_differ(gpt):
    engine = Engine(gpt, None)
    runs = [engine.generate_batch(PROMPT, num_samples=2, max_tokens=6, seed=s, top_k=50)[0] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    greedy = [engine.generate_batch(PROMPT, max_tokens=6, temperature=0.0, seed=s)[0] for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_max_tokens(gpt):
    engine = Engine(gpt, None)
    for n in (0, 1, 5):
        steps = list(engine.generate(PROMPT, num_samples=2, max_tokens=n))
        assert len(steps) == n and all(len(col) == 2 for col, _ in steps)
    # None: until the model's sequence_len is filled
    short = _random_gpt(sequence_len=32)
    assert len(list(Engine(short, None).generate(PROMPT, max_tokens=None, temperature=0.0))) == 32 - len(PROMPT)


def test_sample_next_token_top_k_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0, 2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, g, temperature=0.0).unique().tolist() == [1]
    assert sample_next_token(logits, g, temperature=1.0, top_k=1).unique().tolist() == [1]
    top3 = sample_next_token(logits, g, temperature=1.0, top_k=3)
    assert set(top3.unique().tolist()) == {1, 2, 3}
    everything = sample_next_token(logits, g, temperature=5.0)
    assert set(everything.unique().tolist()) == set(range(6))
    assert top3.shape == (2000, 1) and top3.dtype == torch.int64


def test_bad_arguments_raise_value_error(gpt):
    engine = Engine(gpt, None)
    for kwargs in ({"tokens": []}, {"tokens": PROMPT, "num_samples": 0}, {"tokens": PROMPT, "temperature": -1.0},
                   {"tokens": PROMPT, "top_k": 0}, {"tokens": [0] * (gpt.rotary_seq_len + 1)}):
        with pytest.raises(ValueError):
            next(engine.generate(**{"max_tokens": 4, **kwargs}))


# -----------------------------------------------------------------------------
# Tool use, with a model that follows a script

class ScriptedModel(nn.Module):
    """Predicts, at absolute position p, the token `script[p]` (a huge logit), whatever
    came before. Positions come from the KV cache, so a forced token occupies its place
    in the script like any other: the script holds placeholders there."""

    def __init__(self, script: dict[int, int], vocab_size: int, filler: int):
        super().__init__()
        self.script, self.vocab_size, self.filler = script, vocab_size, filler
        self.config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def get_device(self) -> torch.device:
        return self.anchor.device

    def make_kv_cache(self, batch_size: int, seq_len: int, prefix: KVCache | None = None) -> KVCache:
        cache = KVCache(batch_size, 1, seq_len, 8, 1, self.get_device(), torch.float32)
        if prefix is not None:
            cache.prefill(prefix)
        return cache

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        start = kv_cache.get_pos() if kv_cache is not None else 0
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(T):
            # the logits at input position q predict the token at position q + 1
            logits[:, t, self.script.get(start + t + 1, self.filler)] = 100.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits


def _script_run(tokenizer, prompt: list[int], generated: list[int], num_samples: int = 1):
    script = {len(prompt) + i: tok for i, tok in enumerate(generated)}
    filler = tokenizer.encode("~")[0]
    model = ScriptedModel(script, tokenizer.get_vocab_size(), filler)
    engine = Engine(model, tokenizer)
    steps = list(engine.generate(prompt, num_samples=num_samples, max_tokens=len(generated) + 5, temperature=0.0))
    return engine, steps


def test_calculator_output_is_forced_then_sampling_resumes(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode("What is 12*3?"), sp("<|user_end|>"),
              sp("<|assistant_start|>")]
    forced = [sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>")]
    placeholder = tok.encode("Z")[0]  # what the model "says" where the tool output goes
    before = tok.encode("Let me compute ") + [sp("<|python_start|>"), *tok.encode("12*3"), sp("<|python_end|>")]
    after = tok.encode(" so the answer is 36.")
    generated = before + [placeholder] * len(forced) + after + [sp("<|assistant_end|>")]
    engine, steps = _script_run(tok, prompt, generated, num_samples=2)

    columns = [col for col, _ in steps]
    masks = [m for _, m in steps]
    expected = before + forced + after + [sp("<|assistant_end|>")]
    assert len(steps) == len(expected)  # stopped at <|assistant_end|>
    for row in range(2):
        assert [c[row] for c in columns] == expected
        assert [m[row] for m in masks] == [0] * len(before) + [1] * len(forced) + [0] * (len(after) + 1)
    assert placeholder not in [c[0] for c in columns]
    assert tok.decode([c[0] for c in columns]).endswith("<|output_start|>36<|output_end|> so the answer is 36.<|assistant_end|>")

    seqs, seq_masks = engine.generate_batch(prompt, num_samples=2, max_tokens=len(generated) + 5, temperature=0.0)
    assert seqs[0] == prompt + before + forced + after  # the terminal token is left out
    assert seq_masks[0] == [0] * len(prompt) + [1] * len(before) + [0] * len(forced) + [1] * len(after)


def test_refused_expression_forces_an_error_message(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|assistant_start|>")]
    call = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    _, steps = _script_run(tok, prompt, call + [tok.encode("Z")[0]] * 40)
    tokens = [col[0] for col, _ in steps]
    out_start, out_end = tokens.index(sp("<|output_start|>")), tokens.index(sp("<|output_end|>"))
    assert out_start == len(call)
    assert tok.decode(tokens[out_start + 1:out_end]).startswith("Error: function calls are not supported")
    assert all(m[0] == 1 for _, m in steps[out_start:out_end + 1])


def test_rows_end_independently_on_assistant_end_or_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    body = tok.encode("hello there")
    prompt = [tok.get_bos_token_id()]
    # both rows follow the same script, which ends with <|bos|>: a document boundary also ends a row
    engine, steps = _script_run(tok, prompt, body + [tok.get_bos_token_id()], num_samples=2)
    assert len(steps) == len(body) + 1
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert seqs == [prompt + body] * 2
    # a python block that never closes forces nothing
    unclosed = [sp("<|python_start|>"), *tok.encode("1+1")]
    _, steps = _script_run(tok, prompt, unclosed + [sp("<|assistant_end|>")])
    assert [col for col, _ in steps] == [[t] for t in unclosed + [sp("<|assistant_end|>")]]
    assert [m for _, m in steps] == [[0]] * (len(unclosed) + 1)


# -----------------------------------------------------------------------------
# The inference benchmark (smoke test at toy size; real numbers come from the CLI)

@pytest.mark.slow
def test_bench_infer_compiled_through_the_cli(tmp_path, capsys):
    import json

    from nanochat import cli

    code = cli.main(["bench-infer", "--random-init", "-d", "1", "--sequence-len", "256", "--vocab-size", "256",
                     "--batch-sizes", "1", "2", "--prompt-len", "16", "--decode-tokens", "4", "--positions", "16",
                     "--repeats", "1", "--threads", "1", "--top-k", "5", "--compile", "--device-type", "cpu",
                     "--base-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["compile"] is True and metrics["top_k"] == 5
    assert [r["batch"] for r in metrics["batches"]] == [1, 2] and all(r["tokens_per_s"] > 0 for r in metrics["batches"])
    assert "runs; compiled)" in out


@pytest.mark.slow
def test_decode_compiled_benchmark_checks_and_times_both_engines():
    """benchmarks/decode_compiled.py (README's compiled-vs-eager figures) checks the two
    greedy continuations equal before timing, and pairs the rounds."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_compiled.py"
    out = subprocess.run([sys.executable, str(script), "--depth", "1", "--vocab-size", "512", "--sequence-len", "128",
                          "--prompt-len", "20", "--decode-tokens", "4", "--rounds", "2", "--threads", "1",
                          "--batch-sizes", "3"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n_embd"] == 64 and [r["batch"] for r in summary["results"]] == [3]
    for r in summary["results"]:
        assert len(r["ratios"]) == 2 and r["compile_s"] > 0 and r["eager_ms"] > 0 and r["compiled_ms"] > 0


def test_bench_infer_smoke(tmp_path, capsys):
    import json

    from nanochat import common
    from nanochat.common import Runtime
    from nanochat.stages import bench_infer

    config = bench_infer.Config(depth=2, sequence_len=512, vocab_size=512, batch_sizes=(1, 3), prompt_len=16,
                                decode_tokens=4, positions=(16, 200), repeats=1, threads=1)
    config.validate()
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=tmp_path)  # no checkpoint there
    threads_before = torch.get_num_threads()
    metrics = bench_infer.run(config, runtime)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(metrics))
    assert "random d2 model" in metrics["model"] and metrics["random_init"]
    assert [r["batch"] for r in metrics["batches"]] == [1, 3]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in metrics["batches"])
    assert [r["position"] for r in metrics["positions"]] == [16, 200]
    assert metrics["torch_threads"] == 1 and torch.get_num_threads() == threads_before  # restored afterwards
    assert metrics["processor"].startswith(common.device_description(torch.device("cpu")).replace(
        f"{threads_before} threads", "1 threads"))  # measured under the benchmark's thread count
    assert f"  processor: {metrics['processor']}" in lines
    # "S" windows are 128 at sequence_len 512: past them only the "L" layer reads more keys
    model = bench_infer._random_model(config, runtime, "test").model
    assert model.window_sizes == [128, 512]
    per_position = 2 * model.config.n_kv_head * model.config.head_dim * 4
    assert bench_infer.kv_bytes_read(model, 1, 100) == (101 + 101) * per_position
    assert bench_infer.kv_bytes_read(model, 2, 300) == 2 * (129 + 301) * per_position
    # rows sharing a 250-token prompt read it once: 51 own keys per row in each layer
    assert bench_infer.kv_bytes_read(model, 2, 300, shared=250) == (2 * 51 + 78 + 2 * 51 + 250) * per_position
    # the batch-3 row of the run was measured with the prompt shared (fp32 on the CPU)
    mid = config.prompt_len + config.decode_tokens // 2
    assert model.shares_prompt_cache()
    assert metrics["batches"][1]["bytes_per_step"] == (bench_infer.weight_bytes(model)
                                                       + bench_infer.kv_bytes_read(model, 3, mid, config.prompt_len))
    # decode FLOPs: 2 per matmul weight (not the embedding tables) + attention over the read keys
    c = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n
                 and "value_embeds" not in n)
    assert bench_infer.decode_flops(model, 300) == 2 * matmul + 4 * c.n_head * c.head_dim * (129 + 301)
    # utilisation against one peak per limit, cached in the base dir like the MFU peak
    assert metrics["peak_flops"] > 0 and metrics["peak_bandwidth"] > 0
    assert (tmp_path / "peak_bandwidth.json").exists() and (tmp_path / "peak_flops.json").exists()
    for r in metrics["batches"]:
        assert r["mbu"] == pytest.approx(100 * r["bytes_per_step"] / (r["step_ms"] / 1e3) / metrics["peak_bandwidth"])
        assert 0 < r["mfu"] < 100 and 0 < r["mbu"]
    assert "MBU %" in "\n".join(lines) and "TPOT" in "\n".join(lines)
    with pytest.raises(ValueError):
        bench_infer.Config(random_init=True, source="sft").validate()
