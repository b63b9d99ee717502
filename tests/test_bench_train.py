"""bench-train through the CLI at toy size: the printed table and JSON line are there and
their figures are consistent with each other and with the model (not a timed test)."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat import cli
from nanochat.common import processor_summary
from nanochat.gpt import GPT, GPTConfig

TOY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
       "--device-batch-size", "2", "--window-pattern", "SL", "--steps", "2", "--warmup-steps", "1",
       "--device-type", "cpu", "--log-level", "WARNING"]


def _json_line(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in:\n{out}"
    return json.loads(lines[-1])


def _toy_flops(vocab: int) -> float:
    cfg = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                    window_pattern="SL")
    with torch.device("meta"):
        return GPT(cfg).estimate_flops()


def _check_run(r: dict, dtype: str, vocab: int) -> None:
    assert r["dtype"] == dtype and r["device"] == "cpu" and r["compile"] is False
    assert (r["depth"], r["n_embd"], r["n_head"], r["vocab_size"]) == (1, 32, 2, vocab)
    assert r["tokens_per_step"] == 2 * 64
    assert r["flops_per_token"] == _toy_flops(vocab)
    assert len(r["step_ms"]) == 3  # warm-up + 2 counted
    counted = sorted(r["step_ms"][1:])
    assert r["ms_per_step_min"] == pytest.approx(counted[0], abs=0.01)
    assert r["ms_per_step_median"] == pytest.approx(sum(counted) / 2, abs=0.02)
    assert r["tok_per_sec"] == pytest.approx(128 / (r["ms_per_step_median"] / 1000), rel=1e-6)
    assert r["peak_flops"] > 1e8 and r["peak_flops_source"] == "measured"
    want_mfu = 100 * r["flops_per_token"] * r["tok_per_sec"] / r["peak_flops"]
    assert 0 < r["mfu"] < 100 and r["mfu"] == pytest.approx(want_mfu, rel=1e-6)
    assert r["memory_kind"] == "peak RSS"
    assert r["processor"] == processor_summary(torch.device("cpu"))  # the CPU and its kind, beside the figures
    assert r["peak_memory_mib"] >= r["baseline_rss_mib"] > 50  # torch alone is more than 50 MiB
    assert r["peak_increase_mib"] == pytest.approx(r["peak_memory_mib"] - r["baseline_rss_mib"])
    assert r["full_logits_fp32_mib"] == pytest.approx(128 * vocab * 4 / 2 ** 20)
    assert all(map(lambda v: v == v and abs(v) < 100, (r["first_loss"], r["last_loss"])))


@pytest.mark.slow
def test_bench_train_prints_table_and_consistent_json(capsys):
    assert cli.main(["bench-train", *TOY, "--vocab-size", "512", "--dtype", "float32", "--profile"]) == 0
    out = capsys.readouterr().out
    for label in ("ms/step", "tokens/s", "FLOPs/token", "MFU", "peak RSS", "above the", "full fp32 logits",
                  "processor    " + processor_summary(torch.device("cpu"))):
        assert label in out, label
    assert "Self CPU" in out  # the profiler's table
    r = _json_line(out)
    _check_run(r, "float32", 512)
    assert "profile" not in r  # the table is printed, not put in the JSON


@pytest.mark.slow
def test_compare_dtypes_runs_each_dtype_in_its_own_process(capsys):
    assert cli.main(["bench-train", *TOY, "--vocab-size", "256", "--compare-dtypes"]) == 0
    out = capsys.readouterr().out
    assert "== float32 ==" in out and "== bfloat16 ==" in out and "speedup over float32" in out
    result = _json_line(out)
    fp32, bf16 = result["runs"]["float32"], result["runs"]["bfloat16"]
    _check_run(fp32, "float32", 256)
    _check_run(bf16, "bfloat16", 256)
    assert result["bf16_speedup"] == pytest.approx(bf16["tok_per_sec"] / fp32["tok_per_sec"])
    # the same weights and tokens: the first losses (before any update) agree to bf16 precision
    assert bf16["first_loss"] == pytest.approx(fp32["first_loss"], rel=2e-2)


def test_real_tokens_need_a_tokenizer_and_match_its_vocab(tiny_tokenizer_dir, tmp_path, capsys):
    base = ["bench-train", *TOY, "--dtype", "float32", "--data", "real"]
    assert cli.main([*base, "--base-dir", str(tiny_tokenizer_dir)]) == 0
    r = _json_line(capsys.readouterr().out)
    _check_run(r, "float32", 2048)
    assert r["data"] == "real"
    assert cli.main([*base, "--base-dir", str(tiny_tokenizer_dir), "--vocab-size", "512"]) == 2
    assert "differs from the tokenizer" in capsys.readouterr().err
    assert cli.main([*base, "--base-dir", str(tmp_path)]) == 2  # no tokenizer there


def test_invalid_options_are_reported_together(capsys):
    assert cli.main(["bench-train", *TOY, "--compare-dtypes", "--dtype", "float32", "--steps", "0",
                     "--window-pattern", "SXL"]) == 2
    err = capsys.readouterr().err
    assert "--compare-dtypes" in err and "--steps" in err and "--window-pattern" in err


def test_bench_uses_base_trains_learning_rates():
    """bench-train times base-train's optimizer: the peak LRs it scales are base-train's defaults."""
    from nanochat.scaling import PEAK_LRS
    from nanochat.stages import base_train

    defaults = base_train.Config()
    assert PEAK_LRS == {name: getattr(defaults, name) for name in PEAK_LRS}


def test_a_peak_cached_on_a_busy_machine_is_corrected_by_the_run(base_dir, capsys):
    """A peak_flops.json figure far below what the run reaches (measured while the machine
    was loaded: 0.046 TFLOP/s on a machine doing 0.13) gave MFU 164%; bench-train measures
    it again, reports MFU below 100% and rewrites the file."""
    from nanochat.common import PEAK_FLOPS_CACHE, device_description
    key = f"{device_description(torch.device('cpu'))} | float32 | torch {torch.__version__}"
    (base_dir / PEAK_FLOPS_CACHE).write_text(json.dumps({key: 1.0e5}))
    assert cli.main(["bench-train", *TOY, "--vocab-size", "256", "--dtype", "float32"]) == 0
    r = _json_line(capsys.readouterr().out)
    _check_run(r, "float32", 256)  # includes 0 < MFU < 100
    assert json.loads((base_dir / PEAK_FLOPS_CACHE).read_text())[key] == r["peak_flops"] > 1e8
