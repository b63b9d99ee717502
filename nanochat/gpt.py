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
  cross-entropy that never holds the full (B*T, vocab) fp32 logits; on CUDA the
  reference's plain formulation, which torch.compile fuses (`GPT.chunked_loss`)
- activation memory: RMSNorm saves its output instead of its input and the ReLU^2 MLP
  keeps only its hidden pre-activation for the backward
- CPU speed: in eager mode the elementwise parts (RMSNorm, rotary + QK norm, the ReLU^2
  projection, the per-layer residual mix, the head's loss) run as the row-blocked
  autograd kernels of `nanochat.kernels.cpu`, which allocate only their outputs; under
  torch.compile the plain formulas are used and the compiler fuses them.
- CPU decoding: inference on at most 64 rows (a decode step) multiplies by copies of the
  weights cached in faster layouts (`decode_matmul`: transposed for one or two rows,
  oneDNN-prepacked for more, q/k/v fused), and q and k share one rotary + QK norm call

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
import os
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanochat.attention import KVCache, attend, log_backend, select_backend
from nanochat.errors import UserError
from nanochat.kernels import cpu as cpu_kernels

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
            raise UserError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# Helpers

class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the input's dtype for the matmul.
    Activations already flow in the compute dtype, so this is what sets the matmul
    precision (replacing autocast). Decode-sized inference on a CPU goes through
    `decode_matmul` (weights cached in faster layouts) instead."""

    def forward(self, x: Tensor) -> Tensor:
        if _decode_sized(x):
            y = decode_matmul(self, x, self.weight)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        # the dtype test skips a no-op .to() call: decoding one token runs dozens of
        # matmuls whose per-call overhead is comparable to their arithmetic
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


# Decoding reads every weight matrix once per step for a few rows of arithmetic: on a CPU
# the matmuls are bound by streaming the weights from memory, and how fast that goes
# depends on the layout MKL is handed (measured on a 2-core AVX2 EPYC, the 17 matmuls of
# a depth-4 step from a cold cache):
# - 1 or 2 rows: stored (out, in) as nn.Linear keeps it, each output is a dot product
#   over one row and streams at ~5 GB/s; stored (in, out), the product is a sum of
#   contiguous rows scaled by the input: 3.5 -> 2.6 ms (the (8192, 256) head 1.4 -> 0.5 ms).
# - 3 to 64 rows: MKL's sgemm re-packs the weight on every call; oneDNN's prepacked
#   format skips that: 8.8 -> 5.6 ms at 16 rows, 8.5 -> 4.1 ms at 4 (fp32; bf16 keeps
#   F.linear, which already runs on oneDNN).
# The copies are made on the first decode step and kept on the module (not in its state)
# until a weight changes; they cost the decoded weights' memory once more per layout, up
# to NANOCHAT_DECODE_WEIGHTS_MB in all (default 4096; 0 turns the copies off), past which
# the remaining matrices use F.linear as they are.
FEW_ROWS = 2
DECODE_ROWS = 64
DECODE_WEIGHTS_MB_DEFAULT = 4096
_onednn_failed: list[str] = []  # set when oneDNN's prepacked linear is unavailable here
_decode_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner module -> bytes it caches


def _decode_budget_bytes() -> int:
    raw = os.environ.get("NANOCHAT_DECODE_WEIGHTS_MB", str(DECODE_WEIGHTS_MB_DEFAULT))
    try:
        return max(int(raw), 0) << 20
    except ValueError:
        raise UserError(f"NANOCHAT_DECODE_WEIGHTS_MB={raw!r} is not a whole number of MiB (0 turns "
                        "the decoding weight copies off)") from None


def _decode_sized(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.numel() <= DECODE_ROWS * x.size(-1) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _cached_weight(owner: nn.Module, kind: str, dtype: torch.dtype, weights: tuple[Tensor, ...],
                   make) -> Tensor | None:
    """make(weights) cached on `owner` under `kind` until a weight changes (optimizer
    steps and load_state_dict bump a tensor's version; a cast swaps its storage); None
    when the copy would exceed the memory budget. Weights made under inference_mode have
    no version: they are not cached (made per call)."""
    if any(w.is_inference() for w in weights):
        return make(weights)
    key = (dtype, *((w.data_ptr(), w._version) for w in weights))
    cache = owner.__dict__.setdefault("_decode_weights", {})  # a plain attribute: not a parameter, buffer or state
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        size = sum(w.numel() for w in weights) * dtype.itemsize
        held = sum(_decode_bytes.values()) - (hit[1].nbytes if hit is not None else 0)
        if held + size > _decode_budget_bytes():
            return None
        with torch.no_grad():
            hit = cache[kind] = (key, make(weights))
        _decode_bytes[owner] = sum(t.nbytes for _, t in cache.values())
    return hit[1]


def _stacked(weights: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """[w1; w2; ...] (sum of outs, in) in dtype."""
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    return w.to(dtype)


def decode_matmul(owner: nn.Module, x: Tensor, *weights: Tensor) -> Tensor:
    """x @ [w1; w2; ...]^T for decode-sized CPU inference (x: (..., in), at most
    DECODE_ROWS rows), with each weight layout cached on `owner` (see above); several
    weights give their outputs side by side (q, k and v in one product)."""
    rows, dtype = x.numel() // x.size(-1), x.dtype
    if rows <= FEW_ROWS:
        row_major = _cached_weight(owner, "row_major", dtype, weights, lambda ws: _stacked(ws, dtype).t().contiguous())
        if row_major is not None:
            return x @ row_major
    elif dtype == torch.float32 and not _onednn_failed:
        try:
            packed = _cached_weight(owner, "onednn", dtype, weights,
                                    lambda ws: torch.ops.mkldnn._reorder_linear_weight(_stacked(ws, dtype), 16))
            if packed is not None:
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.size(-1)), packed, None, "none", [], "")
                return y.view(*x.shape[:-1], y.size(-1))
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # a torch built without oneDNN
            _onednn_failed.append(f"{type(e).__name__}: {e}")
            log.info("oneDNN prepacked linear unavailable (%s); decoding uses F.linear", _onednn_failed[0])
    # past the budget, or no faster layout for this case: the weights as they are
    if len(weights) == 1:
        return F.linear(x, weights[0].to(dtype))
    return torch.cat([F.linear(x, w.to(dtype)) for w in weights], dim=-1)


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


# In eager mode the elementwise helpers below run hand-written kernels (row-blocked,
# fewer temporaries, leaner backward; see nanochat/kernels/cpu.py for why and for
# each one's reference formula). Under torch.compile they run that reference formula,
# which the compiler fuses itself. So does inference on a few rows (a decode step):
# there the kernels' per-call overhead outweighs the temporaries they save, and for
# norm, residual_mix and the MLP the plain formula gives the same bits.

def _small_inference(x: Tensor) -> bool:
    return x.numel() <= cpu_kernels.SMALL_INFERENCE_ELEMENTS and not torch.is_grad_enabled()


def _plain(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or _small_inference(x)


def norm(x: Tensor, scale: float = 1.0) -> Tensor:
    """RMSNorm over the last dimension, no learnable gain, times `scale`; x's dtype.
    Bitwise equal to F.rms_norm(x) * scale on every path."""
    if _plain(x):
        y = F.rms_norm(x, (x.size(-1),))
        return y * scale if scale != 1.0 else y
    return cpu_kernels.rms_norm(x, scale)


def rope_norm(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
    """scale * rms_norm(apply_rotary(x, cos, sin)) for q or k (B, T, H, D)."""
    if torch.compiler.is_compiling():
        return norm(apply_rotary(x, cos, sin), scale)
    return cpu_kernels.rope_norm(x, cos, sin, scale)


def residual_mix(x: Tensor, x0: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a * x + b * x0 (x0: the normalized embedding), the same numbers on every path."""
    if _plain(x):
        return torch.addcmul(x * a, x0, b)
    return cpu_kernels.residual_mix(x, x0, a, b)


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
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = rotary
        decoding = _decode_sized(x)
        if decoding:  # a decode step on a CPU: q, k and v from one product
            qkv = decode_matmul(self, x, self.c_q.weight, self.c_k.weight, self.c_v.weight)
            qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)
            v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            # value residual: v += gate * ve, one gate in (0, 3) per token and kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        if decoding:  # rotary + QK norm act per head, so q's and k's heads go through it together
            q, k = rope_norm(qk, cos, sin, QK_SCALE).split([H, Hkv], dim=2)
        else:
            q, k = rope_norm(q, cos, sin, QK_SCALE), rope_norm(k, cos, sin, QK_SCALE)  # rotary, then QK norm
        y = attend(q, k, v, window, kv_cache, self.layer_idx, masks)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, -1))


