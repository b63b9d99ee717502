"""
Export a nanochat checkpoint as a self-contained Hugging Face model directory, and read
one back.

An export directory holds

  config.json                   NanochatConfig fields, `auto_map` to the two files below
  configuration_nanochat.py     copied from this package; needs only transformers
  modeling_nanochat.py          copied from this package; needs only torch + transformers
  model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  generation_config.json        bos / eos (<|assistant_end|> and <|bos|>) / pad ids
  tokenizer.json                a `tokenizers` byte-level BPE equal to our tiktoken encoding
  tokenizer_config.json         special tokens and the chat template
  special_tokens_map.json
  README.md                     model card

Tensor names are ours with `transformer.` -> `model.` and every other non-head tensor
under `model.` (transformers' `base_model_prefix` convention); shapes and values are
unchanged, padded vocabulary rows included, so export -> import is lossless in fp32.

Everything is written into a temporary sibling directory that is renamed into place at
the end: an interrupted export leaves nothing behind under the requested name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.export")

TEMPLATE_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# the GPTConfig fields an export records (and an import needs)
GPT_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


# -----------------------------------------------------------------------------
# Names and sizes

def to_hf_name(name: str) -> str:
    """Our state_dict key -> the exported one."""
    name = name.replace("_orig_mod.", "")
    if name.startswith("lm_head."):
        return name
    if name.startswith("transformer."):
        return "model." + name[len("transformer."):]
    return "model." + name


def from_hf_name(name: str) -> str:
    """The exported key -> ours (inverse of to_hf_name)."""
    if name.startswith("lm_head."):
        return name
    if not name.startswith("model."):
        raise ValueError(f"unexpected tensor {name!r} in the export (expected model.* or lm_head.*)")
    rest = name[len("model."):]
    if rest.startswith(("wte.", "h.")):
        return "transformer." + rest
    return rest


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(text).upper())
    if not m:
        raise UserError(f"size {text!r} is not a byte count or a number with KB, MB or GB (e.g. 5GB)")
    unit = {"B": 1, None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def check_dtype(dtype: str) -> torch.dtype:
    if dtype == "float16":
        raise UserError("--dtype float16 is not supported: the ReLU^2 MLP activations and their squares overflow "
                        "float16's range (max 65504); export in bfloat16 (same size, float32's range) or float32")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken encoding -> tokenizers' byte-level BPE

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what tokenizers'
    ByteLevel pre-tokenizer applies): printable Latin-1 bytes map to themselves, the
    rest to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The two tokens BPE merges last to build `token`: run the merges of lower rank
    than the token itself on its bytes (tiktoken's algorithm)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def onig_pattern(pattern: str) -> str:
    """The split regex in the dialect of tokenizers' Oniguruma engine. tiktoken's engine
    reads `X{m,n}+` as a possessive interval (cl100k_base has `\\p{N}{1,3}+`); Oniguruma
    reads it as `(X{m,n})+`, which would glue all digits together. An atomic group
    `(?>X{m,n})` means the same in both."""
    atom = r"(\\[pP]\{\w+\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]])"
    return re.sub(atom + r"\{(\d+(?:,\d*)?)\}\+", r"(?>\1{\2})", pattern)


def tokenizer_json(enc) -> str:
    """tokenizer.json text for a tiktoken Encoding: regex split (the encoding's own
    pattern) -> byte-level -> BPE whose merge order is tiktoken's rank order. Whole
    pre-tokens found in the vocabulary are taken directly (`ignore_merges`), as tiktoken
    does. Special tokens are added tokens with their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks: dict[bytes, int] = enc._mergeable_ranks
    specials: dict[str, int] = enc._special_tokens
    b2u = _byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    vocab.update(specials)  # fixed ids, even when the encoding's ids have gaps
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1 and (pair := _split_in_two(ranks, tok)) is not None:
            merges.append((as_text(pair[0]), as_text(pair[1])))
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(enc._pat_str)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False)
                           for name, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    return hf.to_str(pretty=True)


def chat_template(specials: set[str]) -> str | None:
    """A Jinja chat template rendering exactly what Tokenizer.render_conversation
    renders (a leading system message folded into the first user message with a blank
    line; assistant content as a string or a list of text/python/python_output parts),
    plus <|assistant_start|> for add_generation_prompt (render_for_completion)."""
    needed = {"<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"}
    if not needed <= specials:
        return None
    return (
        "{%- set ns = namespace(system='') -%}"
        "<|bos|>"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
        "{%- elif message['role'] == 'user' -%}"
        "<|user_start|>{{ ns.system + message['content'] }}<|user_end|>{%- set ns.system = '' -%}"
        "{%- else -%}<|assistant_start|>"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
        "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
        "{%- else -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "<|assistant_end|>"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
    )


