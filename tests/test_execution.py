"""The code sandbox: it runs code, reports failures, and never hangs or harms the caller."""
from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.execution import execute_code
from nanochat.errors import UserError


def test_runs_code_and_captures_output():
    r = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert r.success and r.error is None and not r.timeout and not r.memory_exceeded
    assert r.stdout == "hello 42\n"
    assert r.stderr == "warn\n"


def test_exceptions_and_exits_are_failures():
    r = execute_code("print('before')\nraise ValueError('boom')")
    assert not r.success and r.error == "ValueError: boom" and r.stdout == "before\n"
    assert not execute_code("def f(:\n  pass").success
    # sys.exit() half-way through a test must not count as passing it
    r = execute_code("import sys\nsys.exit(0)\nassert False")
    assert not r.success and "SystemExit" in r.error
    r = execute_code("import os\nos._exit(0)")
    assert not r.success and "without finishing" in r.error


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\nprint('started', flush=True)\ntime.sleep(60)",
])
def test_timeout_kills_runaway_code(code):
    t0 = time.monotonic()
    r = execute_code(code, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert r.timeout and not r.success and "timed out" in r.error
    # 0.5 s of code + interpreter start-up (slow on a loaded machine), far from the 60 s sleep
    assert elapsed < 30
    if "started" in code:
        assert r.stdout == "started\n"  # output produced before the kill is kept


@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024 ** 3)", "x = [0] * (10 ** 9)"])
def test_memory_limit(code):
    r = execute_code(code, max_memory_bytes=256 * 1024 ** 2)
    assert r.memory_exceeded and not r.success and not r.timeout
    # the same allocation scaled down fits
    assert execute_code("x = bytearray(16 * 1024 ** 2)").success


def test_stdin_is_empty_not_blocking():
    # a generous timeout: the clock starts after start-up, so finishing both runs in less
    # time than one timeout proves neither waited for it, however slow the machine
    timeout = 30
    t0 = time.monotonic()
    r = execute_code("print(input())", timeout=timeout)
    assert not r.success and "EOFError" in r.error and not r.timeout
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))", timeout=timeout)
    assert r.stdout == "''\n" and not r.timeout
    assert time.monotonic() - t0 < timeout


def test_printing_forever_is_stopped():
    timeout = 30
    t0 = time.monotonic()
    r = execute_code("while True:\n    print('x' * 100)", timeout=timeout, max_output_bytes=10_000)
    assert not r.success and "Output exceeded" in r.error and not r.timeout
    assert len(r.stdout) == 10_000
    # stopped at the cap, not at the timeout (whose clock starts after start-up)
    assert time.monotonic() - t0 < timeout


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    r = execute_code("import os\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))\nprint(len(os.environ))")
    assert r.success
    secret, n = r.stdout.split()
    assert secret == "None"
    assert int(n) < 12


def test_fresh_working_directory_removed_afterwards():
    code = "import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen('out.txt', 'w').write('hi')\nprint(os.listdir('.'))"
    r = execute_code(code)
    assert r.success
    cwd, before, after = r.stdout.splitlines()
    assert cwd != os.getcwd() and before == "[]" and after == "['out.txt']"
    assert not Path(cwd).exists()
    # each run gets its own directory
    assert execute_code("import os\nprint(os.listdir('.'))").stdout == "[]\n"


@pytest.mark.parametrize("code", [
    "import os\nopen('f', 'w').close()\nos.remove('f')",
    "import os\nopen('f', 'w').close()\nos.unlink('f')",
    "import os\nos.mkdir('d')\nos.rmdir('d')",
    "import os, shutil\nos.mkdir('d')\nshutil.rmtree('d')",
    "import os\nopen('f', 'w').close()\nos.rename('f', 'g')",
    "import os\nos.chdir('/')",
    "import os\nos.chmod('.', 0o777)",
    "import posix\nposix.unlink('whatever')",
])
def test_destructive_file_operations_disabled(code):
    r = execute_code(code)
    assert not r.success and r.error.startswith("PermissionError") and "disabled" in r.error


