"""Hostile programs against the namespace sandbox: each must end as a failure or a
timeout within its limit, leave no file outside its scratch directory and no process
behind, as root and as an unprivileged user.

Every program runs through a harness process (one per case) under an outer guard, so a
sandbox regression cannot take the machine down: a pids cgroup caps how many processes
the case can ever have (or RLIMIT_NPROC when the tests do not run as root), RLIMIT_AS
caps memory, and the test kills the case after a hard timeout. The harness is a child
subreaper: anything that escaped the sandbox's PID namespace would be re-parented to
it, and it reports such leftovers after `execute_code` returns.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from nanochat.execution import sandbox_isolation

REPO = Path(__file__).resolve().parents[1]
SECRET = "nanochat-hostile-secret-" + uuid.uuid4().hex
TIMEOUT = 1.0        # the code's own wall-clock limit
HARD_TIMEOUT = 30.0  # the outer guard's, per case: start-up + set-up + TIMEOUT + tear-down, with margin
CGROUP_PIDS = 64     # processes the whole case may ever have, the harness included

# Runs as its own process: argv[1] is JSON. Prints one JSON line.
HARNESS = r'''
import ctypes, json, os, resource, sys, time
args = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
if os.geteuid() != 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))  # the outer guard without a cgroup
ctypes.CDLL(None).prctl(36, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))  # PR_SET_CHILD_SUBREAPER
sys.path.insert(0, args["repo"])
from nanochat.execution import execute_code
t0 = time.monotonic()
r = execute_code(args["code"], timeout=args["timeout"], max_processes=args["max_processes"], isolation="namespaces")
elapsed = time.monotonic() - t0

def children():
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(pid))
    return found

leftovers = children()
for pid in leftovers:  # clean up after a regression; the test fails on the report
    try:
        os.kill(pid, 9)
    except OSError:
        pass
print(json.dumps({"success": r.success, "timeout": r.timeout, "error": r.error, "stdout": r.stdout[-2000:],
                  "stderr": r.stderr[-2000:], "stdout_len": len(r.stdout), "elapsed": elapsed,
                  "leftovers": leftovers, "uid": os.geteuid()}), flush=True)
'''

# Undo the in-process guard first: the kernel must be what stops each of these.
UNGUARD = """import sys
for _m in ('posix', 'os', 'ctypes', '_ctypes', 'subprocess', '_posixsubprocess', 'shutil', 'resource', 'signal'):
    sys.modules.pop(_m, None)
import posix, os, ctypes
libc = ctypes.CDLL(None, use_errno=True)
def check(ret, what):
    if ret == -1:
        raise OSError(ctypes.get_errno(), what + ': ' + os.strerror(ctypes.get_errno()))
    return ret
