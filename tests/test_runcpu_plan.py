"""runs/runcpu.sh up to its plan (DEMO_PLAN_ONLY=1): the recipe's commands and flags still
parse, one step is timed, and the printed plan fits the budget it was given."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_plans_its_steps_from_a_timed_step(tmp_path, shared_data):
    venv = Path(sys.prefix)  # the environment running the tests: setup_env.sh reuses it
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "NANOCHAT_VENV": str(venv),
           "DEMO_PLAN_ONLY": "1", "DEMO_MINUTES": "30", "DEPTH": "2"}
    for key in ("NANOCHAT_DATA_URL", "STEPS", "SFT_STEPS"):
        env.pop(key, None)
    out = subprocess.run(["bash", "runs/runcpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = re.search(r"one pretraining step of the d2 model \(8,192 tokens\) takes ([0-9.]+) s here", out.stdout)
    fixed = re.search(r"evaluations and start-up, estimated: (\d+) s", out.stdout)
    steps = re.search(r"pretraining: (\d+) steps \(~(\d+) s\), SFT: (\d+) steps", out.stdout)
    spent = re.search(r"\((\d+) s spent on setup and the tokenizer\)", out.stdout)
    assert plan and fixed and steps and spent, out.stdout[-3000:]
    step_s, fixed_s = float(plan.group(1)), int(fixed.group(1))
    pretrain, sft = int(steps.group(1)), int(steps.group(3))
    assert step_s > 0 and pretrain >= 20 and sft >= 10
    # the plan fills the 30 minutes: setup + evaluations + both trainings, within a step or two
    # (plus the rounding of the printed step time to 0.01 s, over every planned step)
    total = int(spent.group(1)) + fixed_s + (pretrain + sft) * step_s
    slack = 2 * step_s + 2 + 0.005 * (pretrain + sft)
    assert abs(total - 30 * 60) <= slack or (pretrain, sft) == (20, 10), (total, out.stdout[-2000:])
    assert pretrain / sft == pytest.approx(4, rel=0.1) or sft == 10
    # it stopped after planning: a tokenizer, no checkpoint
    base = tmp_path / "base"
    assert (base / "tokenizer" / "tokenizer.pkl").exists()
    assert not (base / "base_checkpoints").exists()
