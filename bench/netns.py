"""A shaped link between two network namespaces, for timing migrations and transfers.

The source and the target side each live in their own namespace, joined by one veth pair, and
both directions see the same link: ``rate_mbit`` each way, half the RTT added each way. libvirt is
reached through its unix socket, which no network namespace hides, so a process in either
namespace can drive VMs. Two shapers:

* ``tc netem`` on both veth ends, where the kernel has ``sch_netem``: every packet is delayed and
  serialised at the link rate;
* otherwise the userspace link emulator (``bench/linkemu.py``) in the target namespace: the
  target's servers listen on 127.0.0.1 (:attr:`NetnsLink.serve_host`), and the emulator listens on
  the target address at the same ports and forwards to them, shaped. The source keeps connecting to
  the target address, so all its traffic crosses the emulated link; processes in the target
  namespace reach the servers directly. It models rate, delay and queue per direction but
  terminates TCP (no slow start over the emulated RTT): see its module docstring.

Everything here is built as argv lists by pure functions (tested without root) and run by
:class:`NetnsLink`, which deletes what it created on exit (and what a killed run left behind on
entry: the names are ours alone).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from replay_migrate.errors import HostError

NETEM_LIMIT_PACKETS = 1000
"""netem's queue (its default): at 10 Mbit/s that is ~1.2 s of full-size packets."""
CMD_TIMEOUT_S = 20.0
"""Longest an ``ip``/``tc`` call may take."""
EMULATOR_START_S = 15.0
"""How long the link emulator gets to print ``ready`` (a Python start-up: well under a second)."""
EMULATOR_STOP_S = 10.0
"""How long the emulator gets to exit on SIGTERM before it is killed."""
LOCALHOST = "127.0.0.1"
"""Where the target namespace's servers listen behind the emulator."""
REPO = Path(__file__).resolve().parent.parent
SHAPER_NETEM = "tc netem"
SHAPER_EMULATOR = ("userspace link emulator (bench/linkemu.py): rate and delay per direction, "
                   "TCP terminated at the emulator")
NETEM_MISSING = (
    "this kernel has no sch_netem (tc: 'Specified qdisc kind is unknown'; CONFIG_NET_SCH_NETEM is not "
    "set), so the shaped-link timings cannot be measured here; run `make bench` on a host whose "
    "kernel has netem (any stock distribution kernel: modprobe sch_netem)"
)


@dataclass(frozen=True)
class Shape:
    """A link: ``rate_mbit`` each way, ``rtt_ms`` round trip (half of it added at each end)."""

    rate_mbit: float
    rtt_ms: float

    @property
    def name(self) -> str:
        return f"{self.rate_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT"

    @property
    def key(self) -> str:
        """Short stable id for JSON keys and file names: ``10M-40ms``."""
        return f"{self.rate_mbit:g}M-{self.rtt_ms:g}ms"

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8


SHAPES = (Shape(10, 40), Shape(100, 5))
"""The two links of issue 6: a thin WAN and a fast one."""


@dataclass(frozen=True)
class LinkConfig:
    """Names and addresses; the /30 is used only inside these two namespaces. ``src_ns=None`` puts
    the source end in this process's own namespace (the host's: a second libvirt host joined to
    the first, ``bench/sites.py``)."""

    src_ns: str | None = "rm-bench-src"
    tgt_ns: str = "rm-bench-tgt"
    src_if: str = "rmb-src"
    tgt_if: str = "rmb-tgt"
    src_addr: str = "10.231.0.1"
    tgt_addr: str = "10.231.0.2"
    prefix_len: int = 30

    def __post_init__(self) -> None:
        for name in (self.src_if, self.tgt_if):
            if not 0 < len(name) <= 15:      # IFNAMSIZ - 1
                raise ValueError(f"interface name {name!r} must have 1-15 characters")
        if self.src_ns == self.tgt_ns:
            raise ValueError("the two sides need two namespaces")


