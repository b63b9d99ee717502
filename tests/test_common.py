"""The CPU memory policy: freed tensor buffers are reused from the heap, not re-faulted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A training step's pattern: buffers of mixed sizes (two above glibc's 32 MiB ceiling
# for its adaptive mmap threshold) allocated, filled and freed, round after round. Prints
# the minor page faults of each round, then of one more round after release_free_memory().
_PROBE = """
import resource, sys, torch
from nanochat.common import release_free_memory, tune_cpu_malloc
if sys.argv[1] == "tuned":
    assert tune_cpu_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes_mib = [12, 12, 48, 12, 24, 12, 6, 48, 12]
def one_round():
    before = faults()
    keep = [torch.ones(s << 18) for s in sizes_mib]  # float32: s MiB each
    del keep
    return faults() - before
rounds = [one_round() for _ in range(8)]
release_free_memory()
print(*rounds, one_round())
"""
ROUND_PAGES = sum([12, 12, 48, 12, 24, 12, 6, 48, 12]) * 256  # 4 KiB pages touched per round


def _probe(mode: str) -> tuple[list[int], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    *rounds, after_release = map(int, out.stdout.split())
    return rounds, after_release


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_reuses_freed_buffers_and_release_returns_them():
    default_rounds, _ = _probe("default")
    tuned_rounds, tuned_after_release = _probe("tuned")
    # glibc's default maps buffers above its threshold afresh every round: their pages fault again
    assert min(default_rounds[4:]) > 0.2 * ROUND_PAGES, default_rounds
    # tuned: once the heap has settled, a round is served from memory already faulted in
    assert sum(tuned_rounds[4:]) < 0.05 * ROUND_PAGES, tuned_rounds
    # release_free_memory() handed the free pages back, so the next round faults again
    assert tuned_after_release > 0.4 * ROUND_PAGES, tuned_after_release


def test_explicit_malloc_environment_wins(monkeypatch):
    from nanochat.common import tune_cpu_malloc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert tune_cpu_malloc() is False
