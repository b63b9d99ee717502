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