def ns_exec(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same pid); ``None``: here."""
    return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]


def _ip(ns: str | None) -> list[str]:
    return ["ip"] if ns is None else ["ip", "-n", ns]


def setup_commands(cfg: LinkConfig) -> list[list[str]]:
    """Create both namespaces and the veth pair between them, addressed and up."""
    cmds = [["ip", "netns", "add", ns] for ns in (cfg.src_ns, cfg.tgt_ns) if ns is not None]
    src_netns = [] if cfg.src_ns is None else ["netns", cfg.src_ns]
    cmds.append(["ip", "link", "add", "name", cfg.src_if, *src_netns, "type", "veth",
                 "peer", "name", cfg.tgt_if, "netns", cfg.tgt_ns])
    for ns, dev, addr in ((cfg.src_ns, cfg.src_if, cfg.src_addr), (cfg.tgt_ns, cfg.tgt_if, cfg.tgt_addr)):
        cmds.append([*_ip(ns), "addr", "add", f"{addr}/{cfg.prefix_len}", "dev", dev])
        if ns is not None:
            cmds.append([*_ip(ns), "link", "set", "lo", "up"])
        cmds.append([*_ip(ns), "link", "set", dev, "up"])
    return cmds


def teardown_commands(cfg: LinkConfig) -> list[list[str]]:
    """Delete both namespaces (the veth pair goes with them), and an end left in this namespace.
    Failing ones mean "not there"."""
    cmds = [["ip", "netns", "delete", ns] for ns in (cfg.src_ns, cfg.tgt_ns) if ns is not None]
    if cfg.src_ns is None:
        cmds.append(["ip", "link", "delete", cfg.src_if])
    return cmds


def netem_commands(cfg: LinkConfig, shape: Shape, *, limit: int = NETEM_LIMIT_PACKETS) -> list[list[str]]:
    """netem on both ends: each adds half the RTT and serialises at the rate."""
    delay = f"{shape.rtt_ms / 2:g}ms"
    rate = f"{shape.rate_mbit:g}mbit"
    return [ns_exec(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", delay,
                         "rate", rate, "limit", str(limit)])
            for ns, dev in ((cfg.src_ns, cfg.src_if), (cfg.tgt_ns, cfg.tgt_if))]


def unshape_commands(cfg: LinkConfig) -> list[list[str]]:
    """Back to the plain veth (a failure means there was no qdisc to delete)."""
    return [ns_exec(ns, ["tc", "qdisc", "del", "dev", dev, "root"])
            for ns, dev in ((cfg.src_ns, cfg.src_if), (cfg.tgt_ns, cfg.tgt_if))]


def emulator_argv(cfg: LinkConfig, shape: Shape, ports: Sequence[int], *,
                  python: str = sys.executable) -> list[str]:
    """The link emulator in the target namespace: the target address's ``ports`` forwarded to the
    same ports on 127.0.0.1, at ``shape``."""
    forwards = [a for p in ports for a in ("--forward", f"{cfg.tgt_addr}:{p}={LOCALHOST}:{p}")]
    return ns_exec(cfg.tgt_ns, [python, "-m", "bench.linkemu", "--rate-mbit", f"{shape.rate_mbit:g}",
                                "--rtt-ms", f"{shape.rtt_ms:g}", *forwards])


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found: install iproute2") from None
    if check and r.returncode != 0:
        raise HostError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()[:300]}")
    return r


def netem_unknown(stderr: str) -> bool:
    """Whether tc's complaint means the kernel lacks the netem qdisc (not a usage error)."""
    s = stderr.lower()
    return "unknown" in s and ("qdisc" in s or "netem" in s)


