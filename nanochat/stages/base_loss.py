"""Bits per byte of a base checkpoint on the train and val shards, plus sample completions.

  nanochat base-loss                 # newest base model
  nanochat base-loss -g d4 -s 200 --split-tokens 1048576
  nanochat base-loss --dataset my_books   # on a dataset built by `nanochat ingest`
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option

log = logging.getLogger("nanochat.base_loss")


@dataclass
class Config:
    tag: str | None = option(None, "checkpoint tag, e.g. d12 (default: the largest model)", short="-g")
    step: int | None = option(None, "checkpoint step (default: the last)", short="-s")
    device_batch_size: int = option(32, "sequences per device per forward pass")
    seq_len: int | None = option(None, "sequence length (default: the model's training length)")
    split_tokens: int = option(40 * 524288, "tokens evaluated per split")
    max_tokens: int = option(16, "tokens generated per sample prompt")
    dataset: str | None = option(None, "measure on the named dataset built by `nanochat ingest` instead of the downloaded web text")

    def validate(self) -> None:
        p = [f"--{n.replace('_', '-')} must be positive" for n in ("device_batch_size", "split_tokens", "max_tokens")
             if getattr(self, n) < 1]
        from nanochat.dataset import dataset_problems
        p.extend(dataset_problems(self.dataset))
        check(p)


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.checkpoint import load_model
    from nanochat.loss_eval import SAMPLE_PROMPTS, complete_prompts, split_bpb
    from nanochat.node_sync import pretraining_files, sync_checkpoint
    from nanochat.report import log_section
    from nanochat.tokenizer import get_token_bytes

    # multi-node: every node gets rank 0's checkpoint and shards (see node_sync)
    tag, step = sync_checkpoint(runtime, "base", config.tag, config.step,
                                extra=pretraining_files(runtime.base_dir, config.dataset))
    model, tokenizer, meta = load_model("base", runtime.base_dir, runtime.device, runtime.dtype, tag=tag, step=step)
    model.eval()
    seq_len = config.seq_len or meta["model_config"]["sequence_len"]
    token_bytes = get_token_bytes(runtime.base_dir, device=runtime.device)
    bpb = split_bpb(model, tokenizer, token_bytes, base_dir=runtime.base_dir, batch_size=config.device_batch_size,
                    seq_len=seq_len, tokens=config.split_tokens, rank=runtime.rank, world_size=runtime.world_size,
                    dataset=config.dataset)
    for split, value in bpb.items():
        log.info("%s bpb: %.4f", split, value)
    samples = []
    if runtime.is_master:
        samples = complete_prompts(model, tokenizer, SAMPLE_PROMPTS, max_tokens=config.max_tokens)
        for prompt, completion in zip(SAMPLE_PROMPTS, samples):
            print(f"{prompt}{completion}")
        log_section(runtime.base_dir, "Base model loss",
                    {"step": meta.get("step"), "dataset": config.dataset or "base_data",
                     "train bpb": bpb.get("train"), "val bpb": bpb.get("val"),
                     "samples": [p + c for p, c in zip(SAMPLE_PROMPTS, samples)]})
    return {"train_bpb": bpb.get("train"), "val_bpb": bpb.get("val"), "step": meta.get("step"), "samples": samples}
