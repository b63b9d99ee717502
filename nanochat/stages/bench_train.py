"""Benchmark full training steps: tokens/s, MFU against the measured peak, and peak memory.

  nanochat bench-train                          # d4, 32 x 512 tokens, the runtime's compute dtype
  nanochat bench-train -d 6 --dtype float32     # force fp32 compute
  nanochat bench-train -d 6 --compare-dtypes    # fp32 then bf16, each in a fresh process
  nanochat bench-train --compile --steps 20     # torch.compile'd model (compile time reported)
  nanochat bench-train --profile                # + a torch.profiler table of two extra steps

Each timed step is what base-train runs: `training.optimizer_step` (forward, chunked
cross-entropy, backward, MuonAdamW step, zero_grad) on one micro-batch of
device-batch-size x max-seq-len tokens. The first --warmup-steps steps (allocator
warm-up, compilation) are timed but left out of the figures. Tokens are random ids by
default (timing does not depend on their values) or real ones with --data real.

MFU divides the model's training FLOPs per token (`GPT.estimate_flops`, 6 per matmul
weight plus attention) by the device's peak matmul FLOP/s in the compute dtype: the
datasheet figure on known GPUs, else measured (`common.peak_flops`). Memory is the CUDA
allocator's peak, or on the CPU the process's peak resident set size; the latter includes
the Python/torch baseline, so the increase over the resident size measured just before
the model is built is reported too. Prints a table, then one JSON line with every number.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from nanochat.common import Runtime, peak_flops, processor_summary
from nanochat.config import check, option
from nanochat.errors import UserError
from nanochat.training import MUON_EQ_HELP, MUON_PLUS_HELP

log = logging.getLogger("nanochat.bench_train")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIB = 2 ** 20


@dataclass
class Config:
    depth: int = option(4, "number of transformer layers (width and heads follow, as in base-train)", short="-d")
    aspect_ratio: int = option(64, "model width = depth x aspect ratio (rounded up to a multiple of --head-dim)")
    head_dim: int = option(128, "channels per attention head")
    max_seq_len: int = option(512, "tokens per sequence")
    device_batch_size: int = option(32, "sequences per step")
    window_pattern: str = option("SSSL", "sliding-window pattern tiled over the layers (L = full context)")
    vocab_size: int | None = option(None, "vocabulary size (default: 32768 for random tokens, the tokenizer's "
                                          "for --data real)")
    data: Literal["random", "real"] = option("random", "random token ids, or real tokens from the train shards "
                                                       "(needs a tokenizer in the base dir)")
    steps: int = option(10, "timed steps that count")
    warmup_steps: int = option(3, "steps run first and left out of the figures (warm-up, compilation)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "compute dtype (auto: the runtime's policy, see NANOCHAT_DTYPE)")
    compile: bool | None = option(None, "torch.compile the model (default: on for CUDA, off on CPU, as base-train)")
    fp8: bool = option(False, "fp8 matmuls (H100-class GPU and torchao required)")
    fp8_recipe: str = option("tensorwise", "fp8 scaling recipe", choices=("tensorwise", "rowwise"))
    compare_dtypes: bool = option(False, "run float32 and bfloat16 back to back, each in a fresh process (so "
                                         "peak memory is per run), and print the speedup")
    profile: bool = option(False, "after the timed steps, profile two more with torch.profiler and print "
                                  "the operators that take the most time")
    muon_eq: bool = option(True, MUON_EQ_HELP)
    muon_plus: bool = option(True, MUON_PLUS_HELP)
    seed: int = option(0, "seed for the weights and the random tokens")

    def validate(self) -> None:
        p = []
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "steps"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            p.append(f"--warmup-steps must be >= 0 (got {self.warmup_steps})")
        if self.vocab_size is not None and self.vocab_size < 2:
            p.append(f"--vocab-size must be >= 2 (got {self.vocab_size})")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            p.append(f"--window-pattern must be a string of S and L (got {self.window_pattern!r})")
        if self.compare_dtypes and self.dtype != "auto":
            p.append("--compare-dtypes runs both float32 and bfloat16; drop --dtype")
        check(p)


# -----------------------------------------------------------------------------
# Memory

def current_rss_bytes() -> int | None:
    """Resident set size right now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _memory_figures(device: torch.device, baseline_rss: int | None) -> dict:
    from nanochat.training import peak_memory_bytes
    peak = peak_memory_bytes(device)
    out = {"peak_memory_mib": peak / _MIB}
    if device.type == "cuda":
        out["memory_kind"] = "cuda max_memory_allocated"
    else:
        # the kernel's peak RSS (getrusage) and /proc's current RSS are kept by different
        # counters that can lag each other by a few pages: a peak below a measured RSS is that lag
        peak = max(peak, baseline_rss or 0, current_rss_bytes() or 0)
        out["peak_memory_mib"] = peak / _MIB
        out["memory_kind"] = "peak RSS"
        if baseline_rss is not None:
            out["baseline_rss_mib"] = baseline_rss / _MIB
            out["peak_increase_mib"] = (peak - baseline_rss) / _MIB
    return out


