"""
Checkpoints in the reference nanochat's layout:

    <base_dir>/<stage dir>/<tag>/model_<step:06d>.pt          model state_dict (rank 0)
                                 meta_<step:06d>.json         model config, training config, loop/loader state
                                 optim_<step:06d>_rank<r>.pt  optimizer state of rank r (its shard)

with stage dirs base_checkpoints, chatsft_checkpoints and chatrl_checkpoints, so
checkpoints written by the reference load here and the other way round.

A checkpoint is complete iff its meta file exists: every file is written atomically,
the meta file last (after all ranks wrote their optimizer shards), and an overwrite
first removes the old meta. So a crash at any point leaves either the previous complete
checkpoint or one without meta, which `find_last_step` ignores and `load_checkpoint`
refuses with a message saying what to do.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat.common import atomic_path, atomic_write_text
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.checkpoint")

# stage -> directory under base_dir (the reference's names)
STAGE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
# what to run when a stage has no checkpoint yet
_STAGE_COMMANDS = {"base": "nanochat base-train", "sft": "nanochat sft", "rl": "nanochat rl"}

_META_RE = re.compile(r"meta_(\d+)\.json")


# -----------------------------------------------------------------------------
# Paths

def stage_root(base_dir: str | os.PathLike, stage: str) -> Path:
    """`<base_dir>/<stage dir>`, the folder holding one subfolder per model tag."""
    if stage not in STAGE_DIRS:
        raise UserError(f"unknown checkpoint stage {stage!r}; use one of {sorted(STAGE_DIRS)}")
    return Path(base_dir) / STAGE_DIRS[stage]


def checkpoint_dir(base_dir: str | os.PathLike, stage: str, tag: str) -> Path:
    """`<base_dir>/<stage dir>/<tag>`, e.g. base_checkpoints/d12."""
    if not tag or "/" in tag or tag in (".", ".."):
        raise UserError(f"model tag {tag!r} must be a plain folder name such as d12")
    return stage_root(base_dir, stage) / tag


def model_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.pt"


def meta_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"


def optim_path(ckpt_dir: str | os.PathLike, step: int, rank: int = 0) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank{rank:d}.pt"


def _train_hint(ckpt_dir: Path) -> str:
    for stage, dirname in STAGE_DIRS.items():
        if dirname in (ckpt_dir.name, ckpt_dir.parent.name):
            return f"run `{_STAGE_COMMANDS[stage]}` first"
    return "train a model first"


# -----------------------------------------------------------------------------
# Save

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model_state: dict[str, Any] | None,
                    optim_state: dict[str, Any] | None, meta: dict[str, Any], rank: int = 0,
                    keep_last: int | None = None) -> None:
    """Save one checkpoint. Call it on every rank (it synchronises them when
    torch.distributed is initialised): rank 0 writes the model and the meta, every rank
    writes its optimizer shard (when `optim_state` is not None). `meta` must be JSON
    serialisable. `keep_last`: afterwards delete all but the newest N complete checkpoints.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    ckpt_dir = Path(ckpt_dir)
    # serialise first: a meta that cannot be written must not destroy the previous checkpoint
    try:
        meta_text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON serialisable ({e}); pass plain numbers, strings, lists, dicts") from e
    if rank == 0:
        # overwriting a step: make it incomplete before touching its files
        meta_path(ckpt_dir, step).unlink(missing_ok=True)
    _barrier()
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass the model state to save_checkpoint")
        with atomic_path(model_path(ckpt_dir, step)) as tmp:
            torch.save(model_state, tmp)
    if optim_state is not None:
        with atomic_path(optim_path(ckpt_dir, step, rank)) as tmp:
            torch.save(optim_state, tmp)
    _barrier()  # every shard is on disk before the meta marks the checkpoint complete
    if rank == 0:
        atomic_write_text(meta_path(ckpt_dir, step), meta_text)
        log.info("saved checkpoint step %d to %s", step, ckpt_dir)
        if keep_last is not None:
            prune_checkpoints(ckpt_dir, keep_last)
    _barrier()  # no rank returns (and maybe reads it back) before the checkpoint is complete


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> list[int]:
    """Delete every complete checkpoint but the newest `keep`; returns the steps deleted.
    The meta goes first, so an interrupted prune leaves an incomplete step, never a
    complete-looking one with files missing."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    doomed = complete_steps(ckpt_dir)[:-keep]
    for step in doomed:
        meta_path(ckpt_dir, step).unlink(missing_ok=True)
        model_path(ckpt_dir, step).unlink(missing_ok=True)
        for shard in ckpt_dir.glob(f"optim_{step:06d}_rank*.pt"):
            shard.unlink(missing_ok=True)
    if doomed:
        log.info("pruned checkpoints %s from %s", doomed, ckpt_dir)
    return doomed


# -----------------------------------------------------------------------------
# Find

def complete_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps with both meta and model files, ascending ([] if the folder is missing)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for path in ckpt_dir.iterdir():
        m = _META_RE.fullmatch(path.name)
        if m and model_path(ckpt_dir, int(m.group(1))).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir: str | os.PathLike) -> int:
    """The newest complete step in `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise MissingInputError(f"no checkpoint folder {ckpt_dir}: {_train_hint(ckpt_dir)}")
    steps = complete_steps(ckpt_dir)
    if not steps:
        partial = sorted(p.name for p in ckpt_dir.glob("model_*.pt"))
        extra = f" (only incomplete saves without meta: {partial}; delete them)" if partial else ""
        raise MissingInputError(f"no complete checkpoint in {ckpt_dir}{extra}: {_train_hint(ckpt_dir)}")
    return steps[-1]


def find_largest_tag(checkpoints_dir: str | os.PathLike) -> str:
    """The tag to load by default: the deepest `d<N>` model (as the reference does), else
    the tag written most recently; only tags holding a complete checkpoint count."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        raise MissingInputError(f"no checkpoints folder {root}: {_train_hint(root)}")
    tags = {d.name: max(meta_path(d, s).stat().st_mtime for s in steps)
            for d in root.iterdir() if d.is_dir() and (steps := complete_steps(d))}
    if not tags:
        raise MissingInputError(f"no complete checkpoint under {root}: {_train_hint(root)}")
    depths = {t: int(m.group(1)) for t in tags if (m := re.match(r"d(\d+)", t))}
    pool = depths or tags
    # the deepest model; among equals (or without depth tags) the newest
    return max(pool, key=lambda t: (depths.get(t, 0), tags[t]))


def latest_stage(base_dir: str | os.PathLike) -> str | None:
    """The furthest stage of the pipeline that has a complete checkpoint under base_dir:
    "rl", else "sft", else "base"; None when there is none (the model to use by default)."""
    for stage in ("rl", "sft", "base"):
        try:
            find_largest_tag(stage_root(base_dir, stage))
            return stage
        except FileNotFoundError:
            continue
    return None


# -----------------------------------------------------------------------------
# Load

def _torch_load(path: Path, device: torch.device | str, what: str, fix: str) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean "unreadable"
        raise UserError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); {fix}") from e


def load_checkpoint(ckpt_dir: str | os.PathLike, step: int, device: torch.device | str,
                    load_optimizer: bool = False, rank: int = 0
                    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(model_state, optimizer state of `rank` or None, meta) of one complete checkpoint,
    tensors mapped onto `device`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise MissingInputError(f"no checkpoint folder {ckpt_dir}: {_train_hint(ckpt_dir)}")
    complete = complete_steps(ckpt_dir)
    earlier = [s for s in complete if s < step]
    fallback = (f"resume from an earlier step (latest complete: {earlier[-1]})" if earlier
                else "start over without resuming")
    mpath = meta_path(ckpt_dir, step)
    if not mpath.is_file():
        if model_path(ckpt_dir, step).is_file():
            raise UserError(f"checkpoint step {step} in {ckpt_dir} is incomplete ({mpath.name} is missing: the save "
                            f"was interrupted); delete its files and {fallback}")
        raise MissingInputError(f"no checkpoint at step {step} in {ckpt_dir} (complete steps: {complete or 'none'}); "
                                f"pick one of those or {_train_hint(ckpt_dir)}")
    fix = f"delete step {step}'s files and {fallback}"
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint meta {mpath} is not valid JSON ({e}); {fix}") from e
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint meta {mpath} holds a {type(meta).__name__}, not an object; {fix}")
    model_state = _torch_load(model_path(ckpt_dir, step), device, "model checkpoint", fix)
    optim_state = None
    if load_optimizer:
        shards = sorted(p.name for p in ckpt_dir.glob(f"optim_{step:06d}_rank*.pt"))
        opt_fix = (f"resume with as many processes as saved it ({len(shards)}: {shards})" if shards
                   else "this checkpoint has no optimizer state; resume from another step or start over")
        path = optim_path(ckpt_dir, step, rank)
        optim_state = _torch_load(path, device, "optimizer checkpoint", opt_fix if not path.is_file() else fix)
    return model_state, optim_state, meta


# -----------------------------------------------------------------------------
# Compatibility with checkpoints of older reference versions

# config keys added after some checkpoints were written, with the value that reproduces
# how those models were trained (full-context attention everywhere)
_CONFIG_DEFAULTS: dict[str, Any] = {"window_pattern": "L"}
# per-layer scalars added later: identity residual scale, no x0 skip
_STATE_DEFAULTS = {"resid_lambdas": torch.ones_like, "x0_lambdas": torch.zeros_like}


def patch_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's model config with keys missing from old checkpoints filled in."""
    patched = dict(model_config)
    for key, value in _CONFIG_DEFAULTS.items():
        if key not in patched:
            log.info("checkpoint model config lacks %s; using %r (as old checkpoints were trained)", key, value)
            patched[key] = value
    return patched


def patch_model_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a saved state_dict onto the keys a model expects (`expected`: its state_dict):
    drop torch.compile's `_orig_mod.` prefix and fill parameters that old checkpoints lack."""
    patched = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    for key, fill in _STATE_DEFAULTS.items():
        if key in expected and key not in patched:
            log.info("checkpoint lacks %s; filling it with the neutral value", key)
            patched[key] = fill(expected[key])
    return patched


def load_model(stage: str, base_dir: str | os.PathLike, device: torch.device | str,
               compute_dtype: torch.dtype = torch.float32, tag: str | None = None, step: int | None = None,
               phase: str = "eval") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Build the GPT of a checkpoint and its tokenizer: (model, tokenizer, meta).

    tag: default the largest model (find_largest_tag); step: default the last complete one.
    The model is built by nanochat.gpt.build_model(config, device, compute_dtype) and the
    weights are copied in (so they take the dtypes the model chose, e.g. fp32 on CPU).
    """
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    device = torch.device(device)
    root = stage_root(base_dir, stage)
    if tag is None:
        tag = find_largest_tag(root)
        log.info("no model tag given; using %s", tag)
    ckpt_dir = checkpoint_dir(base_dir, stage, tag)
    if not ckpt_dir.is_dir():
        known = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise MissingInputError(f"no checkpoint folder {ckpt_dir} (tags present: {known or 'none'}); "
                                f"pick an existing tag or {_train_hint(root)}")
    if step is None:
        step = find_last_step(ckpt_dir)
    state, _, meta = load_checkpoint(ckpt_dir, step, device)
    if not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{meta_path(ckpt_dir, step)} has no model_config; it was not written by a training stage")
    kwargs = patch_model_config(meta["model_config"])
    known_fields = set(getattr(GPTConfig, "__dataclass_fields__", kwargs))
    unknown = sorted(set(kwargs) - known_fields)
    if unknown:
        raise UserError(f"{meta_path(ckpt_dir, step)} has model config keys {unknown} that this nanochat's GPTConfig "
                        "does not know; load it with the nanochat version that trained it")
    config = GPTConfig(**kwargs)
    log.info("loading %s step %d from %s: %s", stage, step, ckpt_dir, kwargs)
    model = build_model(config, device, compute_dtype)
    state = patch_model_state(state, model.state_dict())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{model_path(ckpt_dir, step)} does not fit the model its meta describes: {e}") from e
    model.train(phase == "train")
    tokenizer = get_tokenizer(base_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"the tokenizer in {Path(base_dir) / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens but "
                        f"the model was trained with {config.vocab_size}; use the tokenizer it was trained with")
    return model, tokenizer, meta
