"""Run untrusted generated code (HumanEval completions) in a separate, limited process.

What is enforced, per program:
- it runs only when the user passed ``--allow-code-execution`` (else `ConfigError`);
- a separate Python process (``python -I``: no user site, PYTHON* variables ignored) in its own
  session, whose whole process group is killed with SIGKILL at the time limit;
- a fresh scratch directory as working directory, HOME and TMPDIR, deleted afterwards;
- an environment holding only PATH, HOME, TMPDIR and LANG (no tokens or proxies leak in);
- rlimits: address space (``memory_mb``), CPU seconds (time limit + 1), file size 16 MiB,
  no core dumps;
- no network: a new, empty network namespace (``unshare --net``, only loopback, down) when the
  kernel allows it; where it does not, the ``socket`` module is disabled inside the program,
  which stops ordinary Python code but is not a security boundary. ``Sandbox.isolation`` says
  which one applies and the eval output records it.
This is not a container: file system reads outside the scratch directory are not blocked.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

# Prepended to every program: the fallback network block (harmless inside a namespace too).
_PREAMBLE = """\
import socket as _tl_socket
def _tl_no_network(*args, **kwargs):
    raise OSError("network access is disabled by the tunelab sandbox")
for _tl_name in ("socket", "create_connection", "create_server", "socketpair", "fromfd",
                 "getaddrinfo", "gethostbyname"):
    setattr(_tl_socket, _tl_name, _tl_no_network)
del _tl_name, _tl_socket, _tl_no_network
"""

_TAIL = 2000  # characters of stdout/stderr kept per program


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (nonzero exit) or "timeout" (killed)
    returncode: int | None
    stdout: str
    stderr: str


@cache
def _unshare_prefix() -> tuple[str, ...]:
    """The ``unshare`` command that gives a new network namespace here, or () if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net"), (exe, "--net", "--map-root-user")):
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return ()


@dataclass
class Sandbox:
    allow: bool = False
    timeout_s: float = 10.0
    memory_mb: int = 2048

    @property
    def isolation(self) -> str:
        net = (
            "network namespace (unshare --net)"
            if _unshare_prefix()
            else "socket module disabled (no network namespace available)"
        )
        return (
            f"separate process, killed after {self.timeout_s:g}s; scratch dir; empty env; "
            f"rlimits (memory {self.memory_mb} MiB); {net}"
        )

    def run(self, code: str) -> SandboxResult:
        if not self.allow:
            raise ConfigError(
                "refusing to run model-generated code: pass --allow-code-execution to let "
                "tunelab eval execute it (in a separate, time-limited process without network)"
            )
        scratch = tempfile.mkdtemp(prefix="tunelab-sandbox-")
        try:
            program = os.path.join(scratch, "program.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write(_PREAMBLE + "\n" + code)
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
            cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", program]
            proc = subprocess.Popen(
                cmd,
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=self._limits,
            )
            try:
                out, err = proc.communicate(timeout=self.timeout_s)
                status = "passed" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # a grandchild left the group, holding the pipes
                    proc.kill()
                    out, err = b"", b""
                status = "timeout"
            return SandboxResult(
                status,
                None if status == "timeout" else proc.returncode,
                out.decode("utf-8", "replace")[-_TAIL:],
                err.decode("utf-8", "replace")[-_TAIL:],
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _limits(self) -> None:
        # Runs in the child between fork and exec.
        mem = self.memory_mb * 1024 * 1024
        cpu = int(self.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
