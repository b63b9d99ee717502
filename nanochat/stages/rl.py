"""Reinforcement learning on GSM8K: sample answers, reward the right ones, policy gradient.

Starting from an SFT checkpoint, each step takes --examples-per-step training questions
(split across ranks), samples --num-samples answers to each with the engine (calculator
tool on), rewards an answer 1 when its final "#### N" is right, and takes one policy
gradient step. It is "GRPO" reduced to REINFORCE with a group baseline:

  - on policy, one update per batch of samples: no PPO ratio or clipping;
  - no reference model, so no KL penalty;
  - advantage = reward - mean reward of the same question's group (no division by the
    group's std, as in Dr. GRPO, Liu et al. 2025, arXiv:2503.20783);
  - token-level normalisation (DAPO, Yu et al. 2025, arXiv:2503.14476): each forward
    pass of --device-batch-size sequences sums A·log p over its sampled tokens and divides
    by their number (not a mean of per-sequence means); passes are then averaged. Prompt
    tokens and the calculator's forced outputs are not trained on: the model did not
    choose them.

Every --eval-every steps it measures pass@1..k on GSM8K test. Checkpoints go to
chatrl_checkpoints/<tag>/ and resume exactly (--resume latest).

  nanochat rl                                     # newest SFT model
  nanochat rl -g d20 --num-steps 100 --eval-every 20
  torchrun --standalone --nproc_per_node=8 -m nanochat rl -- --run rl_d20
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from nanochat.common import Runtime, peak_flops
from nanochat.config import check, option, to_dict
from nanochat.errors import UserError
from nanochat.training import (MUON_EQ_HELP, MUON_PLUS_HELP, StepLogger, Timer, apply_schedule, find_resume_step,
                               make_grad_scaler, make_sinks, optimizer_step, peak_memory_bytes, restore_checkpoint,
                               train_loop)

log = logging.getLogger("nanochat.rl")


@dataclass
class Config:
    # where to start
    tag: str | None = option(None, "SFT checkpoint tag to start from, e.g. d20 (default: the largest model)", short="-g")
    step: int | None = option(None, "SFT checkpoint step (default: the last)", short="-s")
    output_tag: str | None = option(None, "chatrl_checkpoints/<tag> to write (default: the SFT tag)")
    # horizon
    num_epochs: int = option(1, "passes over GSM8K train")
    num_steps: int | None = option(None, "optimizer steps (default: epochs × train questions // examples per step)")
    # rollouts
    examples_per_step: int = option(16, "questions per optimizer step, across all ranks")
    num_samples: int = option(16, "answers sampled per question (the group of the group baseline)")
    device_batch_size: int = option(8, "sequences per forward pass when sampling and training (lower it if you run out of memory)")
    max_new_tokens: int = option(256, "longest sampled answer, in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(50, "sample among the k likeliest tokens (0: no top-k filtering)")
    # optimizer (the SFT model's groups, each at its LR × --init-lr-frac, decaying linearly to 0)
    embedding_lr: float = option(0.2, "AdamW learning rate of the token embedding (before --init-lr-frac)")
    unembedding_lr: float = option(0.004, "AdamW learning rate of lm_head (before --init-lr-frac)")
    matrix_lr: float = option(0.02, "Muon learning rate of the block matrices (before --init-lr-frac)")
    weight_decay: float = option(0.0, "weight decay")
    init_lr_frac: float = option(0.05, "every group starts at this fraction of its learning rate")
    muon_eq: bool = option(True, MUON_EQ_HELP)
    muon_plus: bool = option(True, MUON_PLUS_HELP)
    # evaluation and output
    eval_every: int = option(60, "measure pass@k on GSM8K test every N steps (0: only at the end; -1: never)")
    eval_examples: int = option(400, "GSM8K test questions per evaluation")
    eval_samples: int = option(8, "answers sampled per test question, in one batch: pass@1 .. pass@N")
    save_every: int = option(60, "save a checkpoint every N steps (0 or -1: only at the end)")
    resume_from_step: int | None = option(None, "continue a run from its RL checkpoint at this step")
    resume: str | None = option(None, "'latest': continue from the newest RL checkpoint of the output tag")
    seed: int = option(42, "seed of the sampling (rollouts of a given step and question are reproducible)")
    run: str | None = option(None, "wandb run name; logging to wandb is on only when given")

    def validate(self) -> None:
        p = []
        for name in ("num_epochs", "examples_per_step", "num_samples", "device_batch_size", "max_new_tokens",
                     "eval_examples", "eval_samples"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.num_steps is not None and self.num_steps < 1:
            p.append(f"--num-steps must be positive (got {self.num_steps})")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < -1:
                p.append(f"--{name.replace('_', '-')} must be >= 0, or -1 for never (as in the reference)")
        if self.top_k < 0:
            p.append("--top-k must be >= 0 (0 disables it)")
        if self.temperature <= 0:
            p.append(f"--temperature must be > 0 (got {self.temperature}): RL learns from the differences "
                     "between sampled answers, and greedy decoding samples the same answer every time")
        if self.num_samples < 2:
            p.append(f"--num-samples must be at least 2 (got {self.num_samples}): with one answer per question "
                     "the group baseline equals the reward and every advantage is 0")
        if not 0 < self.init_lr_frac <= 1:
            p.append(f"--init-lr-frac must be in (0, 1] (got {self.init_lr_frac})")
        if self.resume not in (None, "latest"):
            p.append(f"--resume accepts only 'latest' (got {self.resume!r}); use --resume-from-step N for a given step")
        if self.resume is not None and self.resume_from_step is not None:
            p.append("give either --resume latest or --resume-from-step, not both")
        check(p)


# -----------------------------------------------------------------------------
# The pure parts: advantages, the training batch, the loss

def compute_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-relative advantages: each reward minus the mean reward of its group.

    rewards: (G * group_size,) float, the samples of one question contiguous.
    Returns the same shape. No division by the group's std: a question that every
    sample gets right (or wrong) contributes nothing, and an almost-solved one is not
    blown up by a tiny std (Dr. GRPO, arXiv:2503.20783)."""
    if group_size < 1 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)  # (G, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1)


