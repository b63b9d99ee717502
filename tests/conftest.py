"""Shared fixtures: the real data in ../shared/data, an isolated base dir, and a tiny
tokenizer trained once per session on the real OpenStax shards.

Markers (declared in pyproject.toml): `slow` marks the long tests (a stage run end to end
through the CLI, a training or multi-process run, a live server), so that
`pytest -m 'not slow'` is a quick loop while editing (under 2 minutes on 2 cores); the full
suite runs them all. `gpu` tests need CUDA, `browser` tests Debian's chromium."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OPENSTAX = SHARED_DATA / "pretrain_openstax" / "base_data"


def pytest_configure(config):
    # One intra-op thread per test process: the suite runs as two xdist workers on two
    # cores, and oversubscribed OpenMP threads spin-wait (tiny matmuls go 100× slower).
    # Subprocesses the tests start (torchrun, the sandbox, servers) inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    # tiktoken's GPT-2/GPT-4 encodings, offline
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken" / "cache"))
    # a test that names no base dir writes into a throw-away one, never ~/.cache/nanochat
    # (whose cached peak FLOP/s from an earlier, busier run once pushed an MFU above 100%)
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix="nanochat-tests-")
    os.environ["NANOCHAT_BASE_DIR"] = scratch
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    if not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"the real test data is expected at {SHARED_DATA} (../shared/data beside the repo)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


# -----------------------------------------------------------------------------
# Tokenizer (tok-train's code on real OpenStax text)

def _link_openstax_shards(base: Path) -> None:
    """base/base_data/shard_*.parquet as symlinks to the shared (read-only) shards."""
    data = base / "base_data"
    data.mkdir(parents=True, exist_ok=True)
    for shard in sorted(OPENSTAX.glob("*.parquet")):
        (data / shard.name).symlink_to(shard)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A base dir with base_data/ (the OpenStax shards, symlinked; last = val) and
    tokenizer/ (vocab 2048, trained by `tok-train` on ~2M characters of the train shards).
    Shared by the whole session: treat it as read-only."""
    import torch

    from nanochat.common import Runtime
    from nanochat.stages import tok_train

    base = tmp_path_factory.mktemp("tiny_tokenizer_base")
    _link_openstax_shards(base)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base)
    tok_train.run(tok_train.Config(max_chars=2_000_000, vocab_size=2048), runtime)
    return base


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The Tokenizer saved in `tiny_tokenizer_dir`."""
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer(tiny_tokenizer_dir)


# -----------------------------------------------------------------------------
# A tiny trained base model (for the engine, chat and serving tests)

@pytest.fixture(scope="session")
def tiny_base_checkpoint(tiny_tokenizer_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """A base dir holding tokenizer/ (the tiny tokenizer, symlinked) and
    base_checkpoints/d2/ step 20: a 2-layer, 64-wide GPT (sequence_len 128) trained for
    20 steps of batch 4 x 128 real OpenStax tokens with the model's own optimizer.
    Load it with `checkpoint.load_model("base", base_dir, "cpu")`. Read-only."""
    from nanochat.gpt import GPTConfig
    from smallmodels import train_checkpoint

    config = GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64, window_pattern="L")
    base = tmp_path_factory.mktemp("tiny_base_checkpoint")
    losses = train_checkpoint(tiny_tokenizer_dir, tiny_tokenizer, base, "d2", config, steps=20, batch=4, seed=0,
                              meta={"val_bpb": None, "user_config": {"fixture": "tiny_base_checkpoint"}})
    assert losses[-1] < losses[0] - 0.5, f"the tiny model did not learn: {losses}"
    return base

