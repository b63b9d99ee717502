"""Evaluate a base model: the CORE metric, bits per byte, and samples.

  nanochat base-eval                                # newest base checkpoint, all three
  nanochat base-eval -g d20 --eval core --max-per-task 100
  nanochat base-eval --hf-path ./gpt2 --eval core   # a local Hugging Face causal LM
  torchrun --standalone --nproc_per_node=8 -m nanochat base-eval -g d20

CORE (DCLM's 22 in-context tasks, centered accuracy averaged) needs the eval bundle in
<base_dir>/eval_bundle; it is fetched once from --bundle-url, $NANOCHAT_EVAL_BUNDLE_URL
or the reference's URL. Results go to <base_dir>/base_eval/<model>.csv; tasks whose
data is missing are listed as skipped, and CORE is then not comparable to the
published number.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat.common import Runtime, atomic_write_text
from nanochat.config import check, option
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.base_eval")

EVAL_MODES = ("core", "bpb", "sample")


@dataclass
class Config:
    eval: str = option("core,bpb,sample", "comma-separated evaluations to run: core, bpb, sample")
    max_per_task: int | None = option(None, "CORE: at most this many items per task (default: all)")
    tag: str | None = option(None, "checkpoint tag, e.g. d20 (default: the largest model)", short="-g")
    step: int | None = option(None, "checkpoint step (default: the last)", short="-s")
    batch_size: int = option(16, "CORE: sequences per forward pass (an item has one per choice)")
    device_batch_size: int = option(32, "bpb: sequences per device per forward pass")
    split_tokens: int = option(40 * 524288, "bpb: tokens evaluated per split")
    dataset: str | None = option(None, "bpb: measure on the named dataset built by `nanochat ingest` instead of "
                                       "the downloaded web text")
    hf_path: str | None = option(None, "evaluate a Hugging Face causal LM instead: a local directory (save_pretrained "
                                       "or `nanochat export`) or a hub id (needs `pip install 'nanochat[hf]'`)")
    trust_remote_code: bool = option(False, "--hf-path: let a model that ships its own code run it (an export of "
                                            "this nanochat version is trusted without this)")
    bundle_url: str | None = option(None, "where to fetch the CORE eval bundle if <base_dir>/eval_bundle is absent: "
                                          "URL, file:// URL, zip or directory (default: $NANOCHAT_EVAL_BUNDLE_URL, "
                                          "else the reference's URL)")

    def modes(self) -> list[str]:
        return [m.strip() for m in self.eval.split(",") if m.strip()]

    def validate(self) -> None:
        p = []
        bad = [m for m in self.modes() if m not in EVAL_MODES]
        if bad or not self.modes():
            p.append(f"--eval takes a comma-separated subset of {','.join(EVAL_MODES)}, got {self.eval!r}")
        if self.max_per_task is not None and self.max_per_task < 1:
            p.append(f"--max-per-task must be at least 1 (leave it out for all items), got {self.max_per_task}")
        for name in ("batch_size", "device_batch_size", "split_tokens"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hf_path is not None and (self.tag is not None or self.step is not None):
            p.append("--hf-path evaluates a Hugging Face model; it cannot be combined with --tag/--step")
        from nanochat.dataset import dataset_problems
        p.extend(dataset_problems(self.dataset))
        check(p)


# -----------------------------------------------------------------------------
# Hugging Face models (optional dependency: transformers)

class HFCausalLM(torch.nn.Module):
    """A transformers causal LM seen through our interface: forward(idx) -> logits
    (B, T, V), or the loss when targets are given (for bits per byte). `max_seq_len` is
    the model's position limit, so CORE crops long prompts from the left."""

    def __init__(self, model, max_seq_len: int | None):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        logits = self.model(input_ids=idx).logits
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                                                 ignore_index=-1, reduction=loss_reduction)


