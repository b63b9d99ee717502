"""Supervised fine-tuning: teach a base model to chat on a mixture of conversations.

Loads a base checkpoint and trains it on whole conversations, packed best-fit into
padded rows that start with BOS (the layout it will see when chatting), with the loss on
the assistant's tokens only. Sequence length, batch sizes and learning rates are
inherited from the base checkpoint unless given (the LRs get pretraining's batch-size
scaling, √(batch / 2^19), times --init-lr-frac); the optimizer's moment buffers are
warm-started from the base checkpoint's. By default one epoch of the mixture is run,
with val bits per byte and ChatCORE measured along the way.

The mixture (--mixture) is a list of specs NAME[:EPOCHS][@ROWS]. Names:
  smoltalk  identity  mmlu-aux  gsm8k  simple-spelling  spelling  arc-easy  arc-challenge
  jsonl:/path/to/conversations.jsonl   (your own; one JSON list of messages per line)
EPOCHS lists the component that many times; @ROWS keeps its first ROWS rows (for the
generated spelling tasks: how many to generate). The val mixture (--val-mixture) takes
the same specs; evaluation splits end in -test (smoltalk-test, mmlu-test, gsm8k-test,
arc-easy-test, arc-challenge-test, spelling-test, simple-spelling-test).
Default: smoltalk identity:2 mmlu-aux:3 gsm8k:4 simple-spelling spelling (the
reference's); --mixture-add appends specs to it. Without network access to SmolTalk,
replace it: --mixture identity:2 mmlu-aux:3 gsm8k:4 simple-spelling spelling.

  nanochat sft
  nanochat sft -g d20 --num-iterations 500 --mixture-add jsonl:/data/mine.jsonl:2
  torchrun --standalone --nproc_per_node=8 -m nanochat sft --device-batch-size 16
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat import scaling
from nanochat.common import Runtime, peak_flops
from nanochat.config import check, option, to_dict
from nanochat.errors import UserError
from nanochat.tasks.mixture import (DEFAULT_GSM8K_EPOCHS, DEFAULT_MMLU_EPOCHS, build_mixture, default_mixture,
                                    default_val_mixture, parse_mixture)
from nanochat.training import (MUON_EQ_HELP, MUON_PLUS_HELP, StepLogger, Timer, apply_schedule, find_resume_step,
                               make_grad_scaler, make_sinks, optimizer_step, peak_memory_bytes, restore_checkpoint,
                               train_loop)

log = logging.getLogger("nanochat.sft")

# Hyperparameters inherited from the base checkpoint: name -> (where in its meta, fallback
# when the base checkpoint does not record it). The fallbacks are base-train's defaults.
INHERITED = {
    "max_seq_len": ("meta", 2048),
    "device_batch_size": ("meta", 32),
    "total_batch_size": ("meta", 524288),
    "embedding_lr": ("user_config", scaling.PEAK_LRS["embedding_lr"]),
    "unembedding_lr": ("user_config", scaling.PEAK_LRS["unembedding_lr"]),
    "matrix_lr": ("user_config", scaling.PEAK_LRS["matrix_lr"]),
    "scalar_lr": ("user_config", scaling.PEAK_LRS["scalar_lr"]),
}


@dataclass
class Config:
    # source model
    model_tag: str | None = option(None, "base checkpoint to fine-tune, also the output tag [automatic: the largest model]",
                                   short="-g")
    model_step: int | None = option(None, "step of the base checkpoint [automatic: its last]", short="-s")
    load_optimizer: bool = option(True, "warm-start the optimizer's moment buffers from the base checkpoint")
    output_tag: str | None = option(None, "checkpoint folder name under the SFT checkpoints [automatic: the base tag]")
    # horizon
    num_iterations: int | None = option(None, "train exactly this many steps [automatic: one epoch of the mixture]")
    # batch (default: inherited from the base checkpoint)
    max_seq_len: int | None = option(None, "row length in tokens [automatic: the base checkpoint's]")
    device_batch_size: int | None = option(None, "rows per device per micro-step [automatic: the base checkpoint's]")
    total_batch_size: int | None = option(None, "tokens per optimizer step, all devices [automatic: the base checkpoint's]")
    # optimizer (peak LRs default to the base checkpoint's; scaled by √(batch/2^19) as in pretraining)
    embedding_lr: float | None = option(None, "AdamW LR of the token embedding [automatic: the base checkpoint's]")
    unembedding_lr: float | None = option(None, "AdamW LR of lm_head [automatic: the base checkpoint's]")
    matrix_lr: float | None = option(None, "Muon LR of the block matrices [automatic: the base checkpoint's]")
    scalar_lr: float | None = option(None, "AdamW LR of the per-layer scalars [automatic: the base checkpoint's]")
    init_lr_frac: float = option(0.8, "SFT's peak LR as a fraction of the base LRs")
    warmup_ratio: float = option(0.0, "fraction of the run spent in linear LR warmup")
    warmdown_ratio: float = option(0.5, "fraction of the run spent in the final linear LR warmdown")
    final_lr_frac: float = option(0.0, "LR at the end of warmdown, as a fraction of the peak")
    muon_eq: bool = option(True, MUON_EQ_HELP)
    muon_plus: bool = option(True, MUON_PLUS_HELP)
    # data
    mixture: list[str] | None = option(None, "training mixture, specs NAME[:EPOCHS][@ROWS] [automatic: the reference's]")
    mixture_add: list[str] | None = option(None, "specs appended to the default mixture")
    mmlu_epochs: int | None = option(None, "epochs of MMLU auxiliary_train in the default mixture [automatic: 3]")
    gsm8k_epochs: int | None = option(None, "epochs of GSM8K train in the default mixture [automatic: 4]")
    val_mixture: list[str] | None = option(None, "validation mixture for val bpb [automatic: smoltalk-test mmlu-test@5200 "
                                           "gsm8k-test@420, without smoltalk-test when smoltalk is not trained on]")
    identity_url: str | None = option(None, "where to download identity_conversations.jsonl when <base_dir> lacks it "
                                      "[automatic: the reference's; file:// works]")
    # evaluation and output
    eval_every: int = option(200, "measure val bits per byte every N steps (0: only at the end; -1: never)")
    eval_tokens: int = option(40 * 524288, "tokens of the val mixture per evaluation")
    chatcore_every: int = option(200, "measure ChatCORE every N steps and at the end (0 or -1: never)")
    chatcore_max_problems: int = option(24, "problems per generative task (GSM8K, HumanEval, SpellingBee) in ChatCORE")
    chatcore_max_categorical: int | None = option(None, "problems per multiple-choice task in ChatCORE [automatic: all]")
    chatcore_max_new_tokens: int = option(512, "longest completion sampled for ChatCORE")
    save_every: int = option(0, "save a checkpoint every N steps (0 or -1: only at the end)")
    resume_from_step: int | None = option(None, "continue an SFT run from its checkpoint at this step")
    resume: str | None = option(None, "'latest': continue from the newest complete SFT checkpoint of this tag")
    run: str | None = option(None, "wandb run name; logging to wandb is on only when given")
    compile: bool | None = option(None, "torch.compile the model [automatic: on for CUDA, off on CPU]")

    def validate(self) -> None:
        p = []
        for name in ("num_iterations", "max_seq_len", "device_batch_size", "total_batch_size", "embedding_lr",
                     "unembedding_lr", "matrix_lr", "scalar_lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"--{name.replace('_', '-')} must be positive (got {v})")
        if not 0 < self.init_lr_frac <= 10:
            p.append(f"--init-lr-frac must be in (0, 10] (got {self.init_lr_frac})")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(self, name)})")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            p.append(f"--warmup-ratio + --warmdown-ratio must be at most 1 "
                     f"(got {self.warmup_ratio + self.warmdown_ratio})")
        for name in ("eval_every", "chatcore_every", "save_every"):
            if getattr(self, name) < -1:
                p.append(f"--{name.replace('_', '-')} must be >= 0, or -1 for never (as in the reference)")
        if self.eval_tokens < 0:
            p.append("--eval-tokens must be >= 0")
        for name in ("chatcore_max_problems", "chatcore_max_new_tokens"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.chatcore_max_categorical is not None and self.chatcore_max_categorical < 1:
            p.append(f"--chatcore-max-categorical must be >= 1 (got {self.chatcore_max_categorical})")
        for name in ("mmlu_epochs", "gsm8k_epochs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                p.append(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
        if self.mixture is not None:
            if self.mixture_add:
                p.append("give either --mixture (replaces the default) or --mixture-add (extends it), not both; "
                         "list everything in --mixture")
            for name in ("mmlu_epochs", "gsm8k_epochs"):
                if getattr(self, name) is not None:
                    p.append(f"--{name.replace('_', '-')} only shapes the default mixture; with --mixture write the "
                             f"epochs into the spec (e.g. {'mmlu-aux:3' if name == 'mmlu_epochs' else 'gsm8k:4'})")
        for flag, specs in (("--mixture", self.mixture), ("--mixture-add", self.mixture_add),
                            ("--val-mixture", self.val_mixture)):
            if specs is not None:
                try:
                    parse_mixture(specs)
                except ValueError as e:
                    p.append(f"{flag}: {e}")
        if self.resume not in (None, "latest"):
            p.append(f"--resume accepts only 'latest' (got {self.resume!r}); use --resume-from-step N for a given step")
        if self.resume is not None and self.resume_from_step is not None:
            p.append("give either --resume latest or --resume-from-step, not both")
        check(p)

    def training_specs(self) -> list[str]:
        if self.mixture is not None:
            return list(self.mixture)
        mmlu = DEFAULT_MMLU_EPOCHS if self.mmlu_epochs is None else self.mmlu_epochs
        gsm8k = DEFAULT_GSM8K_EPOCHS if self.gsm8k_epochs is None else self.gsm8k_epochs
        return default_mixture(mmlu, gsm8k) + list(self.mixture_add or [])

    def validation_specs(self, training: list[str]) -> list[str]:
        if self.val_mixture is not None:
            return list(self.val_mixture)
        return default_val_mixture(training)


# -----------------------------------------------------------------------------
# Hyperparameters inherited from the base checkpoint

def resolve_hyperparameters(config: Config, base_meta: dict) -> dict[str, dict[str, Any]]:
    """For each inherited setting: {"value", "source", "base"} where source is
    "inherited" (not given; the base checkpoint's value), "overridden" (given and different
    from the base's), "given" (given, same as the base's or the base has none) or
    "default" (neither given nor recorded by the base checkpoint: base-train's default)."""
    user_config = base_meta.get("user_config") or {}
    out = {}
    for name, (where, fallback) in INHERITED.items():
        base_value = (base_meta if where == "meta" else user_config).get(name)
        given = getattr(config, name)
        if given is None:
            value, source = (base_value, "inherited") if base_value is not None else (fallback, "default")
        else:
            value = given
            source = "overridden" if base_value is not None and given != base_value else "given"
        out[name] = {"value": value, "source": source, "base": base_value}
    return out


def log_hyperparameters(resolved: dict[str, dict[str, Any]]) -> None:
    for name, r in resolved.items():
        flag = "--" + name.replace("_", "-")
        if r["source"] == "inherited":
            log.info("inherited %s=%s from the base checkpoint", name, r["value"])
        elif r["source"] == "overridden":
            log.info("%s=%s overrides the base checkpoint's %s", flag, r["value"], r["base"])
        elif r["source"] == "default":
            log.info("%s=%s (the base checkpoint does not record it; default)", name, r["value"])
        else:
            log.info("%s=%s (given)", name, r["value"])


def progress_lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """LR multiplier from the fraction of the run done (SFT's length is set by the data,
    so the schedule is in progress, not steps): linear warmup, flat, linear warmdown."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min((progress - (1.0 - warmdown_ratio)) / warmdown_ratio, 1.0)
    return (1 - decay) + decay * final_lr_frac


def sft_muon_momentum(step: int) -> float:
    """0.85 → 0.95 over the first 300 steps (a gentler ramp than pretraining's)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------
# Pieces of the run

def _warm_start_optimizer(optimizer, base_dir, tag: str, step: int, runtime: Runtime) -> str:
    """Load the base checkpoint's moment buffers, keeping SFT's own hyperparameters.
    All ranks warm-start or none does (a sharded optimizer must agree across ranks).
    Returns what happened: "loaded", "missing" or "mismatch" (for the log and the meta)."""
    from nanochat import checkpoint as ckpt
    path = ckpt.optim_path(ckpt.checkpoint_dir(base_dir, "base", tag), step, runtime.rank)
    # load_state_dict also restores the saved LRs, betas and weight decay, which pretraining's
    # warmdown left near zero: keep only the buffers and put SFT's settings back.
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    status = "missing"
    if path.is_file():
        state = torch.load(path, map_location=runtime.device, weights_only=True)
        try:
            optimizer.load_state_dict(state)
            status = "loaded"
        except ValueError as e:
            log.warning("the base checkpoint's optimizer state does not fit: %s", e)
            status = "mismatch"
        del state
    everywhere = status == "loaded"
    if runtime.distributed:
        flag = torch.tensor(int(everywhere), device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        everywhere = bool(flag.item())
    if not everywhere:
        optimizer.state.clear()
        status = "mismatch" if status == "loaded" else status
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)
    if everywhere:
        log.info("warm-started the optimizer from %s (moment buffers only; SFT's LRs and settings kept)", path)
    else:
        log.warning("no usable optimizer state for every rank in %s (%s here): starting SFT with a fresh "
                    "optimizer (slightly worse)", path.parent, status)
    return status


def supervised_mean_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the supervised targets of one micro-batch (B, T). A
    micro-batch without any (every row's assistant text cut off) gives 0 and no gradient,
    where a plain mean would give 0/0 = NaN and stop the run."""
    inputs, targets = batch
    return model(inputs, targets, loss_reduction="sum") / (targets >= 0).sum().clamp(min=1)


def _check_resumable(ckpt_dir: Path, step: int, train_specs: list[str]) -> None:
    """Refuse early (before any data is loaded) to resume onto another mixture."""
    from nanochat import checkpoint as ckpt
    path = ckpt.meta_path(ckpt_dir, step)
    if not path.is_file():
        return  # load_checkpoint explains what is missing
    saved = json.loads(path.read_text(encoding="utf-8")).get("mixture")
    if saved != train_specs:
        raise UserError(f"the SFT run in {ckpt_dir} trained on the mixture {saved}, not {train_specs}; "
                        "resume with the same --mixture")


def _gather_loader_states(state: dict, runtime: Runtime) -> list[dict]:
    """Every rank's loader state, in rank order (rank 0 writes them all into the meta)."""
    if not runtime.distributed:
        return [state]
    states: list = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def _rank_loader_state(saved: Any, runtime: Runtime) -> dict | None:
    if saved is None:
        return None
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != runtime.world_size:
        raise UserError(f"the SFT checkpoint was written by {len(states)} process(es) but this run has "
                        f"{runtime.world_size}; resume with the same number of processes")
    return states[runtime.rank]


def _sync_progress(loader, runtime: Runtime) -> tuple[float, bool]:
    """(fraction of the epoch consumed, epoch finished) agreed by all ranks (max), so that
    every rank applies the same LR and stops at the same step."""
    progress, done = loader.progress, loader.epoch_done
    if runtime.distributed:
        t = torch.tensor([progress, float(done)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        progress, done = t[0].item(), bool(t[1].item())
    return progress, done


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat import checkpoint as ckpt
    from nanochat.chat_scoring import evaluate_chatcore
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.node_sync import sync_checkpoint
    from nanochat.report import log_section
    from nanochat.sft_data import SFTLoader
    from nanochat.tokenizer import get_token_bytes

    config.validate()
    device, base_dir = runtime.device, runtime.base_dir
    train_specs = config.training_specs()
    val_specs = config.validation_specs(train_specs)
    train_components, val_components = parse_mixture(train_specs), parse_mixture(val_specs)

    # --- the base model and what it passes on ----------------------------------
    # rank 0 picks the checkpoint (default: its newest) and every node gets its files
    base_tag, base_step = sync_checkpoint(runtime, "base", config.model_tag, config.model_step)
    tag = config.output_tag or base_tag
    ckpt_dir = ckpt.checkpoint_dir(base_dir, "sft", tag)
    resume_step = find_resume_step(ckpt_dir, config.resume_from_step, config.resume, runtime)
    if resume_step is not None:
        _check_resumable(ckpt_dir, resume_step, train_specs)
    model, tokenizer, base_meta = ckpt.load_model("base", base_dir, device, runtime.dtype, tag=base_tag,
                                                  step=base_step, phase="train")
    model_config = asdict(model.config)
    resolved = resolve_hyperparameters(config, base_meta)
    log_hyperparameters(resolved)
    hp = {name: r["value"] for name, r in resolved.items()}
    B, T, total_batch_size = hp["device_batch_size"], hp["max_seq_len"], hp["total_batch_size"]
    tokens_per_micro = B * T * runtime.world_size
    if total_batch_size % tokens_per_micro:
        raise UserError(f"total batch size {total_batch_size:,} is not a multiple of device batch × sequence × devices"
                        f" = {B} × {T} × {runtime.world_size} = {tokens_per_micro:,}; set --total-batch-size, "
                        f"--device-batch-size or --max-seq-len so that it is")
    grad_accum = total_batch_size // tokens_per_micro
    if T > model.config.sequence_len:
        log.warning("--max-seq-len %d is longer than the %d tokens the base model was trained on", T,
                    model.config.sequence_len)

    # --- data ------------------------------------------------------------------
    train_set, train_lines = build_mixture(train_components, base_dir, config.identity_url)
    val_set, val_lines = build_mixture(val_components, base_dir, config.identity_url)
    log.info("training mixture: %s rows\n  %s", f"{len(train_set):,}", "\n  ".join(train_lines))
    log.info("validation mixture: %s rows\n  %s", f"{len(val_set):,}", "\n  ".join(val_lines))

    # --- optimizer ---------------------------------------------------------------
    lr_scale = scaling.batch_lr_scale(total_batch_size)
    optimizer = model.setup_optimizer(
        unembedding_lr=hp["unembedding_lr"] * lr_scale, embedding_lr=hp["embedding_lr"] * lr_scale,
        matrix_lr=hp["matrix_lr"] * lr_scale, scalar_lr=hp["scalar_lr"] * lr_scale,
        weight_decay=0.0, ns_dtype=runtime.muon_dtype, muon_eq=config.muon_eq, muon_plus=config.muon_plus)  # pretraining decays weight decay to zero; SFT continues without it
    log.info("LR scale %.4f for batch %s (as in pretraining) × init-lr-frac %.3f; grad accumulation %d",
             lr_scale, f"{total_batch_size:,}", config.init_lr_frac, grad_accum)
    for group in optimizer.param_groups:
        group["lr"] *= config.init_lr_frac
        group["initial_lr"] = group["lr"]

    # --- resume or warm start -------------------------------------------------------
    step, val_bpb, min_val_bpb, smooth_loss, train_time, loader_state = 0, None, float("inf"), 0.0, 0.0, None
    optimizer_warm_start = "resumed" if resume_step is not None else "off"
    if resume_step is not None:
        meta = restore_checkpoint(ckpt_dir, resume_step, model, optimizer, runtime, model_config=model_config,
                                  mismatch="the SFT checkpoint in {ckpt_dir} has model config {saved}, but the base "
                                           "model has {expected}; resume with the base checkpoint the run started from")
        step, val_bpb = meta["step"], meta.get("val_bpb")
        loop = meta.get("loop_state", {})
        min_val_bpb = loop.get("min_val_bpb", float("inf"))
        smooth_loss, train_time = loop.get("smooth_train_loss", 0.0), loop.get("total_training_time", 0.0)
        loader_state = _rank_loader_state(meta.get("dataloader_state_dict"), runtime)
    elif config.load_optimizer:
        optimizer_warm_start = _warm_start_optimizer(optimizer, base_dir, base_tag, base_step, runtime)

    train_model = model
    if config.compile if config.compile is not None else device.type == "cuda":
        train_model = torch.compile(model, dynamic=False)  # rows are always (B, T): no recompiles
    scaler = make_grad_scaler(runtime)

    loader = SFTLoader(train_set, tokenizer, B, T, device=device, rank=runtime.rank,
                       world_size=runtime.world_size, state=loader_state)
    token_bytes = get_token_bytes(base_dir, device=device)

    def evaluate_val() -> float:
        model.eval()
        try:
            val_loader = SFTLoader(val_set, tokenizer, B, T, device=device, rank=runtime.rank,
                                   world_size=runtime.world_size)
            return evaluate_bpb(model, val_loader, max(1, config.eval_tokens // tokens_per_micro), token_bytes)
        finally:
            model.train()

    def estimated_total(step_now: int, progress: float) -> int:
        if config.num_iterations is not None:
            return config.num_iterations
        return max(step_now + 1, math.ceil(step_now / progress)) if progress > 0 else max(step_now + 1, 1)

    user_config = to_dict(config)
    sink = make_sinks(runtime, ckpt_dir / "metrics.jsonl", config.run, user_config,
                      resume_step=step if resume_step is not None else None)
    peak = peak_flops(device, runtime.dtype, cache_dir=runtime.base_dir) * runtime.world_size
    flops_per_token = model.estimate_flops()
    logger = StepLogger(estimated_total(step, loader.progress), total_batch_size, flops_per_token * total_batch_size,
                        peak, sink, smooth_loss=smooth_loss, elapsed=train_time, show=("epoch",))

    chatcore_results: dict = {}
    progress = 0.0  # of the epoch (or of --num-iterations), agreed by all ranks at the top of each step

    def is_last(step: int) -> bool:
        nonlocal progress
        progress, epoch_done = _sync_progress(loader, runtime)
        if config.num_iterations is not None:
            progress = step / config.num_iterations
            return step >= config.num_iterations
        return epoch_done

    def evaluate_due(step: int, last: bool) -> None:
        nonlocal val_bpb, min_val_bpb, chatcore_results
        if config.eval_every >= 0 and ((config.eval_every and step % config.eval_every == 0) or last):
            val_bpb = evaluate_val()
            min_val_bpb = min(min_val_bpb, val_bpb)
            logger.event(f"step {step} | val bpb {val_bpb:.4f}", runtime.is_master, step=step, val_bpb=val_bpb)
        if config.chatcore_every > 0 and (last or (step > 0 and step % config.chatcore_every == 0)):
            chatcore_results = evaluate_chatcore(
                model, tokenizer, max_problems=config.chatcore_max_problems,
                max_problems_categorical=config.chatcore_max_categorical, batch_size=B,
                max_new_tokens=config.chatcore_max_new_tokens, rank=runtime.rank,
                world_size=runtime.world_size, base_dir=base_dir)
            model.train()
            acc = chatcore_results["accuracy"]
            logger.event(f"step {step} | ChatCORE {chatcore_results['chatcore']:.4f} | ChatCORE_cat "
                         f"{chatcore_results['chatcore_cat']:.4f} | " +
                         " ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()), runtime.is_master,
                         step=step, chatcore=chatcore_results["chatcore"],
                         chatcore_cat=chatcore_results["chatcore_cat"],
                         **{f"chatcore/{k}": v for k, v in acc.items()})

    def checkpoint_meta(step: int) -> dict:
        return {
            "step": step, "val_bpb": val_bpb, "model_config": model_config, "model_tag": tag,
            "user_config": user_config, "source": {"stage": "base", "tag": base_tag, "step": base_step},
            **hp, "hyperparameters": resolved, "lr_scale": lr_scale, "init_lr_frac": config.init_lr_frac,
            "num_iterations": config.num_iterations, "mixture": train_specs, "val_mixture": val_specs,
            "mixture_rows": len(train_set), "optimizer_warm_start": optimizer_warm_start,
            "chatcore": chatcore_results.get("chatcore"),
            "dataloader_state_dict": _gather_loader_states(loader.state_dict(), runtime),
            "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": logger.smooth_loss,
                           "total_training_time": logger.elapsed, "progress": progress},
        }

    def train_step(step: int) -> dict:
        lrm = progress_lr_multiplier(progress, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
        apply_schedule(optimizer, lrm, sft_muon_momentum(step))
        with Timer(device) as timer:
            loss = optimizer_step(train_model, optimizer, loader, supervised_mean_loss, runtime,
                                  num_micro_steps=grad_accum, scaler=scaler)
        logger.total_steps = estimated_total(step + 1, loader.progress)
        return logger.step(step, loss, timer.dt, lrm, runtime.is_master, epoch=loader.epoch,
                           progress=loader.progress)

    t_start = time.time()
    step, record = train_loop(step=step, model=model, optimizer=optimizer, runtime=runtime, logger=logger,
                              ckpt_dir=ckpt_dir, save_every=max(config.save_every, 0), resume_step=resume_step,
                              is_last=is_last, evaluate=evaluate_due, checkpoint_meta=checkpoint_meta,
                              train_step=train_step)

    metrics = {
        "steps": step, "mixture_rows": len(train_set), "epoch_progress": loader.progress,
        "padding_fraction": loader.padding_fraction, "skipped_conversations": loader.skipped,
        "total_batch_size": total_batch_size,
        "tokens": total_batch_size * step, "val_bpb": val_bpb,
        "min_val_bpb": min_val_bpb if val_bpb is not None else None,
        "chatcore": chatcore_results.get("chatcore"), "chatcore_accuracy": chatcore_results.get("accuracy"),
        "final_loss": record.get("loss_ema"), "tok_per_sec": record.get("tok_per_sec"), "mfu": record.get("mfu"),
        "train_time_s": logger.elapsed, "wall_time_s": time.time() - t_start,
        "peak_memory_mib": peak_memory_bytes(device) / 2 ** 20, "checkpoint_dir": str(ckpt_dir),
        "hyperparameters": {k: {"value": v["value"], "source": v["source"]} for k, v in resolved.items()},
        "optimizer_warm_start": optimizer_warm_start,
    }
    if runtime.is_master:
        log.info("peak memory %.0f MiB; training time %.1f s; padding %.1f%% of rows; val bpb %s",
                 metrics["peak_memory_mib"], metrics["train_time_s"], 100 * loader.padding_fraction,
                 f"{val_bpb:.4f}" if val_bpb is not None else "n/a")
        log_section(base_dir, "SFT", {"config": user_config, "mixture": train_lines, "val_mixture": val_lines,
                                      "metrics": metrics})
    return metrics
