"""
The CORE metric of DCLM (Li et al. 2024, "DataComp-LM", arXiv:2406.11794, appendix on
the "core" task set): 22 in-context-learning tasks scored zero- or few-shot, each
accuracy centered against the task's random-guess baseline,

    centered = (accuracy - baseline) / (1 - baseline),

and CORE = the mean of the centered accuracies. A model at chance scores 0, a perfect
model 1.

Three task types, as in the reference nanochat and MosaicML's llm-foundry:

- multiple_choice: one prompt per choice (shared query, different answers); the model
  picks the choice whose answer tokens have the lowest mean cross-entropy.
- schema: one prompt per context option (different beginnings, shared ending); the
  model picks the option under which the shared ending has the lowest mean loss.
- language_modeling: one prompt; correct when greedy decoding reproduces every token of
  the continuation.

Prompts, item order and few-shot choice reproduce the reference exactly (see
`render_mc`, `render_schema`, `render_lm`, `load_task_items`, `fewshot_indices`), so
numbers are comparable with the published ones when all 22 task files are present. Any
task whose data file is missing is reported in the result's "skipped" list, and the
result then says that CORE is the mean over fewer tasks and is not comparable.

Scoring is batched: every sequence of every item is a row; rows are sorted by length
and run `batch_size` at a time, right-padded. A causal model's outputs at real
positions do not depend on the padding after them, so the scores do not depend on the
batch size (up to float rounding).

A "model" is anything with `forward(idx) -> logits (B, T, V)`. Models with a hard
context limit declare it as a `max_seq_len` attribute; their sequences are cropped from
the left, as the reference does for GPT-2. Our own GPT sees whole prompts: its rotary
tables cover ten times its training length, far beyond any CORE prompt of a real model
(only toy models with a tiny sequence_len ever get cropped, at the tables' end).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.core_eval")

# Where the reference downloads its bundle from (a zip holding eval_bundle/).
DEFAULT_EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
BUNDLE_DIRNAME = "eval_bundle"
REQUIRED_BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv")
DATA_SUBDIR = "eval_data"

# The reference's seeds: one shuffle per task (so --max-per-task takes the same random
# subset everywhere), and one RNG per item for its few-shot examples.
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


# -----------------------------------------------------------------------------
# The eval bundle: core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl

def missing_bundle_files(bundle_dir: str | os.PathLike) -> list[str]:
    """The required files (core.yaml, eval_meta_data.csv) absent from `bundle_dir`."""
    return [name for name in REQUIRED_BUNDLE_FILES if not (Path(bundle_dir) / name).is_file()]


def check_bundle(bundle_dir: str | os.PathLike, source: str | None = None) -> Path:
    """Raise FileNotFoundError naming every required file `bundle_dir` lacks."""
    bundle_dir = Path(bundle_dir)
    missing = missing_bundle_files(bundle_dir)
    if missing:
        where = f"the eval bundle from {source}" if source else f"the eval bundle at {bundle_dir}"
        fix = (f"delete {bundle_dir} and run again to fetch it, or point --bundle-url / ${BUNDLE_URL_ENV} "
               f"at a complete bundle" if source is None else
               f"point --bundle-url / ${BUNDLE_URL_ENV} at a complete bundle (a zip or a directory)")
        raise MissingInputError(f"{where} is incomplete: missing {', '.join(missing)}; {fix}")
    return bundle_dir


def ensure_eval_bundle(base_dir: str | os.PathLike, url: str | None = None) -> Path:
    """Return `<base_dir>/eval_bundle`, fetching it first if it is absent.

    The source is `url`, else $NANOCHAT_EVAL_BUNDLE_URL, else the reference's URL. It may
    be an http(s) or file:// URL of a zip, a file:// URL or path of a directory, or a path
    of a zip. The bundle is unpacked (or copied) into a temporary directory beside the
    target and renamed into place, so a reader never sees half a bundle; processes that
    call this at the same time (ranks under torchrun) wait for one another and fetch once.
    """
    target = Path(base_dir) / BUNDLE_DIRNAME
    if target.is_dir():
        return check_bundle(target)
    url = url or os.environ.get(BUNDLE_URL_ENV) or DEFAULT_EVAL_BUNDLE_URL
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{BUNDLE_DIRNAME}.lock"):
        if target.is_dir():  # another process fetched it while we waited
            return check_bundle(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_DIRNAME}.", suffix=".tmp", dir=target.parent))
        try:
            root = _stage_bundle(url, staging)
            check_bundle(root, source=url)
            os.rename(root, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("placed the eval bundle from %s at %s", url, target)
    return target


def _local_path(url: str) -> Path | None:
    """The local path `url` names (a plain path or a file:// URL), else None."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url).expanduser()
    return None


def _stage_bundle(url: str, staging: Path) -> Path:
    """Copy or unpack the bundle named by `url` under `staging`; return its root."""
    local = _local_path(url)
    if local is not None and local.is_dir():
        dest = staging / BUNDLE_DIRNAME
        shutil.copytree(_bundle_root(local), dest)
        return dest
    if local is not None and not local.exists():
        raise MissingInputError(f"no eval bundle at {local} (from {url!r}); give a zip or a directory "
                                f"holding {', '.join(REQUIRED_BUNDLE_FILES)} and eval_data/")
    if local is not None and not zipfile.is_zipfile(local):
        raise UserError(f"{url!r} is neither a directory nor a zip archive; give the eval bundle as one of those")
    if local is not None and urllib.parse.urlparse(url).scheme != "file":
        zip_path = local  # a plain path to a zip: read it where it is
    else:
        from nanochat.downloads import DownloadError, download_file
        zip_path = staging / f"{BUNDLE_DIRNAME}.zip"
        try:
            download_file(url, zip_path, timeout=60, retries=5, validate=_validate_zip)
        except DownloadError as e:
            raise MissingInputError(f"could not fetch the CORE eval bundle from {url}: {e}. Give --bundle-url or "
                                    f"${BUNDLE_URL_ENV} a reachable URL, a local zip or a directory") from e
    unpacked = staging / "unpacked"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(unpacked)  # zipfile drops absolute paths and '..' from member names
    return _bundle_root(unpacked)


def _validate_zip(path: str | os.PathLike) -> bool:
    if not zipfile.is_zipfile(path):
        raise UserError(f"the downloaded eval bundle {path} is not a zip archive")
    return True


def _bundle_root(directory: Path) -> Path:
    """The folder holding core.yaml: `directory` itself, its eval_bundle/, or its only
    subfolder (zips usually wrap the files in one top-level folder)."""
    if (directory / "core.yaml").is_file():
        return directory
    if (directory / BUNDLE_DIRNAME).is_dir():
        return directory / BUNDLE_DIRNAME
    subdirs = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
    if len(subdirs) == 1 and (subdirs[0] / "core.yaml").is_file():
        return subdirs[0]
    return directory  # incomplete: check_bundle names what is missing


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# Tasks

@dataclass(frozen=True)
class TaskSpec:
    """One task of core.yaml, with its random baseline from eval_meta_data.csv."""
    label: str
    task_type: str               # multiple_choice | schema | language_modeling
    dataset_uri: str             # relative to <bundle>/eval_data/
    num_fewshot: int
    continuation_delimiter: str  # between context and continuation; " " unless core.yaml says otherwise
    random_baseline: float       # chance accuracy as a fraction (the CSV stores percent)


def load_task_specs(bundle_dir: str | os.PathLike) -> list[TaskSpec]:
    """The tasks of core.yaml in file order, each with its random baseline."""
    import yaml

    bundle_dir = check_bundle(bundle_dir)
    with open(bundle_dir / "core.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    tasks = config.get("icl_tasks")
    if not tasks:
        raise UserError(f"{bundle_dir / 'core.yaml'} lists no icl_tasks; is it a CORE eval bundle?")
    baselines = load_random_baselines(bundle_dir)
    specs, problems = [], []
    for task in tasks:
        label = task["label"]
        shots = task.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots  # core.yaml lists one value per task
        if task["icl_task_type"] not in TASK_TYPES:
            problems.append(f"{label}: unsupported icl_task_type {task['icl_task_type']!r}")
            continue
        if label not in baselines:
            problems.append(f"{label}: no 'Random baseline' row in eval_meta_data.csv")
            continue
        specs.append(TaskSpec(label=label, task_type=task["icl_task_type"], dataset_uri=task["dataset_uri"],
                              num_fewshot=int(shots), continuation_delimiter=task.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    if problems:
        raise UserError(f"the eval bundle at {bundle_dir} is inconsistent:\n  - " + "\n  - ".join(problems))
    return specs


def load_random_baselines(bundle_dir: str | os.PathLike) -> dict[str, float]:
    """{task label: chance accuracy as a fraction} from eval_meta_data.csv (stored in percent)."""
    with open(Path(bundle_dir) / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
        # 0.01 * percent, the exact operation the reference uses, so centered scores match bit for bit
        return {row["Eval Task"]: 0.01 * float(row["Random baseline"]) for row in csv.DictReader(f)}


def load_task_items(bundle_dir: str | os.PathLike, spec: TaskSpec, max_per_task: int | None = None) -> list[dict]:
    """A task's items in the reference's order: shuffled with Random(1337), then cut to
    the first `max_per_task` (None: all)."""
    path = Path(bundle_dir) / DATA_SUBDIR / spec.dataset_uri
    with open(path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items if max_per_task is None else items[:max_per_task]


def fewshot_indices(idx: int, num_items: int, k: int) -> list[int]:
    """Indices of item `idx`'s few-shot examples among `num_items` items: `k` others drawn
    with Random(1234 + idx), exactly as the reference does. When the task has fewer than
    k other items (tiny --max-per-task), all of them are used in a random order."""
    if k <= 0:
        return []
    others = [i for i in range(num_items) if i != idx]
    return random.Random(FEWSHOT_SEED + idx).sample(others, min(k, len(others)))


# -----------------------------------------------------------------------------
# Prompts. Few-shot examples come first, each a solved item followed by a blank line.

def render_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: [examples] query + delimiter + choice."""
    head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option: [examples] option + delimiter + shared continuation."""
    head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some
    datasets carry trailing spaces), and so is the whole prompt without the continuation:
    a trailing space would be merged into the continuation's first token in the other
    prompt, and the first prompt would no longer be a token prefix of the second."""
    head = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prefix = f"{head}{str(item['context']).strip()}{delimiter}"
    return [prefix.strip(), f"{prefix}{item['continuation']}"]


RENDERERS = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


# -----------------------------------------------------------------------------
# Token rows: (tokens, start, end); the scored tokens are tokens[start:end].

def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def common_suffix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many trailing tokens all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs):
            return i - 1
    return n


@dataclass
class Row:
    item: int          # position of the item in the task's (cut) list
    tokens: list[int]  # BOS + prompt tokens
    start: int         # first scored token
    end: int           # one past the last scored token


def item_rows(task_type: str, token_seqs: list[list[int]], item: int) -> list[Row]:
    """Rows for one item's tokenized prompts (BOS included).

    multiple_choice: the choices differ after the prompts' common token prefix; that
    prefix is context and everything after it is scored (it may start inside a choice
    when choices share their first words, as in the reference).
    schema: the shared ending is the common token suffix; it alone is scored.
    language_modeling: the tokens beyond the prompt without the continuation."""
    if task_type == "multiple_choice":
        start = common_prefix_length(token_seqs)
        return [Row(item, t, start, len(t)) for t in token_seqs]
    if task_type == "schema":
        suffix = common_suffix_length(token_seqs)
        return [Row(item, t, len(t) - suffix, len(t)) for t in token_seqs]
    if task_type == "language_modeling":
        without, with_ = token_seqs
        # The prompt without the continuation is a token prefix of the one with it in
        # practice; if a tokenizer merges across the boundary, score from where they part.
        start = common_prefix_length([without, with_])
        if start != len(without):
            log.debug("item %d: the context is not a token prefix of context+continuation", item)
        return [Row(item, with_, min(start, len(with_) - 1), len(with_))]
    raise UserError(f"unsupported task type {task_type!r}; expected one of {TASK_TYPES}")


def crop_left(row: Row, max_len: int) -> Row:
    """Keep the last `max_len` tokens (models with a hard context limit, e.g. GPT-2)."""
    excess = len(row.tokens) - max_len
    if excess <= 0:
        return row
    if row.start - excess < 1:
        raise UserError(f"item {row.item}: its {row.end - row.start} scored tokens need more context than the "
                        f"model's limit of {max_len} tokens leaves")
    return Row(row.item, row.tokens[excess:], row.start - excess, row.end - excess)


def build_rows(items: Sequence[dict], indices: Sequence[int], spec: TaskSpec, tokenizer,
               max_seq_len: int | None = None) -> list[Row]:
    """Render, tokenize and delimit the rows of the items at `indices`."""
    render = RENDERERS[spec.task_type]
    prompts: list[list[str]] = []
    for idx in indices:
        shots = [items[j] for j in fewshot_indices(idx, len(items), spec.num_fewshot)]
        prompts.append(render(items[idx], spec.continuation_delimiter, shots))
    # one tokenizer call for the whole task (tiktoken encodes a batch in parallel)
    flat = tokenizer.encode([p for group in prompts for p in group], prepend=tokenizer.get_bos_token_id())
    rows: list[Row] = []
    offset = 0
    for idx, group in zip(indices, prompts):
        for row in item_rows(spec.task_type, flat[offset:offset + len(group)], idx):
            rows.append(crop_left(row, max_seq_len) if max_seq_len else row)
        offset += len(group)
    return rows


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_rows(model, rows: Sequence[Row], pad_id: int, device: torch.device | str,
               batch_size: int = 16) -> list[tuple[float, bool]]:
    """For every row: (mean cross-entropy of its scored tokens, whether greedy decoding
    predicts every one of them). Rows run `batch_size` at a time, longest first,
    right-padded with `pad_id` (never scored, and invisible to earlier positions of a
    causal model). An empty scored span gives (nan, True), as in the reference."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    results: list[tuple[float, bool]] = [(math.nan, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens), reverse=True)
    for b in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[b:b + batch_size]]
        width = max(len(r.tokens) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        ids = ids.to(device)
        # Position p predicts token p+1, so a row's scored tokens [start, end) are
        # predicted at positions [start-1, end-1).
        seg = [i for i, r in enumerate(chunk) for _ in range(r.start, r.end)]
        pos = [p for r in chunk for p in range(r.start - 1, r.end - 1)]
        seg_t = torch.tensor(seg, dtype=torch.long, device=ids.device)
        pos_t = torch.tensor(pos, dtype=torch.long, device=ids.device)
        picked = _logits_at(model, ids, seg_t, pos_t)  # (N, V) fp32, N = scored tokens in the chunk
        targets = ids[seg_t, pos_t + 1]
        nll = F.cross_entropy(picked, targets, reduction="none")
        miss = (picked.argmax(dim=-1) != targets).float()
        count = torch.zeros(len(chunk), device=ids.device).index_add_(0, seg_t, torch.ones_like(nll))
        loss_sum = torch.zeros(len(chunk), device=ids.device).index_add_(0, seg_t, nll)
        misses = torch.zeros(len(chunk), device=ids.device).index_add_(0, seg_t, miss)
        mean_loss = (loss_sum / count).tolist()  # 0/0 = nan for an empty span
        for r, loss, m in zip(order[b:b + batch_size], mean_loss, misses.tolist()):
            results[r] = (loss, m == 0)
    return results


def _logits_at(model, ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 logits (N, V) at (rows[n], positions[n]) of the batch `ids` (B, T).

    Our GPT exposes `hidden_states` and `logits`; applying the unembedding only where a
    token is scored skips the (B, T, V) logits tensor, most of the head's FLOPs and
    memory at a large vocabulary. Any other model is run whole."""
    if callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "logits", None)):
        return model.logits(model.hidden_states(ids)[rows, positions]).float()
    return model(ids)[rows, positions].float()


def context_limit(model) -> int | None:
    """The longest input `model` accepts, or None: its `max_seq_len` (models with learned
    positions such as GPT-2), else the length of its rotary tables (our GPT: many times
    its training length, so real prompts never reach it)."""
    limit = getattr(model, "max_seq_len", None)
    if limit is None and isinstance(getattr(model, "cos", None), torch.Tensor) and model.cos.dim() >= 2:
        limit = model.cos.size(1)
    return limit


def judge_items(task_type: str, items: Sequence[dict], rows: Sequence[Row],
                scores: Sequence[tuple[float, bool]]) -> dict[int, bool]:
    """{item index: correct?} from its rows' scores."""
    per_item: dict[int, list[tuple[float, bool]]] = {}
    for row, score in zip(rows, scores):
        per_item.setdefault(row.item, []).append(score)
    out = {}
    for idx, item_scores in per_item.items():
        if task_type == "language_modeling":
            out[idx] = item_scores[0][1]
        else:
            losses = [loss for loss, _ in item_scores]
            # Python's min/index, like the reference (a nan loss is never chosen unless first)
            out[idx] = losses.index(min(losses)) == items[idx]["gold"]
    return out


def evaluate_task(model, tokenizer, items: Sequence[dict], spec: TaskSpec, device: torch.device | str,
                  batch_size: int = 16, rank: int = 0, world_size: int = 1) -> float:
    """Accuracy on `items` (already in evaluation order). Under torchrun each rank takes
    every world_size-th item and the per-item results are summed across ranks."""
    if not items:
        raise UserError(f"task {spec.label} has no items to evaluate")
    indices = range(rank, len(items), world_size)
    rows = build_rows(items, indices, spec, tokenizer, context_limit(model))
    scores = score_rows(model, rows, tokenizer.get_bos_token_id(), device, batch_size)
    correct = torch.zeros(len(items), dtype=torch.float64)  # exact k/n after the sum
    for idx, ok in judge_items(spec.task_type, items, rows, scores).items():
        correct[idx] = float(ok)
    if world_size > 1:
        correct = correct.to(device)  # NCCL reduces device tensors
        torch.distributed.all_reduce(correct, op=torch.distributed.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def core_metric(centered: dict[str, float]) -> float:
    """CORE: the mean of the centered accuracies."""
    if not centered:
        raise ValueError("no task was evaluated, so there is no CORE metric")
    return sum(centered.values()) / len(centered)


def evaluate_core(model, tokenizer, device: torch.device | str, bundle_dir: str | os.PathLike,
                  max_per_task: int | None = None, batch_size: int = 16, rank: int = 0,
                  world_size: int = 1) -> dict[str, Any]:
    """Score `model` on every task of the bundle whose data file is present.

    Returns {"core", "tasks": {label: {accuracy, centered, random_baseline, num_examples,
    num_fewshot, task_type, seconds}}, "skipped": [labels], "skipped_reasons", "num_tasks",
    "num_tasks_total", "comparable", "note", "examples", "seconds", "examples_per_s"}.
    "comparable" is False when tasks were skipped or cut by `max_per_task`: CORE is then
    the mean over what was evaluated and differs from the published full-bundle number.
    """
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be at least 1 (or None for all items), got {max_per_task}")
    bundle_dir = Path(bundle_dir)
    specs = load_task_specs(bundle_dir)
    tasks: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    cut = False
    examples = 0
    loaded: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for spec in specs:
        data_path = bundle_dir / DATA_SUBDIR / spec.dataset_uri
        if not data_path.is_file():
            skipped[spec.label] = f"missing {DATA_SUBDIR}/{spec.dataset_uri}"
            log.warning("CORE: skipping %s: its data file %s is missing", spec.label, data_path)
            continue
        t0 = time.perf_counter()
        if spec.dataset_uri not in loaded:  # hellaswag is scored twice (0- and 10-shot)
            loaded[spec.dataset_uri] = load_task_items(bundle_dir, spec)
        items = loaded[spec.dataset_uri]
        if max_per_task is not None and len(items) > max_per_task:
            items, cut = items[:max_per_task], True
        accuracy = evaluate_task(model, tokenizer, items, spec, device, batch_size, rank, world_size)
        centered = centered_accuracy(accuracy, spec.random_baseline)
        seconds = time.perf_counter() - t0
        examples += len(items)
        tasks[spec.label] = {"accuracy": accuracy, "centered": centered, "random_baseline": spec.random_baseline,
                             "num_examples": len(items), "num_fewshot": spec.num_fewshot,
                             "task_type": spec.task_type, "seconds": seconds}
        log.info("CORE %-34s %2d-shot %-17s accuracy %.4f | centered %+.4f | %d items in %.2fs",
                 spec.label, spec.num_fewshot, spec.task_type, accuracy, centered, len(items), seconds)
    if not tasks:
        raise MissingInputError(f"none of the {len(specs)} CORE tasks has its data file under "
                                f"{bundle_dir / DATA_SUBDIR}; the eval bundle is incomplete")
    seconds = time.perf_counter() - t_start
    core = core_metric({label: t["centered"] for label, t in tasks.items()})
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} of {len(specs)} tasks skipped (missing data: {', '.join(skipped)}); "
                     f"CORE is the mean over the {len(tasks)} evaluated tasks and is not comparable "
                     f"to the published {len(specs)}-task number")
    if cut:
        notes.append(f"at most {max_per_task} items per task: an estimate of the full-data score")
    if skipped:
        log.warning("CORE: %s", notes[0])
    log.info("CORE %.4f over %d tasks, %d items in %.1fs (%.1f items/s)", core, len(tasks), examples, seconds,
             examples / seconds)
    return {"core": core, "tasks": tasks, "skipped": list(skipped), "skipped_reasons": skipped,
            "num_tasks": len(tasks), "num_tasks_total": len(specs), "comparable": not skipped and not cut,
            "note": "; ".join(notes) or None, "examples": examples, "seconds": seconds,
            "examples_per_s": examples / seconds}
