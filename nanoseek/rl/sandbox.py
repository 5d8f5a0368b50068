"""Run model-written Python in a separate, limited process: the code reward's sandbox.

    result = run_python(code, timeout=5.0, memory_mb=512)
    result.ok          True when the program exited with status 0 within its limits
    result.reason      "ok" | "exit N" | "timeout" | "killed by signal N"

Layers, each one catching what the others may miss (none of them alone is a security boundary
against a determined attacker with native code; together they stop the accidents and the usual
reward hacks of a model's code: loops, memory bombs, fork bombs, stray files, network calls):

* a **separate process** in its own session, in a **throw-away directory** (the working dir and
  HOME, deleted afterwards), with a minimal environment, no stdin and Python's isolated mode (-I);
* **resource limits** set with `resource.setrlimit` in the child before it starts: address space
  (`memory_mb`), CPU seconds, file size (no disk filling), open files, and processes
  (RLIMIT_NPROC = the user's current count + a few: a fork bomb hits the ceiling at once);
* a **wall-clock limit**: past `timeout` seconds the whole process group is SIGKILLed;
* **no network** where the OS allows it: `unshare -rn` (a fresh user + network namespace with only
  a loopback device) when the `unshare` tool works here; otherwise, and in any case, the audit hook
  below refuses socket connects and binds;
* a **Python audit hook** installed before the program runs (hooks cannot be removed): it refuses
  writes, renames, deletes and permission changes outside the sandbox directory, new processes
  (fork, exec, subprocess, os.system) and ctypes (which could bypass the rest).

Whatever the program does, the caller only sees a `SandboxResult`; errors inside count as failure.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr kept
FILE_LIMIT = 16 << 20  # largest file the program may write
EXTRA_PROCESSES = 8  # processes the program may hold above the user's count at launch

# Runs first in the child: the policy hook, then the program (read from main.py in the same dir).
PRELUDE = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_BLOCKED = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
            "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
            "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.kill", "os.killpg",
            "signal.pthread_kill", "sys.addaudithook"}
_PATHS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
          "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.chdir", "os.chflags", "os.setxattr",
          "os.removexattr"}

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
    elif event in _PATHS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} outside the sandbox directory")

sys.addaudithook(_hook)
del _hook
sys.argv = ["main.py"]
_code = open("main.py", encoding="utf-8").read()
exec(compile(_code, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    ok: bool
    reason: str
    returncode: int | None
    stdout: str
    stderr: str


@functools.lru_cache(maxsize=1)
def network_isolation() -> bool:
    """Whether `unshare -rn` works here (user + network namespaces); cached."""
    tool = shutil.which("unshare")
    if tool is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([tool, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _user_processes() -> int:
    """Processes of this user right now (RLIMIT_NPROC counts them all, not just the child's)."""
    uid, n = os.getuid(), 0
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    n += os.stat(f"/proc/{pid}").st_uid == uid
                except OSError:
                    pass
    except OSError:
        return 256
    return n


def _limits(memory_bytes: int, cpu_seconds: int, nproc: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    return apply


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, stdin: str | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; see the module docstring for the limits.

    timeout: wall-clock seconds (CPU seconds are capped at the same figure); memory_mb: address
    space limit; stdin: text fed to the program (default none)."""
    workdir = Path(tempfile.mkdtemp(prefix="nanoseek-sandbox-"))
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8")
        (workdir / "prelude.py").write_text(PRELUDE, encoding="utf-8")
        cmd = [sys.executable, "-I", "-X", "utf8", "prelude.py"]
        if network_isolation():
            cmd = [shutil.which("unshare") or "unshare", "-rn", "--"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        limits = _limits(memory_mb << 20, max(1, int(timeout + 0.999)), _user_processes() + EXTRA_PROCESSES)
        # Output goes to files in the sandbox (RLIMIT_FSIZE caps them), never to pipes the caller
        # would have to buffer: a program printing in a loop cannot fill this process's memory.
        with open(workdir / ".stdout", "wb") as fout, open(workdir / ".stderr", "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env,
                                        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        stdout=fout, stderr=ferr, preexec_fn=limits, start_new_session=True)
            except OSError as e:
                return SandboxResult(False, f"could not start: {e}", None, "", "")
            reason = None
            try:
                if stdin:
                    try:
                        proc.stdin.write(stdin.encode())
                        proc.stdin.close()
                    except OSError:
                        pass
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                reason = "timeout"
            finally:
                _kill_group(proc.pid)
                proc.wait()
        rc = proc.returncode
        if reason is None:
            reason = "ok" if rc == 0 else (f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
        out, err = (_head(workdir / name) for name in (".stdout", ".stderr"))
        return SandboxResult(reason == "ok", reason, rc, out, err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _head(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(OUTPUT_LIMIT).decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    """SIGKILL the child's whole session (any process it managed to start goes with it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