# -----------------------------------------------------------------------------
# One benchmark run

def _compute_dtype(config: Config, runtime: Runtime) -> torch.dtype:
    return runtime.dtype if config.dtype == "auto" else _DTYPES[config.dtype]


def _model_config(config: Config, vocab_size: int):
    from nanochat.gpt import GPTConfig
    from nanochat.scaling import model_dims
    n_embd, n_head = model_dims(config.depth, config.aspect_ratio, config.head_dim)
    return GPTConfig(sequence_len=config.max_seq_len, vocab_size=vocab_size, n_layer=config.depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern=config.window_pattern)


def _batches(config: Config, runtime: Runtime, count: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """`count` (inputs, targets) micro-batches prepared before any timing, and the vocab size."""
    B, T = config.device_batch_size, config.max_seq_len
    if config.data == "random":
        vocab = config.vocab_size or 32768
        gen = torch.Generator().manual_seed(config.seed)
        out = []
        for _ in range(count):
            row = torch.randint(0, vocab, (B, T + 1), generator=gen)
            out.append((row[:, :-1].to(runtime.device), row[:, 1:].to(runtime.device)))
        return out, vocab
    from nanochat.dataloader import pretrain_batches
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer(runtime.base_dir)
    vocab = tokenizer.get_vocab_size()
    if config.vocab_size is not None and config.vocab_size != vocab:
        raise UserError(f"--vocab-size {config.vocab_size} differs from the tokenizer's {vocab} in "
                        f"{runtime.base_dir}; drop --vocab-size with --data real")
    loader = pretrain_batches(tokenizer, B, T, "train", base_dir=runtime.base_dir, device=runtime.device,
                              buffer_size=64, prefetch=1)
    try:
        out = [(x, y) for (x, y, _), _ in zip(loader, range(count))]
    finally:
        loader.close()
    return out, vocab


def _profile_table(model, optimizer, batch, runtime: Runtime, loss_fn, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    from nanochat.training import optimizer_step
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            optimizer_step(model, optimizer, iter([batch]), loss_fn, runtime, num_micro_steps=1)
    key = "self_cuda_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench(config: Config, runtime: Runtime) -> dict:
    """Build the model, time warmup + steps training steps, return every figure."""
    from nanochat.gpt import build_model
    from nanochat.scaling import PEAK_LRS, batch_lr_scale
    from nanochat.training import Timer, after_step, optimizer_step

    device = runtime.device
    dtype = _compute_dtype(config, runtime)
    step_runtime = dataclasses.replace(runtime, dtype=dtype)
    n_steps = config.warmup_steps + config.steps
    batches, vocab = _batches(config, runtime, min(n_steps, 4))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = current_rss_bytes()

    torch.manual_seed(config.seed)
    model = build_model(_model_config(config, vocab), device, dtype)
    if config.fp8:
        if device.type != "cuda":
            raise UserError("--fp8 needs a CUDA GPU (H100 class); drop --fp8 on this device")
        from nanochat.fp8 import convert_to_fp8
        convert_to_fp8(model, config.fp8_recipe)
    # base-train's learning rates at this batch size (timing does not depend on them, but
    # the loss then stays finite however many steps are run)
    lr_scale = batch_lr_scale(config.device_batch_size * config.max_seq_len)
    optimizer = model.setup_optimizer(**{name: lr * lr_scale for name, lr in PEAK_LRS.items()},
                                      ns_dtype=runtime.muon_dtype, muon_eq=config.muon_eq,
                                      muon_plus=config.muon_plus)
    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def loss_fn(m, b):
        return m(b[0], b[1])

    times, cpu_times, losses = [], [], []
    try:
        for i in range(n_steps):
            cpu0 = time.process_time()
            with Timer(device) as timer:
                loss = optimizer_step(train_model, optimizer, iter([batches[i % len(batches)]]), loss_fn,
                                      step_runtime, num_micro_steps=1, scaler=scaler)
            cpu_times.append(time.process_time() - cpu0)
            times.append(timer.dt)
            losses.append(loss)
            after_step(i + 1, 0)  # base-train's housekeeping (GC, first-step heap trim), untimed as there
            log.info("step %d/%d%s: %.1f ms, loss %.4f", i + 1, n_steps,
                     " (warm-up)" if i < config.warmup_steps else "", timer.dt * 1000, loss)
    finally:
        gc.enable()  # after_step turned automatic collection off
    memory = _memory_figures(device, baseline_rss)
    profile = _profile_table(train_model, optimizer, batches[0], step_runtime, loss_fn) if config.profile else None

    counted = times[config.warmup_steps:]
    tokens_per_step = config.device_batch_size * config.max_seq_len
    flops_per_token = model.estimate_flops()
    # measured after training, so its large matrices neither slow the steps nor raise the peak
    # RSS above; the best step's rate is a floor for it (a cached peak below it was wrong)
    peak = peak_flops(device, dtype, cache_dir=runtime.base_dir,
                      at_least=flops_per_token * tokens_per_step / min(counted))
    mean_s = sum(counted) / len(counted)
    median_s = statistics.median(counted)
    c = model.config
    result = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "compile": use_compile, "fp8": config.fp8,
        "depth": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "vocab_size": c.vocab_size,
        "window_pattern": c.window_pattern, "device_batch_size": config.device_batch_size,
        "max_seq_len": config.max_seq_len, "data": config.data,
        "num_params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step, "steps": config.steps, "warmup_steps": config.warmup_steps,
        "ms_per_step_median": median_s * 1000, "ms_per_step_mean": mean_s * 1000,
        "ms_per_step_min": min(counted) * 1000, "ms_per_step_max": max(counted) * 1000,
        "first_step_ms": times[0] * 1000,
        # CPU seconds of this process (all threads) per step: wall time inflated by other
        # processes on a shared machine shows up as wall >> cpu / threads
        "cpu_s_per_step_median": statistics.median(cpu_times[config.warmup_steps:]),
        "tok_per_sec": tokens_per_step / median_s,
        "peak_flops": peak, "peak_flops_source": _peak_source(device),
        "mfu": 100 * flops_per_token * tokens_per_step / median_s / peak,
        **memory,
        # what the whole (B*T, vocab) fp32 logits would take: the chunked loss never holds them
        "full_logits_fp32_mib": tokens_per_step * c.vocab_size * 4 / _MIB,
        "first_loss": losses[0], "last_loss": losses[-1],
        "step_ms": [round(t * 1000, 2) for t in times],
        "processor": processor_summary(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if use_compile:
        # the first step traces and compiles; the rest of it is an ordinary step
        result["compile_s"] = max(0.0, times[0] - median_s)
    if profile is not None:
        result["profile"] = profile
    return result


def _peak_source(device: torch.device) -> str:
    if device.type == "cuda":
        from nanochat.common import gpu_peak_flops
        if gpu_peak_flops(torch.cuda.get_device_name(device)) is not None:
            return "datasheet"
    return "measured"


# -----------------------------------------------------------------------------
# Presentation

def _gib(mib: float) -> str:
    return f"{mib:,.{0 if mib >= 100 else 1}f} MiB ({mib / 1024:.2f} GiB)"


def format_run(r: dict) -> str:
    lines = [
        f"model        d{r['depth']}: n_embd {r['n_embd']}, {r['n_head']} heads, vocab {r['vocab_size']:,}, "
        f"window {r['window_pattern']}, {r['num_params']:,} params",
        f"batch        {r['device_batch_size']} x {r['max_seq_len']} = {r['tokens_per_step']:,} tokens/step "
        f"({r['data']} tokens)",
        f"compute      {r['dtype']} on {r['device']}, compile {'on' if r['compile'] else 'off'}"
        f"{', fp8' if r['fp8'] else ''}; {r['threads']} threads, load average {r['load_avg_1m']}",
        f"processor    {r['processor']}",
        f"ms/step      {r['ms_per_step_median']:,.1f} median over {r['steps']} steps "
        f"(mean {r['ms_per_step_mean']:,.1f}, min {r['ms_per_step_min']:,.1f}, max {r['ms_per_step_max']:,.1f}); "
        f"first step {r['first_step_ms']:,.0f}",
        f"cpu time     {r['cpu_s_per_step_median']:,.2f} s/step of this process over {r['threads']} threads",
        f"tokens/s     {r['tok_per_sec']:,.0f}",
        f"FLOPs/token  {r['flops_per_token']:.4g} (6 per matmul weight + attention)",
        f"MFU          {r['mfu']:.2f}% of {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']} "
        f"{r['dtype']} matmul peak)",
        f"memory       {r['memory_kind']} {_gib(r['peak_memory_mib'])}",
    ]
    if "peak_increase_mib" in r:
        lines.append(f"             {_gib(r['peak_increase_mib'])} above the {r['baseline_rss_mib']:,.0f} MiB "
                     f"resident before the model was built")
    lines.append(f"             (the full fp32 logits alone would be {_gib(r['full_logits_fp32_mib'])})")
    if "compile_s" in r:
        lines.append(f"compile      about {r['compile_s']:.1f} s (first step minus a steady step)")
    lines.append(f"loss         {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    return "\n".join(lines)


def format_comparison(runs: dict[str, dict], speedup: float) -> str:
    header = f"{'dtype':<10}{'ms/step':>10}{'tok/s':>10}{'MFU %':>8}{'peak MiB':>10}{'+MiB':>8}"
    rows = [header, "-" * len(header)]
    for name, r in runs.items():
        inc = r.get("peak_increase_mib")
        rows.append(f"{name:<10}{r['ms_per_step_median']:>10,.1f}{r['tok_per_sec']:>10,.0f}{r['mfu']:>8.2f}"
                    f"{r['peak_memory_mib']:>10,.0f}{(f'{inc:,.0f}' if inc is not None else '-'):>8}")
    rows.append(f"bfloat16 speedup over float32: x{speedup:.2f} (tokens/s, median step)")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# --compare-dtypes: one fresh process per dtype

def _to_argv(config: Config) -> list[str]:
    """Flags that rebuild `config` (minus --compare-dtypes and --dtype) on the command line."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("compare_dtypes", "dtype") or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def _run_child(config: Config, runtime: Runtime, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "nanochat", "bench-train", *_to_argv(config), "--dtype", dtype,
           "--device-type", runtime.device.type, "--base-dir", str(runtime.base_dir), "--log-level", "WARNING"]
    log.info("running %s", " ".join(cmd[1:]))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {dtype} benchmark process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not json_lines:
        raise RuntimeError(f"the {dtype} benchmark process printed no JSON result:\n{proc.stdout[-2000:]}")
    return json.loads(json_lines[-1])


def compare_dtypes(config: Config, runtime: Runtime) -> dict:
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = _run_child(config, runtime, dtype)
        print(f"== {dtype} ==\n{format_run(runs[dtype])}\n", flush=True)
    speedup = runs["bfloat16"]["tok_per_sec"] / runs["float32"]["tok_per_sec"]
    print(format_comparison(runs, speedup), flush=True)
    return {"runs": runs, "bf16_speedup": speedup}


# -----------------------------------------------------------------------------
# Entry point

def run(config: Config, runtime: Runtime) -> dict:
    config.validate()
    if runtime.distributed:
        raise UserError("bench-train measures one process; run it without torchrun")
    if config.compare_dtypes:
        result = compare_dtypes(config, runtime)
    else:
        result = bench(config, runtime)
        print(format_run(result), flush=True)
        if "profile" in result:
            print(result["profile"], flush=True)
    summary = {k: v for k, v in result.items() if k != "profile"}
    print(json.dumps(summary, default=str), flush=True)
    return summary
