"""Benchmark tokenizer training time and encoding throughput on the shards.

Trains a tokenizer in memory (nothing is saved) on --max-chars characters of the train
shards, then encodes --encode-chars characters of train-shard documents twice: one
document at a time on one thread, and as one batch on tiktoken's thread pool
(--num-threads). Prints characters per second for each.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.dataset import parquets_iter_batched, tokenizer_train_texts
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger("nanochat.bench_tok")


@dataclass
class Config:
    max_chars: int = option(20_000_000, "characters to train the tokenizer on")
    doc_cap: int = option(10_000, "crop each training document to this many characters")
    vocab_size: int = option(32768, "vocabulary size, special tokens included")
    encode_chars: int = option(5_000_000, "characters of documents to encode in the throughput test")
    num_threads: int = option(8, "threads for the batched encode")
    repeats: int = option(3, "timed repetitions of each encode; the fastest counts")
    dataset: str | None = option(None, "train and encode the named dataset built by `nanochat ingest` instead of "
                                       "the downloaded web text")

    def validate(self) -> None:
        problems = []
        for name in ("max_chars", "doc_cap", "encode_chars", "num_threads", "repeats"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            problems.append(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)}, got {self.vocab_size}")
        from nanochat.dataset import dataset_problems
        problems.extend(dataset_problems(self.dataset))
        check(problems)


def _encode_docs(base_dir, max_chars: int, dataset: str | None = None) -> list[str]:
    docs, total = [], 0
    for batch in parquets_iter_batched("train", base_dir, dataset=dataset):
        for doc in batch:
            if total >= max_chars:
                return docs
            docs.append(doc[:max_chars - total])
            total += len(docs[-1])
    return docs


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(config: Config, runtime: Runtime) -> dict:
    config.validate()
    texts = list(tokenizer_train_texts(runtime.base_dir, config.max_chars, config.doc_cap, config.dataset))
    train_chars = sum(map(len, texts))
    # rustbpe counts words on all cores (rayon), so cpu count matters when comparing runs
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(texts, config.vocab_size)
    train_time = time.perf_counter() - t0

    docs = _encode_docs(runtime.base_dir, config.encode_chars, config.dataset)
    chars = sum(map(len, docs))
    tokenizer.encode(docs[:8], num_threads=config.num_threads)  # warm up the thread pool
    single_s, single = _best_time(lambda: [tokenizer.encode(d) for d in docs], config.repeats)
    batch_s, batched = _best_time(lambda: tokenizer.encode(docs, num_threads=config.num_threads), config.repeats)
    assert single == batched, "batched encode disagrees with one-at-a-time encode"
    n_tokens = sum(map(len, single))

    metrics = {
        "cpu_count": os.cpu_count(),
        "train_chars": train_chars,
        "vocab_size": tokenizer.get_vocab_size(),
        "train_time_s": round(train_time, 3),
        "train_chars_per_s": round(train_chars / train_time),
        "encode_docs": len(docs),
        "encode_chars": chars,
        "encode_tokens": n_tokens,
        "single_chars_per_s": round(chars / single_s),
        "batched_chars_per_s": round(chars / batch_s),
        "batched_speedup": round(single_s / batch_s, 2),
        "num_threads": config.num_threads,
    }
    if runtime.is_master:
        print(f"training:  {train_chars:,} chars -> vocab {metrics['vocab_size']:,} in {train_time:.2f}s "
              f"({metrics['train_chars_per_s']:,} chars/s, {os.cpu_count()} CPUs)\n"
              f"encode:    {len(docs):,} docs, {chars:,} chars, {n_tokens:,} tokens "
              f"({chars / n_tokens:.2f} chars/token)\n"
              f"  single-threaded loop:       {metrics['single_chars_per_s']:>14,} chars/s\n"
              f"  batched ({config.num_threads} threads):       {metrics['batched_chars_per_s']:>14,} chars/s "
              f"(x{metrics['batched_speedup']})", flush=True)
    return metrics
