"""Import a directory written by `nanochat export` back into a nanochat checkpoint.

  nanochat import-hf path/to/export -g d12            # -> base_checkpoints/d12
  nanochat import-hf path/to/export -g d12 -i sft     # -> chatsft_checkpoints/d12

The weights are copied unchanged (an fp32 export round-trips bit for bit). When the base
dir has no tokenizer yet, the export's tokenizer.json is converted back and saved.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.errors import UserError

log = logging.getLogger("nanochat.import_hf")


@dataclass
class Config:
    path: str | None = option(None, "the export directory to import (required)", positional=True)
    tag: str | None = option(None, "checkpoint tag to write, e.g. d12; automatic: the export's own tag, "
                             "else d<n_layer>", short="-g")
    source: str = option("base", "which checkpoint folder to write into: base, sft or rl", short="-i")
    step: int | None = option(None, "checkpoint step to write; automatic: the export's step, else 0", short="-s")
    force: bool = option(False, "overwrite an existing checkpoint at that step")

    def validate(self) -> None:
        problems = []
        if not self.path:
            problems.append("give the export directory to import: nanochat import-hf DIR")
        if self.source not in ("base", "sft", "rl"):
            problems.append(f"-i/--source {self.source!r} must be base, sft or rl")
        if self.step is not None and self.step < 0:
            problems.append(f"--step {self.step} must be non-negative")
        check(problems)


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.checkpoint import checkpoint_dir, meta_path, save_checkpoint
    from nanochat.export.hf import encoding_from_tokenizer_json, read_export
    from nanochat.tokenizer import Tokenizer, get_tokenizer

    export_dir = Path(config.path)
    state, model_config, source = read_export(export_dir)
    tag = config.tag or source.get("tag") or f"d{model_config['n_layer']}"
    step = config.step if config.step is not None else int(source.get("step") or 0)
    ckpt_dir = checkpoint_dir(runtime.base_dir, config.source, tag)
    if meta_path(ckpt_dir, step).exists() and not config.force:
        raise UserError(f"{ckpt_dir} already has a checkpoint at step {step}; pass --force to overwrite it "
                        "or pick another -g/--tag or --step")
    # the tokenizer: reuse the base dir's when it matches, else install the export's
    tok_dir = Path(runtime.base_dir) / "tokenizer"
    try:
        tokenizer = get_tokenizer(runtime.base_dir)
    except FileNotFoundError:
        enc = encoding_from_tokenizer_json(export_dir / "tokenizer.json")
        bos = "<|bos|>" if "<|bos|>" in enc.special_tokens_set else "<|endoftext|>"
        tokenizer = Tokenizer(enc, bos)
        tokenizer.save(tok_dir)
        log.info("installed the export's tokenizer in %s", tok_dir)
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        raise UserError(f"the tokenizer in {tok_dir} has {tokenizer.get_vocab_size()} tokens but the export's "
                        f"model {model_config['vocab_size']}; import into a base dir without a tokenizer "
                        "(--base-dir) or with the one the model was trained with")
    meta = {"step": step, "model_config": model_config,
            "user_config": {"imported_from": str(export_dir.resolve()), "export_source": source}}
    save_checkpoint(ckpt_dir, step, state, None, meta)
    print(f"imported {export_dir} as {config.source}/{tag} step {step} in {ckpt_dir}")
    return {"checkpoint_dir": str(ckpt_dir), "tag": tag, "step": step, "source": config.source}
