"""Build a named pretraining dataset from your own files (txt, md, jsonl, parquet; .gz/.zst).

  nanochat ingest ~/books --dataset books
  nanochat ingest 'papers/**/*.jsonl.zst' notes.md more/ --dataset mine --text-field body --dedup
  nanochat tok-train --dataset books && nanochat base-train --dataset books --depth 12

A .txt/.md file is one document (--split-on-blank-lines: one per paragraph), a .jsonl line
one document (--text-field), a .parquet row one document (--text-column); directories are
read recursively, globs expanded. The documents are shuffled (--seed) and written to
<base_dir>/datasets/NAME/ as shard_NNNNN.parquet in the downloaded shards' layout, the
last shard holding the validation split (--val-fraction of the documents, at least 5, at
most one shard), with a manifest.json. Bad input (empty or binary files, invalid UTF-8,
JSONL lines that are not JSON or lack the field, over-long lines) is skipped, counted and
reported with file and line. Interrupted? Run the same command again: it picks up where
it stopped, and with the dataset complete it does nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option, to_dict

log = logging.getLogger("nanochat.ingest")


@dataclass
class Config:
    paths: tuple[str, ...] = option((), "files, directories (read recursively) and globs: .txt .md .jsonl .parquet, "
                                        "each also .gz or .zst", positional=True)
    dataset: str | None = option(None, "name of the dataset to build (required); other stages read it with --dataset NAME")
    text_field: str = option("text", "JSONL: the field holding each document")
    text_column: str = option("text", "parquet: the column holding each document")
    split_on_blank_lines: bool = option(False, "txt/md: one document per blank-line-separated paragraph instead of per file")
    val_fraction: float = option(0.005, "share of the documents held out for validation (at least 5, at most one shard)")
    seed: int = option(42, "seed of the shuffle")
    dedup: bool = option(False, "drop exact duplicate documents, keeping the first")
    invalid_utf8: str = option("replace", "invalid UTF-8: replace the bad bytes with U+FFFD, or skip the document",
                               choices=("replace", "skip"))
    max_doc_bytes: int = option(16 * 2 ** 20, "a JSONL line or text line longer than this is skipped; a text document "
                                              "longer than this is cut at a line break into several")
    shard_chars: int = option(250_000_000, "characters per shard (the downloaded shards hold about 250M)")
    row_group_size: int = option(1024, "documents per parquet row group (DDP ranks read whole row groups)")
    overwrite: bool = option(False, "rebuild the dataset even if it exists, built from other inputs or options")

    def inputs(self) -> list[str]:
        return list(self.paths)

    def options(self):
        from nanochat.ingest import IngestOptions
        return IngestOptions(text_field=self.text_field, text_column=self.text_column,
                             split_on_blank_lines=self.split_on_blank_lines, val_fraction=self.val_fraction,
                             seed=self.seed, dedup=self.dedup, invalid_utf8=self.invalid_utf8,
                             max_doc_bytes=self.max_doc_bytes, shard_chars=self.shard_chars,
                             row_group_size=self.row_group_size)

    def validate(self) -> None:
        from nanochat.dataset import dataset_problems
        p = []
        if not self.inputs():
            p.append("give the files, directories or globs to read: nanochat ingest PATH... --dataset NAME")
        if self.dataset is None:
            p.append("--dataset NAME is required: the name other stages will read the dataset by")
        p.extend(dataset_problems(self.dataset))
        p.extend(self.options().problems())
        check(p)


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.ingest import ingest
    from nanochat.report import log_section

    config.validate()
    metrics: dict = {}
    if runtime.is_master:  # one writer; the other ranks wait for the dataset
        metrics = ingest(config.inputs(), config.dataset, runtime.base_dir, config.options(),
                         overwrite=config.overwrite)
        log_section(runtime.base_dir, "Dataset ingest", {"config": to_dict(config), "metrics": metrics})
    runtime.barrier()
    return metrics
