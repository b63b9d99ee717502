"""Scoring a chat model on its evaluation tasks: the loops that chat-eval, SFT and RL share.

Multiple-choice tasks (ARC-Easy, ARC-Challenge, MMLU) are scored without sampling: the
prompt goes through the model in batches and the answer is the choice letter with the
highest logit at the answer position, among that question's letters only. Generative
tasks (GSM8K, HumanEval, SpellingBee) sample completions through the Engine, with the
calculator tool; with N samples per problem, pass@k is estimated for every k ≤ N.

ChatCORE is the mean over all six tasks of the centered accuracy
(acc - baseline) / (1 - baseline), with baseline 0.25 for four-way multiple choice and 0
for the generative tasks: 0 is chance, 1 is perfect.

Every function here that takes `rank` and `world_size` splits the problems over ranks
and all-reduces the counts: every rank must call it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from math import comb
from typing import Any

import torch
import torch.distributed as dist

from nanochat.errors import UserError

log = logging.getLogger("nanochat.chat_scoring")

TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")
# Accuracy of guessing: four-way multiple choice, or writing out an exact answer.
RANDOM_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25,
                    "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


# -----------------------------------------------------------------------------
# Results

@dataclass
class EvalResult:
    """One task's outcome, summed over ranks. `accuracy` is pass@num_samples (a problem
    counts when any sample is right); `pass_at_k[k]` is the unbiased estimate of pass@k
    (Chen et al. 2021, arXiv:2107.03374) from the same samples, for k = 1..num_samples."""
    task: str
    passed: int
    total: int
    num_samples: int = 1
    pass_at_k: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.passed / self.total if self.total else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n
    samples, c of them correct, is correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def centered_accuracy(task_name: str, accuracy: float) -> float:
    baseline = RANDOM_BASELINES[task_name]
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(accuracies: dict[str, float], tasks: tuple[str, ...] = TASK_NAMES) -> float | None:
    """Mean centered accuracy over `tasks`, or None when any of them is missing."""
    if any(t not in accuracies for t in tasks):
        return None
    return sum(centered_accuracy(t, accuracies[t]) for t in tasks) / len(tasks)


# -----------------------------------------------------------------------------
# Tasks

def load_task(task_name: str, *, base_dir=None, mirror: str | None = None):
    """The evaluation split of a task, by its ChatCORE name."""
    from nanochat.tasks import ARC, GSM8K, MMLU, HumanEval, SpellingBee
    hub = {"base_dir": base_dir, "mirror": mirror}
    if task_name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=task_name, split="test", **hub)
    if task_name == "MMLU":
        return MMLU(subset="all", split="test", **hub)
    if task_name == "GSM8K":
        return GSM8K(subset="main", split="test", **hub)
    if task_name == "HumanEval":
        return HumanEval(**hub)
    if task_name == "SpellingBee":
        return SpellingBee(size=256, split="test", base_dir=base_dir)
    raise UserError(f"unknown chat task {task_name!r}; choose from {', '.join(TASK_NAMES)}")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model: torch.nn.Module) -> int:
    """Longest input the model takes (its rotary tables may reach past sequence_len)."""
    limit = getattr(model, "rotary_seq_len", None)
    return int(limit) if limit is not None else int(model.config.sequence_len)


def _all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _warn_too_long(name: str, count: int, limit: int, rank: int) -> None:
    if count:
        log.warning("%s: %d prompt(s) on rank %d are longer than the model's %d positions; counted as wrong",
                    name, count, rank, limit)


def _letter_ids(tokenizer, letters, cache: dict[str, int]) -> list[int]:
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise UserError(f"the answer letter {letter!r} is {len(encoded)} tokens in this tokenizer; "
                                "multiple-choice scoring needs every letter to be a single token")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


def _answer_logits(model: torch.nn.Module, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Logits (B, vocab) at one position per row of `ids` (B, T). A model that exposes
    hidden_states/logits (our GPT) projects only those B positions onto the vocabulary
    instead of all B*T, which is most of the memory and time at large vocabularies."""
    rows = torch.arange(ids.size(0), device=ids.device)
    cols = torch.tensor(positions, device=ids.device)
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        return model.logits(model.hidden_states(ids)[rows, cols])
    return model(ids)[rows, cols]


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model: torch.nn.Module, *, batch_size: int = 8,
                         max_problems: int | None = None, rank: int = 0, world_size: int = 1,
                         name: str | None = None) -> EvalResult:
    """Score multiple-choice problems from the logits of their answer letters.

    Problems are cut into batches of `batch_size`; rank r takes batches r, r+W, ...
    Each prompt ends with <|assistant_start|>; prompts are right-padded with BOS (causal
    attention: padding after a position cannot change its logits) and the prediction is
    the argmax over the question's letters of the logits at the prompt's last position."""
    t0 = time.perf_counter()
    device = _model_device(model)
    bos = tokenizer.get_bos_token_id()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    num_batches = -(-n // batch_size)
    limit = _max_positions(model)
    cache: dict[str, int] = {}
    passed = total = too_long = 0
    for b in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        # a prompt the model cannot take counts as a wrong answer
        keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
        too_long += len(prompts) - len(keep)
        total += len(prompts) - len(keep)
        if not keep:
            continue
        conversations, prompts = [conversations[i] for i in keep], [prompts[i] for i in keep]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = _answer_logits(model, ids, [len(p) - 1 for p in prompts])  # (B, vocab)
        for row, conv in enumerate(conversations):
            letters = conv["letters"]
            focus = logits[row, _letter_ids(tokenizer, letters, cache)]  # (num_letters,)
            predicted = letters[int(focus.argmax().item())]
            passed += int(task.evaluate(conv, predicted))
            total += 1
    _warn_too_long(name or type(task).__name__, too_long, limit, rank)
    passed, total = (int(v) for v in _all_reduce_sum([passed, total], device, world_size))
    return EvalResult(task=name or type(task).__name__, passed=passed, total=total, num_samples=1,
                      pass_at_k={1: passed / total if total else 0.0}, seconds=time.perf_counter() - t0)


@torch.no_grad()
def run_generative_eval(task, tokenizer, model: torch.nn.Module, engine=None, *, num_samples: int = 1,
                        max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                        max_problems: int | None = None, rank: int = 0, world_size: int = 1,
                        seed: int = 42, name: str | None = None, log_every: int = 50) -> EvalResult:
    """Sample `num_samples` completions per problem (rank r takes problems r, r+W, ...)
    with tool use, grade each with `task.evaluate`, and sum over ranks."""
    from nanochat.engine import Engine
    t0 = time.perf_counter()
    engine = engine or Engine(model, tokenizer)
    device = _model_device(model)
    n = len(task) if max_problems is None else min(len(task), max_problems)
    limit = _max_positions(model)
    passed = total = too_long = 0
    pass_sums = [0.0] * num_samples  # sum over problems of the pass@k estimate, k = 1..num_samples
    for i in range(rank, n, world_size):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        if len(prompt) >= limit:  # no room to answer: counts as a miss on every sample
            too_long += 1
            total += 1
            continue
        top = top_k if top_k > 0 else None
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top, seed=seed + i)
        completions = [tokenizer.decode(seq[len(prompt):]) for seq in sequences]
        correct = sum(bool(task.evaluate(conv, c)) for c in completions)
        passed += int(correct > 0)
        total += 1
        for k in range(1, num_samples + 1):
            pass_sums[k - 1] += pass_at_k(num_samples, correct, k)
        if log_every and total % log_every == 0:
            log.info("%s: rank %d %d/%d problems, %d passed", name or type(task).__name__, rank, total,
                     -(-(n - rank) // world_size), passed)
    _warn_too_long(name or type(task).__name__, too_long, limit, rank)
    reduced = _all_reduce_sum([passed, total, *pass_sums], device, world_size)
    passed, total = int(reduced[0]), int(reduced[1])
    curve = {k: (reduced[1 + k] / total if total else 0.0) for k in range(1, num_samples + 1)}
    return EvalResult(task=name or type(task).__name__, passed=passed, total=total, num_samples=num_samples,
                      pass_at_k=curve, seconds=time.perf_counter() - t0)


def run_chat_eval(model: torch.nn.Module, tokenizer, task_name: str, *, batch_size: int = 8,
                  num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                  max_problems: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 42,
                  base_dir=None, mirror: str | None = None, engine=None, task=None) -> EvalResult:
    """Evaluate one task by its ChatCORE name ('ARC-Easy', ..., 'SpellingBee'); categorical
    tasks by letter logits, generative ones by sampling. Every rank must call it (the
    counts are all-reduced). Pass `task` to evaluate another split or a custom Task."""
    task = task if task is not None else load_task(task_name, base_dir=base_dir, mirror=mirror)
    was_training = model.training
    model.eval()
    try:
        if task.eval_type == "categorical":
            return run_categorical_eval(task, tokenizer, model, batch_size=batch_size, max_problems=max_problems,
                                        rank=rank, world_size=world_size, name=task_name)
        if task.eval_type == "generative":
            return run_generative_eval(task, tokenizer, model, engine, num_samples=num_samples,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       max_problems=max_problems, rank=rank, world_size=world_size, seed=seed,
                                       name=task_name)
        raise ValueError(f"task {task_name!r} has eval_type {task.eval_type!r}; expected categorical or generative")
    finally:
        model.train(was_training)


def evaluate_chatcore(model: torch.nn.Module, tokenizer, *, tasks: tuple[str, ...] = TASK_NAMES,
                      max_problems: int | None = None, max_problems_categorical: int | None = None,
                      batch_size: int = 8, max_new_tokens: int = 512, rank: int = 0, world_size: int = 1,
                      base_dir=None, mirror: str | None = None) -> dict[str, Any]:
    """Greedy ChatCORE during training: every task, `max_problems` per generative task and
    `max_problems_categorical` per multiple-choice task (None: all). Returns
    {"accuracy": {task: acc}, "chatcore": float | None, "chatcore_cat": float | None}."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    accuracies = {}
    for name in tasks:
        limit = max_problems_categorical if name in CATEGORICAL_TASKS else max_problems
        result = run_chat_eval(model, tokenizer, name, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               max_problems=limit, rank=rank, world_size=world_size, base_dir=base_dir,
                               mirror=mirror, engine=engine)
        accuracies[name] = result.accuracy
    return {"accuracy": accuracies, "chatcore": chatcore(accuracies, tasks=TASK_NAMES),
            "chatcore_cat": chatcore(accuracies, tasks=CATEGORICAL_TASKS)}
