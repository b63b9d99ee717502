"""
Configuration of a nanochat GPT for Hugging Face `transformers`.

This file is copied verbatim into every exported model directory and loaded there with
`trust_remote_code=True`; it imports only `transformers`, never `nanochat`.
The field names are nanochat's (`n_layer`, `n_embd`, ...); `attribute_map` gives
transformers the standard names it looks for (`num_hidden_layers`, `hidden_size`, ...).
"""
from __future__ import annotations

try:  # transformers >= 5 renamed the base class; the old name stays as an alias for a while
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

SHORT_WINDOW_TILE = 128  # "S" windows are rounded up to a multiple of this (FA3's tile size)


def layer_windows(sequence_len: int, n_layer: int, window_pattern: str) -> list[int]:
    """Per-layer left window (earlier tokens a query sees besides itself): "L" layers see
    sequence_len back, "S" layers a quarter of it rounded up to 128; the last layer is "L"."""
    short = -(-sequence_len // 4 // SHORT_WINDOW_TILE) * SHORT_WINDOW_TILE
    pattern = window_pattern.upper()
    sizes = [sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(n_layer)]
    sizes[-1] = sequence_len
    return sizes


class NanochatConfig(_BaseConfig):
    """nanochat's GPTConfig plus the padded vocabulary size of the saved tensors.

    The attention windows are *not* called `sliding_window`/`layer_types`: transformers
    would then build caches that drop old keys, while this model keeps every key and
    masks per layer (the windows are derived from `sequence_len` and `window_pattern`)."""

    model_type = "nanochat_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",  # the trained context (evaluation harnesses read it)
    }

    def __init__(self, sequence_len: int = 2048, vocab_size: int = 32768, padded_vocab_size: int | None = None,
                 n_layer: int = 12, n_head: int = 6, n_kv_head: int = 6, n_embd: int = 768,
                 window_pattern: str = "SSSL", rope_base: float = 100000.0, qk_scale: float = 1.2,
                 logit_softcap: float = 15.0, ve_gate_channels: int = 12, smear_channels: int = 24,
                 bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, tie_word_embeddings: bool = False, **kwargs):
        self.sequence_len = sequence_len
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else -(-vocab_size // 64) * 64
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        self.rope_base = rope_base
        self.qk_scale = qk_scale
        self.logit_softcap = logit_softcap
        self.ve_gate_channels = ve_gate_channels
        self.smear_channels = smear_channels
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def window_sizes(self) -> list[int]:
        return layer_windows(self.sequence_len, self.n_layer, self.window_pattern)