class HFTokenizer:
    """A transformers tokenizer with the part of our Tokenizer's interface that
    evaluation uses: encode(text | list, prepend=...), get_bos_token_id(), decode()."""

    def __init__(self, tok):
        self.tok = tok
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise UserError("this Hugging Face tokenizer has neither a BOS nor an EOS token to start documents with")
        self.bos_token_id = bos

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_vocab_size(self) -> int:
        return len(self.tok)

    def _id(self, token: str | int) -> int:
        return token if isinstance(token, int) else self.tok.convert_tokens_to_ids(token)

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None,
               **_: Any) -> list[int] | list[list[int]]:
        head = [self._id(prepend)] if prepend is not None else []
        tail = [self._id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.tok(text, add_special_tokens=False)["input_ids"] + tail
        rows = self.tok(list(text), add_special_tokens=False)["input_ids"] if text else []
        return [head + r + tail for r in rows]

    __call__ = encode

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab,): UTF-8 bytes each token decodes to; 0 for special tokens."""
        specials = set(self.tok.all_special_ids)
        return torch.tensor([0 if i in specials else len(self.tok.decode([i]).encode("utf-8"))
                             for i in range(len(self.tok))], dtype=torch.int32)


def _is_our_export(path: Path) -> bool:
    """True when `path` was written by `nanochat export` with this version's model code:
    its remote-code files are byte for byte the ones this package ships, so loading them
    runs our code, not a stranger's."""
    from nanochat.export.hf import REMOTE_CODE_FILES, TEMPLATE_DIR
    return all((path / name).is_file() and (path / name).read_bytes() == (TEMPLATE_DIR / name).read_bytes()
               for name in REMOTE_CODE_FILES)


def load_hf_model(hf_path: str, device: torch.device, trust_remote_code: bool = False
                  ) -> tuple[HFCausalLM, HFTokenizer]:
    """Load a transformers causal LM and its tokenizer, in fp32 (as the reference scored
    GPT-2), from a local directory or a hub id (downloaded when the network allows).
    A directory written by `nanochat export` loads its own model code when that code is
    this package's; other remote code runs only with trust_remote_code."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise UserError("--hf-path needs the transformers package: pip install 'nanochat[hf]' "
                        "(or pip install transformers)") from e
    path = Path(hf_path).expanduser()
    if path.is_dir():
        source, kwargs = path, {"local_files_only": True, "trust_remote_code": trust_remote_code or _is_our_export(path)}
    elif path.exists() or hf_path.startswith((".", "/", "~")) or hf_path.count("/") != 1:
        raise MissingInputError(f"--hf-path {hf_path}: no such directory; give a folder written by save_pretrained "
                                "or `nanochat export`, or a hub id such as openai-community/gpt2")
    else:
        source, kwargs = hf_path, {"trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source, **kwargs))
    except OSError as e:  # not found locally, no network, no such repository
        raise MissingInputError(f"--hf-path {hf_path}: could not load it ({e})") from e
    model.float().to(device).eval()
    cfg = model.config
    max_seq_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return HFCausalLM(model, max_seq_len), tokenizer


# -----------------------------------------------------------------------------
# Output

def format_table(core: dict) -> str:
    """A fixed-width table of every task (skipped ones marked) and the CORE line."""
    lines = [f"{'Task':<35} {'Accuracy':>9} {'Centered':>9}"]
    for label, t in core["tasks"].items():
        lines.append(f"{label:<35} {t['accuracy']:>9.4f} {t['centered']:>9.4f}")
    for label in core["skipped"]:
        lines.append(f"{label:<35} {'skipped':>9} {'':>9}  ({core['skipped_reasons'][label]})")
    lines.append(f"{'CORE':<35} {'':>9} {core['core']:>9.4f}  (mean over {core['num_tasks']} of "
                 f"{core['num_tasks_total']} tasks)")
    if core.get("note"):
        lines.append(f"note: {core['note']}")
    return "\n".join(lines)


def format_csv(core: dict) -> str:
    """The reference's CSV layout (Task, Accuracy, Centered; CORE last), plus one row per
    skipped task with empty values, so a missing task is visible, not silently absent."""
    rows = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, t in core["tasks"].items():
        rows.append(f"{label:<35}, {t['accuracy']:<10.6f}, {t['centered']:<10.6f}")
    for label in core["skipped"]:
        rows.append(f"{label:<35}, {'':<10}, {'':<10}")
    rows.append(f"{'CORE':<35}, {'':<10}, {core['core']:<10.6f}")
    return "\n".join(rows) + "\n"


def model_slug(meta: dict, tag: str) -> str:
    """The CSV's name: the reference's base_model_<step>, with the tag so that models of
    different sizes do not overwrite each other's results."""
    return f"base_model_{tag}_{int(meta.get('step') or 0):06d}"


# -----------------------------------------------------------------------------
# The stage

