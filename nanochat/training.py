"""
What every training stage shares: one optimizer step (gradient accumulation, fp16
grad scaling, the NaN guard, schedule application), the loop around it (resume,
evaluate, save on schedule and at the end, clean up), the per-step log line with its
progress display, and metric sinks (JSONL beside the checkpoints, wandb).

Pretraining, SFT and RL all run `train_loop` around `optimizer_step`; they differ in
the evaluations, the checkpoint meta and the training step (`loss_fn`, micro-batches,
schedule) they pass it.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from nanochat import checkpoint as ckpt
from nanochat.common import Runtime, atomic_write_text, release_free_memory
from nanochat.errors import UserError

# Help for the Muon refinement switches every training stage offers (on by default, as
# upstream has them; off is the reference's plain Muon step).
MUON_EQ_HELP = ("MuonEq: equalise the rows' norms before Muon's orthogonalisation (upstream's default; "
                "--no-muon-eq is the reference's step)")
MUON_PLUS_HELP = ("Muon+: rescale each orthogonalised update to Frobenius norm sqrt(min(rows, cols)) "
                  "(upstream's default; --no-muon-plus is the reference's step)")

log = logging.getLogger("nanochat.training")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the step was not applied."""


# -----------------------------------------------------------------------------
# One optimizer step

def apply_schedule(optimizer: torch.optim.Optimizer, lr_multiplier: float,
                   muon_momentum: float | None = None, muon_weight_decay: float | None = None) -> None:
    """Set each group's lr from its initial_lr, and Muon's momentum/weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        if group.get("kind") == "muon":
            if muon_momentum is not None:
                group["momentum"] = muon_momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay


def _all_reduce_mean(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= runtime.world_size
    return t


def make_grad_scaler(runtime: Runtime) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 compute (its 5 exponent bits underflow small gradients), None
    for bf16/fp32. Built for the runtime's device: a GradScaler made without one targets
    CUDA and silently disables itself elsewhere, so fp16 on a CPU trained unscaled."""
    if runtime.dtype != torch.float16:
        return None
    return torch.amp.GradScaler(runtime.device.type)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                   runtime: Runtime, *, num_micro_steps: int,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """Accumulate gradients over `num_micro_steps` micro-batches and step the optimizer.

    `loss_fn(model, micro_batch)` returns the mean loss of that micro-batch; each is
    divided by the number of micro-steps so the gradients add up to the full-batch
    mean. Returns the mean loss over micro-steps and ranks (for logging).
    Raises NonFiniteLossError, leaving the weights untouched, if the loss of any rank
    is NaN or inf. The optimizer averages gradients across ranks itself.
    """
    total = torch.zeros((), dtype=torch.float32, device=runtime.device)
    batches = iter(micro_batches)
    for _ in range(num_micro_steps):
        loss = loss_fn(model, next(batches))
        total += loss.detach().float()
        scaled = loss / num_micro_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    mean_loss = _all_reduce_mean(total / num_micro_steps, runtime)
    value = mean_loss.item()
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"the training loss is {value}: the step was not applied and nothing was saved. "
            "Lower the learning rates, check the data, or resume from the last checkpoint.")
    if scaler is not None:
        scaler.unscale_(optimizer)
        if runtime.distributed:
            # every rank must agree on skipping a step with inf/nan gradients
            for found in scaler._found_inf_per_device(optimizer).values():
                dist.all_reduce(found, op=dist.ReduceOp.MAX)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return value


def after_step(step: int, first_step: int) -> None:
    """Housekeeping to call after each optimizer step of a training loop.

    After the first step: (1) Python's cyclic GC would keep rescanning the large heap of
    objects built during setup for nothing (hundreds of ms every few steps), so freeze
    what survives setup and disable automatic collection (collected by hand every 5000
    steps; re-enable with gc.enable() when the loop ends). (2) That step allocated the
    optimizer state lazily, in among the activations' buffers, and left freed blocks
    around it: hand their pages back to the OS once (`release_free_memory`), or they stay
    resident as holes for the whole run (about 0.4 GiB at depth 6 on the CPU)."""
    if step == first_step + 1:
        gc.collect()
        gc.freeze()
        gc.disable()
        release_free_memory()
    elif step % 5000 == 0:
        gc.collect()


# -----------------------------------------------------------------------------
# The loop around it: resume, evaluate, save, train, clean up

