"""Download pretraining shards (the first N train shards plus the validation shard).

Shards go to <base_dir>/base_data/shard_NNNNN.parquet. The source is the ClimbMix-400B
shuffle on Hugging Face unless --url (or $NANOCHAT_DATA_URL) names another prefix:
http(s)://, file:// or a local directory holding shard_00000.parquet, ... Its last shard
(--num-shards - 1) is always fetched and held out for validation. Each shard is about
100 MB for ClimbMix; about 170 train shards suffice for a GPT-2-grade run. Downloads
are retried, validated as parquet and written atomically; rerunning skips what is there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option

log = logging.getLogger("nanochat.download")


@dataclass
class Config:
    num_train_shards: int = option(8, "how many train shards to fetch (the val shard comes on top); "
                                      "more than the source has fetches them all", short="-n")
    url: str | None = option(None, "URL prefix of the shards: http(s)://, file:// or a directory "
                                   "(automatic: $NANOCHAT_DATA_URL, else ClimbMix-400B)")
    num_shards: int | None = option(None, "total shards of the source; the last is val (automatic: "
                                          "$NANOCHAT_DATA_SHARDS, 6543 for ClimbMix, counted for local sources)")
    workers: int = option(4, "parallel downloads", short="-w")
    timeout: float = option(30.0, "seconds a connect or read may stall before the attempt counts as failed")
    retries: int = option(5, "retries per file after the first attempt")

    def validate(self) -> None:
        problems = []
        if self.num_train_shards < 0:
            problems.append(f"--num-train-shards must be >= 0, got {self.num_train_shards}")
        if self.num_shards is not None and self.num_shards < 2:
            problems.append(f"--num-shards must be at least 2 (train + val), got {self.num_shards}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if self.timeout <= 0:
            problems.append(f"--timeout must be positive, got {self.timeout}")
        if self.retries < 0:
            problems.append(f"--retries must be >= 0, got {self.retries}")
        check(problems)


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.dataset import download_shards
    from nanochat.node_sync import base_dir_is_shared, wait_for_all

    config.validate()
    metrics: dict = {}
    # One download per file system: rank 0's, and under torchrun on several nodes without
    # a shared disk also each other node's local rank 0. The other ranks wait.
    shared = base_dir_is_shared(runtime)
    if runtime.is_master or (runtime.local_rank == 0 and not shared):
        metrics = download_shards(runtime.base_dir, config.num_train_shards, url=config.url,
                                  num_shards=config.num_shards, workers=config.workers,
                                  timeout=config.timeout, retries=config.retries)
        log.info("fetched %d file(s) (%.1f MB), skipped %d already present, in %.1fs -> %s",
                 metrics["files_fetched"], metrics["bytes_fetched"] / 1e6, metrics["files_skipped"],
                 metrics["seconds"], metrics["data_dir"])
    wait_for_all(runtime)
    return metrics
