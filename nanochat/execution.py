"""
Run model-written Python (HumanEval solutions, tool code) in a throw-away process.

Each call starts a FRESH interpreter (`python -I`: isolated mode, so no PYTHON*
variables, no user site-packages, no script directory on sys.path), never a fork of
the caller, so the code cannot see or corrupt the caller's memory (model weights, CUDA
state, open files). Around it:

- wall-clock timeout enforced by the parent: the child runs in its own session and the
  whole process group is SIGKILLed at the deadline (and always at the end, so nothing
  the code left running survives);
- resource limits set in the child before the code runs: RLIMIT_AS (memory),
  RLIMIT_CPU (a second line behind the wall clock), RLIMIT_NPROC (no new processes for
  unprivileged users), RLIMIT_FSIZE (file size), RLIMIT_CORE=0. They are set by the
  child's own bootstrap rather than a `preexec_fn`, which is not safe to use when the
  caller has threads (a web server, a thread pool of evaluators);
- a scrubbed environment: only PATH, LANG, HOME/TMPDIR (the work dir) and thread-count
  variables; nothing the caller holds (tokens, keys) is inherited;
- a fresh temporary working directory, deleted afterwards; stdin is /dev/null;
- destructive functions are replaced, before the code runs, by stubs that raise
  PermissionError (process creation and signalling, deleting/renaming/chmod-ing files,
  changing directory or identity), and `ctypes`/`resource` cannot be imported;
- stdout and stderr are captured up to `max_output_bytes`; a program that prints more
  is stopped.

This protects the caller from accidents (a runaway loop, a fork attempt, an
`rm -rf`-happy solution). It is NOT a security boundary against code written to escape:
there is no kernel isolation (no seccomp, namespaces or containers), the network is
reachable, files outside the work dir can still be written where permissions allow,
and a process running as root ignores RLIMIT_NPROC. Run untrusted workloads inside a
container.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nanochat.execution")

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
STARTUP_GRACE_S = 10.0   # interpreter start-up, not charged to the code's timeout
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class ExecutionResult:
    """What happened. `success` is True only when the code ran to the end without an
    exception (SystemExit counts as an exception: `sys.exit()` half-way through a test
    must not pass it)."""
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


# -----------------------------------------------------------------------------
# The child's bootstrap (run with `python -I -c`). argv: code path, status fd, limits JSON.
# It reports over the status pipe: "started" right before the user code runs (the
# parent starts the timeout clock then), and one JSON line when it finishes.

_CHILD_BOOTSTRAP = r'''
import builtins, json, os, sys

code_path, status_fd, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
status = os.fdopen(status_fd, "w", buffering=1)
os.set_inheritable(status_fd, False)
with open(code_path, encoding="utf-8") as f:
    source = f.read()

import resource
def _limit(which, value):
    if value is None:
        return
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # e.g. a limit already lower than asked for
_limit(resource.RLIMIT_AS, limits["memory"])
_limit(resource.RLIMIT_CPU, limits["cpu"])
_limit(resource.RLIMIT_FSIZE, limits["fsize"])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, 0)  # no new processes or threads (not enforced for root)

def _disabled(name):
    def stub(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in the nanochat sandbox")
    stub.__name__ = name.rsplit(".", 1)[-1]
    return stub

def _disable(module, names):
    for name in names:
        if hasattr(module, name):
            setattr(module, name, _disabled(f"{module.__name__}.{name}"))

import posix, shutil, subprocess, _posixsubprocess
_OS = ["system", "popen", "kill", "killpg", "fork", "forkpty", "vfork", "register_at_fork",
       "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
       "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
       "posix_spawn", "posix_spawnp", "pidfd_open",
       "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
       "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
       "chflags", "lchflags", "chroot", "chdir", "fchdir", "link", "symlink",
       "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid",
       "setresgid", "setgroups", "setsid", "setpgid", "setpgrp", "plock", "putenv", "unsetenv"]
_disable(os, _OS)
_disable(posix, _OS)
_disable(shutil, ["rmtree", "move", "chown", "copytree"])
_disable(subprocess, ["Popen", "run", "call", "check_call", "check_output", "getoutput",
                      "getstatusoutput"])
_disable(_posixsubprocess, ["fork_exec"])
for blocked in ("ctypes", "_ctypes", "resource", "pty"):
    sys.modules[blocked] = None  # `import ctypes` now raises ImportError
del resource, posix, shutil, subprocess, _posixsubprocess

report = {"ok": False, "error": None, "memory": False}
status.write("started\n")
try:
    exec(compile(source, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    report["ok"] = True
except MemoryError as e:
    report.update(error=f"MemoryError: {e}", memory=True)
except BaseException as e:
    report["error"] = f"{type(e).__name__}: {e}"
finally:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        status.write(json.dumps(report) + "\n")
        status.flush()
    except Exception:
        pass
'''


def _child_env(work_dir: Path) -> dict[str, str]:
    """Everything the child sees of the environment; nothing is inherited."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(work_dir), "TMPDIR": str(work_dir),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Collector:
    """Reads the child's stdout, stderr and status pipes without ever blocking for long."""

    def __init__(self, proc: subprocess.Popen, status_r: int, max_output_bytes: int):
        self.sel = selectors.DefaultSelector()
        self.buffers: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
        self.max_output_bytes = max_output_bytes
        self.overflow = False
        for name, fd in (("stdout", proc.stdout.fileno()), ("stderr", proc.stderr.fileno()), ("status", status_r)):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, name)

    @property
    def open(self) -> bool:
        return bool(self.sel.get_map())

    def pump(self, wait_s: float) -> None:
        """Read whatever arrives within `wait_s`; unregister pipes at EOF."""
        for key, _ in self.sel.select(timeout=max(wait_s, 0.0)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fd)
                continue
            buf = self.buffers[key.data]
            room = (self.max_output_bytes if key.data != "status" else 65536) - len(buf)
            buf += chunk[:max(room, 0)]
            if len(chunk) > room and key.data != "status":
                self.overflow = True

    def started(self) -> bool:
        return self.buffers["status"].startswith(b"started\n")

    def report(self) -> dict | None:
        lines = bytes(self.buffers["status"]).decode("utf-8", "replace").splitlines()
        if len(lines) >= 2:
            try:
                return json.loads(lines[1])
            except json.JSONDecodeError:
                return None
        return None

    def text(self, name: str) -> str:
        return bytes(self.buffers[name]).decode("utf-8", "replace")

    def close(self) -> None:
        self.sel.close()


