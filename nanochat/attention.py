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

LAYOUTS = ("bthd", "bhtd")


class KVCache:
    """Pre-allocated keys and values of every layer.

    k_cache, v_cache: (num_layers, batch_size, seq_len, num_heads, head_dim) in layout
    "bthd" (FA3's, which reads the cache in place), or (num_layers, batch_size, num_heads,
    seq_len, head_dim) in layout "bhtd" (SDPA's: each head's keys are one contiguous
    block, so a decode step reads them without gathering; `GPT.make_kv_cache` picks the
    layout of the kernel that will run). dtype must be the model's compute dtype.
    cache_seqlens: (batch_size,) int32, the number of filled positions (FA3 reads it);
    every row is at the same position. prev_embedding: (batch_size, 1, n_embd), the last
    token's normalized embedding, which the model's smear gate mixes into the next one.
    The model writes each layer's new keys/values in `attend` and calls `advance(T)` once
    per forward pass.

    prefix: a filled batch-1 cache (same layers, heads, dims, dtype, layout "bhtd") whose
    positions come before this cache's own: many samples continuing one prompt read the
    prompt's keys from that one copy instead of batch_size copies (on a CPU a decode
    step's attention is bound by reading the cache, so this divides its cost by about the
    batch size while the prompt dominates). Positions count from the start of the prompt
    (`get_pos()` includes it); seq_len counts this cache's own positions only.

    static: a decode step (one token per row) keeps every shape fixed, so that a compiled
    step is one graph for the whole generation (and for every later one with the same
    batch and capacity): the new keys are written at the tensor `own_position` (this
    cache's own index; `position` is the absolute one) with index_copy_, and attention
    reads all seq_len positions, masking those not yet written (and those outside a
    sliding window), instead of slicing the cache to a Python-int length, which would
    change the shapes at every step. Layout "bhtd", SDPA. A static cache's prefix is a
    static batch-1 cache too: its unwritten tail is masked the same way, so prompts of
    any length up to its capacity share one graph. Prefills (more than one token) take
    the ordinary path.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str, dtype: torch.dtype, layout: str = "bthd",
                 prefix: KVCache | None = None, static: bool = False):
        if layout not in LAYOUTS:
            raise ValueError(f"KV cache layout {layout!r} is not one of {LAYOUTS}")
        if static and (layout != "bhtd" or (prefix is not None and not prefix.static)):
            raise ValueError("a static KV cache has layout 'bhtd', and its shared prefix is static too")
        if prefix is not None and prefix.static and not static:
            raise ValueError("a static prefix is read by a static cache only")
        self.batch_size = batch_size
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.layout = layout
        shape = ((num_layers, batch_size, seq_len, num_heads, head_dim) if layout == "bthd"
                 else (num_layers, batch_size, num_heads, seq_len, head_dim))
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self._layers = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))  # per-layer views, made once
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prefix: KVCache | None = None
        self.prefix_len = 0
        self.pos = 0  # = cache_seqlens[0], kept as a Python int: reading the tensor costs a sync per layer
        self.prev_embedding: Tensor | None = None
        self.static = static
        if static:
            self.position = torch.zeros(1, dtype=torch.long, device=device)  # = pos, as a tensor a graph can read
            self.own_position = torch.zeros(1, dtype=torch.long, device=device)  # = pos - prefix_len
            self.key_positions = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, seq_len): SDPA's (Tq, Tk)
        if prefix is not None:
            self._attach(prefix)

    def _attach(self, prefix: KVCache) -> None:
        if self.layout != "bhtd" or prefix.layout != "bhtd":
            raise ValueError("a shared prefix needs layout 'bhtd' on both caches (FA3 reads one contiguous cache)")
        if prefix.batch_size != 1 or prefix.prefix is not None:
            raise ValueError("the shared prefix must be a batch-1 cache without a prefix of its own")
        self._check_compatible(prefix)
        self.prefix, self.prefix_len = prefix, prefix.get_pos()
        self.pos = self.prefix_len
        self.cache_seqlens.fill_(self.pos)
        if self.static:
            self.position.fill_(self.pos)
        if prefix.prev_embedding is not None:
            self.prev_embedding = prefix.prev_embedding.expand(self.batch_size, -1, -1).clone()

    def _check_compatible(self, other: KVCache) -> None:
        mine = (self.n_layers, self.n_heads, self.head_dim)
        theirs = (other.n_layers, other.n_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cache shapes differ: layers/heads/head_dim {mine} vs {theirs}")
        if (self.layout, self.dtype) != (other.layout, other.dtype):
            raise ValueError(f"caches differ in layout/dtype: {(self.layout, self.dtype)} vs "
                             f"{(other.layout, other.dtype)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def _time_dim(self) -> int:
        """The positions' dimension of k_cache / v_cache."""
        return 2 if self.layout == "bthd" else 3

    @property
    def max_seq_len(self) -> int:
        """Positions this cache can hold, its prefix included."""
        return self.prefix_len + self.k_cache.size(self._time_dim)

    def reset(self) -> None:
        """Empty the cache (a shared prefix is let go)."""
        self.cache_seqlens.zero_()
        if self.static:
            self.position.zero_()
            self.own_position.zero_()
        self.pos = self.prefix_len = 0
        self.prefix = None
        self.prev_embedding = None

    def get_pos(self) -> int:
        """Number of positions already filled (the same for every row), prefix included."""
        return self.pos

    def get_layer_cache(self, layer: int) -> tuple[Tensor, Tensor]:
        """(k, v) storage of one layer in this cache's layout (its own positions only)."""
        return self._layers[layer]

    def check_room(self, t: int) -> None:
        """Raise unless t more positions fit. A static cache's decode step does not check
        (it runs inside a compiled graph, where an index_copy_ past the end is unchecked):
        GPT.decode_logits calls this before it."""
        if self.pos + t > self.max_seq_len:
            raise ValueError(f"the KV cache holds {self.max_seq_len} positions; {self.pos} are used and {t} more "
                             "do not fit; build a longer cache")

    def store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write k, v (B, T, Hkv, D) at the current position of `layer`."""
        t = k.size(1)
        if self.static and t == 1:  # at the tensor position: no Python int in a compiled step
            k_layer, v_layer = self._layers[layer]
            k_layer.index_copy_(2, self.own_position, k.transpose(1, 2))
            v_layer.index_copy_(2, self.own_position, v.transpose(1, 2))
            return
        self.check_room(t)
        own = self.pos - self.prefix_len
        k_layer, v_layer = self._layers[layer]
        if self.layout == "bthd":
            k_layer[:, own:own + t] = k
            v_layer[:, own:own + t] = v
        else:
            k_layer[:, :, own:own + t] = k.transpose(1, 2)
            v_layer[:, :, own:own + t] = v.transpose(1, 2)

    def heads_view(self, layer: int, end: int) -> tuple[Tensor, Tensor]:
        """(k, v) of `layer`, each (B, Hkv, positions, D), of this cache's own positions
        up to absolute position `end` (views, no copy)."""
        own = end - self.prefix_len
        k_layer, v_layer = self._layers[layer]
        if self.layout == "bthd":
            return k_layer[:, :own].transpose(1, 2), v_layer[:, :own].transpose(1, 2)
        return k_layer[:, :, :own], v_layer[:, :, :own]

    def decode_mask(self, window: int) -> Tensor:
        """(1, seq_len) bool for a static cache's decode step: its own positions written
        so far, the current one included, and within `window` of it (< 0: all)."""
        seen = self.key_positions <= self.own_position
        if window >= 0:
            seen &= self.key_positions >= self.own_position - window
        return seen

    def prefix_mask(self, window: int) -> Tensor:
        """(1, prefix capacity) bool: the shared prompt's written positions that the
        current position sees through `window` (< 0: all)."""
        prefix = self.prefix
        seen = prefix.key_positions < prefix.position
        if window >= 0:
            seen &= prefix.key_positions >= self.position - window
        return seen

    def advance(self, num_tokens: int) -> None:
        self.cache_seqlens += num_tokens
        if self.static:
            self.position += num_tokens
            self.own_position += num_tokens
        self.pos += num_tokens

    def prefill(self, other: KVCache) -> None:
        """Copy a filled cache (usually batch 1, the prompt) into this empty one, repeating
        its rows across this cache's batch, so many samples can continue one prompt."""
        if self.get_pos() != 0 or self.prefix is not None:
            raise ValueError("prefill() needs an empty cache; call reset() first")
        self._check_compatible(other)
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot spread a batch-{other.batch_size} cache over {self.batch_size} rows")
        if other.prefix is not None:
            raise ValueError("prefill() copies a cache without a shared prefix")
        pos = other.get_pos()
        if pos > self.max_seq_len:
            raise ValueError(f"the source cache holds {pos} positions, this one only {self.max_seq_len}")
        for mine, theirs in ((self.k_cache, other.k_cache), (self.v_cache, other.v_cache)):
            dst = mine.narrow(self._time_dim, 0, pos)
            dst.copy_(theirs.narrow(self._time_dim, 0, pos).expand_as(dst))
        self.cache_seqlens.fill_(pos)
        if self.static:
            self.position.fill_(pos)
            self.own_position.fill_(pos)
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
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with the queries the last Tq positions.
    Returns (B, H, Tq, D)."""
    tq, tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    unlimited = window < 0 or window >= tk - 1
    if tq == 1:
        # decoding one token: it may see every cached key, so a slice replaces the mask
        if not unlimited:
            k, v = k[:, :, tk - window - 1:], v[:, :, tk - window - 1:]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if tq == tk and unlimited:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    key = (tq, tk, window if not unlimited else -1)
    mask = None if masks is None else masks.get(key)
    if mask is None:
        mask = causal_window_mask(tq, tk, key[2], q.device)
        if masks is not None:
            masks[key] = mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _decode_after_prefix(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, k: Tensor, v: Tensor,
                         window: int, masks: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One decoded token per row attending over a shared prompt and its row's own keys.

    q: (B, 1, H, D); prefix_k/v: (1, Hkv, P, D), the prompt every row continues; k, v:
    (B, Hkv, S, D), each row's keys since the prompt (the newest included). Returns
    (B, 1, H, D). Softmax over the concatenated scores, so the result is the same
    attention as over the full keys (up to rounding): the prompt's part is one matmul of
    all B*H/Hkv queries of a kv head against that head's P keys, read once instead of B
    times. fp32 only (the scores are not kept in higher precision than the inputs).
    masks: (prefix mask (1, P), own mask (1, S)) for a static cache, whose unwritten and
    out-of-window positions are masked instead of sliced off (`window` is then unused)."""
    B, _, H, D = q.shape
    Hkv, P, S = k.size(1), prefix_k.size(2), k.size(2)
    if masks is None and 0 <= window < P + S - 1:  # a sliding window: only the last window + 1 keys are visible
        start = P + S - 1 - window
        if start >= P:
            return _sdpa(q.transpose(1, 2), k[:, :, start - P:], v[:, :, start - P:], -1, None).transpose(1, 2)
        prefix_k, prefix_v, P = prefix_k[:, :, start:], prefix_v[:, :, start:], P - start
    G = H // Hkv  # query heads per kv head; head h = kv * G + g
    qg = q.reshape(B, Hkv, G, D)
    shared = torch.matmul(qg.transpose(0, 1).reshape(Hkv, B * G, D), prefix_k[0].transpose(1, 2))  # (Hkv, B*G, P)
    own = torch.matmul(qg, k.transpose(2, 3))  # (B, Hkv, G, S)
    scores = torch.cat([shared.view(Hkv, B, G, P).transpose(0, 1), own], dim=-1)  # (B, Hkv, G, P + S)
    if masks is not None:
        scores.masked_fill_(~torch.cat(masks, dim=-1), float("-inf"))
    probs = torch.softmax(scores.mul_(D ** -0.5), dim=-1)
    y = torch.matmul(probs[..., P:], v)  # (B, Hkv, G, D)
    y_shared = torch.matmul(probs[..., :P].transpose(0, 1).reshape(Hkv, B * G, P), prefix_v[0])  # (Hkv, B*G, D)
    return y.add_(y_shared.view(Hkv, B, G, D).transpose(0, 1)).reshape(B, 1, H, D)


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
    if kv_cache is not None and kv_cache.static and q.size(1) == 1:
        # a fixed-shape decode step (see KVCache): every position, the unwritten masked
        kv_cache.store(layer, k, v)
        keys, values = kv_cache.get_layer_cache(layer)  # (B, Hkv, seq_len, D)
        key = ("static", window)
        step_masks = None if masks is None else masks.get(key)
        if step_masks is None:
            step_masks = (kv_cache.decode_mask(window),
                          None if kv_cache.prefix is None else kv_cache.prefix_mask(window))
            if masks is not None:
                masks[key] = step_masks
        own_mask, prefix_mask = step_masks
        if kv_cache.prefix is not None:
            prefix_k, prefix_v = kv_cache.prefix.get_layer_cache(layer)  # (1, Hkv, prefix capacity, D)
            return _decode_after_prefix(q, prefix_k, prefix_v, keys, values, window, (prefix_mask, own_mask))
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=own_mask,
                                              enable_gqa=q.size(2) != keys.size(1)).transpose(1, 2)
    if _use_fa3(q) and not (kv_cache is not None and kv_cache.static):  # a static cache's prefill: SDPA too
        fa3 = _load_fa3()[0]
        if kv_cache is None:
            return fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        if kv_cache.layout != "bthd" or kv_cache.prefix is not None:
            raise ValueError("FA3 reads a 'bthd' KV cache without a shared prefix; build the cache with "
                             "GPT.make_kv_cache, which picks the layout of the kernel that runs")
        k_cache, v_cache = kv_cache.get_layer_cache(layer)
        return fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                           causal=True, window_size=(window, 0))
    if kv_cache is None:
        return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, masks).transpose(1, 2)
    kv_cache.store(layer, k, v)
    end = kv_cache.get_pos() + q.size(1)
    keys, values = kv_cache.heads_view(layer, end)  # (B, Hkv, own positions, D)
    prefix = kv_cache.prefix
    if prefix is not None:
        prefix_k, prefix_v = prefix.heads_view(layer, prefix.get_pos())  # (1, Hkv, P, D)
        if q.size(1) == 1:
            return _decode_after_prefix(q, prefix_k, prefix_v, keys, values, window)
        # several tokens after a shared prompt (the engine never does this): gather the keys
        keys = torch.cat([prefix_k.expand(keys.size(0), -1, -1, -1), keys], dim=2)
        values = torch.cat([prefix_v.expand(values.size(0), -1, -1, -1), values], dim=2)
    return _sdpa(q.transpose(1, 2), keys, values, window, masks).transpose(1, 2)
