"""
Causal self-attention kernels and the KV cache.

One entry point, `attend(q, k, v, window, kv_cache, layer, masks)`, used by every layer
of the model for training, prefill and decoding. It runs

- Flash Attention 3 (Shah et al. 2024, https://arxiv.org/abs/2407.08608) when the
  tensors are bf16 on a CUDA GPU it has a build for, loaded through the `kernels` package
  (the `gpu` extra) from the Hugging Face hub: the Hopper build the reference uses on SM90,
  the community build on Ampere and Ada (SM80-89), none from SM100 on (Blackwell, RTX 50xx:
  a build that "loads" there fails at its first kernel), see `fa3_kernel_for`;
- PyTorch's `scaled_dot_product_attention` (SDPA) everywhere else: CPU, MPS, other GPUs,
  fp32/fp16.

Both give the same result: causal attention where query position i sees key positions
j with i - window <= j <= i (`window` < 0: no limit), grouped-query attention when K/V
have fewer heads than Q (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245), and the
default 1/sqrt(head_dim) softmax scale. Layout everywhere is (B, T, H, D), FA3's native
one; SDPA gets transposed views.

The SDPA path never builds a mask it can avoid: a window that covers the whole sequence
is plain `is_causal=True`; a single decoded token attends to a slice of the last
window + 1 cached keys with no mask; the remaining cases (sliding windows in training,
multi-token prefill into a non-empty cache) build one boolean (Tq, Tk) mask per distinct
(Tq, Tk, window) and share it through the `masks` dict that the model creates once per
forward pass, so a 12-layer "SSSL" model builds one mask, not nine.

Nothing is probed at import: FA3 is looked up on the first bf16 CUDA call, and the
chosen path (with the reason when it is SDPA) is logged once.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nanochat.errors import UserError

log = logging.getLogger("nanochat.attention")

_BACKENDS = ("auto", "fa3", "sdpa")
_backend = "auto"  # tests and benchmarks switch it with set_backend()
_fa3: tuple[Any, str] | None = None  # (FA3 interface or None, reason), after the first lookup
_logged: set[str] = set()


# -----------------------------------------------------------------------------
# Backend selection

def set_backend(name: str) -> str:
    """Force "fa3" or "sdpa", or go back to "auto"; returns the previous setting."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {_BACKENDS}")
    previous, _backend = _backend, name
    return previous


def _load_fa3() -> tuple[Any, str]:
    """(FA3 interface module or None, reason). Looked up once per process; a plain
    global rather than lru_cache so torch.compile reads it as a constant."""
    global _fa3
    if _fa3 is None:
        _fa3 = _lookup_fa3()
    return _fa3


FA3_HOPPER_KERNEL = "varunneal/flash-attention-3"    # sm90, the build the reference uses
FA3_COMMUNITY_KERNEL = "kernels-community/flash-attn3"  # sm80-sm89 (Ampere, Ada)


def fa3_kernel_for(capability: tuple[int, int]) -> tuple[str | None, str]:
    """(hub repository of the FA3 build for this compute capability or None, why)."""
    major, minor = capability
    if major == 9:
        return FA3_HOPPER_KERNEL, f"SM{major}{minor} (Hopper): the Hopper FA3 build"
    if major == 8:
        return FA3_COMMUNITY_KERNEL, f"SM{major}{minor} (Ampere/Ada): the community FA3 build"
    if major >= 10:
        return None, f"SM{major}{minor}: no FA3 build runs there yet (one that loads fails at its first kernel)"
    return None, f"SM{major}{minor} predates FA3 (Ampere SM80 or newer needed)"