def _leader_exited(proc: subprocess.Popen) -> bool:
    """True once the child has exited, WITHOUT reaping it where the OS allows (Linux):
    while it is a zombie its pid (and so its process-group id) cannot be reused, so the
    killpg that follows cannot hit a stranger."""
    if not hasattr(os, "waitid"):  # macOS: reap, and accept the tiny pid-reuse window
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> ExecutionResult:
    """Run `code` in a fresh sandboxed interpreter and report what happened.

    `timeout` (seconds of wall clock) starts when the code starts, after the interpreter
    has booted. `max_memory_bytes` caps the address space (None: no cap). Never raises
    for anything the code does and never waits much longer than `timeout`."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as tmp:
        root = Path(tmp)
        work_dir = root / "work"
        work_dir.mkdir()
        code_path = root / "code.py"  # outside the work dir: the code does not see itself
        code_path.write_text(code, encoding="utf-8")
        limits = {"memory": max_memory_bytes, "cpu": int(timeout) + 2, "fsize": MAX_FILE_BYTES}
        return _run_child(code_path, work_dir, limits, timeout, max_output_bytes)


def _run_child(code_path: Path, work_dir: Path, limits: dict, timeout: float,
               max_output_bytes: int) -> ExecutionResult:
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_BOOTSTRAP, str(code_path), str(status_w), json.dumps(limits)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=work_dir, env=_child_env(work_dir), pass_fds=(status_w,),
            start_new_session=True,  # own process group, so one killpg reaches everything it spawned
        )
    except OSError as e:
        os.close(status_r)
        os.close(status_w)
        return ExecutionResult(False, "", "", error=f"could not start the sandbox: {e}")
    os.close(status_w)  # only the child writes to it now
    collector = _Collector(proc, status_r, max_output_bytes)
    timed_out = False
    try:
        boot_deadline = time.monotonic() + STARTUP_GRACE_S
        deadline = None
        while True:
            now = time.monotonic()
            if deadline is None and collector.started():
                deadline = now + timeout
            if now > (deadline if deadline is not None else boot_deadline):
                timed_out = True
                break
            if collector.overflow or _leader_exited(proc):
                break
            collector.pump(0.02)
        if timed_out or collector.overflow:
            log.debug("sandbox pid %d: %s; killing its process group", proc.pid,
                      "timed out" if timed_out else "output limit reached")
        _kill_group(proc.pid)  # the leader is alive or a zombie here, so the group id is still ours
        end = time.monotonic() + 1.0
        while collector.open and time.monotonic() < end:  # drain what is left in the pipes
            collector.pump(0.05)
    finally:
        _kill_group(proc.pid)
        proc.wait()
        collector.close()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        os.close(status_r)
    return _result(collector, proc.returncode, timed_out, timeout, max_output_bytes)


def _result(collector: _Collector, returncode: int, timed_out: bool, timeout: float,
            max_output_bytes: int) -> ExecutionResult:
    stdout, stderr = collector.text("stdout"), collector.text("stderr")
    if timed_out:
        return ExecutionResult(False, stdout, stderr, error=f"Execution timed out after {timeout:g}s", timeout=True)
    if collector.overflow:
        return ExecutionResult(False, stdout, stderr, error=f"Output exceeded {max_output_bytes} bytes; stopped")
    report = collector.report()
    if report is None:
        # the child died without reporting: killed by a signal (SIGXCPU, SIGKILL from the
        # kernel's OOM killer, SIGSEGV) or os._exit() from the code
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        return ExecutionResult(False, stdout, stderr, error=f"Process ended without finishing ({how})",
                               memory_exceeded="MemoryError" in stderr)
    if report.get("memory"):
        return ExecutionResult(False, stdout, stderr, error=f"Memory limit exceeded ({report['error']})",
                               memory_exceeded=True)
    if not report.get("ok"):
        return ExecutionResult(False, stdout, stderr, error=report.get("error") or "unknown error")
    return ExecutionResult(True, stdout, stderr)
