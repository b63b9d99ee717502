"""
Run model-written Python (HumanEval solutions, tool code) in a throw-away sandbox.

Each call starts a FRESH interpreter (`python -I`: isolated mode, so no PYTHON*
variables, no user site-packages, no script directory on sys.path), never a fork of
the caller, so the code cannot see or corrupt the caller's memory (model weights, CUDA
state, open files). Two layers of isolation, the first enforced by the kernel:

1. Namespaces (Linux; `isolation="namespaces"`). The interpreter unshares fresh user,
   mount, PID, network, IPC and UTS namespaces and forks the process that runs the
   code, which is PID 1 of its own PID namespace:
   - filesystem: a new root (a tmpfs) holding read-only bind mounts of /usr, /etc, the
     /lib and /bin directories, the interpreter's prefixes (venv and base install) and
     five /dev nodes (null, zero, full, random, urandom); a fresh read-only /proc of the
     new PID namespace; a private tmpfs of SCRATCH_BYTES at /tmp that holds the working
     directory. The old root is detached (`pivot_root`), so the checkout, $HOME, the
     host's /tmp and every socket under /run are simply not there;
   - network: an empty network namespace (its loopback is down and is not the host's);
   - processes: when PID 1 exits or is killed, the kernel kills every process left in
     its namespace, daemons and `setsid` included; PID 1 itself dies with the
     interpreter that forked it (PR_SET_PDEATHSIG). RLIMIT_NPROC allows no process
     besides the code's own (`max_processes` more if asked); it holds as root too,
     because a root caller first drops to uid 65534 (nobody) and the kernel counts
     processes per user namespace;
   - privileges: after setting the mounts up, the code's process drops every capability
     (bounding set, securebits locked, no_new_privs), nested user namespaces are capped
     at zero and every descriptor but stdio and the status pipe is closed, so it cannot
     mount, remount, unshare or chroot its way out;
   - seccomp (x86_64 and aarch64): a deny list of syscalls no program under test needs
     and that have served kernel escapes before (io_uring, bpf, keyrings, ptrace,
     userfaultfd, perf, module loading, the mount APIs, open_by_handle_at): EPERM;
   - the parent tells the namespace's creator to SIGKILL PID 1 at the deadline and waits
     for it, so by the time `execute_code` returns nothing of the run is alive.
   Files under a 0700 directory (a pyenv in /root, say) are reached by a root caller
   through mount clones opened (`open_tree`, Linux 5.2+) before it drops to nobody.
   Set-up is done in the fresh interpreter with ctypes (os.unshare is Python 3.12+),
   needs no helper binary, and adds a few tens of milliseconds per program
   (`nanochat bench-sandbox` measures it).

2. A Python-level guard in the code's process (both modes): resource limits set by the
   child's own bootstrap rather than a `preexec_fn`, which is not safe to use when the
   caller has threads: RLIMIT_AS (memory), RLIMIT_CPU (behind the wall clock),
   RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC; destructive functions
   replaced by stubs that raise PermissionError (process creation and signalling,
   deleting/renaming/chmod-ing files, changing directory or identity) and
   `ctypes`/`resource` made unimportable; a scrubbed environment (PATH, LANG, HOME and
   TMPDIR pointing at the work dir, thread counts); stdin is /dev/null; stdout and
   stderr captured up to `max_output_bytes`; a wall-clock timeout enforced by the
   parent, which SIGKILLs the whole process group. Alone, this layer protects against
   accidents, not against code written to escape (the stubs come back with
   `del sys.modules['posix']`; as root RLIMIT_NPROC is not enforced).

Choosing: `NANOCHAT_SANDBOX` = `auto` (default: namespaces when the kernel allows them,
else the guard with one warning naming what is missing), `strict` (namespaces or a
RuntimeError), `guard` (the Python guard only). The choice is probed once per process
and logged once. macOS and other non-Linux systems have no namespaces: they run the
guard, which is not a security boundary there; run untrusted workloads in a Linux VM or
container (Docker Desktop is one), or set NANOCHAT_SANDBOX=strict to refuse. The same
fallback applies to Linux machines that forbid unprivileged user namespaces (sysctls
kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0, or an AppArmor policy)
and to containers whose seccomp profile refuses unshare (Docker's default does unless
the container has CAP_SYS_ADMIN).
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.errors import UserError

log = logging.getLogger("nanochat.execution")

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
STARTUP_GRACE_S = 10.0   # interpreter start-up and sandbox set-up, not charged to the code's timeout
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
SCRATCH_BYTES = 64 * 1024 * 1024  # the namespaced run's /tmp (tmpfs: it is RAM)
NOBODY = 65534  # the uid/gid a root caller drops to before unsharing
ISOLATIONS = ("namespaces", "guard")


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
# The child's bootstrap (run with `python -I -c`). argv: code path, status fd, settings JSON.
# It reports over the status pipe: "started" right before the user code runs (the
# parent starts the timeout clock then), and one JSON line when it finishes; a failed
# namespace set-up reports one "sandbox-error: ..." line instead.
#
# In "namespaces" mode the interpreter the parent started (call it the keeper) unshares
# the namespaces and forks; the fork is PID 1 of the new PID namespace, builds the new
# root, drops its privileges and runs the code. The keeper stays outside the PID
# namespace (the code cannot see or signal it), kills PID 1 when the parent sends it
# SIGTERM, and exits the way PID 1 did once the kernel has torn the namespace down.

_CHILD_BOOTSTRAP = r'''
import builtins, json, os, sys

code_path, status_fd, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
status = os.fdopen(status_fd, "w", buffering=1)
os.set_inheritable(status_fd, False)
with open(code_path, encoding="utf-8") as f:
    source = f.read()

if settings["isolation"] == "namespaces":
    import ctypes, signal
    MACHINE = os.uname().machine
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
    CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
    AT_FDCWD, AT_RECURSIVE, O_CLOEXEC = -100, 0x8000, 0o2000000
    OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MNT_DETACH = 1, 4, 2
    SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # one number on every arch
    SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(MACHINE)
    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
    PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
    # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (off), NO_CAP_AMBIENT_RAISE: each set and locked
    SECUREBITS = 0b11101111
    NEW = "/tmp"  # where the new root is assembled (any directory that exists will do)
    # seccomp: syscalls that no program under test needs and that have been the way out of
    # containers before (io_uring, bpf, keyrings, userfaultfd, perf, ptrace, module and
    # mount APIs, open_by_handle_at): refused with EPERM, on the two architectures listed
    SECCOMP = {
        "x86_64": (0xC000003E, [101, 103, 135, 153, 155, 161, 163, 165, 166, 167, 168, 169, 175, 176, 179,
                                212, 246, 248, 249, 250, 272, 298, 300, 303, 304, 308, 310, 311, 313, 320,
                                321, 323, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442]),
        "aarch64": (0xC00000B7, [117, 116, 92, 58, 41, 51, 89, 40, 39, 224, 225, 142, 105, 106, 60,
                                 18, 104, 217, 218, 219, 97, 241, 262, 264, 265, 268, 270, 271, 273, 294,
                                 280, 282, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442]),
    }

    def _syscall(nr, *args):
        # variadic: pass every integer as a full-width long, or the kernel may read garbage high bits
        return libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))

    def _prctl(option, arg2=0):
        return libc.prctl(option, *(ctypes.c_ulong(a) for a in (arg2, 0, 0, 0)))

    def _fail(what):
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

    def _mount(src, dst, fstype, flags, data=None):
        enc = lambda s: s.encode() if s is not None else None
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            _fail(f"mount {fstype or src} on {dst}")

    def _plan():
        """What the new root holds, seen from the host: [(kind, path, target)]."""
        plan = []
        for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"):
            if os.path.islink(top):
                plan.append(("link", top, os.readlink(top)))  # merged /usr: /bin -> usr/bin
            elif os.path.isdir(top):
                plan.append(("dir", top, top))
        covered = [path for kind, path, _ in plan if kind == "dir"]
        prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                    os.path.dirname(os.path.realpath(sys.executable)))
        stdlib = os.path.realpath(os.path.dirname(os.__file__))
        for path in sorted({p for prefix in prefixes for p in (os.path.abspath(prefix), os.path.realpath(prefix))}):
            if not os.path.isdir(path) or any(path == c or path.startswith(c + "/") for c in covered):
                continue
            if (path == "/tmp" or path.startswith("/tmp/")) and not stdlib.startswith(path + "/"):
                # a venv in a checkout under /tmp: the program needs the interpreter (already
                # running) and the standard library, not the venv's packages, and binding it
                # would leave its parent directories in the writable scratch
                continue
            plan.append(("dir", path, path))
            covered.append(path)
        for dev in ("null", "zero", "full", "random", "urandom"):
            plan.append(("file", "/dev/" + dev, "/dev/" + dev))
        return plan

    def _clone_trees(plan):
        """Root only: detached copies of the mounts to bind, made while the paths can still
        be walked (a pyenv under /root, mode 0700, cannot be once we are nobody)."""
        fds = {}
        for kind, path, _ in plan:
            if kind != "link":
                fd = _syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE)
                if fd < 0:
                    _fail(f"open_tree {path}")
                fds[path] = fd
        return fds

    def _unshare(settings):
        if os.geteuid() == 0:
            # root ignores RLIMIT_NPROC; the kernel enforces it for any other uid, per user namespace
            nobody = settings["nobody"]
            try:
                os.setgroups([])
                os.setresgid(nobody, nobody, nobody)
                os.setresuid(nobody, nobody, nobody)
            except OSError:
                pass  # nobody is not mapped (root of a rootless container, whose real uid is not 0)
            _prctl(PR_SET_DUMPABLE, 1)  # else /proc/self/uid_map stays root's
        uid, gid = os.geteuid(), os.getegid()
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if libc.unshare(flags) != 0:
            _fail("unshare(user, mount, pid, net, ipc, uts)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)

    def _build_root(plan, fds, settings):
        """In PID 1, still privileged in its user namespace: assemble the new root under NEW."""
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")  # no nested user namespace: it would bring back mount rights (tmpfs = RAM)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
        for kind, path, _ in plan:  # held open: NEW may hide a source (a venv under /tmp)
            if kind != "link" and path not in fds:
                fds[path] = "/proc/self/fd/%d" % os.open(path, os.O_PATH | os.O_CLOEXEC)
        _mount("tmpfs", NEW, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=256,mode=0755")
        # a tree under /tmp (a venv in a checkout under /tmp, as CI clones may be) goes on top of
        # the scratch tmpfs, so it is bound after that is mounted
        under_tmp = [item for item in plan if item[1] == "/tmp" or item[1].startswith("/tmp/")]
        plan = [item for item in plan if item not in under_tmp]

        def bind(kind, path, target):
            dst = NEW + path
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if kind == "link":
                os.symlink(target, dst)
                return
            if kind == "dir":
                os.makedirs(dst, exist_ok=True)
            else:
                open(dst, "w").close()
            source = fds[path]
            if isinstance(source, int):  # a detached clone (root caller): attach it
                if _syscall(SYS_MOVE_MOUNT, source, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH) != 0:
                    _fail(f"move_mount {path}")
            else:
                _mount(source, dst, None, MS_BIND | MS_REC)

        for item in plan:
            bind(*item)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{NEW}/dev/{name}")
        os.mkdir(NEW + "/proc")
        os.mkdir(NEW + "/tmp")
        _make_read_only(NEW)
        _mount("tmpfs", NEW + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={settings['scratch']},nr_inodes=4096,mode=0700")
        for item in under_tmp:
            bind(*item)
            _make_read_only(NEW + item[1])
        for source in fds.values():  # a host directory reached through a left-open fd is no sandbox
            os.close(source if isinstance(source, int) else int(source.rsplit("/", 1)[1]))
        try:
            _mount("proc", NEW + "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass  # a container that masks parts of /proc forbids new proc mounts: /proc stays empty
        libc.sethostname(b"sandbox", ctypes.c_size_t(7))
        os.chdir(NEW)
        if SYS_PIVOT_ROOT is not None and _syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
            if libc.umount2(b".", MNT_DETACH) != 0:  # the old root, stacked on "." by pivot_root
                _fail("umount2 old root")
        else:
            _mount(".", "/", None, MS_MOVE)
            os.chroot(".")
        os.chdir("/")

    def _make_read_only(root):
        attr = (ctypes.c_uint64 * 4)(MS_RDONLY | MS_NOSUID, 0, 0, 0)  # struct mount_attr: set, clr, propagation, userns
        if _syscall(SYS_MOUNT_SETATTR, AT_FDCWD, root.encode(), AT_RECURSIVE, attr, ctypes.sizeof(attr)) == 0:
            return
        # kernels before 5.12: remount each mount read-only, keeping the flags the kernel locks
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in points:
            if point == root or point.startswith(root + "/"):
                st = os.statvfs(point)
                keep = st.f_flag & (MS_NODEV | MS_NOEXEC | 1024 | 2048)  # nodev, noexec, noatime, nodiratime: same bits in ST_ and MS_
                _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)

    def _drop_privileges(last_cap):
        if _prctl(PR_SET_SECUREBITS, SECUREBITS) != 0:
            _fail("securebits")
        for cap in range(last_cap + 1):
            if _prctl(PR_CAPBSET_DROP, cap) != 0:
                _fail(f"drop capability {cap}")
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
        if libc.capset(header, data) != 0:
            _fail("capset")
        if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
            _fail("no_new_privs")

    def _seccomp():
        """A classic-BPF deny list (the optional third layer; skipped on other architectures)."""
        if MACHINE not in SECCOMP:
            return
        audit_arch, numbers = SECCOMP[MACHINE]
        load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
        allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
        checks = ([(jge, 0x40000000)] if audit_arch == 0xC000003E else []) + [(jeq, n) for n in numbers]  # x32 ABI
        prog = [(load, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (load, 0, 0, 0)]  # arch, then nr
        deny_at = len(prog) + len(checks) + 1
        for code, k in checks:
            prog.append((code, deny_at - len(prog) - 1, 0, k))
        prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]

        class SockFilter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

        filters = (SockFilter * len(prog))(*(SockFilter(*insn) for insn in prog))
        fprog = SockFprog(len(prog), filters)
        if libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            _fail("seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

    def _keep(pid, alive_w):
        """The keeper: wait for PID 1, kill it on SIGTERM, then exit as it did."""
        try:  # a pidfd cannot hit a stranger should the signal come after the reaping
            pidfd = os.pidfd_open(pid)
            kill = lambda *_: signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (AttributeError, OSError):
            kill = lambda *_: os.kill(pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, kill)
        _, wstatus = os.waitpid(pid, 0)  # returns once the kernel has killed the whole namespace
        if os.WIFSIGNALED(wstatus):
            signal.signal(os.WTERMSIG(wstatus), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(wstatus))
        os._exit(os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else 1)

    def _enter_namespaces(settings):
        plan = _plan()
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        fds = {}
        if os.geteuid() == 0:
            try:
                fds = _clone_trees(plan)
            except OSError:  # not allowed here (root of a container): bind the paths instead
                for fd in fds.values():
                    os.close(fd)
                fds = {}
        _unshare(settings)
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(alive_r)
            for fd in fds.values():
                os.close(fd)
            _keep(pid, alive_w)
        os.close(alive_w)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.set_blocking(alive_r, False)
        try:
            if os.read(alive_r, 1) == b"":
                os._exit(1)  # the keeper died before PR_SET_PDEATHSIG took effect
        except BlockingIOError:
            pass
        os.close(alive_r)
        _build_root(plan, fds, settings)
        os.makedirs(settings["work_dir"])
        os.chdir(settings["work_dir"])
        _drop_privileges(last_cap)
        _seccomp()
        os.closerange(3, status_fd)  # nothing but stdio and the status pipe stays open
        os.closerange(status_fd + 1, 1 << 16)

    try:
        _enter_namespaces(settings)
    except Exception as e:  # reported to the parent, which decides between fallback and error
        status.write(f"sandbox-error: {type(e).__name__}: {e}\n")
        status.flush()
        os._exit(70)
    del libc

import resource
def _limit(which, value):
    if value is None:
        return
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # e.g. a limit already lower than asked for
_limit(resource.RLIMIT_AS, settings["memory"])
_limit(resource.RLIMIT_CPU, settings["cpu"])
_limit(resource.RLIMIT_FSIZE, settings["fsize"])
_limit(resource.RLIMIT_NOFILE, settings["nofile"])
_limit(resource.RLIMIT_CORE, 0)
# new processes and threads. Namespaced, the kernel counts this user namespace's
# processes (the keeper and this one make 2); unnamespaced, 0 and root is exempt.
_limit(resource.RLIMIT_NPROC, settings["nproc"])

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
# (not register_at_fork: it only records callbacks, and `import random` calls it)
_OS = ["system", "popen", "kill", "killpg", "fork", "forkpty", "vfork",
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


def _child_env(work_dir: str) -> dict[str, str]:
    """Everything the child sees of the environment; nothing is inherited."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": work_dir, "TMPDIR": work_dir,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -----------------------------------------------------------------------------
