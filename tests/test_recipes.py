"""What the recipes install: a GPU run gets the FA3 loader (without it attention silently
falls back to SDPA), from the extra that README names."""
from __future__ import annotations

import re
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
