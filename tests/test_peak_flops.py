"""The MFU denominator: measured once per processor, thread count and dtype, then read
back from the base dir so that every stage of a run divides by the same number."""
from __future__ import annotations

import json

import pytest
import torch

import nanochat.common as common


def _forbid_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measured again although the cache holds the figure")
    monkeypatch.setattr(common, "measure_peak_matmul_flops", fail)


def test_measured_peak_is_cached_in_the_base_dir(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    first = common.peak_flops(cpu, torch.float32, cache_dir=tmp_path)  # a real measurement
    assert first > 1e8  # any CPU of this century does more than 0.1 GFLOP/s
    table = json.loads((tmp_path / common.PEAK_FLOPS_CACHE).read_text())
    [(key, value)] = table.items()
    assert value == first and "float32" in key and common.device_description(cpu) in key
    common._MEASURED_PEAK.clear()       # a new process: only the file remembers
    _forbid_measuring(monkeypatch)
    assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path) == first


def test_each_dtype_and_thread_count_has_its_own_figure(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    figures = iter([1.5e11, 2.5e11, 0.8e11])
    monkeypatch.setattr(common, "measure_peak_matmul_flops", lambda device, dtype, **probe: next(figures))
    assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path) == 1.5e11
    assert common.peak_flops(cpu, torch.bfloat16, cache_dir=tmp_path) == 2.5e11
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path) == 0.8e11
    finally:
        torch.set_num_threads(threads)
    assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path) == 1.5e11
    assert len(json.loads((tmp_path / common.PEAK_FLOPS_CACHE).read_text())) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": "y"}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, content):
    (tmp_path / common.PEAK_FLOPS_CACHE).write_text(content)
    monkeypatch.setattr(common, "measure_peak_matmul_flops", lambda device, dtype, **probe: 3.0e11)
    assert common.peak_flops(torch.device("cpu"), torch.float32, cache_dir=tmp_path) == 3.0e11
    table = json.loads((tmp_path / common.PEAK_FLOPS_CACHE).read_text())
    assert 3.0e11 in table.values()


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """A first run (peak not cached yet) must initialise its model as a later run does."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    common._MEASURED_PEAK.pop(("cpu", torch.float32), None)
    common.measure_peak_matmul_flops(torch.device("cpu"), torch.float32, sizes=(64, 128), budget_seconds=0.2)
    assert torch.equal(torch.rand(4), expected)