@pytest.mark.parametrize("template", [
    "import os\nos.system('touch {marker}')",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import subprocess\nsubprocess.Popen(['touch', '{marker}'])",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    "import os\nif os.fork() == 0:\n    open('{marker}', 'w').close()",
    "import multiprocessing\np = multiprocessing.Process(target=open, args=('{marker}', 'w'))\np.start()",
    "import os\nwhile True:\n    os.fork()",  # a fork bomb
])
def test_process_creation_disabled(template, tmp_path):
    marker = tmp_path / "marker"
    # refused at once: done in less than the timeout, whose clock starts after start-up
    # (kept short: if the refusal ever broke, the fork bomb would run until it)
    timeout = 10
    t0 = time.monotonic()
    r = execute_code(template.format(marker=marker), timeout=timeout)
    assert not r.success and "PermissionError" in r.error and "disabled" in r.error and not r.timeout
    assert time.monotonic() - t0 < timeout
    assert not marker.exists()


def test_escape_hatches_blocked():
    for module in ("ctypes", "resource"):
        r = execute_code(f"import {module}")
        assert not r.success and "ModuleNotFoundError" in r.error
    r = execute_code("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert not r.success and "disabled" in r.error


def test_concurrent_calls_from_threads():
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = execute_code(f"print({i} * {i})")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * i}\n" for i in range(4)}


def test_humaneval_canonical_solutions_pass_and_stubs_fail(shared_data):
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for _, line in zip(range(4), f)]
    assert len(problems) == 4
    for p in problems:
        harness = f"\n\ncheck({p['entry_point']})\n"
        good = execute_code(p["prompt"] + p["canonical_solution"] + p["test"] + harness)
        assert good.success, (p["task_id"], good.error)
        bad = execute_code(p["prompt"] + "    return None\n" + p["test"] + harness)
        assert not bad.success and bad.error.startswith("AssertionError"), p["task_id"]


# -----------------------------------------------------------------------------
# Isolation: which one runs, and what the kernel sandbox guarantees. The hostile
# programs are in test_sandbox_hostile.py.



@pytest.fixture(scope="module")
def namespaces():
    """Skips the test where the kernel offers no namespaces (not Linux, or disabled)."""
    probe = execution._probe()
    if probe["mode"] != "namespaces":
        pytest.skip(f"kernel namespaces unavailable here: {probe['why']}")


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the per-process isolation decision for one test."""
    monkeypatch.setattr(execution, "_isolation_probed", {})
    monkeypatch.delenv("NANOCHAT_SANDBOX", raising=False)


@pytest.mark.parametrize("isolation", ["guard", "namespaces"])
def test_both_isolations_run_fail_and_time_out(isolation, request):
    if isolation == "namespaces":
        request.getfixturevalue("namespaces")
    r = execute_code("print(6 * 7)", isolation=isolation)
    assert r.success and r.stdout == "42\n"
    r = execute_code("raise ValueError('boom')", isolation=isolation)
    assert not r.success and r.error == "ValueError: boom"
    r = execute_code("while True:\n    pass", timeout=0.5, isolation=isolation)
    assert r.timeout and not r.success


def test_sandbox_setting_is_validated(fresh_probe, monkeypatch):
    with pytest.raises(ValueError, match="isolation"):
        execute_code("pass", isolation="docker")
    with pytest.raises(ValueError, match="max_processes"):
        execute_code("pass", max_processes=-1)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "bogus")
    with pytest.raises(ValueError, match="NANOCHAT_SANDBOX"):
        execute_code("pass")
    monkeypatch.setenv("NANOCHAT_SANDBOX", "guard")
    assert execution.sandbox_isolation() == "guard"
    assert execute_code("print(1)").stdout == "1\n"


def test_fallback_warns_once_and_strict_refuses(fresh_probe, monkeypatch, caplog):
    monkeypatch.setattr(execution, "_probe", lambda: {"mode": "guard", "why": "unshare: Operation not permitted"})
    with caplog.at_level(logging.INFO, logger="nanochat.execution"):
        assert execute_code("print(1)").stdout == "1\n"
        assert execute_code("print(2)").stdout == "2\n"
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unshare: Operation not permitted" in warnings[0].getMessage()
    assert "NOT a security boundary" in warnings[0].getMessage()
    monkeypatch.setenv("NANOCHAT_SANDBOX", "strict")
    with pytest.raises(UserError, match="strict.*Operation not permitted"):
        execute_code("pass")


def test_isolation_logged_once(namespaces, fresh_probe, caplog):
    with caplog.at_level(logging.INFO, logger="nanochat.execution"):
        for _ in range(2):
            assert execute_code("pass").success
    lines = [rec.getMessage() for rec in caplog.records if "code sandbox" in rec.getMessage()]
    assert len(lines) == 1 and "kernel namespaces" in lines[0]


def test_namespaces_filesystem_view(namespaces, tmp_path):
    code = """import os