"""

# name -> (program, max_processes). @NAME@ tokens are filled in by the test.
PROGRAMS: dict[str, tuple[str, int]] = {
    "fork_bomb": (UNGUARD + "while True:\n    posix.fork()\n", 0),
    "fork_bomb_ctypes_with_room": (UNGUARD + "while True:\n    libc.fork()\n", 4),  # bounded, then the timeout
    "thread_bomb": ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n", 0),
    "memory_hog": ("chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n", 0),
    "infinite_loop": ("while True:\n    pass\n", 0),
    "write_outside_dir": (UNGUARD + "open('@OUTSIDE@/escaped.txt', 'w').write('x')\n", 0),
    "write_repo": (UNGUARD + "open('@REPO_MARKER@', 'w').write('x')\n", 0),
    "write_home": (UNGUARD + "open(os.path.expanduser('~') + '/x', 'w').close()\nopen('@HOME_MARKER@', 'w').write('x')\n", 0),
    "write_system_dirs": (UNGUARD + "for d in ('/', '/etc', '/usr', '/tmp/..', '/dev'):\n"
                          "    try:\n        open(d + '/nanochat-escape', 'w').close()\n        print('wrote', d)\n"
                          "    except OSError:\n        pass\nraise SystemExit('nothing written')\n", 0),
    "delete_outside_file": (UNGUARD + "os.unlink('@VICTIM@')\n", 0),
    # bounded (320 MiB, five times the scratch), so that a regression cannot fill the host's disk
    "fill_scratch": ("for i in range(40):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * (8 << 20))\n"
                     "raise SystemExit('scratch unlimited')\n", 0),
    "subprocess_spawn": (UNGUARD + "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch @OUTSIDE@/spawned'])\n", 0),
    "subprocess_with_room": (UNGUARD + "import subprocess\n"
                             "subprocess.run(['/bin/sh', '-c', 'touch @OUTSIDE@/spawned'], check=True)\n", 4),
    "connect_host_loopback": ("import socket\nsocket.create_connection(('127.0.0.1', @PORT@), timeout=1).sendall(b'escaped')\n", 0),
    "connect_abstract_unix": ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect('\\0@ABSTRACT@')\n"
                              "s.sendall(b'escaped')\n", 0),
    "reimported_posix_fork": ("import sys\ndel sys.modules['posix']\nimport posix\nposix.fork()\n", 0),
    "ctypes_mount_and_unshare": (UNGUARD + "failures = []\n"
                                 "os.mkdir('m')\n"  # each call is harmless should a regression let it through
                                 "for what, call in (('mount tmpfs', lambda: libc.mount(b'none', b'm', b'tmpfs', 0, None)),\n"
                                 "                   ('remount /usr rw', lambda: libc.mount(None, b'/usr', None, 32 | 4096, None)),\n"
                                 "                   ('unshare user', lambda: libc.unshare(0x10000000)),\n"
                                 "                   ('unshare mount', lambda: libc.unshare(0x20000)),\n"
                                 "                   ('chroot', lambda: libc.chroot(b'/tmp')),\n"
                                 # the host's own name: harmless even if a regression let it through
                                 "                   ('sethostname', lambda: libc.sethostname(b'@HOSTNAME@', len(b'@HOSTNAME@')))):\n"
                                 "    if call() == 0:\n        print('escaped:', what)\n    else:\n        failures.append(what)\n"
                                 "raise SystemExit(f'refused: {failures}')\n", 0),
    "daemon_outlives_run": (UNGUARD + "pid = posix.fork()\nif pid == 0:\n    posix.setsid()\n"
                            "    if posix.fork() == 0:\n        import time\n        time.sleep(600)\n    posix._exit(0)\n"
                            "posix.waitpid(pid, 0)\nposix._exit(0)\n", 4),
    "daemon_then_hang": (UNGUARD + "if posix.fork() == 0:\n    posix.setsid()\n    import time\n    time.sleep(600)\n"
                         "import time\ntime.sleep(600)\n", 4),
    "environment_secrets": (UNGUARD + "found = [k for k, v in os.environ.items() if 'nanochat-hostile-secret' in v]\n"
                            "for pid in os.listdir('/proc'):\n    try:\n"
                            "        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
                            "    except OSError:\n        pass\n"
                            "print(found)\nassert any('nanochat-hostile-secret' in f for f in found), 'no secret'\n", 0),
    "read_stdin": ("import sys, os\ndata = sys.stdin.read() + os.read(0, 100).decode()\nassert data, 'stdin is empty'\n", 0),
    "open_tty": ("open('/dev/tty', 'r+')\n", 0),
    "huge_output": ("import os\nwhile True:\n    os.write(1, b'x' * 65536)\n", 0),
    "huge_stderr": ("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)\n", 0),
    # each write puts back the value just read, so that even a regression changes nothing
    "proc_sys_write": (UNGUARD + "for path in ('/proc/sys/kernel/hostname', '/proc/sys/kernel/domainname',\n"
                       "             '/proc/sys/kernel/core_pattern', '/proc/sys/vm/overcommit_memory'):\n    try:\n"
                       "        value = open(path).read()\n        open(path, 'w').write(value)\n        print('wrote', path)\n"
                       "    except OSError:\n        pass\n"
                       "raise SystemExit('refused')\n", 0),
    # never kill(-1): a regression as root would take every process on the machine with it
    "signal_outside": (UNGUARD + "import signal\nhits = []\nfor pid, sig in ((@VICTIM_PID@, signal.SIGKILL), (@TEST_PID@, 0)):\n"
                       "    try:\n        posix.kill(pid, sig)\n        hits.append(pid)\n    except OSError:\n        pass\n"
                       "raise SystemExit(f'signalled {hits}')\n", 4),
    "proc_self_tricks": (UNGUARD + "seen = []\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
                         "        for link in ('root', 'cwd'):\n            try:\n"
                         "                seen.append(os.listdir(f'/proc/{pid}/{link}/@OUTSIDE_PARENT@'))\n"
                         "            except OSError:\n                pass\n"
                         "            try:\n                open(f'/proc/{pid}/{link}/@OUTSIDE@/proc-escape', 'w').close()\n"
                         "            except OSError:\n                pass\n"
                         "open('/proc/self/root/@OUTSIDE@/proc-escape', 'w')\n", 0),
    "kernel_attack_surface": (UNGUARD + "import platform\n"
                              "nrs = {'x86_64': {'io_uring_setup': 425, 'bpf': 321, 'keyctl': 250, 'perf_event_open': 298,\n"
                              "                  'userfaultfd': 323, 'ptrace': 101, 'open_by_handle_at': 304},\n"
                              "       'aarch64': {'io_uring_setup': 425, 'bpf': 280, 'keyctl': 219, 'perf_event_open': 241,\n"
                              "                   'userfaultfd': 282, 'ptrace': 117, 'open_by_handle_at': 265}}[platform.machine()]\n"
                              "accepted = [name for name, nr in nrs.items()\n"
                              "            if libc.syscall(nr, 0, 0, 0, 0, 0) != -1 or ctypes.get_errno() != 1]  # EPERM\n"
                              "raise SystemExit(f'accepted: {accepted}')\n", 0),
    "too_many_files": ("files = [open('/dev/null') for _ in range(10000)]\n", 0),
}


def _pids_cgroup_root() -> Path | None:
    """A pids cgroup directory this process may create children in (v1 or v2), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        _, point, fstype, options = line.split()[:4]
        if fstype == "cgroup" and "pids" in options.split(","):
            rel = next((l.split(":", 2)[2] for l in own if "pids" in l.split(":")[1].split(",")), "/")
        elif fstype == "cgroup2" and "pids" in (Path(point) / "cgroup.subtree_control").read_text().split():
            rel = next((l.split(":", 2)[2] for l in own if l.startswith("0::")), "/")
        else:
            continue
        candidate = Path(point) / rel.lstrip("/")
        if os.access(candidate, os.W_OK):
            return candidate
    return None


