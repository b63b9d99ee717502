"""Train the BPE tokenizer on the pretraining shards.

Reads documents from <base_dir>/base_data/ (every shard but the last, which is held out
for validation) or from the named --dataset (<base_dir>/datasets/NAME/, its train
shards), crops each to --doc-cap characters, stops after --max-chars characters,
learns --vocab-size tokens (9 of them special) with rustbpe, and writes
<base_dir>/tokenizer/tokenizer.pkl and token_bytes.pt.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option, to_dict
from nanochat.dataset import data_dir, tokenizer_train_texts
from nanochat.errors import UserError
from nanochat.report import log_section
from nanochat.tokenizer import SPECIAL_TOKENS, TOKENIZER_SUBDIR, Tokenizer

log = logging.getLogger("nanochat.tok_train")

# A quick round trip after training: mixed scripts, digits, contractions, emoji.
_SANITY_TEXT = ("Round trip: it's 3.14159 today, we'll see.\n\tTabs, symbols @#$%^&*() and "
                "Unicode: naïve café, Ελληνικά, 東京, 🙂👍🏽\n")


@dataclass
class Config:
    max_chars: int = option(2_000_000_000, "train on at most this many characters")
    doc_cap: int = option(10_000, "crop each document to this many characters")
    vocab_size: int = option(32768, "vocabulary size, special tokens included")
    dataset: str | None = option(None, "train on the named dataset built by `nanochat ingest` instead of the downloaded web text")

    def validate(self) -> None:
        problems = []
        if self.max_chars <= 0:
            problems.append(f"--max-chars must be positive, got {self.max_chars}")
        if self.doc_cap <= 0:
            problems.append(f"--doc-cap must be positive, got {self.doc_cap}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            problems.append(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")
        check(problems)


class _Counter:
    """Pass texts through while counting them, to report what training consumed."""

    def __init__(self, texts):
        self.texts, self.docs, self.chars = texts, 0, 0

    def __iter__(self):
        for text in self.texts:
            self.docs += 1
            self.chars += len(text)
            yield text


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.node_sync import sync_files, tokenizer_files, wait_for_all

    config.validate()
    tokenizer_dir = runtime.base_dir / TOKENIZER_SUBDIR
    metrics: dict = {}
    # Under torchrun one process trains (the result is the same on every rank) and every
    # node gets its files: through the shared disk, or sent from rank 0 (node_sync).
    if runtime.is_master:
        metrics = _train(config, runtime, tokenizer_dir)
    wait_for_all(runtime)
    sync_files(runtime, tokenizer_files())
    return metrics


def _train(config: Config, runtime: Runtime, tokenizer_dir) -> dict:
    stream = _Counter(tokenizer_train_texts(runtime.base_dir, config.max_chars, config.doc_cap, config.dataset))
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(stream, config.vocab_size)
    train_time = time.perf_counter() - t0
    if stream.docs == 0:
        raise UserError(f"the training shards in {data_dir(runtime.base_dir, config.dataset)} hold no text")
    log.info("trained on %s characters (%s documents) in %.2fs", f"{stream.chars:,}", f"{stream.docs:,}", train_time)

    decoded = tokenizer.decode(tokenizer.encode(_SANITY_TEXT))
    assert decoded == _SANITY_TEXT, f"round trip failed: {decoded!r}"
    tokenizer.save(tokenizer_dir)

    token_bytes = tokenizer.token_bytes()
    learned = token_bytes[token_bytes > 0].float()
    metrics = {
        "train_time_s": round(train_time, 3),
        "train_chars": stream.chars,
        "train_docs": stream.docs,
        "vocab_size": tokenizer.get_vocab_size(),
        "num_special_tokens": len(tokenizer.get_special_tokens()),
        "token_bytes_min": int(learned.min()),
        "token_bytes_max": int(learned.max()),
        "token_bytes_mean": round(float(learned.mean()), 4),
        "token_bytes_std": round(float(learned.std()), 4),
        "tokenizer_dir": str(tokenizer_dir),
    }
    log.info("token byte lengths: min %d, max %d, mean %.3f, std %.3f", metrics["token_bytes_min"],
             metrics["token_bytes_max"], metrics["token_bytes_mean"], metrics["token_bytes_std"])
    log_section(runtime.base_dir, "Tokenizer training", {"config": to_dict(config), "metrics": metrics})
    return metrics
