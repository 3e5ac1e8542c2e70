"""N ranks of one command on this machine: ``mlx.launch -n N --backend ring``
on 127.0.0.1 with free ports (tests, benches, trying a launch out).

``mlx.launch`` exits 0 even when a rank fails, and stops the other ranks
when one exits with an error; :class:`LocalRun` reads each rank's outcome
from its warnings. A rank that hangs would block the launch forever: the
whole process group is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = ["LocalLaunch", "LocalRun", "free_ports", "launch_local"]

# mlx.launch's own warnings about its ranks
_RANK_STATUS = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|(was killed))")


@dataclass
class LocalRun:
    stdout: str
    stderr: str
    timed_out: bool

    def failed_ranks(self) -> dict[int, str]:
        """``{rank: "exit code N" or "killed"}`` for every rank that did not exit 0."""
        return {int(m[1]): (f"exit code {m[2]}" if m[2] is not None else "killed")
                for m in _RANK_STATUS.finditer(self.stderr)}


def free_ports(n: int, *, tries: int = 200) -> int:
    """The first of ``n`` consecutive TCP ports that are free on 127.0.0.1 now."""
    rng = random.SystemRandom()
    for _ in range(tries):
        first = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


class LocalLaunch:
    """A running ``mlx.launch`` of N ranks here (its own process group)."""

    def __init__(self, n: int, argv: Sequence[str], *, env: dict | None = None,
                 cwd: str | os.PathLike | None = None):
        launcher = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
        cmd = [*launcher, "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)),
               "--", *map(str, argv)]
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        # stdin: a pipe left open and never written (the launcher polls its stdin: at end of file,
        # /dev/null or a closed pipe, it would spin a core)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._out, stderr=self._err, env=env,
                                     cwd=cwd, start_new_session=True)

    def kill(self, grace: float = 30.0) -> None:
        """SIGKILL the launcher and every rank, and wait (up to ``grace``
        seconds) until none is left (their files and locks closed)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def wait(self, timeout: float) -> LocalRun:
        """Wait for every rank (killing them all after ``timeout`` seconds); their output."""
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            self.kill()  # timed out or interrupted: the ranks go with the launcher
            self.proc.stdin.close()
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return LocalRun(texts[0], texts[1], timed_out=timed_out)


def launch_local(n: int, argv: Sequence[str], *, timeout: float, env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> LocalRun:
    """Run ``argv`` as ``n`` ranks here (ring backend); its output once all ranks ended."""
    return LocalLaunch(n, argv, env=env, cwd=cwd).wait(timeout)
