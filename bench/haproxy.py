"""Several ``replay-migrate serve`` instances behind HAProxy, as processes: the shipped
``bench/haproxy.cfg`` filled in from the environment, and the instances with one shared key.

:class:`HAProxy` runs Debian's ``haproxy`` in the foreground on that config and reads its state
through the admin socket (which instance is up, which instance a session's path sticks to);
:class:`Instance` is one ``serve`` process on a fixed loopback port (a restart gets it back), with
its log in a file so a test can tell which instance holds a session.  ``tests/test_bench_haproxy.py``
kills an instance under a live session with these.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from replay_migrate.errors import HostError
from server.credentials import TOKEN_ENV

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent
CONFIG: Final = HERE / "haproxy.cfg"
SERVERS: Final = ("svc1", "svc2")
"""The instances' names in the shipped config (``RM_SERVICE_1``, ``RM_SERVICE_2``)."""
SESSIONS_BACKEND: Final = "sessions"
START_S: Final = 10.0


def haproxy_binary() -> str:
    exe = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)
    if exe is None:
        raise HostError("haproxy is missing: scripts/setup-host.sh installs Debian's package (apt-get install haproxy)")
    return exe


def fixed_port() -> int:
    """A free loopback port below the ephemeral range: a restarted instance gets its port back, and
    no client's ephemeral port can take it meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(low // 2, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise HostError("no free port below the ephemeral range")


def proxy_env(bind: str, pem: Path, services: Sequence[str], admin: Path) -> dict[str, str]:
    """The environment the shipped config reads."""
    if len(services) != len(SERVERS):
        raise ValueError(f"the shipped config names {len(SERVERS)} instances")
    env = {"RM_PROXY_BIND": bind, "RM_PROXY_PEM": str(pem), "RM_PROXY_ADMIN": str(admin)}
    env.update({f"RM_SERVICE_{i}": s for i, s in enumerate(services, 1)})
    return env


def _wait_for(condition: str, check: Callable[[], bool], timeout: float,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check()`` until true (another process's doing: nothing to wait on but its answers);
    HostError after ``timeout`` or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise HostError(f"gave up waiting for {condition}: the process exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise HostError(f"gave up waiting for {condition} after {timeout:.0f} s")
        time.sleep(0.05)


class HAProxy:
    """``haproxy -db -f CONFIG`` with the environment :func:`proxy_env` makes; stop() ends it."""

    def __init__(self, *, bind: str, pem: Path, services: Sequence[str], admin: Path, log: Path,
                 config: Path = CONFIG) -> None:
        self.admin = admin
        self.log_path = log
        env = {**os.environ, **proxy_env(bind, pem, services, admin)}
        with log.open("ab") as err:
            self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            _wait_for("HAProxy's admin socket", lambda: bool(self.command("show info")), START_S, self.proc)
        except HostError as e:
            self.stop()
            raise HostError(f"{e}; HAProxy said: {log.read_text(errors='replace')[-1500:]}") from None

    def command(self, cmd: str) -> str:
        """One admin-socket command; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.admin))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self, backend: str = SESSIONS_BACKEND) -> dict[str, str]:
        """Each server of ``backend`` → its status (``UP``, ``DOWN``, ``UP 1/2`` while rising...)."""
        text = self.command("show stat").lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def wait_states(self, want: Mapping[str, str], timeout: float = 10.0) -> None:
        """Until every server named in ``want`` has that status (health checks run every 0.2-1 s)."""
        _wait_for(f"servers {dict(want)}",
                  lambda: all(self.server_states().get(k) == v for k, v in want.items()), timeout, self.proc)

    def stuck_to(self, path: str, backend: str = SESSIONS_BACKEND) -> str | None:
        """The server a path sticks to in ``backend``'s stick table (None: no entry)."""
        for line in self.command(f"show table {backend} key {path}").splitlines():
            m = re.search(r"server_key=(\S+)", line)
            if m is not None and f"key={path} " in line:
                return m[1]
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Instance:
    """``replay-migrate -v serve`` on 127.0.0.1:``port`` with ``key_file``; its log goes to ``log``."""

    def __init__(self, port: int, key_file: Path, token: str, log: Path, *, extra: Sequence[str] = ()) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log
        self.argv = [sys.executable, "-m", "cli.main", "-v", "serve", "--listen", self.address,
                     "--key-file", str(key_file), *extra]
        self.env = {**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO)}
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log_path.open("a") as err:
            proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(f"serving on ws://{self.address}"):
            self.stop()
            raise HostError(f"serve did not start on {self.address}: {line!r}")

    def kill(self) -> None:
        """SIGKILL: no close frame, no goodbye; the peers see their TCP connections reset."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def holds(self, session_id: str, since: int = 0) -> bool:
        """Whether this instance opened ``session_id`` (in its log from byte ``since`` on)."""
        return f"replay_migrate.session.{session_id}: session opened" in self.log_text()[since:]
