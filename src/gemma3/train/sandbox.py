"""Run an untrusted program (a model's completion) in a limited subprocess: the code-execution reward.

What is enforced (Linux), per run:
- a fresh temporary directory as the working directory, and HOME / TMPDIR pointing into it;
- wall time (the whole process group is SIGKILLed when it runs out), CPU time (RLIMIT_CPU),
  address space (RLIMIT_AS: a 10 GB allocation fails with MemoryError), file size (RLIMIT_FSIZE),
  open files (RLIMIT_NOFILE), no core dumps;
- processes (RLIMIT_NPROC): the limit counts every process of the user, so it only works for a user
  that runs few other processes. Running as root, the child therefore drops to the unprivileged
  `nobody` user (root ignores RLIMIT_NPROC) — which also makes the file system outside the temporary
  directory unwritable for it. A non-root caller keeps its own user: there RLIMIT_NPROC is set to the
  user's current process count plus `max_procs`, and writes outside the temporary directory are *not*
  prevented by permissions (only discouraged by cwd / HOME / TMPDIR);
- no network and a private /tmp: the child enters new network and mount namespaces (unshare(2); as
  non-root inside a new user namespace) where the kernel allows it, and mounts a small private tmpfs
  over each world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock), with its work directory
  bind-mounted back; `SandboxResult.isolation` says what the kernel allowed;
- Python runs isolated (`-I`: no user site-packages, no PYTHON* environment) with an empty environment.

Not enforced: a read-only view of the file system (the child can read what `nobody` or the caller may
read), seccomp syscall filtering, cgroup accounting. Use a container for adversarial code at scale.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000


@dataclass(frozen=True)
class Limits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20  # address space; Python itself needs ~30 MB
    file_bytes: int = 1 << 20
    max_procs: int = 16
    open_files: int = 64
    output_bytes: int = 64 << 10  # stdout / stderr kept per stream


@dataclass
class SandboxResult:
    returncode: int | None  # None: killed on the wall-time limit
    stdout: str
    stderr: str
    seconds: float
    reason: str  # "ok", "timeout", "cpu limit", "memory limit", "file size limit", "process limit", "error (rc N)"
    isolation: tuple[str, ...]  # what the kernel allowed: "network" (no network), "private tmp"

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


def _user_process_count(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                count += os.stat(f"/proc/{pid}").st_uid == uid
            except OSError:
                pass
    return count


def _nobody():
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _world_executable(path: str) -> bool:
    """Whether any user can run `path`: every directory above it searchable and the file executable by others."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    try:
        return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(path).st_mode & 0o001)
    except OSError:
        return False


def _interpreter(drop_privileges: bool) -> str:
    """This Python, unless the unprivileged user cannot reach it (e.g. a pyenv under /root): then the
    system python3. The program only gets the standard library either way."""
    if not drop_privileges or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(candidate):
            return candidate
    raise RuntimeError("sandbox: no Python interpreter that the unprivileged user 'nobody' can execute")


# The world-writable directories: each gets a private, small tmpfs in the child's mount namespace, so
# that writes there vanish with the child. The work directory (under /tmp) is bind-mounted back at
# its path: the child's cwd still refers to it, because the child changes into it before the mounts.
_SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 12, 1 << 14, 1 << 18


def _isolate(work: str) -> list[str]:
    """New network and mount namespaces (with a user namespace when not root); what was achieved."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET | _CLONE_NEWNS | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        return []
    done = ["network"]
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0 and all(
            not os.path.isdir(d) or libc.mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                               b"size=16m,mode=1777") == 0 for d in _SHARED_WRITABLE):
        os.makedirs(work, exist_ok=True)
        if libc.mount(b".", work.encode(), None, _MS_BIND, None) == 0:
            os.chdir(work)
            done.append("private tmp")
    return done


def _preexec(limits: Limits, as_user, nproc: int, work: str, status_file: str):
    """Runs in the child between fork and exec (after the chdir into the work directory)."""
    def setup():
        # Opened before the mounts hide the path; the parent reads back what was isolated.
        with open(status_file, "w") as status:
            status.write(",".join(_isolate(work)))
        if as_user is not None:
            uid, gid = as_user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        for res, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                           (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
            resource.setrlimit(res, (value, value))
        # SIGXFSZ would kill silently; ignoring it makes the write fail with EFBIG, which we report.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return setup


def _reason(rc: int | None, stderr: str, limits: Limits, seconds: float) -> str:
    if rc is None:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == -signal.SIGXCPU or rc == -signal.SIGKILL and seconds >= limits.cpu_s:
        return "cpu limit"
    if "MemoryError" in stderr:
        return "memory limit"
    if "File too large" in stderr or "EFBIG" in stderr:
        return "file size limit"
    if "Resource temporarily unavailable" in stderr or "BlockingIOError" in stderr:
        return "process limit"
    return f"error (rc {rc})"


def _read_capped(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", "replace")


def run_python(source: str, limits: Limits = Limits(), stdin: str = "") -> SandboxResult:
    """Runs `source` with `python -I` in a fresh temporary directory under `limits`; never raises for
    anything the program does. The directory is removed afterwards."""
    root = os.geteuid() == 0
    as_user = _nobody() if root else None
    uid = as_user[0] if as_user else os.getuid()
    nproc = limits.max_procs + _user_process_count(uid)
    work = tempfile.mkdtemp(prefix="gemma3-sandbox-")
    meta = tempfile.mkdtemp(prefix="gemma3-sandbox-meta-")  # the child cannot write here once it is `nobody`
    try:
        if as_user:
            os.chown(work, *as_user)
        os.chmod(work, 0o700)
        program = os.path.join(work, "main.py")
        with open(program, "w") as f:
            f.write(source)
        if as_user:
            os.chown(program, *as_user)
        out_path, err_path = os.path.join(meta, "stdout"), os.path.join(meta, "stderr")
        status_path = os.path.join(meta, "isolation")
        env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        began = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([_interpreter(as_user is not None), "-I", "main.py"], cwd=work, env=env, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=_preexec(limits, as_user, nproc, work, status_path))
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                # The program may have left children behind (a fork bomb always does): kill the group.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.perf_counter() - began
        stdout, stderr = _read_capped(out_path, limits.output_bytes), _read_capped(err_path, limits.output_bytes)
        isolation = _read_capped(status_path, 100).split(",") if os.path.exists(status_path) else []
        return SandboxResult(rc, stdout, stderr, seconds, _reason(rc, stderr, limits, seconds),
                             tuple(filter(None, isolation)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(meta, ignore_errors=True)
