"""A shaped link between two network namespaces, for timing migrations and transfers.

The source and the target side each live in their own namespace, joined by one veth pair; ``tc
netem`` on both ends gives every packet half the round-trip time and serialises it at the link
rate, so both directions see the same link. libvirt is reached through its unix socket, which no
network namespace hides, so a process in either namespace can drive VMs.

Everything here is built as argv lists by pure functions (tested without root) and run by
:class:`NetnsLink`, which deletes what it created on exit (and what a killed run left behind on
entry: the names are ours alone).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from replay_migrate.errors import HostError

NETEM_LIMIT_PACKETS = 1000
"""netem's queue (its default): at 10 Mbit/s that is ~1.2 s of full-size packets."""
CMD_TIMEOUT_S = 20.0
"""Longest an ``ip``/``tc`` call may take."""
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
    """Names and addresses; the /30 is used only inside these two namespaces."""

    src_ns: str = "rm-bench-src"
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


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", ns, *argv]


def setup_commands(cfg: LinkConfig) -> list[list[str]]:
    """Create both namespaces and the veth pair between them, addressed and up."""
    cmds = [
        ["ip", "netns", "add", cfg.src_ns],
        ["ip", "netns", "add", cfg.tgt_ns],
        ["ip", "link", "add", "name", cfg.src_if, "netns", cfg.src_ns, "type", "veth",
         "peer", "name", cfg.tgt_if, "netns", cfg.tgt_ns],
    ]
    for ns, dev, addr in ((cfg.src_ns, cfg.src_if, cfg.src_addr), (cfg.tgt_ns, cfg.tgt_if, cfg.tgt_addr)):
        cmds += [
            ["ip", "-n", ns, "addr", "add", f"{addr}/{cfg.prefix_len}", "dev", dev],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "link", "set", dev, "up"],
        ]
    return cmds


def teardown_commands(cfg: LinkConfig) -> list[list[str]]:
    """Delete both namespaces (the veth pair goes with them). Failing ones mean "not there"."""
    return [["ip", "netns", "delete", cfg.src_ns], ["ip", "netns", "delete", cfg.tgt_ns]]


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

    ``netem`` says whether shaping works here (probed on the fresh link); :meth:`shape` raises a
    HostError with :data:`NETEM_MISSING` when it does not, never shapes some other way."""

    def __init__(self, cfg: LinkConfig | None = None) -> None:
        self.cfg = cfg or LinkConfig()
        self.netem = False
        self.shaped: Shape | None = None

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
        if not self.netem:
            raise HostError(NETEM_MISSING)
        for argv in netem_commands(self.cfg, shape):
            _run(argv)
        self.shaped = shape

    def unshape(self) -> None:
        for argv in unshape_commands(self.cfg):
            _run(argv, check=False)
        self.shaped = None

    def src(self, argv: Sequence[str]) -> list[str]:
        return ns_exec(self.cfg.src_ns, argv)

    def tgt(self, argv: Sequence[str]) -> list[str]:
        return ns_exec(self.cfg.tgt_ns, argv)
