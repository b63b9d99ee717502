"""
The GPT model: a decoder-only Transformer with the reference nanochat's architecture,
so checkpoints move between the two (same state_dict names, shapes and semantics).

Features
- rotary position embeddings, no learned positions (Su et al. 2021,
  https://arxiv.org/abs/2104.09864), base 100000, "half split" pairing (channel c is
  rotated with channel c + head_dim/2), precomputed for 10x sequence_len
- QK norm: parameter-free RMSNorm on q and k after the rotation, then both scaled by 1.2
  (Henry et al. 2020, https://arxiv.org/abs/2010.04245)
- grouped-query attention, n_kv_head dividing n_head (Ainslie et al. 2023,
  https://arxiv.org/abs/2305.13245)
- sliding-window attention from `window_pattern` tiled over the layers: "L" sees
  sequence_len tokens back, "S" a quarter of that rounded up to 128; the last layer is
  always "L"
- ReLU^2 MLP with 4x expansion (So et al. 2021, https://arxiv.org/abs/2109.08668)
- parameter-free RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467),
  applied after the token embedding, before each sublayer and before the head
- no biases; untied token embedding (wte) and unembedding (lm_head)
- value embeddings (ResFormer, Zhou et al. 2024, https://arxiv.org/abs/2410.17897):
  alternating layers, the last included, add a per-token embedding to v through an
  input-dependent per-head gate 3*sigmoid(W x[:12]) in (0, 3)
- per-layer scalars (modded-nanogpt): before block i, x = resid_lambdas[i] * x +
  x0_lambdas[i] * x0, with x0 the normalized (smeared) embedding
- smear: each token's embedding gets the previous token's mixed in through a gate
  smear_lambda * sigmoid(W x[:24]) (cheap bigram information)
- backout: the residual stream after layer n_layer // 2 is scaled by backout_lambda and
  subtracted before the final norm
- logits softcap 15 * tanh(z / 15) in fp32 (Gemma 2, https://arxiv.org/abs/2408.00118)
- vocabulary padded to a multiple of 64 (faster matmuls); logits are cropped back
- off CUDA, the training loss is computed in row chunks by a fused head + softcap +
  cross-entropy that never holds the full (B*T, vocab) fp32 logits (`head_loss`); on
  CUDA the reference's plain formulation, which torch.compile fuses (`chunked_loss`)
- activation memory: RMSNorm saves its output instead of its input and the ReLU^2 MLP
  keeps only its hidden pre-activation for the backward
- CPU speed: the element-wise parts run as custom autograd functions that allocate only
  their outputs and walk their inputs in row blocks (RMSNorm, rotary + QK norm, the
  ReLU^2 projection, the per-layer residual mix, the head's loss): on a CPU every fresh
  large temporary is a round trip through memory, and elementwise passes, not matmuls,
  are what is left of a bf16 step. Under torch.compile the plain formulas are used and
  the compiler fuses them.

Compute policy: parameters are fp32 masters; every matmul runs in `compute_dtype`
(a constructor argument, chosen by the CLI's Runtime) by casting the weight in
`Linear.forward`, and activations flow in that dtype from the embedding on. As in the
reference, `init_weights` stores the two kinds of embedding tables in the compute dtype
(not for fp16, whose GradScaler cannot unscale fp16 gradients).

Building: construct on the meta device, `to_empty(device=...)`, then `init_weights()`
sets every tensor (`build_model` does all three). Init table (s = sqrt(3 / n_embd), so
U(-s, s) has std 1/sqrt(n_embd)):

  tensor                         shape                    init
  transformer.wte.weight         (V_pad, n_embd)          N(0, 0.8)
  lm_head.weight                 (V_pad, n_embd)          N(0, 0.001)
  h.i.attn.c_q.weight            (n_head*hd, n_embd)      U(-s, s)
  h.i.attn.c_k / c_v.weight      (n_kv_head*hd, n_embd)   U(-s, s)
  h.i.attn.c_proj.weight         (n_embd, n_embd)         0
  h.i.attn.ve_gate.weight        (n_kv_head, 12)          U(0, 0.02)   value-embedding layers only
  h.i.mlp.c_fc.weight            (4*n_embd, n_embd)       U(-0.4 s, 0.4 s)
  h.i.mlp.c_proj.weight          (n_embd, 4*n_embd)       0
  value_embeds.i.weight          (V_pad, n_kv_head*hd)    U(-s, s)
  resid_lambdas                  (n_layer,)               1.15 - 0.10 * i / max(n_layer-1, 1)
  x0_lambdas                     (n_layer,)               0.20 - 0.15 * i / max(n_layer-1, 1)
  smear_gate.weight              (1, 24)                  U(0, 0.02)
  smear_lambda                   (1,)                     0
  backout_lambda                 (1,)                     0.2
  cos, sin (buffers, not saved)  (1, 10*seq_len, 1, hd/2) rotary tables

(h.i = transformer.h.i). The reference leaves the last three parameters uninitialized
when built on the meta device (garbage that turns into NaN at depth 6); here the two
lambdas get the values its constructor intends and the smear gate is drawn like the
value-embedding gates.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanochat.attention import KVCache, attend, log_backend

log = logging.getLogger("nanochat.gpt")

ROPE_BASE = 100_000
ROPE_LENGTH_FACTOR = 10  # rotary tables cover 10x sequence_len (KV-cache decoding may run long)
QK_SCALE = 1.2  # multiplies q and k after QK norm: sharper attention (1.44 on the logits)
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the embedding
LOGIT_SOFTCAP = 15.0
IGNORE_INDEX = -1
SHORT_WINDOW_TILE = 128  # "S" windows are rounded up to FA3's tile size


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    # tiled over the layers, last layer always "L": L = full context, S = about a quarter
    window_pattern: str = "SSSL"

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field."""
        problems = []
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if not problems:
            if self.n_embd % self.n_head:
                problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            elif (self.n_embd // self.n_head) % 2:
                problems.append(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")
            if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
                problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# Helpers

# On the CPU the element-wise kernels below walk the rows in blocks of about this many
# elements: their fp32 workspaces (1 MiB each) then come from malloc's cached heap and
# stay in cache, where whole-tensor temporaries would each be a fresh mmap whose pages
# fault in one by one (about 1 us per 4 KiB page, as long as the arithmetic itself).
CPU_BLOCK_ELEMENTS = 1 << 18


def _block_rows(x: Tensor, row_elements: int, block_elements: int | None = None) -> int:
    """Rows (along dim 0) per block of about `block_elements` (default
    CPU_BLOCK_ELEMENTS): all of them on accelerators, where each op is one kernel launch
    and a loop would only add launches."""
    if x.device.type != "cpu":
        return max(1, x.size(0))
    return max(1, (block_elements or CPU_BLOCK_ELEMENTS) // max(1, row_elements))


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """sum(u * v) over all elements as a 0-dim tensor in the accumulation dtype (fp32,
    or fp64 for fp64), upcast block by block (no full-size product or upcast)."""
    u, v = u.reshape(-1), v.reshape(-1)
    if u.dtype == v.dtype and u.dtype in (torch.float32, torch.float64):
        return torch.dot(u, v)
    total = torch.zeros((), dtype=torch.float32, device=u.device)
    step = _block_rows(u, 1)
    for i in range(0, u.numel(), step):
        total += torch.dot(u[i:i + step].float(), v[i:i + step].float())
    return total


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms_forward_into(y: Tensor, rstd: Tensor, xf: Tensor, scratch: bool, scale: float) -> None:
    """One block of y = rms_norm(x) * scale, rounded like F.rms_norm(x) * scale (to
    y's dtype, then the scale), and rstd = 1 / rms(x). xf: the block in the accumulation
    dtype (rstd's), which may be overwritten when `scratch`; y: (R, ..., D) in the
    output dtype; rstd: (R, ..., 1). The same steps as F.rms_norm (mean of squares +
    the accumulation dtype's epsilon, rsqrt, multiply), so bitwise equal to it."""
    torch.mean(xf.square(), -1, keepdim=True, out=rstd)
    rstd.add_(torch.finfo(rstd.dtype).eps).rsqrt_()
    if scratch:
        y.copy_(xf.mul_(rstd))
    else:  # xf is x itself, already in y's dtype
        torch.mul(xf, rstd, out=y)
    if scale != 1.0:
        y.mul_(scale)


def _rms_backward(g: Tensor, y: Tensor, rstd: Tensor, scale: float) -> Tensor:
    """dL/dx of y = scale * rms_norm(x) for one block, from the output y and rstd, in
    rstd's dtype: with n = y / s and dn = s * g,
    dx = rstd * (dn - n * mean(dn * n)) = rstd * (s * g - y * mean(g * y) / s)."""
    acc = rstd.dtype
    gf, yf = g.to(acc), y.to(acc)
    m = (gf * yf).mean(-1, keepdim=True).mul_(-1.0 / scale)
    return torch.mul(gf, scale).addcmul_(yf, m).mul_(rstd)


def _rms_norm_rows(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x (N, D): the forward of `norm`, block by block."""
    y = torch.empty_like(x)
    rstd = torch.empty(x.size(0), 1, dtype=_acc_dtype(x.dtype), device=x.device)
    step = _block_rows(x, x.size(1))
    for i in range(0, x.size(0), step):
        xb = x[i:i + step]
        xf = xb.to(rstd.dtype)
        _rms_forward_into(y[i:i + step], rstd[i:i + step], xf, xf is not xb, scale)
    return y, rstd


class _RMSNormFn(torch.autograd.Function):
    """scale * rms_norm(x) whose backward keeps the output (which the next layer saves
    anyway: the matmul input) plus one rstd per row, instead of the input; both passes
    run in row blocks on the CPU (see CPU_BLOCK_ELEMENTS)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        y, rstd = _rms_norm_rows(x.reshape(-1, x.size(-1)), scale)
        y = y.view(x.shape)
        ctx.save_for_backward(y, rstd)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        y, rstd = ctx.saved_tensors
        y2, g2 = y.view(-1, y.size(-1)), grad.reshape(-1, y.size(-1))
        dx = torch.empty_like(y2)
        step = _block_rows(y2, y2.size(1))
        for i in range(0, y2.size(0), step):
            dx[i:i + step].copy_(_rms_backward(g2[i:i + step], y2[i:i + step], rstd[i:i + step], ctx.scale))
        return dx.view(y.shape), None


def norm(x: Tensor, scale: float = 1.0) -> Tensor:
    """RMSNorm over the last dimension, no learnable gain, times `scale`; x's dtype.
    Bitwise equal to F.rms_norm(x) * scale on every path."""
    if torch.compiler.is_compiling():  # plain ops, which the compiler fuses
        y = F.rms_norm(x, (x.size(-1),))
        return y * scale if scale != 1.0 else y
    if torch.is_grad_enabled() and x.requires_grad:
        return _RMSNormFn.apply(x, scale)
    return _rms_norm_rows(x.reshape(-1, x.size(-1)), scale)[0].view(x.shape)


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the input's dtype for the matmul.
    Activations already flow in the compute dtype, so this is what sets the matmul
    precision (replacing autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Alternating layers carry value embeddings, counted so the last one does."""
    return layer % 2 == (n_layer - 1) % 2


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window (earlier tokens each query may see besides itself)."""
    long_window = config.sequence_len
    short_window = -(-long_window // 4 // SHORT_WINDOW_TILE) * SHORT_WINDOW_TILE  # 2048 -> 512, 512 -> 128
    pattern = config.window_pattern.upper()
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window
    return sizes


def rotary_tables(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device | str | None = None,
                  base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (1, seq_len, 1, head_dim/2): angle t * base^(-2c/head_dim) for
    position t and channel pair c, computed in fp32, stored in `dtype`."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (c, c + D/2) of x (B, T, H, D) by the per-position angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _rotate(xf: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """apply_rotary on a block in the accumulation dtype into a new tensor; sign -1
    rotates back (the transpose, which is the backward of the rotation)."""
    half = xf.size(-1) // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.empty_like(xf)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin, value=-sign)
    return out


def _rope_norm_rows(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(y, rstd) of y = scale * rms_norm(apply_rotary(x)) for x (B, T, H, D), blocked
    over B; the rotation runs in the accumulation dtype, so y is rounded once (plus the
    scale), where the unfused ops would round after the rotation too."""
    y = torch.empty_like(x)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=_acc_dtype(x.dtype), device=x.device)
    step = _block_rows(x, x[0].numel())
    for i in range(0, x.size(0), step):
        r = _rotate(x[i:i + step].to(rstd.dtype), cos, sin, 1.0)
        _rms_forward_into(y[i:i + step], rstd[i:i + step], r, True, scale)
    return y, rstd


class _RopeNormFn(torch.autograd.Function):
    """Rotary embedding then QK norm in one pass over q or k (B, T, H, D): allocates
    only its output (kept for the backward, as attention keeps q and k anyway) and rstd,
    instead of the ~8 full-size temporaries of the separate ops."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
        acc = _acc_dtype(x.dtype)
        c, s = cos.to(acc), sin.to(acc)  # (1, T, 1, D/2)
        y, rstd = _rope_norm_rows(x, c, s, scale)
        ctx.save_for_backward(y, rstd, c, s)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        y, rstd, c, s = ctx.saved_tensors
        dx = torch.empty_like(y)
        step = _block_rows(y, y[0].numel())
        for i in range(0, y.size(0), step):
            dr = _rms_backward(grad[i:i + step], y[i:i + step], rstd[i:i + step], ctx.scale)
            dx[i:i + step].copy_(_rotate(dr, c, s, -1.0))
        return dx, None, None, None


def rope_norm(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
    """scale * rms_norm(apply_rotary(x, cos, sin)) for q or k (B, T, H, D)."""
    if torch.compiler.is_compiling():
        return norm(apply_rotary(x, cos, sin), scale)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeNormFn.apply(x, cos, sin, scale)
    acc = _acc_dtype(x.dtype)
    return _rope_norm_rows(x, cos.to(acc), sin.to(acc), scale)[0]


# -----------------------------------------------------------------------------
# Attention

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        c, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(c, config.n_head * self.head_dim, bias=False)
        self.c_k = Linear(c, kv, bias=False)
        self.c_v = Linear(c, kv, bias=False)
        self.c_proj = Linear(c, c, bias=False)
        self.ve_gate = (Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x: Tensor, ve: Tensor | None, rotary: tuple[Tensor, Tensor], window: int,
                kv_cache: KVCache | None, masks: dict) -> Tensor:
        B, T, _ = x.shape  # x: (B, T, C), already normalized
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: v += gate * ve, one gate in (0, 3) per token and kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = rotary
        q, k = rope_norm(q, cos, sin, QK_SCALE), rope_norm(k, cos, sin, QK_SCALE)  # rotary, then QK norm
        y = attend(q, k, v, window, kv_cache, self.layer_idx, masks)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, -1))


# -----------------------------------------------------------------------------
# MLP and block

# rows of h per block in the ReLU^2 projection on the CPU: a relu(h)^2 workspace of at
# most 32 MiB (reused from the heap), few enough blocks that grad_w's fp32 accumulation
# (one (C, 4C) conversion and add per block) stays cheap
MLP_BLOCK_BYTES = 32 << 20


class _ReluSquaredProj(torch.autograd.Function):
    """y = relu(h)^2 @ w^T that keeps only h (B, T, 4C) for the backward, recomputing
    relu(h)^2 there; autograd would keep relu(h) and relu(h)^2 (twice the bytes). On the
    CPU both passes run on blocks of rows, so relu(h)^2 never exists at full size."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        h2, wt = h.reshape(-1, h.size(-1)), w.to(h.dtype)  # (N, 4C), (C, 4C)
        out = torch.empty(h2.size(0), wt.size(0), dtype=h.dtype, device=h.device)
        step = _block_rows(h2, h2.size(1), MLP_BLOCK_BYTES // h.element_size())
        for i in range(0, h2.size(0), step):
            torch.mm(F.relu(h2[i:i + step]).square_(), wt.t(), out=out[i:i + step])
        return out.view(*h.shape[:-1], wt.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        h, w = ctx.saved_tensors
        h2, g2 = h.reshape(-1, h.size(-1)), grad.reshape(-1, grad.size(-1))
        w2 = w.to(h.dtype) * 2  # d relu(h)^2 / dh = 2 relu(h); the 2 is exact in any dtype
        grad_h = torch.empty_like(h2)
        grad_w = torch.zeros(w.shape, dtype=_acc_dtype(h.dtype), device=w.device)  # (C, 4C), summed over blocks
        step = _block_rows(h2, h2.size(1), MLP_BLOCK_BYTES // h.element_size())
        for i in range(0, h2.size(0), step):
            r = F.relu(h2[i:i + step])
            torch.mm(g2[i:i + step], w2, out=grad_h[i:i + step]).mul_(r)  # zero where h <= 0, as relu's backward
            grad_w += (g2[i:i + step].t() @ r.square_()).to(grad_w.dtype)
        return grad_h.view(h.shape), grad_w.to(w.dtype)


class _ResidualMixFn(torch.autograd.Function):
    """y = a * x + b * x0 for the per-layer scalars a, b (0-dim): one new tensor forward
    and two backward (the gradients of x and x0); autograd's version makes four more for
    the products and the scalars' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, x0: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(x, x0, a, b)
        return (x * a).addcmul_(x0, b)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, x0, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (g * a if need[0] else None, g * b if need[1] else None,
                _dot(g, x).to(a.dtype) if need[2] else None, _dot(g, x0).to(b.dtype) if need[3] else None)


def residual_mix(x: Tensor, x0: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a * x + b * x0 (x0: the normalized embedding), the same numbers on every path."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            x.requires_grad or x0.requires_grad or a.requires_grad or b.requires_grad):
        return _ResidualMixFn.apply(x, x0, a, b)
    return torch.addcmul(x * a, x0, b)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        if type(self.c_proj) is Linear:
            return _ReluSquaredProj.apply(h, self.c_proj.weight)
        return self.c_proj(F.relu(h).square())  # c_proj swapped (fp8): let the module run


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, ve: Tensor | None, rotary: tuple[Tensor, Tensor], window: int,
                kv_cache: KVCache | None, masks: dict) -> Tensor:
        x = x + self.attn(norm(x), ve, rotary, window, kv_cache, masks)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# Head + loss without the full logits
#
# For N = B*T rows and vocabulary V the fp32 logits are N*V*4 bytes (2 GiB at batch
# 32 x 512 tokens, V = 32768), and autograd would keep several such tensors for the
# backward. Instead rows are processed in chunks of about 2^25 logits: each chunk's
# logits, softcap, log-sum-exp and (when training) gradient are computed and dropped
# before the next. With d = dL/dlogits_raw per chunk,
#     dL/dz = softmax(z) - onehot(target),  z = cap * tanh(u / cap),  dz/du = 1 - tanh^2,
#     grad_x = d @ W,  grad_W = d^T @ x.
# For "mean"/"sum" the gradient is computed during the forward pass (the upstream
# gradient is one scalar, applied in backward), so the head's logits are computed once;
# for "none" (per-row losses, e.g. RL) they are recomputed chunk by chunk in backward.

# (1024 rows at vocab 32768: each chunk adds its bf16 grad_w into the fp32 one, a pass
# over a (V, C) matrix, so fewer chunks are faster; the chunk buffer is 64 MiB in bf16)
LOSS_CHUNK_ELEMENTS = 1 << 25


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, LOSS_CHUNK_ELEMENTS // vocab)


# exp(z) of capped logits |z| <= softcap cannot overflow fp32 (nor underflow to a zero
# sum) below this cap, so the log-sum-exp needs no max subtraction (one pass fewer).
_SHIFT_FREE_SOFTCAP = 30.0
# On the CPU the elementwise work on a chunk's logits runs on pieces of about this many
# logits, so that its fp32 workspaces (2 x 1 MiB) stay in L2 cache between passes
# (measured at d4, vocab 32768: 2^18 beats 2^17 and 2^19).
LOSS_PIECE_ELEMENTS = 1 << 18


def _head_chunks(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, softcap: float,
                 chunk_rows: int, row_scale: Tensor | None, want_grad: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-row losses (N,) fp32 (0 where target == IGNORE_INDEX), and when `want_grad`
    the gradients of sum(row_scale * losses) w.r.t. x (N, C; x's dtype) and weight
    (V_pad, C; fp32). row_scale None means 1 for every row.

    Speed (this is most of a CPU training step at small depth): the matmuls run on chunks
    of `chunk_rows` rows, the ~10 elementwise passes of softcap, softmax and gradient on
    pieces of a few rows whose fp32 workspaces stay in cache (3-4x faster on a CPU than
    streaming whole chunks through memory), and every buffer is allocated once per call:
    fresh tensors of tens of MiB per chunk would each be mmap'ed and page-faulted in.
    The gradient overwrites the raw logits it came from.
    """
    n, C, dev = x.size(0), x.size(1), x.device
    w = weight[:vocab_size].to(x.dtype)  # (V, C): the padded rows never reach a logit
    grad_x = torch.empty_like(x) if want_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if want_grad else None
    rows = max(1, min(chunk_rows, n))
    # cache-sized pieces pay off on CPUs; on a GPU each op is a kernel launch, so one piece per chunk
    piece = max(1, min(rows, LOSS_PIECE_ELEMENTS // vocab_size)) if dev.type == "cpu" else rows
    valid = targets != IGNORE_INDEX  # (N,)
    safe = targets.clamp(min=0).long().unsqueeze(1)  # (N, 1): a harmless index for ignored rows
    scale = valid.float() if row_scale is None else row_scale.float() * valid  # (N,)
    neg_scale = -scale.unsqueeze(1)  # (N, 1)
    sumexp = torch.empty(n, 1, dtype=torch.float32, device=dev)  # sum_j exp(z_j - shift)
    t_target = torch.empty(n, 1, dtype=torch.float32, device=dev)  # tanh(u_target / cap)
    shift = torch.zeros(n, 1, dtype=torch.float32, device=dev)
    raw_buf = torch.empty(rows, vocab_size, dtype=x.dtype, device=dev)  # u / cap = (x / cap) @ w^T, then dL/du
    t_buf = torch.empty(piece, vocab_size, dtype=torch.float32, device=dev)  # tanh(u / cap), then its square
    e_buf = torch.empty_like(t_buf)  # exp(z - shift), then the gradient in fp32
    low = x.dtype != torch.float32
    # the chunk's grad_w in x.dtype, added to the fp32 grad_w in row blocks (an op mixing
    # dtypes would convert the whole chunk into a temporary)
    gw_buf = torch.empty(vocab_size, C, dtype=x.dtype, device=dev) if want_grad and low else None
    gw_rows = _block_rows(grad_w, C) if want_grad else 0
    for start in range(0, n, rows):
        end = min(start + rows, n)
        xc, raw = x[start:end], raw_buf[:end - start]
        # the matmul yields u / cap straight away (one pass per piece fewer); the chunk of
        # x is scaled, a small temporary, rather than a copy of the whole weight
        torch.mm(xc * (1.0 / softcap), w.t(), out=raw)
        # per piece: only full-width passes; per-row values go to (N, 1) buffers via out=
        for p0 in range(start, end, piece):
            p1 = min(p0 + piece, end)
            t, e, u = t_buf[:p1 - p0], e_buf[:p1 - p0], raw[p0 - start:p1 - start]
            t.copy_(u).tanh_()
            torch.gather(t, 1, safe[p0:p1], out=t_target[p0:p1])
            torch.mul(t, softcap, out=e)  # z, the capped logits
            if softcap > _SHIFT_FREE_SOFTCAP:
                torch.amax(e, dim=1, keepdim=True, out=shift[p0:p1])
                e.sub_(shift[p0:p1])
            torch.sum(e.exp_(), dim=1, keepdim=True, out=sumexp[p0:p1])
            if not want_grad:
                continue
            # dL/du = (softmax(z) - onehot) * (1 - t^2), times the row's scale
            e.mul_(scale[p0:p1].unsqueeze(1) / sumexp[p0:p1])
            e.scatter_add_(1, safe[p0:p1], neg_scale[p0:p1])
            e.addcmul_(e, t.square_(), value=-1.0)
            u.copy_(e)
        if not want_grad:
            continue
        torch.mm(raw, w, out=grad_x[start:end])
        if low:
            torch.mm(raw.t(), xc, out=gw_buf)
            for r0 in range(0, vocab_size, gw_rows):
                grad_w[r0:min(r0 + gw_rows, vocab_size)] += gw_buf[r0:r0 + gw_rows].float()
        else:
            grad_w[:vocab_size].addmm_(raw.t(), xc)
    lse = sumexp.log_().add_(shift).squeeze(1)
    losses = torch.where(valid, lse - softcap * t_target.squeeze(1), 0.0)
    return losses, grad_x, grad_w


class _HeadLossSum(torch.autograd.Function):
    """sum of the per-row losses; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, chunk_rows):
        losses, grad_x, grad_w = _head_chunks(x, weight, targets, vocab_size, softcap, chunk_rows, None, True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return ((grad_x * grad_out.to(grad_x.dtype)), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None)


class _HeadLossRows(torch.autograd.Function):
    """(N,) per-row losses; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, chunk_rows):
        losses, _, _ = _head_chunks(x, weight, targets, vocab_size, softcap, chunk_rows, None, False)
        ctx.save_for_backward(x, weight, targets)
        ctx.args = (vocab_size, softcap, chunk_rows)
        return losses

    @staticmethod
    def backward(ctx, grad_rows):
        x, weight, targets = ctx.saved_tensors
        _, grad_x, grad_w = _head_chunks(x, weight, targets, *ctx.args, row_scale=grad_rows, want_grad=True)
        return grad_x, grad_w.to(weight.dtype), None, None, None, None


def head_loss(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, reduction: str = "mean",
              softcap: float = LOGIT_SOFTCAP, chunk_rows: int | None = None) -> Tensor:
    """Cross-entropy of softcap(x @ weight[:vocab_size]^T) against targets, chunked.

    x: (N, C) final hidden states in the compute dtype; weight: (V_pad, C) the lm_head
    master weight; targets: (N,) with IGNORE_INDEX (-1) for positions without a loss.
    reduction: "mean" over the non-ignored rows, "sum", or "none" for (N,) fp32 losses
    (0 at ignored rows). Equals F.cross_entropy on the full fp32 softcapped logits.
    """
    if torch.compiler.is_compiling():
        # keep the chunk loop eager: tracing would unroll every chunk into the graph
        # (torch.compiler.disable is looked up here, not at import, where it costs a second)
        return torch.compiler.disable(_head_loss)(x, weight, targets, vocab_size, reduction, softcap, chunk_rows)
    return _head_loss(x, weight, targets, vocab_size, reduction, softcap, chunk_rows)


def _head_loss(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, reduction: str, softcap: float,
               chunk_rows: int | None) -> Tensor:
    rows = _chunk_rows(vocab_size, chunk_rows)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if reduction == "none":
        if needs_grad:
            return _HeadLossRows.apply(x, weight, targets, vocab_size, softcap, rows)
        return _head_chunks(x, weight, targets, vocab_size, softcap, rows, None, False)[0]
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction={reduction!r} is not one of 'mean', 'sum', 'none'")
    if needs_grad:
        total = _HeadLossSum.apply(x, weight, targets, vocab_size, softcap, rows)
    else:
        total = _head_chunks(x, weight, targets, vocab_size, softcap, rows, None, False)[0].sum()
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum()  # 0/0 = nan when every target is ignored, as F.cross_entropy


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    """See the module docstring. Build with `build_model` (meta -> to_empty ->
    init_weights); the constructor only declares shapes."""

    def __init__(self, config: GPTConfig, pad_vocab_size_to: int = 64, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        config.validate()
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype {compute_dtype} is not one of float32, bfloat16, float16")
        self.config = config
        self.compute_dtype = compute_dtype
        self.window_sizes = window_sizes(config)
        # training loss in row chunks (None: everywhere but CUDA, where memory is ample
        # and torch.compile fuses the plain version); rows per chunk (None: ~2^25 logits)
        self.chunked_loss: bool | None = None
        self.loss_chunk_rows: int | None = None
        vocab = padded_vocab_size(config.vocab_size, pad_vocab_size_to)
        if vocab != config.vocab_size:
            log.debug("padding the vocabulary from %d to %d", config.vocab_size, vocab)
        kv_dim = config.n_kv_head * config.head_dim
        # registration order matches the reference, so parameter order (and hence the
        # optimizer's state layout) does too
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.empty(1))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(vocab, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        self.rotary_seq_len = config.sequence_len * ROPE_LENGTH_FACTOR
        cos, sin = rotary_tables(self.rotary_seq_len, config.head_dim, compute_dtype, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)  # recomputed, never saved
        self.register_buffer("sin", sin, persistent=False)

    # --- initialization --------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter and buffer (the table in the module docstring). Random
        draws happen in the reference's order, then the smear gate."""
        c = self.config.n_embd
        s = math.sqrt(3.0 / c)  # uniform bound with std 1/sqrt(n_embd); uniform avoids outliers
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        n = self.config.n_layer
        m = max(n - 1, 1)
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / m for i in range(n)]))  # stronger residual early
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / m for i in range(n)]))  # more embedding mixed in early
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)  # like c_v
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start a bit above neutral
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)  # smear starts off
        self.backout_lambda.fill_(0.2)
        self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, self.compute_dtype,
                                           device=self.lm_head.weight.device)
        if self.compute_dtype != torch.float16:
            # embedding rows only ever feed compute-dtype activations; storing them so halves their memory
            self.transformer.wte.to(dtype=self.compute_dtype)
            for ve in self.value_embeds.values():
                ve.to(dtype=self.compute_dtype)

    # --- forward ---------------------------------------------------------------

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def _smear(self, x: Tensor, prev: Tensor | None) -> Tensor:
        """x: (B, T, C) normalized embeddings; prev: (B, 1, C) embedding of the token
        before x[:, 0] (from the KV cache) or None at the start of a sequence."""
        lam = self.smear_lambda.to(x.dtype)
        if prev is None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))  # (B, T-1, 1)
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        before = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        return x + lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS])) * before

    def hidden_states(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Final normalized hidden states (B, T, n_embd) in the compute dtype; advances
        kv_cache by T when given."""
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        if pos + T > self.cos.size(1):
            raise ValueError(f"position {pos + T} is beyond the rotary tables ({self.cos.size(1)} = "
                             f"{ROPE_LENGTH_FACTOR} x sequence_len); use shorter inputs")
        if idx.device != self.cos.device:
            raise ValueError(f"input is on {idx.device} but the model is on {self.cos.device}")
        rotary = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]  # (1, T, 1, hd/2)

        x = norm(self.transformer.wte(idx).to(self.compute_dtype))  # (B, T, C)
        if kv_cache is None:
            x = self._smear(x, None)
        else:
            prev, kv_cache.prev_embedding = kv_cache.prev_embedding, x[:, -1:].clone()
            x = self._smear(x, prev)
        x0 = x
        masks: dict = {}  # attention masks shared by the layers of this pass
        backout_layer = self.config.n_layer // 2
        x_mid = x
        for i, block in enumerate(self.transformer.h):
            x = residual_mix(x, x0, self.resid_lambdas[i], self.x0_lambdas[i])
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, rotary, self.window_sizes[i], kv_cache, masks)
            if i == backout_layer:
                x_mid = x
        x = norm(x - self.backout_lambda.to(x.dtype) * x_mid)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Hidden states (..., C) -> softcapped fp32 logits (..., vocab_size)."""
        z = self.lm_head(x)[..., :self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(z / LOGIT_SOFTCAP)

    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> Tensor:
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab_size) fp32. With
        targets (B, T) (-1 = no loss): the cross-entropy, "mean" (scalar), "sum"
        (scalar) or "none" ((B*T,) fp32)."""
        if targets is not None and loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction={loss_reduction!r} is not one of 'mean', 'sum', 'none'")
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(x)
        chunked = self.chunked_loss if self.chunked_loss is not None else x.device.type != "cuda"
        if chunked:
            return head_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                             self.config.vocab_size, loss_reduction, chunk_rows=self.loss_chunk_rows)
        logits = self.logits(x)  # (B, T, V) fp32
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)

    def make_kv_cache(self, batch_size: int, seq_len: int) -> KVCache:
        """An empty KV cache for this model: its heads, dims, device and compute dtype."""
        c = self.config
        return KVCache(batch_size=batch_size, num_heads=c.n_kv_head, seq_len=seq_len, head_dim=c.head_dim,
                       num_layers=c.n_layer, device=self.get_device(), dtype=self.compute_dtype)

    # --- accounting ------------------------------------------------------------

    def _scalar_params(self) -> list[nn.Parameter]:
        return [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward; Kaplan
        et al. 2020) plus 12 * heads * head_dim * context per layer for QK^T and AV
        (PaLM, https://arxiv.org/abs/2204.02311), the context capped by each layer's
        window. Embedding lookups and scalars are not matmuls and are left out."""
        nparams = sum(p.numel() for p in self.parameters())
        lookup = self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        scalars = sum(p.numel() for p in self._scalar_params())
        h, hd, t = self.config.n_head, self.config.head_dim, self.config.sequence_len
        attn = sum(12 * h * hd * (t if w < 0 else min(w, t)) for w in self.window_sizes)
        return 6 * (nparams - lookup - scalars) + attn

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group (Kaplan et al. leave embeddings out, Chinchilla
        counts everything; callers pick)."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in self._scalar_params()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no group"
        return counts

    # --- optimizer -------------------------------------------------------------

    def optimizer_groups(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, scalar_lr: float = 0.5,
                         adam_betas: tuple[float, float] | None = None) -> list[dict]:
        """The reference's param groups: AdamW for embeddings, head and scalars (LRs of
        the first three scaled by 1/sqrt(n_embd/768)), Muon for the blocks' matrices
        grouped by shape. `adam_betas` replaces every AdamW group's betas when given."""
        matrices = list(self.transformer.h.parameters())
        scale = (self.config.n_embd / 768) ** -0.5
        log.info("AdamW LRs scaled by 1/sqrt(%d/768) = %.6f", self.config.n_embd, scale)

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=params, lr=lr, betas=adam_betas or betas, eps=1e-10, weight_decay=wd)

        groups = [
            adamw(list(self.lm_head.parameters()), unembedding_lr * scale, (0.8, 0.96), 0.01),
            adamw(list(self.transformer.wte.parameters()), embedding_lr * scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),  # higher beta1 for x0
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        grouped = sum(len(g["params"]) for g in groups)
        assert grouped == len(list(self.parameters())), "a parameter is in no optimizer group"
        return groups

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                        weight_decay: float = 0.0, scalar_lr: float = 0.5,
                        adam_betas: tuple[float, float] | None = None, ns_dtype: torch.dtype | None = None):
        """MuonAdamW over `optimizer_groups(...)`, each group's "initial_lr" set to its lr.

        ns_dtype: dtype of Muon's Polar Express matmuls. None follows the compute dtype:
        bf16 when the model computes in bf16 (the reference's choice, on GPUs and CPUs with
        native bf16), fp32 otherwise: on a CPU without native bf16 (AVX2 only) bf16 matmuls
        are emulated ~100x slower than fp32 and the optimizer step dominated training."""
        from nanochat.optim import MuonAdamW
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        optimizer = MuonAdamW(self.optimizer_groups(unembedding_lr, embedding_lr, matrix_lr, weight_decay,
                                                    scalar_lr, adam_betas), ns_dtype=ns_dtype)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # --- sampling --------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Yield up to max_tokens sampled ids after the prompt `tokens` (batch 1, no KV
        cache: the whole sequence is re-run each step; for samples during training).
        temperature 0 is greedy."""
        if not tokens:
            raise ValueError("generate() needs at least one prompt token (e.g. BOS)")
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if top_k is not None and 0 < top_k < logits.size(-1):
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)
            else:
                nxt = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            yield int(nxt.item())


def build_model(config: GPTConfig, device: torch.device | str, compute_dtype: torch.dtype = torch.float32,
                pad_vocab_size_to: int = 64) -> GPT:
    """Declare the model on the meta device (no memory), allocate it on `device`, and
    initialize every tensor."""
    with torch.device("meta"):
        model = GPT(config, pad_vocab_size_to=pad_vocab_size_to, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    model.init_weights()
    log_backend(model.get_device(), compute_dtype)  # visible even when forward is compiled
    return model