def build_rl_batch(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], prompt_len: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sampled sequences into next-token (inputs, targets).

    sequences: B lists of token ids, each the prompt followed by the sampled answer.
    masks: same lengths; 1 where the model sampled the token, 0 where it was given
    (the prompt, and calculator output that the engine forced).
    Returns inputs (B, T-1) and targets (B, T-1), int64, T the longest sequence;
    targets[b, t] = sequences[b][t+1] where that token was sampled, else -1 (ignored
    by the loss). The first `prompt_len` tokens are never targets, whatever the mask
    says. Padding (`pad_id`, never a target) only fills the tail."""
    if len(sequences) != len(masks) or not sequences:
        raise ValueError(f"need as many masks as sequences, and at least one (got {len(sequences)} and {len(masks)})")
    T = max(len(s) for s in sequences)
    if T < 2:
        raise ValueError("every sequence is shorter than two tokens: nothing to predict")
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    trained = torch.zeros((len(sequences), T), dtype=torch.bool)
    for b, (seq, mask) in enumerate(zip(sequences, masks)):
        if len(seq) != len(mask):
            raise ValueError(f"sequence {b} has {len(seq)} tokens but its mask has {len(mask)}")
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        trained[b, :len(mask)] = torch.tensor(mask, dtype=torch.long) != 0
    trained[:, :prompt_len] = False
    inputs = ids[:, :-1]
    targets = ids[:, 1:].masked_fill(~trained[:, 1:], -1)
    return inputs.contiguous(), targets.contiguous()


def policy_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE loss with token-level normalisation.

    inputs, targets: (B, T) from `build_rl_batch` (targets -1 = not trained on).
    advantages: (B,), one per sequence, spread over all its sampled tokens.
    Returns  -Σ_{b,t trained} A_b · log p(target_bt) / (number of trained tokens),
    whose gradient is the policy gradient estimate (on policy, so no importance ratio).
    A batch with no trained token gives 0 (with a graph, so backward still works)."""
    nll = model(inputs, targets, loss_reduction="none").view_as(inputs).float()  # (B, T) = -log p
    trained = targets >= 0
    logp = torch.where(trained, -nll, torch.zeros_like(nll))
    objective = (logp * advantages.to(logp.dtype).unsqueeze(1)).sum()
    return -objective / trained.sum().clamp(min=1)


