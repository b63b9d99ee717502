"""Benchmark inference: time to first token, decode speed per batch size, cost vs context.

  nanochat bench-infer                     # newest checkpoint (rl, sft, base), else a random d4 model
  nanochat bench-infer --random-init -d 6  # random weights at depth 6 (timing does not need training)
  nanochat bench-infer -i sft -g d20 --batch-sizes 1 8 32

Everything is measured through the Engine (KV cache, sampling, the per-row state
machine), as served; with no stop tokens, so every step runs. For each batch size: time
to first token (prefill of the prompt at batch 1, cache copy, first sample), decode
latency per step and tokens/s, and peak memory. Decoding one token is memory-bound: every
step reads all the weights plus the cached keys/values that attention looks at, so the
table also gives those bytes, the bandwidth they imply and its share of the device's
(MBU: datasheet on known GPUs, else a measured copy rate, cached in the base dir), next to
MFU (decode FLOPs per token against the same peak as training's MFU). A last table shows the decode
step at growing context positions: with sliding windows the "S" layers read at most
window + 1 keys, so the cost per token grows only through the full-window layers.
Prints readable tables, then one JSON line with every number.
"""
from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.errors import UserError

log = logging.getLogger("nanochat.bench_infer")


@dataclass
class Config:
    source: Literal["base", "sft", "rl"] | None = option(
        None, "checkpoint to load, base, sft or rl; automatic: the newest that exists, else a random model", short="-i")
    tag: str | None = option(None, "checkpoint tag, e.g. d20; automatic: the largest model", short="-g")
    step: int | None = option(None, "checkpoint step; automatic: the last", short="-s")
    random_init: bool = option(False, "benchmark a randomly initialised model at --depth even if checkpoints exist")
    depth: int = option(4, "depth of the random model", short="-d")
    sequence_len: int = option(2048, "context length of the random model")
    vocab_size: int | None = option(None, "vocabulary of the random model; automatic: the tokenizer's, else 32768")
    batch_sizes: tuple[int, ...] = option(help="decode batch sizes (samples per prompt)", factory=lambda: (1, 4, 16))
    prompt_len: int = option(256, "prompt tokens for the prefill and batch measurements")
    decode_tokens: int = option(64, "decode steps timed per measurement")
    positions: tuple[int, ...] = option(help="context positions at which a batch-1 decode step is timed",
                                        factory=lambda: (64, 256, 1024))
    repeats: int = option(3, "repetitions of each measurement (the median is reported)")
    temperature: float = option(1.0, "sampling temperature (0: greedy)")
    top_k: int | None = option(None, "sample among the k most likely tokens (automatic: the whole vocabulary)")
    cast_weights: bool = option(True, "store the weights in the compute dtype once (as chat does) instead of "
                                      "casting the fp32 masters in every forward pass")
    compile: bool = option(False, "decode through torch.compile graphs (static caches, frozen weights; one per "
                                  "batch size, compiled before timing, ~40 s each on a small CPU; see nanochat/engine.py)")
    seed: int = option(0, "seed for the random model and prompts")
    threads: int | None = option(None, "CPU threads torch may use; automatic: torch's choice (1 is steadier on a busy "
                                       "machine, where spinning OpenMP threads slow each other down)")

    def validate(self) -> None:
        problems = []
        for name in ("depth", "sequence_len", "prompt_len", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if self.vocab_size is not None and self.vocab_size < 2:
            problems.append(f"--vocab-size must be >= 2, got {self.vocab_size}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            problems.append(f"--batch-sizes must be positive, got {list(self.batch_sizes)}")
        if self.positions and min(self.positions) < 1:
            problems.append(f"--positions must be positive, got {list(self.positions)}")
        if self.random_init and (self.source or self.tag or self.step is not None):
            problems.append("--random-init benchmarks a fresh model; drop --source/--tag/--step or --random-init")
        check(problems)


# -----------------------------------------------------------------------------
# The model

@dataclass
class Subject:
    model: torch.nn.Module
    description: str
    info: dict = field(default_factory=dict)


def _random_model(config: Config, runtime: Runtime, why: str) -> Subject:
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.scaling import model_dims

    vocab = config.vocab_size
    if vocab is None:
        try:
            from nanochat.tokenizer import get_tokenizer
            vocab = get_tokenizer(runtime.base_dir).get_vocab_size()
        except (FileNotFoundError, ValueError):
            vocab = 32768
    n_embd, n_head = model_dims(config.depth)
    gpt_config = GPTConfig(sequence_len=config.sequence_len, vocab_size=vocab, n_layer=config.depth,
                           n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(config.seed)
    model = build_model(gpt_config, runtime.device, runtime.dtype)
    return Subject(model, f"random d{config.depth} model ({why})", {"random_init": True})


def load_subject(config: Config, runtime: Runtime) -> Subject:
    from nanochat.checkpoint import latest_stage, load_model

    if config.random_init:
        return _random_model(config, runtime, "--random-init")
    source = config.source
    if source is None:
        source = latest_stage(runtime.base_dir)
        if source is None:
            log.warning("no checkpoint under %s: benchmarking a random d%d model instead (timings do not depend "
                        "on the weights)", runtime.base_dir, config.depth)
            return _random_model(config, runtime, f"no checkpoint under {runtime.base_dir}")
    model, _, meta = load_model(source, runtime.base_dir, runtime.device, runtime.dtype, tag=config.tag,
                                step=config.step)
    return Subject(model, f"{source} checkpoint, step {meta.get('step')}",
                   {"random_init": False, "source": source, "step": meta.get("step")})


# -----------------------------------------------------------------------------
# Accounting

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters a decode step reads, as stored: every matrix except the
    embedding tables (of which only the rows of the current tokens are read). Without
    --cast-weights the fp32 masters are read and a compute-dtype copy is written and read
    again, so the real traffic is higher than this."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)


def decode_flops(model: torch.nn.Module, position: int) -> int:
    """FLOPs to decode one token at `position`: 2 per matmul weight (the embedding tables
    are lookups) plus, per layer, 4 * heads * head_dim per attended key (q.k and the
    weighted sum of v), over min(position, window) + 1 keys."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmul = sum(p.numel() for p in model.parameters() if id(p) not in tables and p.dim() == 2)
    c = model.config
    attention = sum(4 * c.n_head * c.head_dim * (min(position, w) + 1) for w in model.window_sizes)
    return 2 * matmul + attention


def kv_bytes_read(model: torch.nn.Module, batch: int, position: int, shared: int = 0) -> int:
    """Bytes of cached keys and values attention reads for one decode step at `position`
    (tokens already cached): each layer reads min(position, window) + 1 positions per
    row, except that the first `shared` positions (a prompt the rows share, see
    GPT.make_kv_cache) are read once for all rows."""
    c = model.config
    itemsize = torch.empty((), dtype=model.compute_dtype).element_size()
    per_position = 2 * c.n_kv_head * c.head_dim * itemsize  # k and v
    total = 0
    for w in model.window_sizes:
        visible = min(position, w) + 1
        own = min(visible, position + 1 - shared)  # the row's own keys among the visible ones
        total += (batch * own + (visible - own)) * per_position
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (kilobytes on Linux), over the whole run
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# Measurements

def time_generation(engine, prompt: list[int], batch: int, steps: int, temperature: float = 1.0,
                    top_k: int | None = None) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds of each later decode step). The engine turns
    every step's tokens into a Python list, which synchronises the device, so wall-clock
    gaps between yields are device time."""
    device = engine.model.get_device()
    _sync(device)
    t0 = time.perf_counter()
    stamps = []
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=steps + 1, temperature=temperature,
                               top_k=top_k, seed=0):
        stamps.append(time.perf_counter())
    assert len(stamps) == steps + 1, "a row ended early: the benchmark engine must have no stop tokens"
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def _random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def bench_batches(engine, config: Config, vocab: int, peak_flops: float, peak_bandwidth: float) -> list[dict]:
    model, device = engine.model, engine.model.get_device()
    prompt = _random_prompt(vocab, config.prompt_len, config.seed)
    rows = []
    for batch in config.batch_sizes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ttfts, steps = [], []
        for _ in range(config.repeats):
            ttft, step_times = time_generation(engine, prompt, batch, config.decode_tokens, config.temperature,
                                               config.top_k)
            ttfts.append(ttft)
            steps.extend(step_times)
        step_s = statistics.median(steps)
        mid_position = config.prompt_len + config.decode_tokens // 2
        shared = config.prompt_len if batch > 1 and model.shares_prompt_cache() else 0
        read = weight_bytes(model) + kv_bytes_read(model, batch, mid_position, shared)
        flops = batch * decode_flops(model, mid_position)
        rows.append({
            "batch": batch, "ttft_ms": 1e3 * statistics.median(ttfts), "step_ms": 1e3 * step_s,
            "tokens_per_s": batch / step_s, "ms_per_token": 1e3 * step_s / batch,
            "peak_mem_mb": _peak_memory_mb(device), "bytes_per_step": read, "gb_per_s": read / step_s / 1e9,
            # utilisation of the two limits: arithmetic (MFU) and memory traffic (MBU)
            "mfu": 100 * flops / step_s / peak_flops, "mbu": 100 * read / step_s / peak_bandwidth,
        })
        log.info("batch %d: %.2f ms/step", batch, rows[-1]["step_ms"])
    return rows


def bench_positions(engine, config: Config, vocab: int) -> list[dict]:
    model = engine.model
    limit = engine.max_positions() - 8
    rows = []
    for position in config.positions:
        if position > limit:
            log.warning("position %d is beyond the model's %d positions; skipped", position, limit + 8)
            continue
        prompt = _random_prompt(vocab, position, config.seed + position)
        steps = []
        for _ in range(config.repeats):
            steps.extend(time_generation(engine, prompt, 1, 8, config.temperature, config.top_k)[1])
        step_s = statistics.median(steps)
        rows.append({"position": position, "step_ms": 1e3 * step_s,
                     "kv_bytes_per_step": kv_bytes_read(model, 1, position + 4),
                     "bytes_per_step": weight_bytes(model) + kv_bytes_read(model, 1, position + 4)})
    return rows


# -----------------------------------------------------------------------------
# Report

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render(metrics: dict) -> str:
    mb = 2**20
    parts = [f"nanochat bench-infer: {metrics['model']}",
             f"  {metrics['params'] / 1e6:.1f}M parameters, depth {metrics['depth']}, width {metrics['n_embd']}, "
             f"windows {metrics['window_sizes']}, {metrics['dtype']} on {metrics['device']} "
             f"({metrics['torch_threads']} threads), weights {'cast once' if metrics['cast_weights'] else 'fp32 masters'}",
             f"  processor: {metrics['processor']}",
             f"  weights read per decode step: {metrics['weight_bytes'] / mb:.1f} MiB",
             "",
             f"batch decode (prompt {metrics['prompt_len']} tokens, {metrics['decode_tokens']} steps, "
             f"temperature {metrics['temperature']}, top-k {metrics['top_k'] or 'off'}, "
             f"median of {metrics['repeats']} runs{'; compiled' if metrics.get('compile') else ''})",
             _table(["batch", "TTFT ms", "ms/step", "tok/s", "ms/token", "peak MiB", "read MiB/step", "GB/s",
                     "MBU %", "MFU %"],
                    [[str(r["batch"]), f"{r['ttft_ms']:.1f}", f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['ms_per_token']:.2f}", f"{r['peak_mem_mb']:.0f}", f"{r['bytes_per_step'] / mb:.1f}",
                      f"{r['gb_per_s']:.1f}", f"{r['mbu']:.1f}", f"{r['mfu']:.2f}"] for r in metrics["batches"]]),
             f"  MBU against {metrics['peak_bandwidth'] / 1e9:,.0f} GB/s, MFU against {metrics['peak_flops'] / 1e12:.3g} "
             f"TFLOP/s ({metrics['dtype']}); ms/step is each stream's time per output token (TPOT), ms/token that ÷ batch"]
    if metrics["positions"]:
        parts += ["", "decode step vs context position (batch 1)",
                  _table(["position", "ms/step", "KV read KiB", "total read MiB"],
                         [[str(r["position"]), f"{r['step_ms']:.2f}", f"{r['kv_bytes_per_step'] / 1024:.0f}",
                           f"{r['bytes_per_step'] / mb:.1f}"] for r in metrics["positions"]])]
    return "\n".join(parts)


def run(config: Config, runtime: Runtime) -> dict:
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, runtime)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: give it back to in-process callers


