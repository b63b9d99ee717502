"""The MFU denominator: measured once per processor, thread count and dtype, then read
back from the base dir so that every stage of a run divides by the same number."""
from __future__ import annotations

import io
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


def test_a_cached_peak_below_an_achieved_rate_is_measured_again(tmp_path, monkeypatch):
    """A peak measured while the machine was busy would put every later MFU above 100%:
    a rate the run reached (bench-train's best step) is a floor, and a cached figure under
    it is re-measured and replaced (by the floor if the new probe is still below it)."""
    from logcapture import capture_log
    cpu = torch.device("cpu")
    key = f"{common.device_description(cpu)} | float32 | torch {torch.__version__}"
    path = tmp_path / common.PEAK_FLOPS_CACHE
    path.write_text(json.dumps({key: 4.6e10, "other machine | float32 | torch 0": 1.0}))
    _forbid_measuring(monkeypatch)
    assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path, at_least=4.0e10) == 4.6e10  # consistent
    probes = iter([1.3e11, 0.9e11])
    monkeypatch.setattr(common, "measure_peak_matmul_flops", lambda device, dtype, **probe: next(probes))
    with capture_log("nanochat") as log:
        assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path, at_least=7.5e10) == 1.3e11
    assert "measured on a busy machine" in log.text and "4.6e+10" in log.text
    table = json.loads(path.read_text())
    assert table == {key: 1.3e11, "other machine | float32 | torch 0": 1.0}
    assert common.peak_flops(cpu, torch.float32, cache_dir=tmp_path, at_least=1.5e11) == 1.5e11  # probe 0.9e11
    assert json.loads(path.read_text())[key] == 1.5e11


def test_training_log_warns_once_when_mfu_passes_100_percent():
    from logcapture import capture_log
    from nanochat.training import StepLogger

    class Sink:
        def log(self, record):
            pass

    logger = StepLogger(total_steps=4, tokens_per_step=100, flops_per_step=2e9, peak_flops=1e9, sink=Sink(),
                        warmup_steps_excluded=1, stream=io.StringIO())
    with capture_log("nanochat.training") as log:
        records = [logger.step(i, 1.0, dt=1.0, lrm=1.0) for i in range(4)]
    assert records[-1]["mfu"] == pytest.approx(200.0)
    assert len([m for m in log.messages if "MFU 200%" in m and "peak_flops.json" in m]) == 1
    other_rank = StepLogger(total_steps=4, tokens_per_step=100, flops_per_step=2e9, peak_flops=1e9, sink=Sink(),
                            warmup_steps_excluded=1, stream=io.StringIO())
    with capture_log("nanochat.training") as log:
        for i in range(4):
            other_rank.step(i, 1.0, dt=1.0, lrm=1.0, is_master=False)
    assert not log.messages  # one warning per run, from the master rank


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """A first run (peak not cached yet) must initialise its model as a later run does."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    common._MEASURED_PEAK.pop(("cpu", torch.float32), None)
    common.measure_peak_matmul_flops(torch.device("cpu"), torch.float32, sizes=(64, 128), budget_seconds=0.2)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("flags, kind", [
    ({"sse4_2", "avx", "avx2", "fma"}, "AVX2, no native bf16"),
    ({"avx2", "avx512f"}, "AVX-512, no native bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "native bf16 (AVX512-BF16)"),
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "native bf16 (AMX)"),
    ({"sse4_2"}, "no AVX2, no native bf16"),
])
def test_processor_summary_names_the_cpu_kind_that_decides_the_fast_dtype(monkeypatch, flags, kind):
    """Benchmarks print it beside every figure: on AVX2-only CPUs bf16 is emulated (fp32
    is the fast path), on AVX512-BF16/AMX bf16 is; the runtime's dtype choice agrees."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "_cpu_flags", lambda: set(flags))
    summary = common.processor_summary(cpu)
    assert summary == f"{common.device_description(cpu)}; {kind}"
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert (common.choose_compute_dtype("cpu")[0] == torch.bfloat16) == kind.startswith("native bf16")


def test_processor_summary_without_cpu_flags_is_the_processor_alone(monkeypatch):
    monkeypatch.setattr(common, "_cpu_flags", lambda: set())  # no /proc/cpuinfo (macOS)
    cpu = torch.device("cpu")
    assert common.processor_summary(cpu) == common.device_description(cpu)
