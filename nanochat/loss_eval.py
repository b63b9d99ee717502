"""
Bits per byte: the loss normalised by the bytes the target tokens stand for, so models
with different vocabularies compare fairly. Special tokens (0 bytes) and ignored
targets (-1) count neither loss nor bytes.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of nats over sum of bytes across `steps` batches (and all ranks), in bits.

    `batches` yields (inputs, targets, ...) with targets (B, T); `token_bytes` is (vocab,)."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y, *_ in itertools.islice(batches, steps):  # fewer when `batches` ends first
        loss = model(x, y, loss_reduction="none").view(-1).double()  # (B*T,) nats per target
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y)).to(torch.int64)
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    nb = total_bytes.item()
    if nb == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * nb)


# Fixed prompts to eyeball what a base model knows (sampled during and after training).
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def complete_prompts(model: torch.nn.Module, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 16,
                     temperature: float = 0.0) -> list[str]:
    """Greedy (by default) completions of each prompt, as text without the prompt."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    out = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        seqs, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature)
        out.append(tokenizer.decode(seqs[0][len(tokens):]))
    return out


def split_bpb(model: torch.nn.Module, tokenizer, token_bytes: torch.Tensor, *, base_dir, splits=("train", "val"),
              batch_size: int, seq_len: int, tokens: int, rank: int = 0, world_size: int = 1,
              dataset: str | None = None) -> dict[str, float]:
    """Bits per byte on `tokens` tokens of each pretraining split (of the named dataset
    built by `nanochat ingest`, or the downloaded web text when None)."""
    from nanochat.dataloader import pretrain_batches
    steps = max(1, tokens // (batch_size * seq_len * world_size))
    results = {}
    for split in splits:
        loader = pretrain_batches(tokenizer, batch_size, seq_len, split, base_dir=base_dir,
                                  device=token_bytes.device, rank=rank, world_size=world_size, dataset=dataset,
                                  epochs=1)  # a small split is measured once, not on repeats
        try:
            results[split] = evaluate_bpb(model, loader, steps, token_bytes)
        finally:
            loader.close()
    return results