def find_resume_step(ckpt_dir: Path, resume_from_step: int | None, resume: str | None,
                     runtime: Runtime | None = None) -> int | None:
    """The step to resume from: the newest complete checkpoint in `ckpt_dir` for
    `--resume latest`, else `--resume-from-step` (None: start afresh).

    With a `runtime`, rank 0 decides (only its disk surely has the checkpoints) and every
    node is given that step's weights and meta (see node_sync)."""
    if runtime is None or not runtime.distributed:
        return ckpt.find_last_step(ckpt_dir) if resume == "latest" else resume_from_step
    from nanochat.node_sync import checkpoint_files, from_master, sync_files

    step = find_resume_step(ckpt_dir, resume_from_step, resume) if runtime.is_master else None
    step = from_master(runtime, step)
    if step is not None:
        sync_files(runtime, checkpoint_files(runtime.base_dir, ckpt_dir, step))
    return step


def restore_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       runtime: Runtime, *, model_config: dict, mismatch: str) -> dict:
    """Load the weights and this rank's optimizer state saved at `step` into `model` and
    `optimizer`, and return the checkpoint's meta. When the checkpoint holds another
    architecture than `model_config`, raise ValueError(`mismatch`), formatted with
    `ckpt_dir`, the `saved` model config and the `expected` one."""
    model_state, optim_state, meta = ckpt.load_checkpoint(ckpt_dir, step, runtime.device, load_optimizer=True,
                                                          rank=runtime.rank)
    if meta.get("model_config") != model_config:
        raise UserError(mismatch.format(ckpt_dir=ckpt_dir, saved=meta.get("model_config"), expected=model_config))
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    del model_state, optim_state
    log.info("resumed from %s at step %d", ckpt_dir, meta["step"])
    return meta


def train_loop(*, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
               logger: StepLogger, ckpt_dir: Path, save_every: int, resume_step: int | None,
               is_last: Callable[[int], bool], evaluate: Callable[[int, bool], None],
               checkpoint_meta: Callable[[int], dict], train_step: Callable[[int], dict],
               close: Callable[[], None] | None = None) -> tuple[int, dict]:
    """Run a stage from `step` (0, or the step resumed from) to its last step:

        at each step:  last = is_last(step); evaluate(step, last)
                       save a checkpoint if due; stop if last
                       record = train_step(step); step += 1; after_step(...)

    `train_step` takes one optimizer step and returns the record `logger.step` made of it.
    A checkpoint (weights, this rank's optimizer shard, meta = `checkpoint_meta(step)`;
    every rank calls it) is saved at the last step and every `save_every` steps (0:
    only at the end), but not at step 0 nor at `resume_step`, which is already on disk.
    On a NaN/inf loss it logs where the run stopped and re-raises; the checkpoints saved
    so far hold finite weights. However it ends, automatic GC is back on and the logger,
    its sink and `close` (e.g. the loader) are closed.
    Returns (the last step, the record of the last step trained; {} if none was)."""
    first_step = step
    record: dict = {}
    try:
        while True:
            last = is_last(step)
            evaluate(step, last)
            if last or (save_every and step > 0 and step != resume_step and step % save_every == 0):
                meta = checkpoint_meta(step)
                ckpt.save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta,
                                     rank=runtime.rank)
                logger.event(f"step {step} | saved checkpoint to {ckpt_dir}", runtime.is_master)
            if last:
                return step, record
            record = train_step(step)
            step += 1
            after_step(step, first_step)
    except NonFiniteLossError:
        logger.close()
        log.error("stopping at step %d: the loss is not finite; the last good checkpoint is kept", step)
        raise
    finally:
        gc.enable()  # after_step turned automatic collection off
        logger.close()
        logger.sink.close()
        if close is not None:
            close()


# -----------------------------------------------------------------------------
# Metric sinks: null, JSONL, wandb behind one tiny interface

