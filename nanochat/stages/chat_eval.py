"""Evaluate a chat model (sft or rl) on ARC, MMLU, GSM8K, HumanEval and SpellingBee; ChatCORE.

Multiple-choice tasks (ARC-Easy, ARC-Challenge, MMLU) are scored without sampling: the
prompt goes through the model in batches and the answer is the choice letter with the
highest logit at the answer position, among that question's letters only. Generative
tasks (GSM8K, HumanEval, SpellingBee) sample completions through the Engine, with the
calculator tool; with -n N samples per problem, pass@k is reported for every k ≤ N.

ChatCORE is the mean over all six tasks of the centered accuracy
(acc - baseline) / (1 - baseline), with baseline 0.25 for four-way multiple choice and 0
for the generative tasks: 0 is chance, 1 is perfect. It is reported only when every task ran.
(The scoring itself lives in nanochat.chat_scoring, shared with sft and rl.)

  nanochat chat-eval -i sft
  nanochat chat-eval -i rl -a GSM8K -n 8 -t 1.0
  torchrun --standalone --nproc_per_node=8 -m nanochat chat-eval -i sft -a 'ARC-Easy|MMLU'
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from nanochat.chat_scoring import TASK_NAMES, EvalResult, chatcore, run_chat_eval
from nanochat.common import Runtime
from nanochat.config import check, option, to_dict

log = logging.getLogger("nanochat.chat_eval")


@dataclass
class Config:
    source: str = option("sft", "which chat model to evaluate", short="-i", choices=("sft", "rl"))
    task_name: str | None = option(None, "tasks to run, '|'-separated [automatic: all of " + "|".join(TASK_NAMES) + "]",
                                   short="-a")
    temperature: float = option(0.0, "sampling temperature of the generative tasks (0: greedy)", short="-t")
    max_new_tokens: int = option(512, "longest completion sampled per problem", short="-m")
    num_samples: int = option(1, "completions sampled per problem; pass@k is reported for k up to this", short="-n")
    top_k: int = option(50, "sample only among the k likeliest tokens (0: no limit)", short="-k")
    batch_size: int = option(8, "problems per forward pass of the multiple-choice tasks", short="-b")
    model_tag: str | None = option(None, "checkpoint directory to load [automatic: the largest model]", short="-g")
    step: int | None = option(None, "checkpoint step to load [automatic: the last]", short="-s")
    max_problems: int | None = option(None, "evaluate at most this many problems per task [automatic: all]", short="-x")
    seed: int = option(42, "seed of the samplers (problem i uses seed + i)")
    compile: bool = option(False, "generative tasks decode through torch.compile graphs (one per cache shape, "
                                  "~40 s each on a small CPU; see nanochat/engine.py)")

    def validate(self) -> None:
        p = []
        if self.task_name is not None:
            unknown = [t for t in parse_task_names(self.task_name) if t not in TASK_NAMES]
            if unknown:
                p.append(f"-a/--task-name: unknown task(s) {unknown}; choose from {'|'.join(TASK_NAMES)}")
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            p.append(f"--top-k must be >= 0 (0 disables it; got {self.top_k})")
        if self.max_problems is not None and self.max_problems < 1:
            p.append(f"--max-problems must be >= 1 (got {self.max_problems})")
        if self.num_samples > 1 and self.temperature == 0:
            p.append("--num-samples > 1 with --temperature 0 samples the same greedy completion N times; "
                     "raise the temperature (e.g. -t 1.0) or use -n 1")
        check(p)


def parse_task_names(text: str) -> list[str]:
    """'ARC-Easy|GSM8K' -> ['ARC-Easy', 'GSM8K'] (blanks around names ignored, order kept, no repeats)."""
    names = [t.strip() for t in text.split("|") if t.strip()]
    return list(dict.fromkeys(names))


# -----------------------------------------------------------------------------
# The stage

def _merge_report(base_dir, title: str, model_id: dict, results: dict[str, dict]) -> dict[str, dict]:
    """Results of earlier runs on the same checkpoint, updated with these (so `-a GSM8K`
    after a full run keeps the other tasks in the report)."""
    from nanochat.report import report_dir, slugify
    path = report_dir(base_dir) / f"{slugify(title)}.json"
    merged: dict[str, dict] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())["data"]
            if old.get("model") == model_id:
                merged.update(old.get("results", {}))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable report section %s", path)
    merged.update(results)
    return merged


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.checkpoint import load_model
    from nanochat.node_sync import sync_checkpoint
    from nanochat.engine import Engine
    from nanochat.report import log_section

    config.validate()
    tasks = TASK_NAMES if config.task_name is None else tuple(parse_task_names(config.task_name))
    tag, step = sync_checkpoint(runtime, config.source, config.model_tag, config.step)  # multi-node: see node_sync
    model, tokenizer, meta = load_model(config.source, runtime.base_dir, runtime.device, runtime.dtype,
                                        tag=tag, step=step)
    model.eval()
    engine = Engine(model, tokenizer, compile=config.compile)
    model_id = {"source": config.source, "tag": meta.get("model_tag", config.model_tag), "step": meta.get("step")}
    log.info("evaluating %s model (step %s) on %s", config.source, meta.get("step"), ", ".join(tasks))

    results: dict[str, EvalResult] = {}
    for name in tasks:
        result = run_chat_eval(model, tokenizer, name, batch_size=config.batch_size, num_samples=config.num_samples,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_k=config.top_k, max_problems=config.max_problems, rank=runtime.rank,
                               world_size=runtime.world_size, seed=config.seed, base_dir=runtime.base_dir,
                               engine=engine)
        results[name] = result
        extra = ""
        if result.num_samples > 1:
            extra = " | " + " ".join(f"pass@{k} {100 * v:.2f}%" for k, v in result.pass_at_k.items())
        log.info("%s accuracy: %d/%d = %.2f%%%s (%.1f s)", name, result.passed, result.total,
                 100 * result.accuracy, extra, result.seconds)

    accuracies = {name: r.accuracy for name, r in results.items()}
    score = chatcore(accuracies)
    missing = [t for t in TASK_NAMES if t not in accuracies]
    if score is not None:
        log.info("ChatCORE: %.4f", score)
    else:
        log.info("ChatCORE not computed: it needs all six tasks; missing %s", ", ".join(missing))
    metrics: dict[str, Any] = {"accuracy": accuracies, "chatcore": score, "missing_for_chatcore": missing,
                               "pass_at_k": {n: r.pass_at_k for n, r in results.items() if r.num_samples > 1},
                               "problems": {n: r.total for n, r in results.items()}}
    if runtime.is_master:
        title = f"Chat evaluation {config.source}"
        merged = _merge_report(runtime.base_dir, title, model_id, {n: asdict(r) for n, r in results.items()})
        merged_acc = {n: r["passed"] / r["total"] if r["total"] else 0.0 for n, r in merged.items()}
        log_section(runtime.base_dir, title, {
            "config": to_dict(config), "model": model_id, "results": merged,
            "accuracy": merged_acc, "chatcore": chatcore(merged_acc)})
    return metrics
