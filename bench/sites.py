"""A second libvirt host on this machine ("site B"), for the tests and the bench.

Every VM of this project used to run under one libvirt daemon; a migration goes from one host to
another. Site A is this machine as it is (its libvirtd, its network namespace, its state and
cache folders). Site B is made of namespaces and folders of its own:

* a **network namespace** (``rm-site-b``) joined to the host's by a veth pair (``rm-sa`` 10.232.0.1
  here, ``rm-sb`` 10.232.0.2 there; built with ``bench.netns``): what crosses between the sites
  crosses the veth, and is counted there (:meth:`SiteB.counters`);
* a **mount namespace** in which ``/etc/libvirt`` (a copy of the host's configuration files with a
  ``host_uuid`` of its own, so libvirt does not refuse a migration "to the same host", and
  ``qemu+tcp`` on the veth address), ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``,
  ``/var/cache/libvirt`` and replay-migrate's state and cache folders (the same paths as site A's,
  so the guest image and the checkpoints are where both sites' domains name them) are bind mounts
  of folders under :attr:`SiteConfig.root`; and a UTS namespace with its own host name;
* its own ``virtlogd`` and ``libvirtd`` (their own pid files), listening on the veth address with
  ``qemu+tcp`` and **no authentication**: the veth exists only between two namespaces of this
  machine, and only root can enter them. Never configure a real host so.

Processes of site B are run inside its namespaces with ``nsenter`` (:meth:`SiteB.enter`), as a
second host would run them: a ``replay-migrate follow`` there writes into site B's state folder and
drives site B's daemon. Site B holds its **own copy** of a checkpoint, made by ``checkpoint export``
at site A piped into ``checkpoint import`` at site B (:meth:`SiteB.copy_checkpoint`), and a hard-linked
copy of the guest image (:meth:`SiteB.link_image`; a copy where hard links cannot be made).

:meth:`SiteB.start` is idempotent and first removes whatever a killed run left: every process in
site B's network namespace (daemons, guests, commands entered there: all ours, found by
``ip netns pids``, ended by pid), the namespace and the veth. The mount namespace has no name on
the host: it ends with its last process. :meth:`SiteB.stop` does the same and, with ``wipe``,
deletes site B's folders.

    python -m bench.sites start|stop|status [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.netns import LinkConfig, NetnsLink
from replay_migrate.errors import HostError
from replay_migrate.sparse import link_or_copy
from store import checkpoint as ckpt
from store.paths import cache_root, state_root
from vm.machine import Hypervisor
from vm.spec import GuestImage

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0
"""How long site B's libvirtd gets to answer on qemu+tcp after it was started."""
STOP_TIMEOUT_S = 15.0
"""How long site B's processes get to end on SIGTERM before they are killed."""
COPY_TIMEOUT_S = 900.0
"""Bound on a checkpoint's export piped into its import (~1 min for a 1 GiB guest here)."""
CMD_TIMEOUT_S = 30.0
LIBVIRT_FOLDERS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                   "log": "/var/log/libvirt", "cache-libvirt": "/var/cache/libvirt"}
"""Site B's own folder (under its root) for each of libvirt's."""
CONFIG_FILES = ("libvirtd.conf", "qemu.conf", "virtlogd.conf", "libvirt.conf", "network.conf")
"""The host's libvirt configuration copied to site B; domains, networks and secrets are not."""