# -----------------------------------------------------------------------------
# MLP and block

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        if type(self.c_proj) is Linear and not _small_inference(h):
            return cpu_kernels.relu_squared_proj(h, self.c_proj.weight)  # relu(h)^2 @ w^T, keeps only h
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
        prev = prev if prev.dtype == x.dtype else prev.to(x.dtype)
        before = prev if x.size(1) == 1 else torch.cat([prev, x[:, :-1]], dim=1)  # (B, T, C)
        return x + lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS])) * before

    def hidden_states(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Final normalized hidden states (B, T, n_embd) in the compute dtype; advances
        kv_cache by T when given."""
        x = self._trunk(idx, self._rotary(idx, kv_cache), kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return x

    def decode_logits(self, idx: Tensor, kv_cache: KVCache, step=None) -> Tensor:
        """fp32 logits (B, vocab_size) of the last of the tokens idx (B, T) that follow
        kv_cache's positions; advances the cache. step: a compiled `decode_graph` (see
        Engine(compile=True)); None runs it eagerly. Everything that depends on the
        cache's Python-int position happens here, outside the graph."""
        rotary = self._rotary(idx, kv_cache)
        kv_cache.check_room(idx.size(1))  # here: the graph's writes do not check
        logits = (step or self.decode_graph)(idx, rotary, kv_cache)
        kv_cache.advance(idx.size(1))
        return logits

    def decode_graph(self, idx: Tensor, rotary: tuple[Tensor, Tensor], kv_cache: KVCache) -> Tensor:
        """The part of a decode step that torch.compile captures: with a static cache its
        shapes are the same at every step."""
        return self.logits(self._trunk(idx, rotary, kv_cache)[:, -1])

    def _rotary(self, idx: Tensor, kv_cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """cos, sin (1, T, 1, hd/2) of the positions idx (B, T) takes after the cache's."""
        T = idx.size(1)
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        if pos + T > self.cos.size(1):
            raise ValueError(f"position {pos + T} is beyond the rotary tables ({self.cos.size(1)} = "
                             f"{ROPE_LENGTH_FACTOR} x sequence_len); use shorter inputs")
        if idx.device != self.cos.device:
            raise ValueError(f"input is on {idx.device} but the model is on {self.cos.device}")
        return self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]

    def _trunk(self, idx: Tensor, rotary: tuple[Tensor, Tensor], kv_cache: KVCache | None) -> Tensor:
        """Embeddings -> blocks -> final norm, for idx (B, T) at the rotary's positions;
        leaves advancing the cache to the caller."""
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))  # (B, T, C)
        if kv_cache is None:
            x = self._smear(x, None)
        else:
            prev, kv_cache.prev_embedding = kv_cache.prev_embedding, x[:, -1:].clone(memory_format=torch.contiguous_format)
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
        return norm(x - self.backout_lambda.to(x.dtype) * x_mid)

    def logits(self, x: Tensor) -> Tensor:
        """Hidden states (..., C) -> softcapped fp32 logits (..., vocab_size)."""
        z = self.lm_head(x)[..., :self.config.vocab_size].float()
        if torch.is_grad_enabled():
            return LOGIT_SOFTCAP * torch.tanh(z / LOGIT_SOFTCAP)
        return z.div_(LOGIT_SOFTCAP).tanh_().mul_(LOGIT_SOFTCAP)  # the same ops, in place (z is a fresh tensor)

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
            return cpu_kernels.head_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         self.config.vocab_size, LOGIT_SOFTCAP, loss_reduction,
                                         chunk_rows=self.loss_chunk_rows, ignore_index=IGNORE_INDEX)
        logits = self.logits(x)  # (B, T, V) fp32
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)

    def shares_prompt_cache(self) -> bool:
        """Whether `make_kv_cache(..., prefix=)` shares the prompt's cache between rows
        (SDPA in fp32) rather than copying it into each (FA3 reads one contiguous cache;
        in low precision the shared path would round the attention scores)."""
        return self.compute_dtype == torch.float32 and not select_backend(self.get_device(), self.compute_dtype)[0]

    def make_kv_cache(self, batch_size: int, seq_len: int, prefix: KVCache | None = None,
                      static: bool = False) -> KVCache:
        """An empty KV cache for this model (its heads, dims, device, compute dtype, and
        the layout of the attention kernel that will read it) for seq_len positions.

        prefix: a filled batch-1 cache (the prompt) that every row continues: shared by
        the rows where `shares_prompt_cache()` (they read one copy of the prompt's keys,
        see KVCache), else copied into every row. Either way the cache starts at the
        prompt's position and holds seq_len in all.

        static: fixed shapes for a compiled decode step (see KVCache), in SDPA's layout;
        rows share a static prefix as above, and get copies of any other."""
        c = self.config
        device, dtype = self.get_device(), self.compute_dtype
        layout = "bthd" if select_backend(device, dtype)[0] and not static else "bhtd"
        shape = dict(num_heads=c.n_kv_head, head_dim=c.head_dim, num_layers=c.n_layer, device=device, dtype=dtype,
                     layout=layout)
        if (prefix is not None and batch_size > 1 and self.shares_prompt_cache()
                and static == prefix.static):
            return KVCache(batch_size=batch_size, seq_len=max(seq_len - prefix.get_pos(), 0), prefix=prefix,
                           static=static, **shape)
        cache = KVCache(batch_size=batch_size, seq_len=seq_len, static=static, **shape)
        if prefix is not None:
            cache.prefill(prefix)
        return cache

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
                        adam_betas: tuple[float, float] | None = None, ns_dtype: torch.dtype | None = None,
                        muon_eq: bool = False, muon_plus: bool = False):
        """MuonAdamW over `optimizer_groups(...)`, each group's "initial_lr" set to its lr.

        ns_dtype: dtype of Muon's Polar Express matmuls. None follows the compute dtype:
        bf16 when the model computes in bf16 (the reference's choice, on GPUs and CPUs with
        native bf16), fp32 otherwise: on a CPU without native bf16 (AVX2 only) bf16 matmuls
        are emulated ~100x slower than fp32 and the optimizer step dominated training.
        muon_eq, muon_plus: upstream's MuonEq and Muon+ refinements of the Muon step (see
        nanochat.optim); both off is the reference's optimizer."""
        from nanochat.optim import MuonAdamW
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        optimizer = MuonAdamW(self.optimizer_groups(unembedding_lr, embedding_lr, matrix_lr, weight_decay,
                                                    scalar_lr, adam_betas), ns_dtype=ns_dtype,
                              muon_eq=muon_eq, muon_plus=muon_plus)
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