# Which isolation: decided once per process.

_isolation_lock = threading.Lock()
_isolation_probed: dict[str, str] = {}  # "mode"; a fallback's "why"; else "seccomp" (on/off), outside "uid"


def requested_isolation() -> str:
    """NANOCHAT_SANDBOX, validated: 'auto' (default), 'strict' or 'guard'."""
    mode = os.environ.get("NANOCHAT_SANDBOX", "auto").strip().lower() or "auto"
    if mode not in ("auto", "strict", "guard"):
        raise UserError(f"NANOCHAT_SANDBOX must be auto, strict or guard, got {mode!r}")
    return mode


def sandbox_isolation() -> str:
    """The isolation `execute_code` uses by default: 'namespaces' or 'guard'. The first
    call probes the kernel (one empty run, tens of ms) and logs the outcome once."""
    mode = requested_isolation()
    if mode == "guard":
        return "guard"
    with _isolation_lock:
        if "mode" not in _isolation_probed:
            _isolation_probed.update(_probe())
            if _isolation_probed["mode"] == "namespaces":
                log.info("code sandbox: kernel namespaces (user, mount, pid, net, ipc, uts), read-only root, "
                         "%d MiB scratch, no network, no capabilities%s%s", SCRATCH_BYTES >> 20,
                         ", seccomp filter" if _isolation_probed["seccomp"] == "on" else "",
                         f", as uid {_isolation_probed['uid']}")
                if _isolation_probed["uid"] == "0":
                    log.warning("code sandbox: the code runs as uid 0 outside its namespace (uid %d is not mapped "
                                "here), so the kernel does not enforce its process limit", NOBODY)
            elif mode == "auto":
                log.warning("code sandbox: kernel isolation unavailable (%s); falling back to the in-process "
                            "guard, which is NOT a security boundary (NANOCHAT_SANDBOX=strict makes this an "
                            "error)", _isolation_probed["why"])
        probed = dict(_isolation_probed)
    if probed["mode"] == "guard" and mode == "strict":
        raise UserError(f"NANOCHAT_SANDBOX=strict but kernel isolation is unavailable: {probed['why']}")
    return probed["mode"]