@dataclass(frozen=True)
class SiteConfig:
    """Names, addresses and folders of site B."""

    root: Path = field(default_factory=lambda: Path(f"{state_root()}.site-b"))
    """Site B's folders on the host (its libvirt's, its state and cache)."""
    netns: str = "rm-site-b"
    hostname: str = "rm-site-b"
    host_if: str = "rm-sa"
    site_if: str = "rm-sb"
    host_addr: str = "10.232.0.1"
    site_addr: str = "10.232.0.2"
    prefix_len: int = 30
    state: Path = field(default_factory=state_root)
    """replay-migrate's state folder: the same path at both sites, site B's own content."""
    cache: Path = field(default_factory=cache_root)
    """replay-migrate's cache folder (guest images): the same path at both sites."""

    @property
    def link(self) -> LinkConfig:
        return LinkConfig(src_ns=None, tgt_ns=self.netns, src_if=self.host_if, tgt_if=self.site_if,
                          src_addr=self.host_addr, tgt_addr=self.site_addr, prefix_len=self.prefix_len)

    @property
    def uri(self) -> str:
        """Site B's libvirt, from anywhere on this machine."""
        return f"qemu+tcp://{self.site_addr}/system"

    def folder(self, name: str) -> Path:
        return self.root / name

    def mounts(self) -> list[tuple[Path, Path]]:
        """(site B's folder, the path it is mounted on in site B's mount namespace)."""
        out = [(self.folder(name), Path(target)) for name, target in LIBVIRT_FOLDERS.items()]
        return [*out, (self.folder("state"), self.state), (self.folder("cache"), self.cache)]


def libvirtd_conf(host_text: str, cfg: SiteConfig, host_uuid: str) -> str:
    """The host's libvirtd.conf with site B's listener, identity and log file instead of its own
    settings of those keys (libvirt reads the first setting of a key, so they are removed, not
    overridden)."""
    ours = {
        "listen_tls": "0", "listen_tcp": "1", "listen_addr": f'"{cfg.site_addr}"',
        # no authentication: the veth joins two namespaces of this machine, only root enters them
        "auth_tcp": '"none"', "host_uuid": f'"{host_uuid}"',
        "log_outputs": '"3:file:/var/log/libvirt/libvirtd.log"',
    }
    return _replace_keys(host_text, ours)


def qemu_conf(host_text: str, cfg: SiteConfig) -> str:
    """The host's qemu.conf, with incoming migrations listening on, and announced as, the veth
    address (libvirt's own live migration to site B needs no explicit migration URI then)."""
    return _replace_keys(host_text, {"migration_address": f'"{cfg.site_addr}"', "migration_host": f'"{cfg.site_addr}"'})


def _replace_keys(text: str, values: dict[str, str]) -> str:
    kept = [line for line in text.splitlines()
            if not any(re.match(rf"\s*{re.escape(k)}\s*=", line) for k in values)]
    return "\n".join([*kept, "", "# bench/sites.py: site B", *(f"{k} = {v}" for k, v in values.items())]) + "\n"


