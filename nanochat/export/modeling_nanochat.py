"""
A nanochat GPT as a Hugging Face `transformers` causal LM (PreTrainedModel + GenerationMixin).

This file is copied verbatim into every exported model directory and loaded there with
`trust_remote_code=True`; it needs only torch and transformers, never `nanochat`. It is
the same network as `nanochat/gpt.py` written in plain PyTorch, so the two give the same
logits (tests check 1e-4 in fp32):

- token embedding -> parameter-free RMSNorm -> smear (the previous token's embedding
  mixed in through the gate smear_lambda * sigmoid(W x[:24]))
- before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the smeared embedding)
- attention: q, k, v projections; on value-embedding layers (alternating, the last
  included) v += 3 * sigmoid(W x[:12]) * value_embed(token) per kv head (ResFormer);
  rotary (base 100000, channel c paired with c + head_dim/2), then RMSNorm of q and k
  times 1.2; grouped-query attention; causal with a per-layer left window
- MLP: relu(x W1)^2 W2 (4x wide); no biases anywhere
- backout: the stream after block n_layer // 2, times backout_lambda, is subtracted
  before the final RMSNorm
- untied head over the vocabulary padded to a multiple of 64, cropped back to
  vocab_size, then softcapped 15 * tanh(z / 15) in fp32

The KV cache is transformers' own (`DynamicCache` by default): every layer keeps all
its keys and the window is applied as a mask, in prefill and in decoding alike. The
smear needs the token before the first new one; `generate` passes it as `smear_ids`
(and the model also remembers it on the cache for hand-written decoding loops).

Limits: rotary positions count from the start of the cache, so in a left-padded batch
the padding is masked out as keys but still shifts positions (and feeds the first real
token's smear); generate unpadded prompts (or one at a time) for exact results.
Beam search reorders the cache but not the remembered token: use greedy or sampling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5: init functions that skip tensors already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

from .configuration_nanochat import NanochatConfig

_LAST_IDS = "_nanochat_last_ids"  # attribute on the cache: the last token fed, for the next smear


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dimension, no learnable gain (eps: the dtype's epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(start: int, length: int, head_dim: int, base: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (1, length, 1, head_dim/2) for positions start..start+length-1, computed
    in fp32 (angle t * base^(-2c/head_dim)) and cast to `dtype`."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    t = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (c, c + D/2) of x (B, T, H, D)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    return layer % 2 == (n_layer - 1) % 2


class NanochatAttention(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.gate_channels = config.ve_gate_channels
        c, kv = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = nn.Linear(c, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(c, kv, bias=False)
        self.c_v = nn.Linear(c, kv, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.ve_gate = (nn.Linear(config.ve_gate_channels, config.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x: Tensor, ve: Tensor | None, rotary: tuple[Tensor, Tensor], mask: Tensor,
                cache: Cache | None) -> Tensor:
        B, T, _ = x.shape  # x: (B, T, C), normalized
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))  # (B, T, Hkv) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = rotary
        q = rms_norm(apply_rotary(q, cos, sin)) * self.qk_scale  # rotary, then QK norm
        k = rms_norm(apply_rotary(k, cos, sin)) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, past + T, D)
        if self.n_kv_head != self.n_head:
            # query head h reads kv head h // (n_head / n_kv_head)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanochatMLP(nn.Module):
    def __init__(self, config: NanochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class NanochatBlock(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int):
        super().__init__()
        self.attn = NanochatAttention(config, layer_idx)
        self.mlp = NanochatMLP(config)

    def forward(self, x: Tensor, ve: Tensor | None, rotary: tuple[Tensor, Tensor], mask: Tensor,
                cache: Cache | None) -> Tensor:
        x = x + self.attn(rms_norm(x), ve, rotary, mask, cache)
        return x + self.mlp(rms_norm(x))


class NanochatPreTrainedModel(PreTrainedModel):
    config_class = NanochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanochatBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # only reached for tensors missing from a checkpoint (or a model built from a config)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, NanochatModel):
            _init.ones_(module.resid_lambdas)
            _init.zeros_(module.x0_lambdas)
            _init.zeros_(module.smear_lambda)
            _init.constant_(module.backout_lambda, 0.2)


class NanochatModel(NanochatPreTrainedModel):
    """The network up to the final norm: hidden states (B, T, n_embd)."""

    def __init__(self, config: NanochatConfig):
        super().__init__(config)
        c, n = config.n_embd, config.n_layer
        kv_dim = config.n_kv_head * (c // config.n_head)
        self.wte = nn.Embedding(config.padded_vocab_size, c)
        self.h = nn.ModuleList([NanochatBlock(config, i) for i in range(n)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.padded_vocab_size, kv_dim)
                                           for i in range(n) if has_value_embedding(i, n)})
        self.resid_lambdas = nn.Parameter(torch.ones(n))
        self.x0_lambdas = nn.Parameter(torch.zeros(n))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.windows = config.window_sizes()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _smear(self, x: Tensor, prev: Tensor | None) -> Tensor:
        """x: (B, T, C) normalized embeddings; prev: (B, 1, C), the embedding of the token
        before x[:, 0], or None at the start of a sequence."""
        ch = self.config.smear_channels
        lam = self.smear_lambda.to(x.dtype)
        if prev is None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :ch]))  # (B, T-1, 1)
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        before = prev if x.size(1) == 1 else torch.cat([prev, x[:, :-1]], dim=1)  # (B, T, C)
        return x + lam * torch.sigmoid(self.smear_gate(x[..., :ch])) * before

    def _masks(self, past: int, T: int, attention_mask: Tensor | None, device) -> dict[int, Tensor]:
        """window -> bool mask (B or 1, 1, T, past + T), True where query i (at position
        past + i) may see key j: j <= past + i and j >= past + i - window, and key j is
        not padding. A query always sees itself, so no row is empty."""
        q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k = torch.arange(past + T, device=device)[None, :]  # (1, Tk)
        pad = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            pad = attention_mask[:, -(past + T):].bool()[:, None, None, :]  # (B, 1, 1, Tk)
        masks = {}
        for w in set(self.windows):
            m = (k <= q) & (k >= q - w)
            m = m[None, None]
            if pad is not None:
                m = (m & pad) | (k == q)[None, None]
            masks[w] = m
        return masks

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: Cache | None = None,
                smear_ids: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = rms_norm(self.wte(input_ids))  # (B, T, C)
        prev = None
        if past > 0:
            if smear_ids is None:
                smear_ids = getattr(cache, _LAST_IDS, None)
            if smear_ids is None:
                raise ValueError("decoding after a filled cache needs the previous token: pass smear_ids (B, 1) "
                                 "or use a cache this model filled")
            prev = rms_norm(self.wte(smear_ids.to(input_ids.device)))  # (B, 1, C)
        if cache is not None:
            setattr(cache, _LAST_IDS, input_ids[:, -1:])
        x = self._smear(x, prev)
        x0 = x
        head_dim = self.config.n_embd // self.config.n_head
        rotary = rotary_tables(past, T, head_dim, self.config.rope_base, x.device, x.dtype)
        masks = self._masks(past, T, attention_mask, x.device)
        backout_layer = self.config.n_layer // 2
        x_mid = x
        for i, block in enumerate(self.h):
            x = torch.addcmul(x * self.resid_lambdas[i].to(x.dtype), x0, self.x0_lambdas[i].to(x.dtype))
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, rotary, masks[self.windows[i]], cache)
            if i == backout_layer:
                x_mid = x
        return rms_norm(x - self.backout_lambda.to(x.dtype) * x_mid)


class NanochatForCausalLM(NanochatPreTrainedModel, GenerationMixin):
    """The nanochat GPT with its head: softcapped fp32 logits over the real vocabulary."""

    def __init__(self, config: NanochatConfig):
        super().__init__(config)
        self.model = NanochatModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.size(1) < input_ids.size(1):
            n = new.size(1)
            inputs["smear_ids"] = input_ids[:, -n - 1:-n]  # the token before the uncached ones
        return inputs

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                smear_ids: Tensor | None = None, return_dict: bool | None = None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab_size) fp32. Positions continue from the
        cache (position_ids are ignored: rotary positions are the cache length onwards)."""
        if input_ids is None:
            raise ValueError("this model needs input_ids (its value embeddings and smear read the token ids); "
                             "inputs_embeds alone are not supported")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.model(input_ids, attention_mask=attention_mask, cache=cache if use_cache else None,
                       smear_ids=smear_ids)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            x = x[:, logits_to_keep]
        z = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(z / cap)
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = {"loss": loss, "logits": logits}
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        out[field] = cache if use_cache else None
        if return_dict is False:
            return tuple(v for v in (loss, logits, out[field]) if v is not None)
        return CausalLMOutputWithPast(**out)


__all__ = ["NanochatConfig", "NanochatForCausalLM", "NanochatModel", "NanochatPreTrainedModel"]
