"""The code sandbox: it runs code, reports failures, and never hangs or harms the caller."""
from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import pytest

from nanochat.execution import execute_code


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
