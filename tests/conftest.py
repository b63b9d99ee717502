"""Shared fixtures: the real data in ../shared/data, an isolated base dir, and a tiny
tokenizer trained once per session on the real OpenStax shards."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OPENSTAX = SHARED_DATA / "pretrain_openstax" / "base_data"


def pytest_configure(config):
    # tiktoken's GPT-2/GPT-4 encodings, offline
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken" / "cache"))
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
