"""The CPU memory policy: freed tensor buffers stay in the process for reuse (no fresh
mapping and page faults next time) until `release_free_memory()` hands them back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Fills a 48 MiB tensor, frees it, then releases free memory; prints by how many MiB the
# resident size fell at the free and at the release. 48 MiB is above the largest block
# glibc's default ever serves from its heap (32 MiB), so by default it is a private
# mapping that the free unmaps.
_PROBE = """
import sys, torch
from nanochat.common import release_free_memory, tune_cpu_malloc
if sys.argv[1] == "tuned":
    assert tune_cpu_malloc()
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
t = torch.ones(12 << 20)
filled = rss_mib()
del t
freed = rss_mib()
release_free_memory()
print(filled - freed, freed - rss_mib())
"""


def _probe(mode: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    at_free, at_release = map(float, out.stdout.split())
    return at_free, at_release


@pytest.mark.slow  # two fresh interpreters importing torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_keeps_freed_buffers_until_released():
    default_free, _ = _probe("default")
    tuned_free, tuned_release = _probe("tuned")
    assert default_free > 40  # glibc's default unmaps the block: next time its pages fault in again
    assert tuned_free < 8  # tuned: the block stays in the heap for the next allocation
    assert tuned_release > 40  # release_free_memory() gives it back


def test_explicit_malloc_environment_wins(monkeypatch):
    from nanochat.common import tune_cpu_malloc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert tune_cpu_malloc() is False