def _probe() -> dict[str, str]:
    if not sys.platform.startswith("linux"):
        return {"mode": "guard", "why": f"namespaces are Linux-only, this is {sys.platform}"}
    # what the kernel applied: the seccomp mode, and the uid the code has outside its namespace
    code = ("try:\n    print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
            "    print(open('/proc/self/uid_map').read().split()[1])\nexcept OSError:\n    pass")
    r = execute_code(code, timeout=10.0, isolation="namespaces")
    if r.success:
        seccomp, outside_uid = (r.stdout.split() + ["?", "?"])[:2]
        return {"mode": "namespaces", "seccomp": "on" if seccomp == "2" else "off", "uid": outside_uid}
    return {"mode": "guard", "why": r.error or "the probe program failed"}


# -----------------------------------------------------------------------------
# The parent side.

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
        # a pidfd turns readable when the child exits: `pump` wakes then instead of at its timeout
        self.pidfd = None
        try:
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):  # not Linux 5.3+ / Python 3.9+: polling it is
            pass

    @property
    def open(self) -> bool:
        """Whether an output pipe is still open."""
        return any(key.data != "exit" for key in self.sel.get_map().values())

    def pump(self, wait_s: float) -> None:
        """Read whatever arrives within `wait_s`; unregister pipes at EOF."""
        for key, _ in self.sel.select(timeout=max(wait_s, 0.0)):
            if key.data == "exit":
                self.sel.unregister(key.fd)
                continue
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

    def setup_error(self) -> str | None:
        """The namespace set-up's failure, if that is what the child reported."""
        first = bytes(self.buffers["status"]).split(b"\n", 1)[0].decode("utf-8", "replace")
        return first[len("sandbox-error: "):] if first.startswith("sandbox-error: ") else None

    def report(self) -> dict | None:
        lines = bytes(self.buffers["status"]).decode("utf-8", "replace").splitlines()
        if len(lines) >= 2 and lines[0] == "started":
            try:
                return json.loads(lines[1])
            except json.JSONDecodeError:
                return None
        return None

    def text(self, name: str) -> str:
        return bytes(self.buffers[name]).decode("utf-8", "replace")

    def close(self) -> None:
        self.sel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)


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
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, *,
                 isolation: str | None = None, max_processes: int = 0) -> ExecutionResult:
    """Run `code` in a fresh sandboxed interpreter and report what happened.

    `timeout` (seconds of wall clock) starts when the code starts, after the interpreter
    has booted and the sandbox is set up. `max_memory_bytes` caps the address space
    (None: no cap). `isolation`: 'namespaces', 'guard' or None for `sandbox_isolation()`.
    `max_processes`: processes (threads too) the code may start besides its own, under
    namespaces only (the guard's stubs refuse them anyway; they still die with the run).
    Never raises for anything the code does and never waits much longer than `timeout`;
    raises RuntimeError under NANOCHAT_SANDBOX=strict when namespaces are unavailable."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if max_processes < 0:
        raise ValueError(f"max_processes must be >= 0, got {max_processes}")
    if isolation is None:
        isolation = sandbox_isolation()
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS} or None, got {isolation!r}")
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as tmp:
        root = Path(tmp)
        code_path = root / "code.py"  # outside the work dir: the code does not see itself
        code_path.write_text(code, encoding="utf-8")
        if isolation == "namespaces":
            # created inside the sandbox's own /tmp; the name only mirrors the host's temp dir
            work_dir = f"/tmp/{root.name}/work"
        else:
            (root / "work").mkdir()
            work_dir = str(root / "work")
        settings = {"isolation": isolation, "memory": max_memory_bytes, "cpu": int(timeout) + 2,
                    "fsize": MAX_FILE_BYTES, "nofile": MAX_OPEN_FILES, "scratch": SCRATCH_BYTES,
                    "work_dir": work_dir, "nobody": NOBODY,
                    "nproc": 2 + max_processes if isolation == "namespaces" else 0}
        return _run_child(code_path, root if isolation == "namespaces" else Path(work_dir), settings,
                          timeout, max_output_bytes)


def _run_child(code_path: Path, cwd: Path, settings: dict, timeout: float,
               max_output_bytes: int) -> ExecutionResult:
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_BOOTSTRAP, str(code_path), str(status_w), json.dumps(settings)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=_child_env(settings["work_dir"]), pass_fds=(status_w,),
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
            log.debug("sandbox pid %d: %s; killing it", proc.pid, "timed out" if timed_out else "output limit reached")
        if settings["isolation"] == "namespaces":
            # the keeper SIGKILLs PID 1 and exits once the kernel has emptied the namespace
            _stop_keeper(proc)
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


def _stop_keeper(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the keeper and wait (without reaping) until it has exited; the killpg
    after it is the fallback should it not within `grace_s`."""
    if _leader_exited(proc):
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: it would reap the leader
    except ProcessLookupError:
        return
    end = time.monotonic() + grace_s
    while not _leader_exited(proc) and time.monotonic() < end:
        time.sleep(0.002)


def _result(collector: _Collector, returncode: int, timed_out: bool, timeout: float,
            max_output_bytes: int) -> ExecutionResult:
    stdout, stderr = collector.text("stdout"), collector.text("stderr")
    setup_error = collector.setup_error()
    if setup_error is not None:
        return ExecutionResult(False, stdout, stderr, error=f"sandbox set-up failed: {setup_error}")
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