def _run(config: Config, runtime: Runtime) -> dict:
    from nanochat.engine import Engine, cast_for_inference

    subject = load_subject(config, runtime)
    model = subject.model.eval()
    if config.cast_weights:
        cast_for_inference(model)
    engine = Engine(model, None, compile=config.compile)  # no tokenizer: no stop tokens, every step runs
    vocab = model.config.vocab_size
    if config.prompt_len + config.decode_tokens + 1 > engine.max_positions():
        raise UserError(f"--prompt-len + --decode-tokens exceeds the model's {engine.max_positions()} positions")
    # warm-up; compiled, every batch size's graph is built here (the timed runs have the same cache shapes)
    for batch in config.batch_sizes if config.compile else [max(config.batch_sizes)]:
        t0 = time.perf_counter()
        time_generation(engine, _random_prompt(vocab, 32, 1), batch, 4)
        if config.compile:
            log.info("batch %d: compiled the decode step in %.1f s", batch, time.perf_counter() - t0)
    from nanochat.common import peak_bandwidth, peak_flops, processor_summary
    flops_peak = peak_flops(runtime.device, model.compute_dtype, cache_dir=runtime.base_dir)
    bandwidth_peak = peak_bandwidth(runtime.device, cache_dir=runtime.base_dir)
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu"
    metrics = {
        "model": subject.description, **subject.info, "depth": model.config.n_layer, "n_embd": model.config.n_embd,
        "params": sum(p.numel() for p in model.parameters()), "window_sizes": sorted(set(model.window_sizes)),
        "dtype": str(runtime.dtype).removeprefix("torch."), "device": device_name, "cast_weights": config.cast_weights,
        "processor": processor_summary(runtime.device),
        "torch_threads": torch.get_num_threads(), "weight_bytes": weight_bytes(model),
        "prompt_len": config.prompt_len, "decode_tokens": config.decode_tokens, "repeats": config.repeats,
        "temperature": config.temperature, "top_k": config.top_k, "compile": engine.compile,
        "peak_flops": flops_peak, "peak_bandwidth": bandwidth_peak,
        "batches": bench_batches(engine, config, vocab, flops_peak, bandwidth_peak),
        "positions": bench_positions(engine, config, vocab),
    }
    if runtime.is_master:
        print(render(metrics))
        print(json.dumps(metrics))
        sys.stdout.flush()
    return metrics