def rollout_seed(seed: int, step: int, example_index: int, chunk: int) -> int:
    """A reproducible, well-spread 31-bit seed for one generate call (Python's hash of
    ints is not randomised, but mixing by hand keeps the seeds independent of it)."""
    x = (seed * 0x9E3779B1 + step * 0x85EBCA77 + example_index * 0xC2B2AE3D + chunk * 0x27D4EB2F) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    x = (x * 0xED5AD4BB) & 0xFFFFFFFFFFFF
    x ^= x >> 11
    return x & 0x7FFFFFFF


# -----------------------------------------------------------------------------
# Sampling

@dataclass
class Group:
    """The answers sampled to one question, with what is needed to train on them."""
    sequences: list[list[int]]   # prompt + answer ids, per sample
    masks: list[list[int]]       # 1 = sampled, 0 = given
    prompt_len: int
    rewards: list[float]
    completions: list[str]


@torch.no_grad()
def sample_group(engine, tokenizer, task, conversation: dict, *, num_samples: int, device_batch_size: int,
                 max_new_tokens: int, temperature: float, top_k: int, seed: int, step: int,
                 example_index: int) -> Group:
    """Sample `num_samples` answers to one conversation in chunks of at most
    `device_batch_size` and score each with `task.reward`."""
    prompt = tokenizer.render_for_completion(conversation)
    sequences: list[list[int]] = []
    masks: list[list[int]] = []
    chunk = 0
    while len(sequences) < num_samples:
        n = min(device_batch_size, num_samples - len(sequences))
        seqs, msks = engine.generate_batch(prompt, num_samples=n, max_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k or None, seed=rollout_seed(seed, step, example_index, chunk))
        sequences.extend(list(s) for s in seqs)
        masks.extend(list(m) for m in msks)
        chunk += 1
    completions = [tokenizer.decode(s[len(prompt):]) for s in sequences]
    rewards = [float(task.reward(conversation, c)) for c in completions]
    return Group(sequences, masks, len(prompt), rewards, completions)


# -----------------------------------------------------------------------------
# The training step's micro-batches

@dataclass
class StepStats:
    rewards: list[float]
    seq_lens: list[int]      # prompt + answer
    answer_lens: list[int]   # answer only
    trained_tokens: int = 0


def rollout_micro_batches(engine, model, tokenizer, task, indices: Sequence[int], config: Config, step: int,
                          device: torch.device, stats: StepStats) -> Iterator[tuple[torch.Tensor, ...]]:
    """For each question: sample its group (eval mode, no grad), then yield its
    sequences in slices of at most device_batch_size as (inputs, targets, advantages).
    Sampling and training alternate question by question, so only one group's
    sequences are alive at a time."""
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id works: padding is never a target
    for index in indices:
        model.eval()
        group = sample_group(engine, tokenizer, task, task[index], num_samples=config.num_samples,
                             device_batch_size=config.device_batch_size, max_new_tokens=config.max_new_tokens,
                             temperature=config.temperature, top_k=config.top_k, seed=config.seed, step=step,
                             example_index=index)
        model.train()
        rewards = torch.tensor(group.rewards, dtype=torch.float32)
        advantages = compute_advantages(rewards, config.num_samples)
        stats.rewards.extend(group.rewards)
        stats.seq_lens.extend(len(s) for s in group.sequences)
        stats.answer_lens.extend(len(s) - group.prompt_len for s in group.sequences)
        for b0 in range(0, config.num_samples, config.device_batch_size):
            b1 = b0 + config.device_batch_size
            inputs, targets = build_rl_batch(group.sequences[b0:b1], group.masks[b0:b1], group.prompt_len, pad_id)
            stats.trained_tokens += int((targets >= 0).sum())
            yield (inputs.to(device), targets.to(device), advantages[b0:b1].to(device))


def _rl_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return policy_loss(model, *batch)