class MetricSink:
    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink(MetricSink):
    """Appends one JSON object per line. On resume from step s, records of steps >= s
    are dropped first (the resumed run logs step s's training and evaluation again), so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_step is None:
                self.path.unlink()
            else:
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) < resume_step]
                atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class WandbSink(MetricSink):
    def __init__(self, run_name: str, config: dict, project: str = "nanochat"):
        try:
            import wandb
        except ImportError as e:
            raise UserError("--run asks for wandb logging but wandb is not installed: "
                            "pip install 'nanochat[wandb]' or drop --run") from e
        self._run = wandb.init(project=project, name=run_name, config=config)

    def log(self, record: dict) -> None:
        self._run.log(record)

    def close(self) -> None:
        self._run.finish()


class MultiSink(MetricSink):
    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def make_sinks(runtime: Runtime, jsonl_path: Path | None, run_name: str | None, config: dict,
               resume_step: int | None = None) -> MetricSink:
    """Rank 0 gets the JSONL file (and wandb when `run_name` is set); other ranks log nothing."""
    if not runtime.is_master:
        return MultiSink([])
    sinks: list[MetricSink] = []
    if jsonl_path is not None:
        sinks.append(JsonlSink(jsonl_path, resume_step))
    if run_name:
        sinks.append(WandbSink(run_name, config))
    return MultiSink(sinks)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return str(x)


# -----------------------------------------------------------------------------
# The per-step line and progress display

def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocator peak on CUDA, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib * 1024


@dataclass
class StepLogger:
    """Formats one fixed line per step: step/total, loss (debiased EMA), lr multiplier,
    dt, tok/s, MFU, elapsed, ETA. On a terminal the line is redrawn in place with a
    progress bar; in a log file each step is its own line."""
    total_steps: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    sink: MetricSink
    ema_beta: float = 0.9
    smooth_loss: float = 0.0
    elapsed: float = 0.0  # training time, excluding the first (warm-up/compile) steps
    warmup_steps_excluded: int = 10
    stream: Any = None
    show: tuple[str, ...] = ()  # extra record fields to print in the line too (e.g. RL's reward)

    def __post_init__(self):
        self.stream = self.stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty() and not os.environ.get("CI")
        self._line_open = False
        self._warned_peak = False

    def step(self, step: int, loss: float, dt: float, lrm: float, is_master: bool = True, **extra: Any) -> dict:
        self.smooth_loss = self.ema_beta * self.smooth_loss + (1 - self.ema_beta) * loss
        debiased = self.smooth_loss / (1 - self.ema_beta ** (step + 1))
        if step >= self.warmup_steps_excluded:
            self.elapsed += dt
        counted = step + 1 - self.warmup_steps_excluded
        remaining = self.total_steps - step - 1
        eta = self.elapsed / counted * remaining if counted > 0 else None
        tok_s = self.tokens_per_step / dt if dt > 0 else 0.0
        mfu = 100 * self.flops_per_step / dt / self.peak_flops if dt > 0 and self.peak_flops else 0.0
        if is_master and mfu > 100 and not self._warned_peak and step >= self.warmup_steps_excluded:
            self._warned_peak = True
            log.warning("MFU %.0f%%: the peak FLOP/s it divides by (%.3g) is too low, probably measured while "
                        "the machine was busy; delete peak_flops.json in the base dir to measure it again "
                        "(or run `nanochat bench-train`, which corrects it)", mfu, self.peak_flops)
        record = {"step": step, "loss": loss, "loss_ema": debiased, "lrm": lrm, "dt": dt,
                  "tok_per_sec": tok_s, "mfu": mfu, "time": self.elapsed, **extra}
        if is_master:
            self.sink.log(record)
            width = len(str(self.total_steps))
            shown = "".join(f"{k} {extra[k]:.4g} | " for k in self.show if isinstance(extra.get(k), (int, float)))
            line = (f"step {step + 1:>{width}}/{self.total_steps} | loss {debiased:.4f} | {shown}lrm {lrm:.3f} | "
                    f"dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | mfu {mfu:.2f}% | "
                    f"elapsed {_fmt_duration(self.elapsed)} | eta {_fmt_duration(eta) if eta is not None else '--'}")
            self._emit(line, step)
        return record

    def _emit(self, line: str, step: int) -> None:
        if self.tty:
            frac = (step + 1) / self.total_steps
            bar = "█" * int(20 * frac) + "·" * (20 - int(20 * frac))
            self.stream.write(f"\r\x1b[2K{bar} {line}")
            self.stream.flush()
            self._line_open = True
        else:
            log.info(line)

    def event(self, message: str, is_master: bool = True, **record: Any) -> None:
        """An eval/sample/save event: its own line (closing a redrawn progress line first)."""
        if not is_master:
            return
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        log.info(message)
        if record:
            self.sink.log(record)

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.dt = time.perf_counter() - self.t0