class OuterGuard:
    """One pids cgroup per case (when the machine offers one), killed and removed after."""

    def __init__(self, root: Path | None):
        self.dir = None
        if root is not None:
            self.dir = root / f"nanochat-hostile-{uuid.uuid4().hex[:12]}"
            self.dir.mkdir()
            (self.dir / "pids.max").write_text(str(CGROUP_PIDS))

    def wrap(self, argv: list[str]) -> list[str]:
        if self.dir is None:
            return argv
        # enter the cgroup first, then become the harness: everything it starts stays inside
        return ["/bin/sh", "-c", f'echo $$ > "{self.dir}/cgroup.procs" && exec "$@"', "sh", *argv]

    def close(self) -> None:
        if self.dir is None:
            return
        for _ in range(100):
            pids = (self.dir / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.dir.rmdir()


def _runners() -> dict[str, list[str] | None]:
    """How to start the harness: as the test's own user, and as nobody when we are root."""
    runners: dict[str, list[str] | None] = {"caller": [sys.executable]}
    if os.geteuid() != 0:
        runners["nobody"] = None  # already unprivileged: "caller" is that run
        return runners
    setpriv = shutil.which("setpriv")
    runners["nobody"] = None
    if setpriv is None:
        return runners
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # nobody may not be able to reach this venv's interpreter (a pyenv under /root, mode 0700);
    # the sandbox needs only the standard library, so any Python 3.10+ nobody can run will do
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not python:
            continue
        try:
            # it must also start itself again: execute_code runs sys.executable
            check = "import subprocess, sys; assert sys.version_info >= (3, 10); subprocess.run([sys.executable, '-c', ''], check=True)"
            ok = subprocess.run([*drop, python, "-c", check], cwd="/", capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            runners["nobody"] = [*drop, python]
            break
    return runners


@pytest.fixture(scope="module")
def environment():
    if not sys.platform.startswith("linux"):
        pytest.skip("namespaces are Linux-only")
    if sandbox_isolation() != "namespaces":
        pytest.skip("kernel namespaces unavailable here (the execution log says why)")
    cgroup = _pids_cgroup_root()
    if cgroup is None and os.geteuid() == 0:
        pytest.skip("no writable pids cgroup: as root nothing would contain a regressed fork bomb")
    return {"cgroup": cgroup, "runners": _runners()}


def _run_case(environment, runner: list[str], program: str, max_processes: int, tokens: dict[str, str]) -> dict:
    for key, value in tokens.items():
        program = program.replace(f"@{key}@", value)
    guard = OuterGuard(environment["cgroup"])
    try:
        args = {"code": program, "timeout": TIMEOUT, "max_processes": max_processes, "repo": str(REPO)}
        proc = subprocess.Popen(guard.wrap([*runner, "-c", HARNESS, json.dumps(args)]), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "NANOCHAT_HOSTILE_SECRET": SECRET}, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"the outer guard's {HARD_TIMEOUT}s timeout struck")
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return json.loads(out.decode().strip().splitlines()[-1])
    finally:
        guard.close()


@pytest.mark.parametrize("user", ["caller", "nobody"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_hostile_program_is_contained(environment, user, name):
    runner = environment["runners"][user]
    if runner is None:
        pytest.skip("cannot run as an unprivileged user here" if user == "nobody" and os.geteuid() == 0
                    else "the tests already run unprivileged (see 'caller')")
    # in the host's /tmp and world-writable, so that nobody could write there too: only the
    # sandbox may stop the writes
    outside = Path(tempfile.mkdtemp(prefix="nanochat-hostile-"))
    outside.chmod(0o777)
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    victim_process = subprocess.Popen(["sleep", "60"])
    repo_marker = REPO / f".sandbox-escape-{uuid.uuid4().hex}"
    home_marker = Path.home() / f".sandbox-escape-{uuid.uuid4().hex}"
    abstract = f"nanochat-hostile-{uuid.uuid4().hex}"
    hostname = socket.gethostname()
    listener = socket.create_server(("127.0.0.1", 0))  # the test's own listener, loopback only
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind("\0" + abstract)
    unix_listener.listen()
    for s in (listener, unix_listener):
        s.setblocking(False)
    if name == "kernel_attack_surface" and platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp layer covers x86_64 and aarch64 only")
    program, max_processes = PROGRAMS[name]
    tokens = {"OUTSIDE": str(outside), "OUTSIDE_PARENT": str(outside.parent), "VICTIM": str(victim),
              "REPO_MARKER": str(repo_marker), "HOME_MARKER": str(home_marker),
              "PORT": str(listener.getsockname()[1]), "ABSTRACT": abstract, "HOSTNAME": hostname,
              "VICTIM_PID": str(victim_process.pid), "TEST_PID": str(os.getpid())}
    try:
        report = _run_case(environment, runner, program, max_processes, tokens)
        # 1. it ended as a failure or a timeout, within its limit
        assert not report["success"], report
        assert report["elapsed"] < TIMEOUT + 10, report
        # 2. nothing of it is alive
        assert report["leftovers"] == [], report
        # 3. nothing outside its scratch directory changed
        assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"], report
        assert victim.read_text() == "keep me"
        assert not repo_marker.exists() and not home_marker.exists(), report
        assert socket.gethostname() == hostname
        assert victim_process.poll() is None  # still alive
        for s in (listener, unix_listener):
            with pytest.raises(BlockingIOError):
                s.accept()  # no connection arrived
        assert SECRET not in report["stdout"] + report["stderr"]
        assert "escaped" not in report["stdout"] and "wrote" not in report["stdout"], report
        if user == "nobody":
            assert report["uid"] == 65534
        _check_expected_outcome(name, report)
    finally:
        victim_process.kill()
        victim_process.wait()
        shutil.rmtree(outside)
        listener.close()
        unix_listener.close()
        for marker in (repo_marker, home_marker, *(Path(d) / "nanochat-escape" for d in ("/", "/etc", "/usr", "/dev"))):
            if marker.is_file():  # only after a regression: leave the machine as it was
                marker.unlink()


def _check_expected_outcome(name: str, report: dict) -> None:
    """How each case ends, where that is specific."""
    error = report["error"] or ""
    timeouts = {"fork_bomb_ctypes_with_room", "infinite_loop", "daemon_then_hang"}
    assert report["timeout"] == (name in timeouts), report
    expected = {
        "fork_bomb": "Resource temporarily unavailable",
        "thread_bomb": "can't start new thread",
        "memory_hog": "Memory limit exceeded",
        "write_outside_dir": "No such file or directory",
        "delete_outside_file": "No such file or directory",
        "fill_scratch": "No space left on device",
        "subprocess_spawn": "Resource temporarily unavailable",
        "subprocess_with_room": "CalledProcessError",  # sh runs, inside, and finds no such directory
        "connect_host_loopback": "Network is unreachable",
        "connect_abstract_unix": "Connection refused",
        "reimported_posix_fork": "Resource temporarily unavailable",
        "ctypes_mount_and_unshare": "refused: ['mount tmpfs', 'remount /usr rw', 'unshare user', 'unshare mount', 'chroot', 'sethostname']",
        "daemon_outlives_run": "without finishing",
        "environment_secrets": "no secret",
        "read_stdin": "stdin is empty",
        "open_tty": "No such file or directory",
        "huge_output": "Output exceeded",
        "huge_stderr": "Output exceeded",
        "proc_sys_write": "refused",
        "signal_outside": "signalled []",
        "proc_self_tricks": "No such file or directory",
        "too_many_files": "Too many open files",
        "kernel_attack_surface": "accepted: []",  # the seccomp filter's EPERM
        "write_system_dirs": "nothing written",
    }
    if name in expected:
        assert expected[name] in error, report
