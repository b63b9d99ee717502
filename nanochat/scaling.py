"""
The `--depth` dial and the rules that derive everything else from it.

Pure functions, each unit-tested: model shape from depth, the training horizon, the
batch size (Power Lines), learning-rate and weight-decay transfer across batch sizes,
and the schedules the training loop applies each step.
"""
from __future__ import annotations

import math

from nanochat.errors import UserError

# Hyperparameters are tuned at depth 12 and transferred to other depths from there.
REF_DEPTH = 12
# Best total batch size at d12, in tokens (measured by the reference's sweeps).
B_REF = 2 ** 19
# Peak learning rates tuned at B_REF (base-train's defaults); other batch sizes scale
# them by batch_lr_scale. Keys are GPT.setup_optimizer's arguments.
PEAK_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}


def model_dims(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """(n_embd, n_head) for a depth: width = depth × aspect_ratio rounded UP to a
    multiple of head_dim, so that every head has exactly head_dim channels."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise UserError(f"depth, aspect ratio and head dim must be positive (got {depth}, {aspect_ratio}, {head_dim})")
    base = depth * aspect_ratio
    n_embd = -(-base // head_dim) * head_dim
    return n_embd, n_embd // head_dim


def scaling_params(param_counts: dict[str, int]) -> int:
    """Parameters that enter the scaling laws: transformer matrices + lm_head.
    (Embeddings and scalars are excluded; that choice gives the cleanest fits.)"""
    return param_counts["transformer_matrices"] + param_counts["lm_head"]


def auto_total_batch_size(target_tokens: float, ref_tokens: float, b_ref: int = B_REF) -> int:
    """Power Lines (Filatov et al. 2025, arXiv:2505.13738): the best batch size grows
    as D^0.383 with the token horizon D. Anchored at d12 (ref_tokens ↔ b_ref) and
    rounded to the nearest power of two."""
    predicted = b_ref * (target_tokens / ref_tokens) ** 0.383
    return 2 ** round(math.log2(predicted))


def batch_lr_scale(total_batch_size: int, b_ref: int = B_REF) -> float:
    """η ∝ √(B/B_ref), the usual AdamW rule, applied to Muon too."""
    return (total_batch_size / b_ref) ** 0.5


def scaled_weight_decay(weight_decay: float, total_batch_size: int, target_tokens: float,
                        ref_tokens: float, b_ref: int = B_REF) -> float:
    """Keep T_epoch = B / (η·λ·D) constant (Wang & Aitchison 2024, arXiv:2405.13698).
    With η ∝ √(B/B_ref) this gives λ = λ_ref · √(B/B_ref) · (D_ref / D)."""
    return weight_decay * math.sqrt(total_batch_size / b_ref) * (ref_tokens / target_tokens)


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """0.85 → 0.97 over the first 400 steps, 0.97 → 0.90 during the LR warmdown."""
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start and warmdown > 0:
        progress = (step - warmdown_start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine decay of Muon's weight decay from its initial value to zero."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))
