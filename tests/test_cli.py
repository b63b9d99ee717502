"""Every subcommand parses and prints its help; bad input exits 2 with one clear line."""
import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from nanochat import cli
from nanochat.config import add_dataclass_args, check, from_args, option


def test_every_stage_has_help(capsys):
    stages = cli.available_stages()
    assert stages, "no stage modules found"
    for name in stages:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--device-type" in out, name


@dataclasses.dataclass
class _Demo:
    depth: int = option(4, "model depth", short="-d")
    lr: float | None = option(None, "learning rate")
    mode: Literal["a", "b"] = option("a", "a mode")
    compile: bool = option(False, "use torch.compile")
    tasks: list[str] = option(help="tasks", factory=lambda: ["x", "y"])


def test_dataclass_flags_roundtrip():
    import argparse
    p = argparse.ArgumentParser()
    add_dataclass_args(p, _Demo)
    cfg = from_args(_Demo, p.parse_args(["-d", "6", "--lr", "0.5", "--mode", "b", "--compile", "--tasks", "q"]))
    assert cfg == _Demo(depth=6, lr=0.5, mode="b", compile=True, tasks=["q"])
    assert from_args(_Demo, p.parse_args([])) == _Demo()
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_check_lists_every_problem():
    with pytest.raises(ValueError, match="one.*\n.*two"):
        check(["one", "two"])
    check([])


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "nanochat", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "<stage>" in r.stdout