def special_roles(enc) -> dict[str, str]:
    """bos / eos / pad token strings: <|bos|> (or <|endoftext|>), eos <|assistant_end|>
    when the encoding has the chat tokens, pad = bos (no separate pad token exists)."""
    specials = enc.special_tokens_set
    bos = "<|bos|>" if "<|bos|>" in specials else "<|endoftext|>"
    eos = "<|assistant_end|>" if "<|assistant_end|>" in specials else bos
    return {"bos_token": bos, "eos_token": eos, "pad_token": bos}


def tokenizer_files(enc, model_max_length: int) -> dict[str, str]:
    roles = special_roles(enc)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    template = chat_template(enc.special_tokens_set)
    if template is not None:
        config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer_json(enc),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(roles, indent=2),
    }


def encoding_from_tokenizer_json(path: str | os.PathLike):
    """Rebuild the tiktoken Encoding from an exported tokenizer.json (the inverse of
    `tokenizer_json`): vocabulary -> byte ranks, Split pattern, added tokens."""
    import tiktoken

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    u2b = {c: b for b, c in _byte_to_unicode().items()}
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    ranks = {bytes(u2b[c] for c in text): rank for text, rank in data["model"]["vocab"].items()
             if text not in specials}
    pattern = None
    for step in data.get("pre_tokenizer", {}).get("pretokenizers", []):
        if step.get("type") == "Split":
            pattern = step["pattern"].get("Regex")
    if pattern is None:
        raise UserError(f"{path} has no Split pre-tokenizer; it was not written by `nanochat export`")
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


# -----------------------------------------------------------------------------
# Config files and model card

def hf_config(model_config: dict[str, Any], padded_vocab: int, token_ids: dict[str, int], dtype: str,
              source: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["NanochatForCausalLM"],
        "model_type": "nanochat_gpt",
        "auto_map": {
            "AutoConfig": "configuration_nanochat.NanochatConfig",
            "AutoModel": "modeling_nanochat.NanochatModel",
            "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM",
        },
        **{k: model_config[k] for k in GPT_FIELDS},
        "padded_vocab_size": padded_vocab,
        "rope_base": 100000.0,
        "qk_scale": 1.2,
        "logit_softcap": 15.0,
        "ve_gate_channels": 12,
        "smear_channels": 24,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"],
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        "nanochat": source,  # where the weights came from; `nanochat import-hf` reads it back
    }


