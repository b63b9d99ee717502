"""Pretrain a base GPT on the web-text shards (or --dataset NAME); --depth sizes everything.

From one dial, --depth, the stage derives the model's width and heads, the training
horizon (tokens = ratio × scaling params), the total batch size (Power Lines), and
learning rates and weight decay transferred from the d12 reference. Periodically it
measures val bits per byte, CORE and samples, and saves resumable checkpoints.

Rows are packed best-fit from a buffer of documents; a document longer than the room left
in a row is split (--long-docs split, the default: its remainder starts a later row with
BOS, so every token is trained on) or cropped (--long-docs crop, the reference's rule,
which discards the rest). The log reports the share of each epoch's tokens trained on.

Upstream's later changes are the defaults, each one flag from the reference: MuonEq row
equilibration and Muon+ renormalisation in the Muon step (--no-muon-eq, --no-muon-plus)
and a 12 tokens-per-parameter horizon (--target-param-data-ratio 10.5).

  nanochat base-train --depth 20                       # the speedrun model
  nanochat base-train --depth 4 --max-seq-len 512 --device-batch-size 8 --num-iterations 200
  nanochat base-train --dataset my_books --depth 12    # a dataset built by `nanochat ingest`
  torchrun --standalone --nproc_per_node=8 -m nanochat base-train --depth 24
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass

import torch

from nanochat import scaling
from nanochat.common import Runtime, peak_flops, release_free_memory
from nanochat.config import check, option, to_dict
from nanochat.errors import UserError
from nanochat.training import (MUON_EQ_HELP, MUON_PLUS_HELP, StepLogger, Timer, apply_schedule, find_resume_step,
                               make_grad_scaler, make_sinks, optimizer_step, peak_memory_bytes, restore_checkpoint,
                               train_loop)

log = logging.getLogger("nanochat.base_train")

# training tokens per scaling parameter when no horizon is given: upstream's 12 (the
# reference used 10.5; pass --target-param-data-ratio 10.5 for its horizon)
DEFAULT_PARAM_DATA_RATIO = 12.0

@dataclass
class Config:
    # model
    depth: int = option(20, "number of transformer layers; width, heads, horizon, batch size and LRs follow from it")
    aspect_ratio: int = option(64, "model width = depth × aspect ratio (rounded up to a multiple of --head-dim)")
    head_dim: int = option(128, "channels per attention head")
    max_seq_len: int = option(2048, "context length in tokens")
    window_pattern: str = option("SSSL", "sliding-window pattern tiled over layers: L = full context, S = a quarter "
                                         "of it rounded up to 128 (the last layer is always L)")
    # data
    dataset: str | None = option(None, "train on this named dataset (built by `nanochat ingest`) instead of the downloaded web text")
    long_docs: str = option("split", "a document longer than the room left in a row: 'split' it (its rest starts a later row; "
                                     "no token discarded) or 'crop' it (the reference's rule)", choices=("split", "crop"))
    # horizon: at most one of these; none given means --target-param-data-ratio 12 (upstream's default;
    # the reference's was 10.5)
    num_iterations: int | None = option(None, "train for exactly this many optimizer steps")
    target_flops: float | None = option(None, "train until this many FLOPs have been spent")
    target_param_data_ratio: float | None = option(None, "train for ratio × (transformer matrices + lm_head) tokens (12, upstream's default, "
                                                                 "when no horizon is given; the reference used 10.5)")
    # batch
    device_batch_size: int = option(32, "sequences per device per micro-step (lower it if you run out of memory)")
    total_batch_size: int | None = option(None, "tokens per optimizer step across all devices (automatic: Power Lines rule)")
    # optimizer
    embedding_lr: float = option(scaling.PEAK_LRS["embedding_lr"], "AdamW learning rate of the token embedding")
    unembedding_lr: float = option(scaling.PEAK_LRS["unembedding_lr"], "AdamW learning rate of lm_head")
    matrix_lr: float = option(scaling.PEAK_LRS["matrix_lr"], "Muon learning rate of the block matrices")
    scalar_lr: float = option(scaling.PEAK_LRS["scalar_lr"], "AdamW learning rate of the per-layer scalars")
    weight_decay: float = option(0.28, "Muon's cautious weight decay at d12 (rescaled for other depths)")
    warmup_steps: int = option(40, "steps of linear LR warmup")
    warmdown_ratio: float = option(0.65, "fraction of the run spent in the final linear LR warmdown")
    final_lr_frac: float = option(0.05, "LR at the end of warmdown, as a fraction of the peak")
    muon_eq: bool = option(True, MUON_EQ_HELP)
    muon_plus: bool = option(True, MUON_PLUS_HELP)
    # evaluation and output
    eval_every: int = option(250, "measure val bits per byte every N steps (0: only at the end; -1: never)")
    eval_tokens: int = option(80 * 524288, "tokens of the val shard per evaluation")
    core_metric_every: int = option(2000, "measure CORE every N steps and at the end (0 or -1: never)")
    core_metric_max_per_task: int = option(500, "items per task for CORE during training")
    sample_every: int = option(2000, "print samples of the fixed prompts every N steps and at the end (0 or -1: never)")
    save_every: int = option(0, "save a checkpoint every N steps (0 or -1: only at the end)")
    model_tag: str | None = option(None, "checkpoint directory name (default: d<depth>)")
    resume_from_step: int | None = option(None, "continue a run from its checkpoint at this step")
    resume: str | None = option(None, "'latest': continue from the newest complete checkpoint of this tag")
    run: str | None = option(None, "wandb run name; logging to wandb is on only when given")
    # compute
    compile: bool | None = option(None, "torch.compile the model (default: on for CUDA, off on CPU)")
    fp8: bool = option(False, "fp8 matmuls (H100-class GPU and torchao required)")
    fp8_recipe: str = option("tensorwise", "fp8 scaling recipe", choices=("tensorwise", "rowwise"))

    def validate(self) -> None:
        p = []
        horizons = [n for n in ("num_iterations", "target_flops", "target_param_data_ratio") if getattr(self, n) is not None]
        if len(horizons) > 1:
            p.append(f"give at most one training horizon, got {', '.join('--' + h.replace('_', '-') for h in horizons)}")
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "warmup_steps"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                p.append(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        for name in ("num_iterations", "target_flops", "target_param_data_ratio", "total_batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"--{name.replace('_', '-')} must be positive (got {v})")
        for name in ("eval_every", "core_metric_every", "sample_every", "save_every"):
            if getattr(self, name) < -1:
                p.append(f"--{name.replace('_', '-')} must be >= 0, or -1 for never (as in the reference)")
        if self.eval_tokens < 0:
            p.append("--eval-tokens must be >= 0")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            p.append(f"--window-pattern must be a string of S and L (got {self.window_pattern!r})")
        if not 0 <= self.warmdown_ratio <= 1:
            p.append(f"--warmdown-ratio must be in [0, 1] (got {self.warmdown_ratio})")
        if self.resume not in (None, "latest"):
            p.append(f"--resume accepts only 'latest' (got {self.resume!r}); use --resume-from-step N for a given step")
        if self.resume is not None and self.resume_from_step is not None:
            p.append("give either --resume latest or --resume-from-step, not both")
        if self.long_docs not in ("split", "crop"):
            p.append(f"--long-docs must be 'split' or 'crop' (got {self.long_docs!r})")
        from nanochat.dataset import dataset_problems
        p.extend(dataset_problems(self.dataset))
        check(p)


@dataclass
class Plan:
    """Everything derived from the config and the vocabulary before training starts."""
    model_config: dict
    num_params: int
    num_scaling_params: int
    flops_per_token: float
    target_tokens: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    lr_scale: float
    weight_decay: float


def _meta_model(config: Config, depth: int, vocab_size: int):
    from nanochat.gpt import GPT, GPTConfig
    n_embd, n_head = scaling.model_dims(depth, config.aspect_ratio, config.head_dim)
    cfg = GPTConfig(sequence_len=config.max_seq_len, vocab_size=vocab_size, n_layer=depth,
                    n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern=config.window_pattern)
    with torch.device("meta"):
        return GPT(cfg)


def make_plan(config: Config, vocab_size: int, world_size: int) -> Plan:
    """Derive shape, horizon, batch size, LR scale and weight decay (no weights touched)."""
    model = _meta_model(config, config.depth, vocab_size)
    counts = model.num_scaling_params()
    n_scaling = scaling.scaling_params(counts)
    flops_per_token = model.estimate_flops()
    ratio = config.target_param_data_ratio if config.target_param_data_ratio is not None else DEFAULT_PARAM_DATA_RATIO
    target_tokens = int(ratio * n_scaling)
    # d12 is where the hyperparameters were tuned; everything transfers from its horizon.
    ref_tokens = ratio * scaling.scaling_params(_meta_model(config, scaling.REF_DEPTH, vocab_size).num_scaling_params())
    total_batch_size = config.total_batch_size or scaling.auto_total_batch_size(target_tokens, ref_tokens)
    tokens_per_micro = config.device_batch_size * config.max_seq_len * world_size
    if total_batch_size % tokens_per_micro:
        raise UserError(
            f"--total-batch-size {total_batch_size:,} is not a multiple of device batch × sequence × devices = "
            f"{config.device_batch_size} × {config.max_seq_len} × {world_size} = {tokens_per_micro:,}; "
            f"change --total-batch-size or --device-batch-size")
    if config.num_iterations is not None:
        num_iterations = config.num_iterations
    elif config.target_flops is not None:
        num_iterations = round(config.target_flops / (flops_per_token * total_batch_size))
    else:
        num_iterations = target_tokens // total_batch_size
    if num_iterations < 1:
        raise UserError(f"the horizon works out to {num_iterations} steps at batch {total_batch_size:,}; "
                        "raise the horizon or lower --total-batch-size")
    return Plan(
        model_config=asdict(model.config), num_params=counts["total"], num_scaling_params=n_scaling,
        flops_per_token=flops_per_token, target_tokens=target_tokens, total_batch_size=total_batch_size,
        grad_accum_steps=total_batch_size // tokens_per_micro, num_iterations=num_iterations,
        lr_scale=scaling.batch_lr_scale(total_batch_size),
        weight_decay=scaling.scaled_weight_decay(config.weight_decay, total_batch_size, target_tokens, ref_tokens),
    )


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat import checkpoint as ckpt
    from nanochat.dataloader import pretrain_batches, used_fraction
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.loss_eval import SAMPLE_PROMPTS, complete_prompts, evaluate_bpb
    from nanochat.node_sync import pretraining_files, sync_files
    from nanochat.report import log_section
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    config.validate()
    device, base_dir = runtime.device, runtime.base_dir
    # multi-node without a shared disk: every node gets rank 0's tokenizer and shards
    sync_files(runtime, pretraining_files(base_dir, config.dataset))
    tokenizer = get_tokenizer(base_dir)
    token_bytes = get_token_bytes(base_dir, device=device)
    plan = make_plan(config, tokenizer.get_vocab_size(), runtime.world_size)
    tag = config.model_tag or f"d{config.depth}"
    ckpt_dir = ckpt.checkpoint_dir(base_dir, "base", tag)

    log.info("model: %s", plan.model_config)
    log.info("parameters: %s total, %s for scaling laws; %.3e FLOPs/token",
             f"{plan.num_params:,}", f"{plan.num_scaling_params:,}", plan.flops_per_token)
    log.info("horizon: %d steps × %s tokens = %s tokens (%.2f tokens/param); grad accumulation %d",
             plan.num_iterations, f"{plan.total_batch_size:,}", f"{plan.num_iterations * plan.total_batch_size:,}",
             plan.num_iterations * plan.total_batch_size / plan.num_scaling_params, plan.grad_accum_steps)
    log.info("LR scale %.4f for batch %s; Muon weight decay %.5f", plan.lr_scale, f"{plan.total_batch_size:,}", plan.weight_decay)

    # measured (off GPUs) before the model, the optimizer and the loader thread exist:
    # on a quiet device, and its matrices are gone before training allocates
    peak = peak_flops(device, runtime.dtype, cache_dir=runtime.base_dir) * runtime.world_size
    model = build_model(GPTConfig(**plan.model_config), device, runtime.dtype)
    if config.fp8:
        if device.type != "cuda":
            raise ValueError("--fp8 needs a CUDA GPU (H100 class); drop --fp8 on this device")
        from nanochat.fp8 import convert_to_fp8
        convert_to_fp8(model, config.fp8_recipe)
    optimizer = model.setup_optimizer(
        unembedding_lr=config.unembedding_lr * plan.lr_scale, embedding_lr=config.embedding_lr * plan.lr_scale,
        matrix_lr=config.matrix_lr * plan.lr_scale, scalar_lr=config.scalar_lr * plan.lr_scale,
        weight_decay=plan.weight_decay, ns_dtype=runtime.muon_dtype, muon_eq=config.muon_eq, muon_plus=config.muon_plus)

    # --- resume ---------------------------------------------------------------
    resume_step = find_resume_step(ckpt_dir, config.resume_from_step, config.resume, runtime)
    step, val_bpb, min_val_bpb, smooth_loss, train_time, loader_state = 0, None, float("inf"), 0.0, 0.0, None
    if resume_step is not None:
        meta = restore_checkpoint(ckpt_dir, resume_step, model, optimizer, runtime, model_config=plan.model_config,
                                  mismatch="the checkpoint in {ckpt_dir} was trained with model config {saved}, "
                                           "but these flags give {expected}; resume with the original flags")
        step, val_bpb = meta["step"], meta.get("val_bpb")
        loop = meta.get("loop_state", {})
        min_val_bpb = loop.get("min_val_bpb", float("inf"))
        smooth_loss = loop.get("smooth_train_loss", 0.0)
        train_time = loop.get("total_training_time", 0.0)
        loader_state = meta.get("dataloader_state_dict")
        saved = loader_state[0] if isinstance(loader_state, list) and loader_state else loader_state
        if isinstance(saved, dict) and saved.get("long_docs", config.long_docs) != config.long_docs:
            log.warning("the checkpoint's run packed with --long-docs %s; continuing with --long-docs %s",
                        saved["long_docs"], config.long_docs)

    train_model = model
    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    if use_compile:
        train_model = torch.compile(model, dynamic=False)
    scaler = make_grad_scaler(runtime)

    # --- data ----------------------------------------------------------------
    B, T = config.device_batch_size, config.max_seq_len
    loader = pretrain_batches(tokenizer, B, T, "train", base_dir=base_dir, device=device, rank=runtime.rank,
                              world_size=runtime.world_size, resume_state=loader_state, long_docs=config.long_docs,
                              dataset=config.dataset)
    consumed = {"state": loader_state}

    def micro_batches():
        # the state saved in a checkpoint is that of the last batch actually trained on
        for x, y, state in loader:
            finished, before = state.get("last_epoch"), consumed["state"]
            if finished and not (isinstance(before, dict) and before.get("last_epoch") == finished):
                logger.event(f"data: epoch {finished['epoch']} of the train split done: "
                             f"{100 * finished['used_fraction']:.1f}% of its {finished['dataset_tokens']:,} tokens "
                             f"trained on (--long-docs {config.long_docs})", runtime.is_master)
            consumed["state"] = state
            yield x, y

    micro = micro_batches()
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def evaluate() -> float:
        # The val tokens are the same at every evaluation: tokenize them once and keep
        # them (on the CPU) instead of re-reading and re-packing the shard each time.
        if not val_batches:
            steps = max(1, config.eval_tokens // (B * T * runtime.world_size))
            # packed the reference's way whatever --long-docs is: one fixed val set for
            # every run, comparable with base-loss and with runs from before --long-docs
            # (one pass at most: a val split smaller than --eval-tokens is measured once)
            val = pretrain_batches(tokenizer, B, T, "val", base_dir=base_dir, device="cpu",
                                   rank=runtime.rank, world_size=runtime.world_size, dataset=config.dataset,
                                   epochs=1)
            try:
                val_batches.extend((x, y) for x, y, _ in itertools.islice(val, steps))
            finally:
                val.close()
            if len(val_batches) < steps:
                log.info("the val split holds about %d batches of %d x %d tokens: evaluating on one pass of it "
                         "rather than --eval-tokens %s", len(val_batches), B, T, f"{config.eval_tokens:,}")
        release_free_memory()  # the training step's freed buffers: evaluation allocates its own
        model.eval()
        try:
            batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in val_batches)
            return evaluate_bpb(model, batches, len(val_batches), token_bytes)
        finally:
            model.train()

    user_config = to_dict(config)
    sink = make_sinks(runtime, ckpt_dir / "metrics.jsonl", config.run, user_config,
                      resume_step=step if resume_step is not None else None)
    logger = StepLogger(plan.num_iterations, plan.total_batch_size, plan.flops_per_token * plan.total_batch_size,
                        peak, sink, smooth_loss=smooth_loss, elapsed=train_time)
    log.info("peak %.3e FLOP/s in %s for MFU", peak, runtime.autocast_dtype_name())

    core_results: dict = {}
    samples: list[str] = []

    def evaluate_due(step: int, last: bool) -> None:
        # evaluation (bpb, CORE, samples) runs the plain compute-dtype matmuls, as the
        # reference's does: fp8 is for training throughput, not for the numbers we report
        if config.fp8:
            from nanochat.fp8 import disable_fp8
            with disable_fp8(model):
                return _evaluate_due(step, last)
        return _evaluate_due(step, last)

    def _evaluate_due(step: int, last: bool) -> None:
        nonlocal val_bpb, min_val_bpb, core_results, samples
        if config.eval_every >= 0 and ((config.eval_every and step % config.eval_every == 0) or last):
            val_bpb = evaluate()
            min_val_bpb = min(min_val_bpb, val_bpb)
            logger.event(f"step {step} | val bpb {val_bpb:.4f}", runtime.is_master, step=step, val_bpb=val_bpb)
        if config.core_metric_every > 0 and (last or (step > 0 and step % config.core_metric_every == 0)):
            from nanochat.core_eval import ensure_eval_bundle, evaluate_core
            model.eval()
            core_results = evaluate_core(model, tokenizer, device, ensure_eval_bundle(base_dir),
                                         max_per_task=config.core_metric_max_per_task,
                                         rank=runtime.rank, world_size=runtime.world_size)
            model.train()
            logger.event(f"step {step} | CORE {core_results['core']:.4f}", runtime.is_master,
                         step=step, core=core_results["core"])
        if config.sample_every > 0 and runtime.is_master and (last or (step > 0 and step % config.sample_every == 0)):
            model.eval()
            samples = complete_prompts(model, tokenizer, SAMPLE_PROMPTS)
            model.train()
            logger.event("samples:\n" + "\n".join(f"  {p!r} → {s!r}" for p, s in zip(SAMPLE_PROMPTS, samples)))

    def checkpoint_meta(step: int) -> dict:
        loader_states = consumed["state"]
        if runtime.distributed:
            # every rank reads its own row groups: keep all positions for an exact resume
            loader_states = [None] * runtime.world_size
            torch.distributed.all_gather_object(loader_states, consumed["state"])
        return {
            "step": step, "val_bpb": val_bpb, "model_config": plan.model_config, "user_config": user_config,
            "device_batch_size": B, "max_seq_len": T, "total_batch_size": plan.total_batch_size,
            "num_iterations": plan.num_iterations, "dataloader_state_dict": loader_states,
            "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": logger.smooth_loss,
                           "total_training_time": logger.elapsed},
        }

    def train_step(step: int) -> dict:
        lrm = scaling.lr_multiplier(step, plan.num_iterations, config.warmup_steps, config.warmdown_ratio, config.final_lr_frac)
        apply_schedule(optimizer, lrm, scaling.muon_momentum(step, plan.num_iterations, config.warmdown_ratio),
                       scaling.muon_weight_decay(step, plan.num_iterations, plan.weight_decay))
        with Timer(device) as timer:
            loss = optimizer_step(train_model, optimizer, micro, lambda m, b: m(b[0], b[1]), runtime,
                                  num_micro_steps=plan.grad_accum_steps, scaler=scaler)
        return logger.step(step, loss, timer.dt, lrm, runtime.is_master)

    t_start = time.time()
    _, record = train_loop(step=step, model=model, optimizer=optimizer, runtime=runtime, logger=logger,
                           ckpt_dir=ckpt_dir, save_every=max(config.save_every, 0), resume_step=resume_step,
                           is_last=lambda step: step == plan.num_iterations, evaluate=evaluate_due,
                           checkpoint_meta=checkpoint_meta, train_step=train_step, close=micro.close)

    metrics = {
        "steps": plan.num_iterations, "num_params": plan.num_params, "flops_per_token": plan.flops_per_token,
        "total_batch_size": plan.total_batch_size, "tokens": plan.total_batch_size * plan.num_iterations,
        "val_bpb": val_bpb, "min_val_bpb": min_val_bpb if val_bpb is not None else None,
        "core": core_results.get("core"), "final_loss": record.get("loss_ema"),
        "tok_per_sec": record.get("tok_per_sec"), "mfu": record.get("mfu"),
        "train_time_s": logger.elapsed, "wall_time_s": time.time() - t_start,
        "peak_memory_mib": peak_memory_bytes(device) / 2 ** 20, "checkpoint_dir": str(ckpt_dir),
        "samples": samples,
    }
    if isinstance(consumed["state"], dict):  # (a list of every rank's states only before the first step)
        state = consumed["state"]
        metrics["data_epoch"] = state["epoch"]
        metrics["data_used_fraction"] = used_fraction(state)
        if "last_epoch" in state:
            metrics["data_last_epoch_used_fraction"] = state["last_epoch"]["used_fraction"]
        if runtime.is_master:
            log.info("data: %.1f%% of the dataset tokens handed to packing were trained on (--long-docs %s; "
                     "the reader is in epoch %d)", 100 * metrics["data_used_fraction"], config.long_docs, state["epoch"])
    if runtime.is_master:
        log.info("peak memory %.0f MiB; training time %.1f s; val bpb %s", metrics["peak_memory_mib"],
                 metrics["train_time_s"], f"{val_bpb:.4f}" if val_bpb is not None else "n/a")
        log_section(base_dir, "Base model training", {"config": user_config, "plan": asdict(plan), "metrics": metrics})
    return metrics
