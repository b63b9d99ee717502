"""Small GPT checkpoints trained on real tokens, for fixtures."""
from __future__ import annotations

from pathlib import Path


def train_checkpoint(tokenizer_dir: Path, tokenizer, base: Path, tag: str, config, *, steps: int, batch: int,
                     seed: int, meta: dict) -> list[float]:
    """Train a small GPT of `config` for `steps` steps of batch x sequence_len real OpenStax
    tokens with its own optimizer, save it as base_checkpoints/<tag> under `base` (which
    gets the tokenizer linked in) and return the losses."""
    import dataclasses

    import torch

    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.dataloader import pretrain_batches
    from nanochat.gpt import build_model

    (base / "tokenizer").symlink_to(tokenizer_dir / "tokenizer", target_is_directory=True)
    torch.manual_seed(seed)
    model = build_model(config, "cpu", torch.float32)
    optimizer = model.setup_optimizer()
    # a small document buffer: the default (1000 long OpenStax chapters) takes seconds to tokenize
    batches = pretrain_batches(tokenizer, batch, config.sequence_len, "train", base_dir=tokenizer_dir,
                               buffer_size=16, tokenizer_batch_size=16, prefetch=1)
    losses = []
    # one thread: matrices this small gain nothing from more, and on a busy machine
    # spinning OpenMP workers made these steps ~20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, (inputs, targets, _) in zip(range(steps), batches):
            loss = model(inputs, targets)
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        batches.close()
        torch.set_num_threads(threads)
    meta = {"step": steps, "model_config": dataclasses.asdict(config), "train_losses": losses, **meta}
    save_checkpoint(checkpoint_dir(base, "base", tag), steps, model.state_dict(), None, meta)
    return losses