def _load(config: Config, runtime: Runtime):
    """(model, tokenizer, name, slug, sequence_len, token_bytes or None, is_hf)."""
    if config.hf_path is not None:
        model, tokenizer = load_hf_model(config.hf_path, runtime.device, config.trust_remote_code)
        slug = Path(config.hf_path).expanduser().resolve().name  # e.g. gpt2 for ./models/gpt2
        return (model, tokenizer, config.hf_path, slug, model.max_seq_len or 1024,
                tokenizer.token_bytes().to(runtime.device), True)
    from nanochat.checkpoint import load_model
    from nanochat.node_sync import pretraining_files, sync_checkpoint
    from nanochat.tokenizer import get_token_bytes

    # multi-node: every node gets rank 0's checkpoint, and its shards for bpb (see node_sync)
    tag, step = sync_checkpoint(runtime, "base", config.tag, config.step,
                                extra=pretraining_files(runtime.base_dir, config.dataset))
    model, tokenizer, meta = load_model("base", runtime.base_dir, runtime.device, runtime.dtype, tag=tag, step=step)
    model.eval()
    token_bytes = None
    if "bpb" in config.modes():
        token_bytes = get_token_bytes(runtime.base_dir, device=runtime.device)
    name = f"base model {tag} step {meta.get('step')}"
    return (model, tokenizer, name, model_slug(meta, tag), meta["model_config"]["sequence_len"], token_bytes, False)


def run(config: Config, runtime: Runtime) -> dict:
    config.validate()
    modes = config.modes()
    model, tokenizer, name, slug, seq_len, token_bytes, is_hf = _load(config, runtime)
    log.info("evaluating %s: %s", name, ", ".join(modes))
    metrics: dict[str, Any] = {"model": name}
    report: dict[str, Any] = {"model": name}

    if "sample" in modes:
        if is_hf:
            log.info("sampling is skipped for Hugging Face models (it uses our KV-cache engine)")
        elif runtime.is_master:
            metrics["samples"] = _samples(model, tokenizer)
            report["samples"] = metrics["samples"]

    if "bpb" in modes:
        from nanochat.loss_eval import split_bpb
        bpb = split_bpb(model, tokenizer, token_bytes, base_dir=runtime.base_dir, batch_size=config.device_batch_size,
                        seq_len=seq_len, tokens=config.split_tokens, rank=runtime.rank,
                        world_size=runtime.world_size, dataset=config.dataset)
        for split, value in bpb.items():
            log.info("%s bpb: %.6f", split, value)
            metrics[f"{split}_bpb"] = value
            report[f"{split} bpb"] = value

    if "core" in modes:
        from nanochat.core_eval import ensure_eval_bundle, evaluate_core
        if runtime.is_master:
            ensure_eval_bundle(runtime.base_dir, config.bundle_url)
        runtime.barrier()
        bundle = ensure_eval_bundle(runtime.base_dir, config.bundle_url)
        core = evaluate_core(model, tokenizer, runtime.device, bundle, max_per_task=config.max_per_task,
                             batch_size=config.batch_size, rank=runtime.rank, world_size=runtime.world_size)
        metrics.update(core=core["core"], tasks=core["tasks"], skipped=core["skipped"],
                       comparable=core["comparable"], core_note=core["note"],
                       core_examples_per_s=core["examples_per_s"])
        if runtime.is_master:
            print(format_table(core))
            csv_path = runtime.base_dir / "base_eval" / f"{slug}.csv"
            atomic_write_text(csv_path, format_csv(core))
            log.info("CORE results written to %s", csv_path)
            metrics["csv"] = str(csv_path)
            report.update({"CORE metric": core["core"], "CORE tasks": f"{core['num_tasks']}/{core['num_tasks_total']}",
                           "CORE skipped": core["skipped"], "CORE note": core["note"],
                           "centered": {k: t["centered"] for k, t in core["tasks"].items()}})

    if runtime.is_master:
        from nanochat.report import log_section
        log_section(runtime.base_dir, "Base model evaluation", report)
    return metrics


def _samples(model, tokenizer) -> list[str]:
    """Greedy completions of the fixed prompts, and a few unconditioned samples at
    temperature 1, printed for a person to eyeball."""
    from nanochat.loss_eval import SAMPLE_PROMPTS, complete_prompts

    out = []
    print("Conditioned samples:")
    for prompt, completion in zip(SAMPLE_PROMPTS, complete_prompts(model, tokenizer, SAMPLE_PROMPTS)):
        print(f"  {prompt}{completion}")
        out.append(prompt + completion)
    from nanochat.engine import Engine

    bos = tokenizer.get_bos_token_id()
    seqs, _ = Engine(model, tokenizer).generate_batch([bos], num_samples=4, max_tokens=64, temperature=1.0)
    print("Unconditioned samples:")
    for seq in seqs:
        text = tokenizer.decode(seq[1:])
        print(f"  {text!r}")
        out.append(text)
    return out
