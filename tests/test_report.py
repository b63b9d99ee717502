"""The report card: `nanochat report --reset`, stages' sections, then `nanochat report`
through the CLI: header, sections in pipeline order, the BASE/SFT/RL summary table,
wall-clock time, cost, code size, and PNG training curves from metrics.jsonl files."""
from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest

from nanochat import cli
from nanochat import report as rp
from nanochat.report import log_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _log_pipeline(base: Path) -> None:
    """Sections with the titles and keys the stages log, and metrics.jsonl files with the
    records the training loops write (loss per step, val_bpb / reward / pass@k on evals)."""
    base_ckpt = base / "base_checkpoints" / "d4"
    _write_jsonl(base_ckpt / "metrics.jsonl",
                 [{"step": s, "loss": 7.0 - 0.3 * s, "loss_ema": 7.1 - 0.3 * s, "lrm": 1.0} for s in range(10)]
                 + [{"step": s, "val_bpb": 2.0 - 0.1 * s} for s in (0, 5, 10)])
    _write_jsonl(base / "chatsft_checkpoints" / "d4" / "metrics.jsonl",
                 [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(5)] + [{"step": 5, "val_bpb": 0.9}])
    _write_jsonl(base / "chatrl_checkpoints" / "d4" / "metrics.jsonl",
                 [{"step": s, "loss": 0.01 * s, "reward": 0.1 * s, "seq_len": 150.0} for s in range(4)]
                 + [{"step": s, "pass@1": 0.02 * s, "pass@4": 0.05 * s} for s in (0, 2, 4)])
    # out of pipeline order on purpose: the report sorts them
    log_section(base, "Chat evaluation sft", {
        "config": {"source": "sft", "task_name": None}, "model": {"source": "sft", "tag": "d4", "step": 5},
        "results": {"ARC-Easy": {"task": "ARC-Easy", "passed": 31, "total": 80, "num_samples": 1}},
        "accuracy": {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455,
                     "HumanEval": 0.0854, "SpellingBee": 0.9},
        "chatcore": 0.0884})
    log_section(base, "Tokenizer training", {"config": {"vocab_size": 2048}, "metrics": {"train_time_s": 1.5}})
    log_section(base, "Base model training", {
        "config": {"depth": 4}, "plan": {"num_params": 123456},
        "metrics": {"val_bpb": 1.05, "core": 0.11, "checkpoint_dir": str(base_ckpt),
                    "samples": ["The capital of France is Paris.", "The opposite of hot is\ncold"]}})
    log_section(base, "Base model evaluation", {
        "model": "base model d4 step 10", "CORE metric": 0.2219, "CORE tasks": "20/22",
        "centered": {"arc_easy": 0.55, "arc_challenge": 0.12}})
    log_section(base, "Tokenizer evaluation", {"table": "| text | ratio |\n| news | 4.1 |"})
    log_section(base, "Base model loss", {"step": 10, "train bpb": 1.01, "val bpb": 1.05, "samples": ["a", "b"]})
    log_section(base, "SFT", {"config": {"num_iterations": 5}, "metrics": {
        "val_bpb": 0.9, "checkpoint_dir": str(base / "chatsft_checkpoints" / "d4")}})
    log_section(base, "Chat RL", {"config": {"num_samples": 4}, "metrics": {"pass@1": 0.08}})
    log_section(base, "Chat evaluation rl", {"model": {"source": "rl"}, "accuracy": {"GSM8K": 0.0758},
                                             "chatcore": None})


