"""Benchmark the code sandbox: per-program overhead and HumanEval's canonical run.

Runs an empty program --runs times under each isolation (the in-process guard alone,
and kernel namespaces; runs alternate so that both see the same machine load) and
prints the median and p95 wall time of one `execute_code` call. Then grades every
canonical HumanEval solution under each isolation, as `HumanEval.evaluate` does (one
program at a time, alternating isolations), and prints the summed time of the calls and
pass@1 (which must not depend on the isolation).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.execution import execute_code, sandbox_isolation
from nanochat.tasks.humaneval import build_program

log = logging.getLogger("nanochat.bench_sandbox")


@dataclass
class Config:
    runs: int = option(100, "empty-program runs per isolation")
    humaneval: bool = option(True, "also grade every canonical HumanEval solution under each isolation")
    humaneval_file: str | None = option(None, "HumanEval.jsonl(.gz) to read (default: the hub copy in the base dir)")
    timeout: float = option(5.0, "per-program timeout, as HumanEval's")

    def validate(self) -> None:
        problems = []
        if self.runs <= 0:
            problems.append(f"--runs must be positive, got {self.runs}")
        if self.timeout <= 0:
            problems.append(f"--timeout must be positive, got {self.timeout}")
        if self.humaneval_file is not None and not Path(self.humaneval_file).is_file():
            problems.append(f"--humaneval-file {self.humaneval_file} does not exist")
        check(problems)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _humaneval_rows(config: Config, runtime: Runtime) -> list[dict]:
    if config.humaneval_file is None:
        from nanochat.tasks.humaneval import HumanEval
        return list(HumanEval(base_dir=runtime.base_dir).rows)
    path = Path(config.humaneval_file)
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _timed_calls(programs: list[str], isolations: list[str], timeout: float) -> dict[str, list[tuple[float, bool]]]:
    """(seconds, success) of each program under each isolation, the isolations taking turns
    program by program so that a change in the machine's load hits them alike."""
    calls: dict[str, list[tuple[float, bool]]] = {iso: [] for iso in isolations}
    for program in programs:
        for iso in isolations:
            t0 = time.perf_counter()
            success = execute_code(program, timeout=timeout, isolation=iso).success
            calls[iso].append((time.perf_counter() - t0, success))
    return calls


def run(config: Config, runtime: Runtime) -> dict:
    config.validate()
    isolations = ["guard"] + (["namespaces"] if sandbox_isolation() == "namespaces" else [])
    if len(isolations) == 1:
        log.warning("kernel namespaces unavailable: only the guard is measured")
    _timed_calls(["pass"], isolations, config.timeout)  # warm the page cache
    empty = _timed_calls(["pass"] * config.runs, isolations, config.timeout)
    for iso in isolations:
        if not all(success for _, success in empty[iso]):
            raise RuntimeError(f"an empty program failed under {iso}")
    times = {iso: [seconds for seconds, _ in empty[iso]] for iso in isolations}
    metrics: dict = {"cpu_count": os.cpu_count(), "runs": config.runs, "euid": os.geteuid()}
    for iso in isolations:
        metrics[f"{iso}_median_ms"] = round(1000 * statistics.median(times[iso]), 1)
        metrics[f"{iso}_p95_ms"] = round(1000 * _percentile(times[iso], 0.95), 1)
    if "namespaces" in isolations:
        metrics["overhead_median_ms"] = round(metrics["namespaces_median_ms"] - metrics["guard_median_ms"], 1)
        metrics["overhead_p95_ms"] = round(metrics["namespaces_p95_ms"] - metrics["guard_p95_ms"], 1)
    lines = [f"empty program, {config.runs} runs per isolation ({os.cpu_count()} CPUs, euid {os.geteuid()}):"]
    for iso in isolations:
        lines.append(f"  {iso:<11} median {metrics[f'{iso}_median_ms']:7.1f} ms   p95 {metrics[f'{iso}_p95_ms']:7.1f} ms")
    if "overhead_median_ms" in metrics:
        lines.append(f"  overhead    median {metrics['overhead_median_ms']:+7.1f} ms   p95 {metrics['overhead_p95_ms']:+7.1f} ms")

    if config.humaneval:
        rows = _humaneval_rows(config, runtime)
        programs = [build_program(r["prompt"], r["prompt"] + r["canonical_solution"], r["test"], r["entry_point"])
                    for r in rows]
        metrics["humaneval_programs"] = len(programs)
        lines.append(f"HumanEval canonical solutions ({len(programs)} programs, one at a time):")
        graded = _timed_calls(programs, isolations, config.timeout)
        for iso in isolations:
            seconds, passed = sum(s for s, _ in graded[iso]), sum(ok for _, ok in graded[iso])
            metrics[f"humaneval_{iso}_s"] = round(seconds, 2)
            metrics[f"humaneval_{iso}_passed"] = passed
            lines.append(f"  {iso:<11} {seconds:7.2f} s   pass@1 {passed}/{len(programs)}")
    if runtime.is_master:
        print("\n".join(lines), flush=True)
        print(json.dumps(metrics), flush=True)  # last line: every number, as the other benchmarks do
    return metrics
