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


def test_user_error_is_one_line_exit_2(tmp_path):
    # through the real entry point: a dataset that was never ingested is the user's to fix
    r = subprocess.run([sys.executable, "-m", "nanochat", "tok-train", "--dataset", "never_ingested",
                        "--base-dir", str(tmp_path), "--device-type", "cpu", "--log-level", "WARNING"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanochat tok-train: error: no dataset 'never_ingested'"), r.stderr
    assert "nanochat ingest" in lines[0]  # the message names the fix


def test_config_mistake_is_one_line_exit_2(capsys, tmp_path):
    assert cli.main(["tok-train", "--vocab-size", "100", "--base-dir", str(tmp_path), "--device-type", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "vocab" in err and "Traceback" not in err


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    # A ValueError that is not a UserError (here: what a pyarrow or unpacking bug raises)
    # must reach the user with its traceback, not as a one-line "error:".
    from nanochat.stages import tok_eval

    def buggy_run(config, runtime):
        a, b = [1, 2, 3]  # noqa: F841  ValueError: too many values to unpack

    monkeypatch.setattr(tok_eval, "run", buggy_run)
    with pytest.raises(ValueError, match="too many values to unpack"):
        cli.main(["tok-eval", "--base-dir", str(tmp_path), "--device-type", "cpu"])


def test_user_errors_are_value_errors():
    # callers and tests that catch the built-in types keep working
    from nanochat.errors import MissingInputError, UserError
    assert issubclass(UserError, ValueError)
    assert issubclass(MissingInputError, UserError) and issubclass(MissingInputError, FileNotFoundError)
