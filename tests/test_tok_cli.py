"""`nanochat tok-train`, `tok-eval` and `bench-tok` end to end on the real OpenStax shards."""
from __future__ import annotations

import logging

import pytest
import torch

from nanochat import cli
from nanochat.common import Runtime
from nanochat.dataset import parquets_iter_batched, tokenizer_train_texts
from nanochat.report import read_sections
from nanochat.stages import tok_eval, tok_train
from nanochat.tokenizer import get_token_bytes, get_tokenizer


@pytest.fixture(autouse=True)
def _restore_nanochat_logger():
    """cli.main() points the `nanochat` logger at the sys.stderr of the moment (capsys's,
    closed after the test); put the logger back as it was so later tests can log."""
    logger = logging.getLogger("nanochat")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def shard_base(tmp_path, shared_data):
    """A base dir whose base_data/ links to the OpenStax shards (last one = val)."""
    base = tmp_path / "base"
    (base / "base_data").mkdir(parents=True)
    for shard in sorted((shared_data / "pretrain_openstax" / "base_data").glob("*.parquet")):
        (base / "base_data" / shard.name).symlink_to(shard)
    return base


def test_tokenizer_train_texts_crop_and_cap(shard_base):
    texts = list(tokenizer_train_texts(shard_base, max_chars=50_000, doc_cap=1000))
    assert sum(map(len, texts)) == 50_000 and max(map(len, texts)) == 1000
    # the train shards' documents in order, each cropped (never the held-out last shard)
    docs = (doc for batch in parquets_iter_batched("train", shard_base) for doc in batch)
    assert all(doc.startswith(text) for text, doc in zip(texts, docs))
    with pytest.raises(FileNotFoundError):
        tokenizer_train_texts(shard_base / "nothing", 10, 10)


def test_tok_train_then_tok_eval(shard_base, capsys):
    rc = cli.main(["tok-train", "--max-chars", "300000", "--doc-cap", "5000", "--vocab-size", "512",
                   "--base-dir", str(shard_base), "--device-type", "cpu"])
    assert rc == 0
    tok = get_tokenizer(shard_base)
    assert tok.get_vocab_size() == 512
    tb = get_token_bytes(shard_base)
    assert tb.shape == (512,) and int((tb == 0).sum()) == 9
    assert sorted(p.name for p in (shard_base / "tokenizer").iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]

    rc = cli.main(["tok-eval", "--shard-chars", "50000", "--base-dir", str(shard_base), "--device-type", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    for label in ("news", "code", "math", "korean", "train", "val", "gpt2 tok", "gpt4 tok", "vocab sizes"):
        assert label in out, label
    assert "ours 512" in out and "gpt2 50,257" in out
    sections = {s["title"]: s["data"] for s in read_sections(shard_base)}
    assert sections["Tokenizer training"]["metrics"]["vocab_size"] == 512
    assert sections["Tokenizer training"]["config"]["max_chars"] == 300000
    assert sections["Tokenizer evaluation"]["table"] in out


def test_tok_eval_numbers(shard_base):
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=shard_base)
    trained = tok_train.run(tok_train.Config(max_chars=400_000, vocab_size=600), runtime)
    assert trained["vocab_size"] == 600 and trained["train_chars"] == 400_000
    assert 1 <= trained["token_bytes_min"] <= trained["token_bytes_mean"] <= trained["token_bytes_max"]

    metrics = tok_eval.run(tok_eval.Config(shard_chars=30_000), runtime)
    results = metrics["results"]
    assert set(results) == {"ours", "gpt2", "gpt4"}
    assert set(results["ours"]) == {"news", "code", "math", "korean", "train", "val"}
    tok = get_tokenizer(shard_base)
    for name, text in tok_eval.SAMPLES:
        r = results["ours"][name]
        assert r["bytes"] == len(text.encode("utf-8")) and r["tokens"] == len(tok.encode(text))
        assert r["ratio"] == pytest.approx(r["bytes"] / r["tokens"], abs=1e-4)
    # a 600-token vocabulary learned on textbook prose: compresses that prose much better
    # than raw bytes, Korean (unseen script) hardly at all, and GPT-4 beats it on code
    assert results["ours"]["train"]["ratio"] > 2.0
    assert results["ours"]["val"]["ratio"] > 2.0
    assert results["ours"]["korean"]["ratio"] < 1.5
    assert results["gpt4"]["code"]["ratio"] > results["ours"]["code"]["ratio"]
    assert results["ours"]["train"]["bytes"] >= 30_000  # shard_chars characters, some multi-byte


def test_bench_tok_runs(shard_base, capsys):
    rc = cli.main(["bench-tok", "--max-chars", "200000", "--vocab-size", "400", "--encode-chars", "100000",
                   "--repeats", "1", "--num-threads", "2", "--base-dir", str(shard_base), "--device-type", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "single-threaded loop" in out and "batched (2 threads)" in out and "chars/s" in out
    assert not (shard_base / "tokenizer").exists()  # the benchmark saves nothing


def test_user_mistakes_exit_2_with_a_hint(tmp_path, shard_base, capsys):
    empty = tmp_path / "empty"
    assert cli.main(["tok-train", "--base-dir", str(empty), "--device-type", "cpu"]) == 2
    assert "nanochat download" in capsys.readouterr().err
    assert cli.main(["tok-train", "--vocab-size", "100", "--base-dir", str(shard_base)]) == 2
    assert "--vocab-size must be at least 265" in capsys.readouterr().err
    assert cli.main(["tok-eval", "--base-dir", str(shard_base), "--device-type", "cpu"]) == 2
    assert "nanochat tok-train" in capsys.readouterr().err
