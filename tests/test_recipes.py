"""What the recipes install: a GPU run gets the FA3 loader (without it attention silently
falls back to SDPA), from the extra that README names."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def test_speedrun_installs_the_gpu_extra_with_the_fa3_loader():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0] for req in extras["gpu"]}
    assert {"kernels", "torchao"} <= names
    install = [line for line in (REPO / "runs" / "speedrun.sh").read_text().splitlines() if "pip install" in line]
    assert install and all(re.search(r'-e "\.\[[^\]]*\bgpu\b[^\]]*\]"', line) for line in install), install


@pytest.mark.slow
def test_speedrun_smoke_mode_runs_every_stage(tmp_path, shared_data):
    """SMOKE=1 runs the speedrun recipe itself (its stage order and flags) at toy size: two
    CPU processes under torchrun with gloo, a few steps per stage, RL included."""
    base = tmp_path / "base"
    env = {**os.environ, "SMOKE": "1", "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_VENV": sys.prefix}
    for key in ("NANOCHAT_DATA_URL", "NPROC", "DEPTH", "WITH_RL", "REPORT_OUT"):
        env.pop(key, None)
    checkout_report = REPO / "report.md"
    before = checkout_report.stat().st_mtime_ns if checkout_report.exists() else None
    out = subprocess.run(["bash", "runs/speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (base / "report.md").read_text()
    sections = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                "Base model evaluation", "SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
    positions = [report.find(f"## {name}") for name in sections]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (positions, report[:2000])
    for stage_dir in ("base_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        ckpt = base / stage_dir / "d2"
        assert list(ckpt.glob("model_*.pt")), stage_dir
    # two ranks: each wrote its optimizer shard of the pretraining run
    assert {p.name.rsplit("_", 1)[-1] for p in (base / "base_checkpoints" / "d2").glob("optim_*.pt")} == {
        "rank0.pt", "rank1.pt"}
    # the smoke run leaves the checkout alone
    assert (checkout_report.stat().st_mtime_ns if checkout_report.exists() else None) == before