class NetnsLink:
    """The two namespaces and their veth, for the ``with`` block's lifetime.

    ``netem`` says whether the kernel shapes (probed on the fresh link). Where it does not and
    ``ports`` are given, :meth:`shape` runs the link emulator for those TCP ports instead (servers
    in the target namespace then listen on :attr:`serve_host`); with neither, :meth:`shape` raises
    a HostError with :data:`NETEM_MISSING`. ``log`` receives the emulator's stderr."""

    def __init__(self, cfg: LinkConfig | None = None, *, ports: Sequence[int] = (), log: Path | None = None,
                 python: str = sys.executable) -> None:
        self.cfg = cfg or LinkConfig()
        self.ports = tuple(ports)
        self.log = log
        self.python = python
        self.netem = False
        self.shaped: Shape | None = None
        self._emulator: subprocess.Popen[bytes] | None = None
        self._emulator_log: IO[bytes] | None = None

    @property
    def emulated(self) -> bool:
        """Whether :meth:`shape` uses the userspace emulator (no netem here, ports to forward)."""
        return not self.netem and bool(self.ports)

    @property
    def shaper(self) -> str | None:
        """What shapes this link, for the report; None when nothing can."""
        return SHAPER_NETEM if self.netem else SHAPER_EMULATOR if self.emulated else None

    @property
    def serve_host(self) -> str:
        """Where servers in the target namespace listen, and where processes there reach them:
        the target address, or 127.0.0.1 behind the emulator (which holds the target address)."""
        return LOCALHOST if self.emulated else self.cfg.tgt_addr

    def __enter__(self) -> NetnsLink:
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise HostError(f"{tool} not found: install iproute2")
        self.delete()
        try:
            for argv in setup_commands(self.cfg):
                _run(argv)
            self.netem = self._probe_netem()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete()

    def delete(self) -> None:
        self._stop_emulator()
        for argv in teardown_commands(self.cfg):
            _run(argv, check=False)

    def _probe_netem(self) -> bool:
        argv = netem_commands(self.cfg, SHAPES[0])[0]
        r = _run(argv, check=False)
        if r.returncode != 0:
            if netem_unknown(r.stderr):
                return False
            raise HostError(f"`{' '.join(argv)}` failed: {r.stderr.strip()[:300]}")
        for u in unshape_commands(self.cfg):
            _run(u, check=False)
        return True

    def shape(self, shape: Shape) -> None:
        if self.netem:
            for argv in netem_commands(self.cfg, shape):
                _run(argv)
        elif self.emulated:
            if shape == self.shaped and self._emulator is not None and self._emulator.poll() is None:
                return
            self._stop_emulator()
            self._start_emulator(shape)
        else:
            raise HostError(NETEM_MISSING)
        self.shaped = shape

    def unshape(self) -> None:
        """Back to the plain veth. Behind the emulator that means no forwarder: nothing answers on
        the target address's forwarded ports until the next :meth:`shape`."""
        self._stop_emulator()
        for argv in unshape_commands(self.cfg):
            _run(argv, check=False)
        self.shaped = None

    def _start_emulator(self, shape: Shape) -> None:
        argv = emulator_argv(self.cfg, shape, self.ports, python=self.python)
        self._emulator_log = open(self.log, "ab") if self.log is not None else None
        self._emulator = p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._emulator_log, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout is not None
        deadline = time.monotonic() + EMULATOR_START_S
        out = b""
        while b"ready" not in out and p.poll() is None and time.monotonic() < deadline:
            if select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                piece = os.read(p.stdout.fileno(), 4096)
                if not piece:
                    break
                out += piece
        if b"ready" not in out:
            self._stop_emulator()
            where = f" (see {self.log})" if self.log is not None else ""
            raise HostError(f"the link emulator did not start{where}: `{' '.join(argv)}`")

    def _stop_emulator(self) -> None:
        p, self._emulator = self._emulator, None
        if p is not None:
            self.shaped = None
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(EMULATOR_STOP_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stdout is not None:
                p.stdout.close()
        if self._emulator_log is not None:
            self._emulator_log.close()
            self._emulator_log = None

    def src(self, argv: Sequence[str]) -> list[str]:
        return ns_exec(self.cfg.src_ns, argv)

    def tgt(self, argv: Sequence[str]) -> list[str]:
        return ns_exec(self.cfg.tgt_ns, argv)
