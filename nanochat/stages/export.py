"""Export a checkpoint as a self-contained Hugging Face model directory (transformers, the hub).

  nanochat export -o my_model                       # newest chat model, bfloat16
  nanochat export -i base -g d12 -s 5000 -o d12_base --dtype float32
  nanochat export -o my_model --push-to-hub me/my-model

Load it anywhere with transformers (no nanochat needed):
  model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
  tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.export")


@dataclass
class Config:
    source: str | None = option(None, "which checkpoint, base, sft or rl; automatic: rl if trained, else sft, "
                                "else base", short="-i")
    tag: str | None = option(None, "checkpoint tag, e.g. d12; automatic: the largest model", short="-g")
    step: int | None = option(None, "checkpoint step; automatic: the last", short="-s")
    output: str | None = option(None, "output directory; automatic: <base-dir>/hf/<source>_<tag>", short="-o")
    dtype: str = option("bfloat16", "weight dtype in the export: bfloat16 or float32 (float16 is refused: "
                        "ReLU^2 activations overflow it)")
    force: bool = option(False, "replace a non-empty output directory")
    max_shard_size: str = option("5GB", "split model.safetensors into shards above this size")
    push_to_hub: str | None = option(None, "also upload the export to this hub repo (needs huggingface_hub)")

    def validate(self) -> None:
        from nanochat.export.hf import check_dtype, parse_size

        problems = []
        if self.source is not None and self.source not in ("base", "sft", "rl"):
            problems.append(f"-i/--source {self.source!r} must be base, sft or rl")
        for check_one in (lambda: check_dtype(self.dtype), lambda: parse_size(self.max_shard_size)):
            try:
                check_one()
            except ValueError as e:
                problems.append(str(e))
        if self.step is not None and self.step < 0:
            problems.append(f"--step {self.step} must be non-negative")
        check(problems)


def _report_summary(base_dir: Path) -> str | None:
    """The report card's summary table, when `nanochat report` sections exist."""
    from nanochat.report import format_summary_table, read_sections, summary_metrics

    try:
        sections = read_sections(base_dir)
        if not sections:
            return None
        table = summary_metrics(sections)
        if all(v is None for column in table.values() for v in column.values()):
            return None
        return format_summary_table(table)
    except Exception as e:  # a damaged report must not block an export
        log.warning("could not read the report card for the model card (%s: %s)", type(e).__name__, e)
        return None


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.checkpoint import (checkpoint_dir, find_largest_tag, find_last_step, latest_stage,
                                     load_checkpoint, patch_model_config, stage_root)
    from nanochat.export.hf import export_model, prepare_output, push_to_hub
    from nanochat.tokenizer import get_tokenizer

    source = config.source or latest_stage(runtime.base_dir)
    if source is None:
        raise MissingInputError(f"no checkpoint under {runtime.base_dir}; train one with `nanochat base-train` first")
    tag = config.tag or find_largest_tag(stage_root(runtime.base_dir, source))
    out = Path(config.output) if config.output else Path(runtime.base_dir) / "hf" / f"{source}_{tag}"
    prepare_output(out, config.force)  # refuse before loading anything
    ckpt_dir = checkpoint_dir(runtime.base_dir, source, tag)
    step = config.step if config.step is not None else find_last_step(ckpt_dir)
    state, _, meta = load_checkpoint(ckpt_dir, step, "cpu")
    if not isinstance(meta.get("model_config"), dict):
        raise UserError(f"checkpoint {ckpt_dir} step {step} has no model_config; "
                        "it was not written by a training stage")
    model_config = patch_model_config(meta["model_config"])
    tokenizer = get_tokenizer(runtime.base_dir)
    batch = meta.get("total_batch_size")
    info = {"stage": source, "tag": tag, "step": step,
            "training_tokens": batch * step if isinstance(batch, int) and source == "base" else None}
    export_model(state, model_config, tokenizer.enc, out, dtype=config.dtype, force=config.force, source=info,
                 report=_report_summary(runtime.base_dir), max_shard_size=config.max_shard_size)
    print(f"exported {source}/{tag} step {step} to {out}")
    result = {"output": str(out), "source": source, "tag": tag, "step": step, "dtype": config.dtype}
    if config.push_to_hub:
        result["hub_url"] = push_to_hub(out, config.push_to_hub)
        print(f"pushed to {result['hub_url']}")
    return result