def _table_row(text: str, metric: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {metric} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_reset_sections_then_report_through_the_cli(tmp_path, monkeypatch):
    base = tmp_path / "nc"
    log_section(base, "Stale section", {"x": 1})  # from an earlier run: --reset removes it
    assert cli.main(["report", "--reset", "--base-dir", str(base)]) == 0
    header_path = base / "report" / "header.json"
    header = json.loads(header_path.read_text())
    assert header["data"]["software"]["torch"] and header["data"]["hardware"]["cpu_threads"] >= 1
    assert header["data"]["code"]["files"] > 10 and header["data"]["code"]["dependencies"] >= 1
    assert rp.read_sections(base) == []

    # pretend the run started 1h02m03s ago
    header["time"] -= 3723
    header["timestamp"] = time.strftime(rp.TIMESTAMP_FORMAT, time.localtime(header["time"]))
    header_path.write_text(json.dumps(header))
    _log_pipeline(base)

    out = tmp_path / "elsewhere" / "card.md"
    assert cli.main(["report", "-o", str(out), "--base-dir", str(base)]) == 0
    text = (base / "report" / "report.md").read_text()
    assert out.read_text() == text

    # header
    assert text.startswith("# nanochat training report")
    assert f"Run started: {header['timestamp']}" in text
    assert re.search(r"- Commit: \S+", text) and "- GPUs: none" in text and "- PyTorch: " in text
    # sections in pipeline order, rendered
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert titles[titles.index("Tokenizer training"):titles.index("Chat evaluation rl") + 1] == [
        t for t in rp.SECTION_ORDER if t != "Chat SFT"]
    assert "Stale section" not in titles and titles[-2:] == ["Training curves", "Summary"]
    assert "- table:\n  ```\n  | text | ratio |\n  | news | 4.1 |\n  ```\n" in text
    assert "- samples:\n    ```\n    The capital of France is Paris.\n    ```\n    ```\n    The opposite of hot is\n    cold\n" in text
    assert "  - num_params: 123,456" in text and "  - val_bpb: 1.0500" in text
    # the summary table: base CORE from base-eval (not training's 0.11, not CORE's arc_easy)
    assert _table_row(text, "CORE") == ["0.2219", "-", "-"]
    assert _table_row(text, "ARC-Easy") == ["-", "0.3876", "-"]
    assert _table_row(text, "GSM8K") == ["-", "0.0455", "0.0758"]
    assert _table_row(text, "SpellingBee") == ["-", "0.9000", "-"]
    assert _table_row(text, "ChatCORE") == ["-", "0.0884", "-"]
    assert text.index("| Metric | BASE | SFT | RL |") > text.index("## Summary")
    # code size, wall clock (header → last section), cost on a CPU machine
    assert re.search(r"- Characters: [\d,]+\n- Lines: [\d,]+\n- Files: [\d,]+\n- Tokens \(approx\): [\d,]+\n"
                     r"- Dependencies: \d+", text)
    assert re.search(r"Total wall clock time: 1h02m(0[3-9]|[1-5]\d)s", text)
    assert "Estimated cost: none (no GPU)" in text
    # plots: one per training stage, panels chosen by the data present
    for stage, panels in (("base", 2), ("sft", 2), ("rl", 3)):  # rl: loss, reward, pass@k
        png = base / "report" / f"report-{stage}.png"
        assert f"![{stage} training](report-{stage}.png)" in text
        assert _png_size(png) == (450 * panels, 340)
        assert (out.parent / png.name).read_bytes() == png.read_bytes()

    # the next reset clears sections, plots and report.md
    assert cli.main(["report", "--reset", "--base-dir", str(base)]) == 0
    assert sorted(p.name for p in (base / "report").iterdir()) == ["header.json"]


def test_report_without_header_or_matplotlib(tmp_path, monkeypatch, caplog):
    base = tmp_path / "nc"
    _log_pipeline(base)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    result = rp.generate_report(base, output=tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "plots skipped: matplotlib is not installed (pip install 'nanochat[report]')" in text
    assert not list((base / "report").glob("*.png")) and result["plots"] == {}
    assert "nanochat report --reset" in text and "Total wall clock time: unknown" in text
    assert _table_row(text, "CORE") == ["0.2219", "-", "-"]
    assert "no header" in caplog.text


def test_missing_values_are_dashes_and_no_sections_is_fine(tmp_path):
    base = tmp_path / "nc"
    result = rp.generate_report(base, output=None)
    text = Path(result["report"]).read_text()
    assert "CORE" in rp.SUMMARY_ROWS and "ChatCORE" in rp.SUMMARY_ROWS
    for row in rp.SUMMARY_ROWS:
        assert _table_row(text, row) == ["-", "-", "-"]
    log_section(base, "Base model training", {"metrics": {"core": 0.123, "val_bpb": None}})
    text = Path(rp.generate_report(base)["report"]).read_text()
    assert _table_row(text, "CORE") == ["0.1230", "-", "-"]  # base-eval missing: training's CORE


def test_find_metric_matches_names_robustly():
    data = {"config": {"core_metric_every": 2000},
            "metrics": {"CORE metric": 0.25, "ChatCORE": 0.4, "flag": True},
            "accuracy": {"arc_easy": 0.5, "GSM8K": None}}
    assert rp.find_metric(data, "CORE") == 0.25
    assert rp.find_metric(data, "ChatCORE") == 0.4
    assert rp.find_metric(data, "ARC-Easy") == 0.5
    assert rp.find_metric(data, "GSM8K") is None  # None is missing, not 0
    assert rp.find_metric({"nested": [{"humaneval_acc": 0.1}]}, "HumanEval") == 0.1
    assert rp.find_metric({"chatcore": 0.3}, "CORE") is None


def test_hourly_rate_and_section_title_rules(tmp_path):
    assert rp.hourly_rate([]) is None
    assert rp.hourly_rate([{"name": "NVIDIA H100 80GB HBM3"}] * 8) == pytest.approx(24.0)
    assert rp.hourly_rate([{"name": "Some Future GPU"}]) == rp.DEFAULT_GPU_RATE
    with pytest.raises(ValueError, match="reserved"):
        log_section(tmp_path, "Header", {})