def _mean_across_ranks(values: list[float], runtime: Runtime) -> float:
    """Mean over every rank's values (weighted by how many each rank has)."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if runtime.distributed:
        t = t.to(runtime.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.cpu()
    return (t[0] / t[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# The stage

def run(config: Config, runtime: Runtime) -> dict:
    from nanochat import checkpoint as ckpt
    from nanochat.chat_scoring import run_chat_eval
    from nanochat.engine import Engine
    from nanochat.node_sync import sync_checkpoint
    from nanochat.report import log_section
    from nanochat.tasks.gsm8k import GSM8K

    config.validate()
    device, base_dir = runtime.device, runtime.base_dir
    if config.examples_per_step % runtime.world_size:
        raise UserError(f"--examples-per-step {config.examples_per_step} must be a multiple of the number of "
                        f"ranks ({runtime.world_size}) so every rank gets the same number of questions")
    examples_per_rank = config.examples_per_step // runtime.world_size
    passes_per_example = math.ceil(config.num_samples / config.device_batch_size)

    source_tag, source_step = sync_checkpoint(runtime, "sft", config.tag, config.step)  # multi-node: see node_sync
    model, tokenizer, source_meta = ckpt.load_model("sft", base_dir, device, runtime.dtype, tag=source_tag, step=source_step)
    model_config = source_meta["model_config"]
    out_tag = config.output_tag or config.tag or source_meta.get("model_tag") or f"d{model_config['n_layer']}"
    ckpt_dir = ckpt.checkpoint_dir(base_dir, "rl", out_tag)

    train_task = GSM8K(subset="main", split="train", base_dir=base_dir)
    val_task = GSM8K(subset="main", split="test", base_dir=base_dir)
    num_steps = config.num_steps or (len(train_task) // config.examples_per_step) * config.num_epochs
    if num_steps < 1:
        raise UserError(f"GSM8K train has {len(train_task)} questions, fewer than --examples-per-step "
                        f"{config.examples_per_step}: lower it or give --num-steps")
    rank_indices = list(range(runtime.rank, len(train_task), runtime.world_size))

    optimizer = model.setup_optimizer(unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                      matrix_lr=config.matrix_lr, weight_decay=config.weight_decay,
                                      ns_dtype=runtime.muon_dtype, muon_eq=config.muon_eq,
                                      muon_plus=config.muon_plus)
    for group in optimizer.param_groups:
        group["lr"] *= config.init_lr_frac
        group["initial_lr"] = group["lr"]

    # --- resume ---------------------------------------------------------------
    resume_step = find_resume_step(ckpt_dir, config.resume_from_step, config.resume, runtime)
    step, smooth_loss, train_time, last_eval = 0, 0.0, 0.0, {}
    if resume_step is not None:
        meta = restore_checkpoint(ckpt_dir, resume_step, model, optimizer, runtime, model_config=model_config,
                                  mismatch="the RL checkpoint in {ckpt_dir} has model config {saved}, but the SFT "
                                           "model has {expected}; resume from the SFT checkpoint the run started from "
                                           "(-g/-s)")
        step = meta["step"]
        num_steps = meta.get("num_steps", num_steps) if config.num_steps is None else num_steps
        loop = meta.get("loop_state", {})
        smooth_loss, train_time = loop.get("smooth_train_loss", 0.0), loop.get("total_training_time", 0.0)
        last_eval = meta.get("eval", {})
        if step > num_steps:
            raise UserError(f"the checkpoint is at step {step}, past the run's {num_steps} steps; raise --num-steps")

    engine = Engine(model, tokenizer)
    scaler = make_grad_scaler(runtime)
    log.info("RL on GSM8K: %d steps × %d questions × %d samples (%d per rank, %d micro-steps each); "
             "source sft/%s step %s -> %s", num_steps, config.examples_per_step, config.num_samples,
             examples_per_rank, examples_per_rank * passes_per_example, out_tag, source_meta.get("step"), ckpt_dir)

    user_config = to_dict(config)
    sink = make_sinks(runtime, ckpt_dir / "metrics.jsonl", config.run, user_config,
                      resume_step=step if resume_step is not None else None)
    # Rough FLOPs per step: sampling costs about a forward (1/3 of forward+backward) per
    # token with the KV cache, training a forward+backward per token.
    flops_per_token = model.estimate_flops() if hasattr(model, "estimate_flops") else 0.0
    logger = StepLogger(num_steps, 0, 0.0, peak_flops(device, runtime.dtype, cache_dir=runtime.base_dir) * runtime.world_size, sink,
                        smooth_loss=smooth_loss, elapsed=train_time, warmup_steps_excluded=1,
                        show=("reward", "seq_len"))

    def pass_at_k() -> dict[str, float]:
        # chat-eval's sampler: unbiased pass@k (Chen et al. 2021) from eval_samples answers
        # per question, seeds fixed per question so evaluations at different steps compare
        result = run_chat_eval(model, tokenizer, "GSM8K", task=val_task, engine=engine,
                               num_samples=config.eval_samples, max_new_tokens=config.max_new_tokens,
                               temperature=config.temperature, top_k=config.top_k,
                               max_problems=config.eval_examples, rank=runtime.rank,
                               world_size=runtime.world_size, seed=config.seed)
        model.train()
        return {f"pass@{k}": v for k, v in result.pass_at_k.items()}

    if resume_step is not None and last_eval.get("step") == step:
        sink.log(dict(last_eval))  # the saved evaluation of this step, not run again
    history: list[float] = []

    def evaluate_due(step: int, last: bool) -> None:
        nonlocal last_eval
        if (config.eval_every >= 0 and ((config.eval_every and step % config.eval_every == 0) or last)
                and last_eval.get("step") != step):
            passk = pass_at_k()
            last_eval = {"step": step, **passk}
            k = config.eval_samples
            logger.event(f"step {step} | pass@1 {passk['pass@1']:.4f} | pass@{k} {passk[f'pass@{k}']:.4f}",
                         runtime.is_master, step=step, **passk)

    def checkpoint_meta(step: int) -> dict:
        return {
            **{k: v for k, v in source_meta.items() if k not in ("loop_state", "dataloader_state_dict", "user_config")},
            "step": step, "model_config": model_config, "model_tag": out_tag, "user_config": user_config,
            "source": {"stage": "sft", "tag": config.tag or source_meta.get("model_tag"), "step": source_meta.get("step")},
            "num_steps": num_steps, "eval": last_eval,
            "loop_state": {"smooth_train_loss": logger.smooth_loss, "total_training_time": logger.elapsed},
        }

    def train_step(step: int) -> dict:
        first = step * examples_per_rank
        indices = [rank_indices[(first + j) % len(rank_indices)] for j in range(examples_per_rank)]
        stats = StepStats([], [], [])
        lrm = 1.0 - step / num_steps
        apply_schedule(optimizer, lrm)
        micro = rollout_micro_batches(engine, model, tokenizer, train_task, indices, config, step, device, stats)
        with Timer(device) as timer:
            loss = optimizer_step(model, optimizer, micro, _rl_loss, runtime,
                                  num_micro_steps=examples_per_rank * passes_per_example, scaler=scaler)
        micro.close()
        reward = _mean_across_ranks(stats.rewards, runtime)
        seq_len = _mean_across_ranks([float(n) for n in stats.seq_lens], runtime)
        answer_len = _mean_across_ranks([float(n) for n in stats.answer_lens], runtime)
        tokens = int(round(seq_len * config.examples_per_step * config.num_samples))
        logger.tokens_per_step = tokens
        logger.flops_per_step = flops_per_token * tokens * 4 / 3
        record = logger.step(step, loss, timer.dt, lrm, runtime.is_master, reward=reward, seq_len=seq_len,
                             answer_len=answer_len, trained_tokens=stats.trained_tokens)
        history.append(reward)
        return record

    t_start = time.time()
    step, record = train_loop(step=step, model=model, optimizer=optimizer, runtime=runtime, logger=logger,
                              ckpt_dir=ckpt_dir, save_every=max(config.save_every, 0), resume_step=resume_step,
                              is_last=lambda step: step == num_steps, evaluate=evaluate_due,
                              checkpoint_meta=checkpoint_meta, train_step=train_step)

    k = config.eval_samples
    metrics = {
        "steps": num_steps, "final_step": step, "mean_reward": record.get("reward"),
        "mean_reward_run": sum(history) / len(history) if history else None,
        "mean_seq_len": record.get("seq_len"), "final_loss": record.get("loss"),
        "pass@1": last_eval.get("pass@1"), f"pass@{k}": last_eval.get(f"pass@{k}"), "eval": last_eval,
        "train_time_s": logger.elapsed, "wall_time_s": time.time() - t_start,
        "peak_memory_mib": peak_memory_bytes(device) / 2 ** 20, "checkpoint_dir": str(ckpt_dir),
    }
    if runtime.is_master:
        log.info("done: pass@1 %s, pass@%d %s; training time %.1f s", _fmt(metrics["pass@1"]), k,
                 _fmt(metrics[f"pass@{k}"]), logger.elapsed)
        log_section(base_dir, "Chat RL", {"config": user_config, "metrics": metrics})
    return metrics


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