def _lookup_fa3() -> tuple[Any, str]:
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    repo, why = fa3_kernel_for(torch.cuda.get_device_capability())
    if repo is None:
        return None, why
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel
        module = get_kernel(repo)
        # the Hopper build nests its API one level down; the community build exposes it directly
        return getattr(module, "flash_attn_interface", module), f"loaded {repo} ({why})"
    except ImportError:
        return None, (f"{why}, but the `kernels` package is not installed (pip install 'nanochat[gpu]'; "
                      "runs/speedrun.sh does)")
    except Exception as e:  # no network, ABI mismatch: both mean "use SDPA"
        return None, f"could not load {repo} through the `kernels` package ({type(e).__name__}: {e})"


def fa3_available() -> bool:
    """True when Flash Attention 3 can run here (Hopper GPU and the kernel loads)."""
    return _load_fa3()[0] is not None


def select_backend(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(use FA3?, a sentence saying which kernel runs and why) for tensors on `device`
    in `dtype`. The model logs it when built; `attend` decides with it on every call."""
    if _backend == "sdpa":
        return False, "attention: PyTorch SDPA (forced)"
    if _backend == "fa3":
        if not fa3_available():
            raise UserError(f"attention backend 'fa3' was forced but FA3 is unavailable: {_load_fa3()[1]}")
        return True, "attention: Flash Attention 3 (forced)"
    if device.type != "cuda":
        return False, f"attention: PyTorch SDPA (FA3 needs a Hopper GPU; tensors are on {device.type})"
    fa3, reason = _load_fa3()
    if fa3 is None:
        return False, f"attention: PyTorch SDPA ({reason})"
    if dtype != torch.bfloat16:
        return False, f"attention: PyTorch SDPA (FA3 runs bf16 only, compute dtype is {dtype})"
    return True, f"attention: Flash Attention 3 ({reason})"


def log_backend(device: torch.device, dtype: torch.dtype) -> bool:
    """Log (once per distinct reason) which kernel attention uses; returns use-FA3."""
    use, why = select_backend(device, dtype)
    if why not in _logged and not torch.compiler.is_compiling():  # no logging inside traced code
        _logged.add(why)
        log.info(why)
    return use


# (device, dtype, forced backend, FA3 lookup) -> use FA3: attend asks once per layer and token
_decided: dict[tuple, bool] = {}


def _use_fa3(q: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return log_backend(q.device, q.dtype)
    key = (q.device, q.dtype, _backend, id(_fa3))
    use = _decided.get(key)
    if use is None:
        use = _decided[key] = log_backend(q.device, q.dtype)
    return use


# -----------------------------------------------------------------------------
# The KV cache

class KVCache:
    """Pre-allocated keys and values of every layer, in FA3's layout.

    k_cache, v_cache: (num_layers, batch_size, seq_len, num_heads, head_dim) in `dtype`,
    which must be the model's compute dtype (`GPT.make_kv_cache` gets it right).
    cache_seqlens: (batch_size,) int32, the number of filled positions (FA3 reads it);
    every row is at the same position. prev_embedding: (batch_size, 1, n_embd), the last
    token's normalized embedding, which the model's smear gate mixes into the next one.
    The model writes each layer's new keys/values in `attend` and calls `advance(T)` once
    per forward pass.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.pos = 0  # = cache_seqlens[0], kept as a Python int: reading the tensor costs a sync per layer
        self.prev_embedding: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    def reset(self) -> None:
        self.cache_seqlens.zero_()
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self) -> int:
        """Number of positions already filled (the same for every row)."""
        return self.pos

    def get_layer_cache(self, layer: int) -> tuple[Tensor, Tensor]:
        """(k, v) views of one layer, each (batch_size, seq_len, num_heads, head_dim)."""
        return self.k_cache[layer], self.v_cache[layer]

    def advance(self, num_tokens: int) -> None:
        self.cache_seqlens += num_tokens
        self.pos += num_tokens

    def prefill(self, other: KVCache) -> None:
        """Copy a filled cache (usually batch 1, the prompt) into this empty one, repeating
        its rows across this cache's batch, so many samples can continue one prompt."""
        if self.get_pos() != 0:
            raise ValueError("prefill() needs an empty cache; call reset() first")
        if (self.n_layers, self.n_heads, self.head_dim) != (other.n_layers, other.n_heads, other.head_dim):
            raise ValueError(f"cache shapes differ: layers/heads/head_dim {(self.n_layers, self.n_heads, self.head_dim)} "
                             f"vs {(other.n_layers, other.n_heads, other.head_dim)}")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot spread a batch-{other.batch_size} cache over {self.batch_size} rows")
        pos = other.get_pos()
        if pos > self.max_seq_len:
            raise ValueError(f"the source cache holds {pos} positions, this one only {self.max_seq_len}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        self.pos = pos
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()


# -----------------------------------------------------------------------------
# SDPA path

def causal_window_mask(tq: int, tk: int, window: int, device: torch.device) -> Tensor:
    """(tq, tk) bool, True where attention is allowed. The tq queries are the last tq of
    the tk positions; query i sits at absolute position tk - tq + i."""
    rows = torch.arange(tk - tq, tk, device=device).unsqueeze(1)  # (tq, 1)
    cols = torch.arange(tk, device=device).unsqueeze(0)  # (1, tk)
    mask = cols <= rows
    if 0 <= window < tk - 1:
        mask &= cols >= rows - window
    return mask


def _sdpa(q: Tensor, k: Tensor, v: Tensor, window: int, masks: dict | None) -> Tensor:
    """q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with the queries the last Tq positions."""
    tq, tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    unlimited = window < 0 or window >= tk - 1
    if tq == 1:
        # decoding one token: it may see every cached key, so a slice replaces the mask
        if not unlimited:
            kt, vt = kt[:, :, tk - window - 1:], vt[:, :, tk - window - 1:]
        y = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    elif tq == tk and unlimited:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        key = (tq, tk, window if not unlimited else -1)
        mask = None if masks is None else masks.get(key)
        if mask is None:
            mask = causal_window_mask(tq, tk, key[2], q.device)
            if masks is not None:
                masks[key] = mask
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# The entry point

def attend(q: Tensor, k: Tensor, v: Tensor, window: int, kv_cache: KVCache | None = None,
           layer: int = 0, masks: dict | None = None) -> Tensor:
    """Causal (sliding-window) attention; returns (B, T, H, D).

    q: (B, T, H, D); k, v: (B, T, Hkv, D) with H a multiple of Hkv.
    window: how many earlier positions each query may also see (< 0: all of them).
    kv_cache: when given, k and v are written into `layer`'s cache at its current position
      and the queries attend over everything cached so far; the caller advances the cache.
    masks: a dict shared by the layers of one forward pass, where SDPA keeps the masks
      it had to build (None: build fresh each call).
    """
    if kv_cache is not None and kv_cache.dtype != q.dtype:
        raise ValueError(f"the KV cache holds {kv_cache.dtype} but attention runs in {q.dtype}; "
                         "build the cache with dtype=model.compute_dtype (GPT.make_kv_cache does)")
    if _use_fa3(q):
        fa3 = _load_fa3()[0]
        if kv_cache is None:
            return fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        k_cache, v_cache = kv_cache.get_layer_cache(layer)
        return fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                           causal=True, window_size=(window, 0))
    if kv_cache is None:
        return _sdpa(q, k, v, window, masks)
    pos, t = kv_cache.get_pos(), q.size(1)
    if pos + t > kv_cache.max_seq_len:
        raise ValueError(f"the KV cache holds {kv_cache.max_seq_len} positions; {pos} are used and {t} more "
                         "do not fit; build a longer cache")
    k_cache, v_cache = kv_cache.get_layer_cache(layer)
    k_cache[:, pos:pos + t] = k
    v_cache[:, pos:pos + t] = v
    return _sdpa(q, k_cache[:, :pos + t], v_cache[:, :pos + t], window, masks)