def model_card(model_config: dict[str, Any], n_params: int, source: dict[str, Any], dtype: str,
               report: str | None) -> str:
    c = model_config
    tokens = source.get("training_tokens")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [nanochat]",
        "---",
        f"# nanochat {source.get('stage', '')} model {source.get('tag', '')}".rstrip(),
        "",
        f"A GPT trained with nanochat ({source.get('stage')} checkpoint, tag {source.get('tag')}, "
        f"step {source.get('step')}), exported in {dtype}.",
        "",
        "## Architecture",
        "",
        f"- {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} query heads, {c['n_kv_head']} key/value heads, "
        f"context {c['sequence_len']}, vocabulary {c['vocab_size']}",
        f"- attention windows per layer from the pattern {c['window_pattern']!r} (S = a quarter of the context, "
        "last layer full)",
        "- rotary embeddings (base 100000), QK norm, ReLU^2 MLP, value embeddings with gates, smear, backout, "
        "per-layer residual/x0 scalars, logit softcap 15, no biases, untied embeddings",
        f"- parameters: {n_params:,}",
    ]
    if tokens:
        lines.append(f"- training tokens: {tokens:,}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi!'}], add_generation_prompt=True, "
        "return_tensors='pt', return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        "```",
        "",
        "`trust_remote_code=True` runs `modeling_nanochat.py` from this directory (plain PyTorch). "
        "Text encodes exactly as nanochat's tokenizer; to encode special-token strings typed as text as "
        "ordinary text (as nanochat does), pass `split_special_tokens=True`.",
    ]
    if report:
        lines += ["", "## Report card", "", report.strip()]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Weights

def _save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards plus an index when the total exceeds max_shard_bytes."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in state.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(state, str(out / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names + [INDEX_FILE]


def load_safetensors(export_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an export, under the exported names."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    if (export_dir / SINGLE_FILE).is_file():
        return load_file(str(export_dir / SINGLE_FILE))
    index = export_dir / INDEX_FILE
    if not index.is_file():
        raise MissingInputError(f"{export_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; is it a model export?")
    weight_map = json.loads(index.read_text())["weight_map"]
    state = {}
    for fname in sorted(set(weight_map.values())):
        state.update(load_file(str(export_dir / fname)))
    return state


# -----------------------------------------------------------------------------
# Export / import

def prepare_output(out_dir: str | os.PathLike, force: bool) -> Path:
    """Refuse a non-empty output directory unless force (checked before any work)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} is not empty; pass --force to replace it")
    return out


def export_model(state: dict[str, torch.Tensor], model_config: dict[str, Any], enc, out_dir: str | os.PathLike,
                 dtype: str = "bfloat16", force: bool = False, source: dict[str, Any] | None = None,
                 report: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the export of one checkpoint (its state_dict and model config, the tiktoken
    Encoding of its tokenizer) to out_dir; returns out_dir."""
    torch_dtype = check_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    out = prepare_output(out_dir, force)
    source = dict(source or {})
    missing = [k for k in GPT_FIELDS if k not in model_config]
    if missing:
        raise UserError(f"the checkpoint's model config lacks {missing}")
    if enc.n_vocab != model_config["vocab_size"]:
        raise UserError(f"the tokenizer has {enc.n_vocab} tokens but the model {model_config['vocab_size']}; "
                        "export with the tokenizer the model was trained with")

    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and t.dtype != torch_dtype:
            # e.g. embeddings stored in bf16 by GPU training: import casts them back
            source.setdefault("original_dtypes", {})[name.replace("_orig_mod.", "")] = str(t.dtype).split(".")[-1]
        tensors[to_hf_name(name)] = (t.to(torch_dtype) if t.is_floating_point() else t).contiguous().clone()
    padded_vocab = tensors["model.wte.weight"].size(0)
    n_params = sum(t.numel() for t in tensors.values())
    roles = special_roles(enc)
    ids = {
        "bos": enc.encode_single_token(roles["bos_token"]),
        "eos": enc.encode_single_token(roles["eos_token"]),
        "pad": enc.encode_single_token(roles["pad_token"]),
    }
    stops = [ids["eos"]] + ([ids["bos"]] if ids["bos"] != ids["eos"] else [])  # as the Engine stops

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _save_safetensors(tensors, tmp, max_shard_bytes)
        config = hf_config(model_config, padded_vocab, {**ids, "eos": stops}, dtype, source)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": ids["bos"], "eos_token_id": stops, "pad_token_id": ids["pad"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for fname in REMOTE_CODE_FILES:
            shutil.copyfile(TEMPLATE_DIR / fname, tmp / fname)
        for fname, text in tokenizer_files(enc, model_config["sequence_len"]).items():
            (tmp / fname).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(model_card(model_config, n_params, source, dtype, report), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # only reached with force (or an empty directory)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s parameters (%s) to %s", f"{n_params:,}", dtype, out)
    return out


def read_export(export_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state_dict under our names, GPTConfig fields, the export's `nanochat` source block)."""
    export_dir = Path(export_dir)
    cfg_path = export_dir / "config.json"
    if not cfg_path.is_file():
        raise MissingInputError(f"{cfg_path} does not exist; pass a directory written by `nanochat export`")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "nanochat_gpt":
        raise UserError(f"{cfg_path} has model_type {cfg.get('model_type')!r}, not 'nanochat_gpt'; "
                        "only nanochat exports can be imported")
    model_config = {k: cfg[k] for k in GPT_FIELDS}
    source = cfg.get("nanochat") or {}
    original = source.get("original_dtypes") or {}
    state = {}
    for k, v in load_safetensors(export_dir).items():
        name = from_hf_name(k)
        state[name] = v.to(getattr(torch, original[name])) if name in original else v
    return state, model_config, source


def push_to_hub(export_dir: str | os.PathLike, repo_id: str) -> str:
    """Upload an export directory to the Hugging Face hub; returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise UserError("--push-to-hub needs the huggingface_hub package: pip install 'nanochat[hf]' "
                        "(or pip install huggingface_hub)") from e
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, commit_message="nanochat export")
    except Exception as e:  # offline, no token, no permission: one clear line
        raise UserError(f"could not push {export_dir} to the hub repo {repo_id!r} ({type(e).__name__}: "
                        f"{str(e)[:300]}); the export itself is complete, upload it later with "
                        "`huggingface-cli upload`") from e
    return str(url)