def inside_commands(cfg: SiteConfig) -> list[list[str]]:
    """What runs inside site B's new mount and UTS namespaces: the bind mounts, the host name, the
    daemons (which detach and keep the namespaces alive)."""
    cmds = [["mount", "--bind", str(src), str(dst)] for src, dst in cfg.mounts()]
    return [*cmds, ["hostname", cfg.hostname],
            ["mkdir", "-p", "/var/lib/libvirt/qemu", "/var/log/libvirt/qemu"],
            ["virtlogd", "-d", "-p", "/run/libvirt/virtlogd.pid"],
            ["libvirtd", "-d", "--listen", "-p", "/run/libvirt/libvirtd.pid"]]


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found (iproute2, util-linux and libvirt are needed)") from None
    if check and r.returncode != 0:
        raise HostError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return r


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class SiteB:
    """Site B for the ``with`` block's lifetime (or :meth:`start` / :meth:`stop`)."""

    def __init__(self, cfg: SiteConfig | None = None, *, stop_timeout: float = STOP_TIMEOUT_S) -> None:
        self.cfg = cfg or SiteConfig()
        self.link = NetnsLink(self.cfg.link)
        self.stop_timeout = stop_timeout

    @property
    def uri(self) -> str:
        return self.cfg.uri

    def __enter__(self) -> SiteB:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def remove_clones(self, here: Hypervisor, there: Hypervisor, names: Iterable[str]) -> None:
        """Every clone in ``names`` at site A (``here``) and at this site (``there``, with its folder):
        what a native leg may have left on either side, whatever state it ended in."""
        for name in names:
            ckpt.remove_clone(here, name)
            if there.exists(name):
                there.lookup(name).remove()
            shutil.rmtree(self.cfg.folder("state") / "clones" / name, ignore_errors=True)

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self) -> SiteB:
        """Build site B from nothing (after removing what a killed run left) and wait until its
        libvirtd answers on qemu+tcp."""
        for tool in ("ip", "nsenter", "unshare", "mount", "libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                raise HostError(f"{tool} not found: a second libvirt host needs iproute2, util-linux and libvirt")
        self.stop()
        try:
            self._folders()
            self.link.__enter__()
            r = _run(["ip", "netns", "exec", self.cfg.netns, "unshare", "--mount", "--uts", "--propagation",
                      "private", "--", sys.executable, "-m", "bench.sites", "inside", "--root", str(self.cfg.root),
                      "--state", str(self.cfg.state), "--cache", str(self.cfg.cache)],
                     check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
            if r.returncode != 0:
                raise HostError(f"site B did not start: {(r.stderr or r.stdout).strip()[-600:]}")
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _folders(self) -> None:
        for src, dst in self.cfg.mounts():
            src.mkdir(parents=True, exist_ok=True)
            dst.mkdir(parents=True, exist_ok=True)           # the mount point, on the host
        run = self.cfg.folder("run")
        for p in run.iterdir():                               # a killed run's pid files and sockets
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        etc = self.cfg.folder("etc")
        shutil.rmtree(etc)
        etc.mkdir()
        (etc / "qemu").mkdir()
        for name in CONFIG_FILES:
            host = Path(LIBVIRT_FOLDERS["etc"]) / name
            text = host.read_text() if host.is_file() else ""
            if name == "libvirtd.conf":
                text = libvirtd_conf(text, self.cfg, str(uuid.uuid4()))
            elif name == "qemu.conf":
                text = qemu_conf(text, self.cfg)
            (etc / name).write_text(text)

    def _wait_ready(self) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            pid = self.daemon_pid()
            if pid is not None and not _alive(pid):
                raise HostError(f"site B's libvirtd (pid {pid}) exited: see {self.cfg.folder('log')}/libvirtd.log")
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise HostError(f"site B's libvirtd does not answer at {self.uri} after {START_TIMEOUT_S:.0f} s: "
                                    f"{e.get_error_message()}") from None
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """Every process in site B's network namespace: its daemons, guests, and commands run there."""
        r = _run(["ip", "netns", "pids", self.cfg.netns], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []

    def stop(self, *, wipe: bool = False) -> None:
        """End every process of site B (SIGTERM, then SIGKILL after ``stop_timeout`` s), delete
        its namespace and veth; with ``wipe``, its folders too. Safe to call on a site that is
        half-made, stopped or was never started."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + self.stop_timeout
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not any(_alive(p) for p in pids):
                break
        left = [p for p in self.pids() if _alive(p)]
        if left:
            raise HostError(f"site B's processes {left} did not end; its namespace is kept")
        self.link.delete()
        if wipe and self.cfg.root.exists():
            shutil.rmtree(self.cfg.root)

    # ---- using it -----------------------------------------------------------------------------------
    def daemon_pid(self) -> int | None:
        try:
            text = (self.cfg.folder("run") / "libvirtd.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside site B's namespaces (those of its libvirtd), from the repository."""
        pid = self.daemon_pid()
        if pid is None or not _alive(pid):
            raise HostError("site B is not running")
        return ["nsenter", "--target", str(pid), "--mount", "--uts", "--net", f"--wd={REPO}", "--", *argv]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a replay-migrate process at either site: the same state and cache
        paths (each site's mount namespace gives them its own content), this checkout's code."""
        return {**os.environ, "REPLAY_MIGRATE_STATE": str(self.cfg.state),
                "REPLAY_MIGRATE_CACHE": str(self.cfg.cache), "PYTHONPATH": str(REPO), **extra}

    def link_image(self, image: GuestImage) -> Path:
        """Site B's copy of a guest image folder (hard links: the files are never written), where
        site B's domains look for it: the same path in its mount namespace."""
        rel = image.dir.relative_to(self.cfg.cache)
        dst = self.cfg.folder("cache") / rel
        dst.mkdir(parents=True, exist_ok=True)
        for f in image.dir.iterdir():
            if not f.is_file() or (dst / f.name).exists():
                continue
            link_or_copy(f, dst / f.name)
        return dst

    def hold(self, ck: ckpt.Checkpoint, say: Callable[[str], None] = print) -> None:
        """Give site B what a migration from site A needs of ``ck``: its guest image (linked) and
        the checkpoint itself (exported at A, imported at B)."""
        self.link_image(ck.image)
        say(f"copying checkpoint {ck.name} to site B")
        self.copy_checkpoint(ck.name)

    def copy_checkpoint(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``checkpoint export NAME`` at site A piped into ``checkpoint import`` at site B (both
        ``--json``): returns the two reports (sizes, root hashes)."""
        cli = [sys.executable, "-m", "cli.main"]
        export = subprocess.Popen([*cli, "checkpoint", "export", name, "--json"], cwd=REPO, env=self.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            imported = subprocess.run(self.enter([*cli, "checkpoint", "import", "--json"]), cwd=REPO,
                                      env=self.env(), stdin=export.stdout, capture_output=True, text=True,
                                      timeout=COPY_TIMEOUT_S, check=False)
        finally:
            assert export.stdout is not None
            export.stdout.close()
            _, err = export.communicate(timeout=COPY_TIMEOUT_S)
        if export.returncode != 0 or imported.returncode != 0:
            raise HostError(f"copying checkpoint {name} to site B failed: export {export.returncode} "
                            f"({err.decode(errors='replace').strip()[-400:]}), import {imported.returncode} "
                            f"({imported.stderr.strip()[-400:]})")
        return _json_in(err.decode()), json.loads(imported.stdout)

    def counters(self) -> tuple[int, int]:
        """Bytes (received, sent) by site A's end of the veth: everything site B sent and got."""
        stats = Path("/sys/class/net") / self.cfg.host_if / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


def _json_in(text: str) -> dict[str, Any]:
    """The JSON object a command printed after any log lines."""
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    obj = json.loads(text[start:])
    if not isinstance(obj, dict):
        raise HostError("expected a JSON object")
    return obj


# ---- inside site B's namespaces ---------------------------------------------------------------------
def _inside(args: argparse.Namespace) -> int:
    """Run in site B's fresh mount and UTS namespaces (``start`` execs us there): mount its folders
    over libvirt's and replay-migrate's, start its daemons, and leave them running."""
    cfg = SiteConfig(root=args.root, state=args.state, cache=args.cache)
    for argv in inside_commands(cfg):
        _run(argv)
    return 0


@contextlib.contextmanager
def running(cfg: SiteConfig | None = None, *, wipe: bool = True) -> Iterator[SiteB]:
    """Site B for a ``with`` block, stopped (and by default wiped) at its end, whatever happens."""
    site = SiteB(cfg)
    try:
        yield site.start()
    finally:
        site.stop(wipe=wipe)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sites", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, default=None, help="site B's folders (default: <state>.site-b)")
        if name == "stop":
            p.add_argument("--wipe", action="store_true", help="delete site B's folders too")
    p = sub.add_parser("inside", help="(internal) mount and start inside site B's namespaces")
    for opt in ("--root", "--state", "--cache"):
        p.add_argument(opt, type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "inside":
        return _inside(args)
    site = SiteB(SiteConfig(root=args.root) if args.root else None)
    if args.cmd == "start":
        site.start()
        print(f"site B: {site.uri} (pid {site.daemon_pid()}), folders in {site.cfg.root}")
    elif args.cmd == "stop":
        site.stop(wipe=args.wipe)
    else:
        print(f"site B: processes {site.pids() or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