print(os.getcwd())
print(os.path.realpath(os.environ['TMPDIR']) == os.getcwd())
print(sorted(os.listdir('/tmp')) == [os.getcwd().split('/')[2]])
for path in ('/etc/passwd-copy', '/usr/x', '/x', '/proc/sys/kernel/hostname'):
    try:
        open(path, 'w').close()
        print('wrote', path)
    except OSError as e:
        print(type(e).__name__, e.errno)
open('/tmp/fine.txt', 'w').write('scratch /tmp is writable')
print(os.path.exists(%r), os.path.exists('/home'), os.path.exists('/run'))
""" % str(tmp_path)
    r = execute_code(code, isolation="namespaces")
    assert r.success, r
    cwd, tmpdir_is_cwd, tmp_holds_only_scratch, *writes, visible = r.stdout.splitlines()
    assert cwd.startswith("/tmp/nanochat-exec-") and tmpdir_is_cwd == "True" and tmp_holds_only_scratch == "True"
    assert writes == ["OSError 30"] * 4  # EROFS: read-only everywhere but the scratch
    assert visible == "False False False"  # the host's /tmp, /home and /run are not there


def test_namespaces_from_a_venv_under_tmp(namespaces, tmp_path):
    """A checkout (and its venv) under /tmp, as a CI clone may be: the sandbox still isolates,
    /tmp is the scratch alone, and the standard library imports."""
    import subprocess
    import venv

    venv.create(tmp_path / "venv", with_pip=False, symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    script = ("from nanochat.execution import execute_code\n"
              "r = execute_code('import json, os; print(sorted(os.listdir(\"/tmp\")) == [os.getcwd().split(\"/\")[2]])',"
              " isolation='namespaces')\n"
              "print(r.success, r.stdout.strip(), r.error)")
    repo = Path(execution.__file__).resolve().parents[1]
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert str(tmp_path).startswith("/tmp/")
    assert out.stdout.split() == ["True", "True", "None"], (out.stdout, out.stderr[-2000:])


def test_namespaces_scratch_is_size_limited(namespaces):
    # 64 MiB of tmpfs, files up to 16 MiB each: the fifth 16 MiB file cannot fit
    code = "for i in range(6):\n    open(f'f{i}', 'wb').write(b'x' * (16 << 20))"
    r = execute_code(code, isolation="namespaces", max_memory_bytes=None)
    assert not r.success and "No space left on device" in r.error


def test_namespaces_allow_processes_only_when_asked(namespaces):
    code = ("import sys\nsys.modules.pop('posix')\nimport posix\npid = posix.fork()\n"
            "if pid == 0:\n    posix._exit(7)\nprint(posix.waitstatus_to_exitcode(posix.waitpid(pid, 0)[1]))")
    assert "Resource temporarily unavailable" in execute_code(code, isolation="namespaces").error
    r = execute_code(code, isolation="namespaces", max_processes=1)
    assert r.success and r.stdout == "7\n"


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass_in_the_sandbox(namespaces, shared_data):
    from nanochat.tasks.humaneval import build_program
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    failed = []
    for p in problems:
        program = build_program(p["prompt"], p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"])
        r = execute_code(program, isolation="namespaces")
        if not r.success:
            failed.append((p["task_id"], r.error))
    assert failed == []


def test_bench_sandbox_stage(shared_data, tmp_path, capsys):
    import torch

    from nanochat.common import Runtime
    from nanochat.stages import bench_sandbox
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        lines = [line for _, line in zip(range(2), f)]
    subset = tmp_path / "he.jsonl"
    subset.write_text("".join(lines))
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=tmp_path)
    config = bench_sandbox.Config(runs=3, humaneval_file=str(subset))
    metrics = bench_sandbox.run(config, runtime)
    assert metrics["humaneval_programs"] == 2 and metrics["humaneval_guard_passed"] == 2
    assert metrics["guard_median_ms"] > 0 and "median" in capsys.readouterr().out
    # and through the command, whose last stdout line is the same JSON
    from nanochat import cli
    assert cli.main(["bench-sandbox", "--runs", "2", "--humaneval-file", str(subset), "--base-dir", str(tmp_path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["humaneval_programs"] == 2 and line["humaneval_guard_passed"] == 2
    if "namespaces_median_ms" in metrics:  # where the kernel allows them
        assert metrics["humaneval_namespaces_passed"] == 2 and "overhead_median_ms" in metrics
    with pytest.raises(ValueError, match="--runs"):
        bench_sandbox.Config(runs=0).validate()
