"""bench/sites.py: the second libvirt host. Its configuration and commands as data (no root
needed), and, as a VM test under the lock, a real one: it answers on qemu+tcp with an identity of
its own, sees its own folders, starts again over what a killed run left, and leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import libvirt
import pytest

from bench.sites import SiteB, SiteConfig, inside_commands, libvirtd_conf, qemu_conf

CFG = SiteConfig(root=Path("/srv/site-b"), state=Path("/var/lib/rm-x"), cache=Path("/root/.cache/rm-x"))


def test_site_b_listens_on_the_veth_without_auth_and_has_its_own_host_uuid() -> None:
    host = ('# comment\nlisten_tcp = 0\n  auth_tcp = "sasl"\n'
            'host_uuid = "00000000-0000-0000-0000-000000000001"\nmax_clients = 5\n')
    text = libvirtd_conf(host, CFG, "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    settings = [line for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    assert 'listen_addr = "10.232.0.2"' in settings and "listen_tcp = 1" in settings
    assert 'auth_tcp = "none"' in settings and "listen_tls = 0" in settings
    assert 'host_uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"' in settings
    # libvirt reads the first setting of a key: the host's are gone, not shadowed
    assert sum(line.strip().startswith(("listen_tcp", "auth_tcp", "host_uuid")) for line in settings) == 3
    assert "max_clients = 5" in settings                          # the rest of the host's is kept
    assert CFG.uri == "qemu+tcp://10.232.0.2/system"


def test_incoming_migrations_listen_on_and_are_announced_as_the_veth_address() -> None:
    text = qemu_conf('user = "root"\nmigration_address = "0.0.0.0"\n', CFG)
    assert 'user = "root"' in text and '0.0.0.0' not in text
    assert 'migration_address = "10.232.0.2"' in text and 'migration_host = "10.232.0.2"' in text


def test_inside_its_namespace_site_b_mounts_its_own_folders_then_starts_its_daemons() -> None:
    cmds = inside_commands(CFG)
    mounts = {c[3]: c[2] for c in cmds if c[:2] == ["mount", "--bind"]}
    assert mounts == {"/etc/libvirt": "/srv/site-b/etc", "/run/libvirt": "/srv/site-b/run",
                      "/var/lib/libvirt": "/srv/site-b/lib", "/var/log/libvirt": "/srv/site-b/log",
                      "/var/cache/libvirt": "/srv/site-b/cache-libvirt", "/var/lib/rm-x": "/srv/site-b/state",
                      "/root/.cache/rm-x": "/srv/site-b/cache"}
    daemons = [c for c in cmds if c[0] in ("virtlogd", "libvirtd")]
    assert daemons == [["virtlogd", "-d", "-p", "/run/libvirt/virtlogd.pid"],
                       ["libvirtd", "-d", "--listen", "-p", "/run/libvirt/libvirtd.pid"]]
    assert cmds.index(daemons[0]) > max(i for i, c in enumerate(cmds) if c[0] == "mount")
    assert ["hostname", "rm-site-b"] in cmds


def test_the_link_joins_the_hosts_namespace_to_site_bs() -> None:
    link = CFG.link
    assert (link.src_ns, link.tgt_ns, link.src_if, link.tgt_if) == (None, "rm-site-b", "rm-sa", "rm-sb")
    assert (link.src_addr, link.tgt_addr) == ("10.232.0.1", "10.232.0.2")
    assert SiteConfig().root.name.endswith(".site-b")


@pytest.mark.vm
def test_a_real_site_b_starts_again_over_a_killed_run_and_leaves_nothing(tmp_path: Path) -> None:
    cfg = SiteConfig(root=tmp_path / "site-b")
    site = SiteB(cfg, stop_timeout=2.0)
    try:
        site.start()
        first = site.daemon_pid()
        assert first is not None and first in site.pids()
        conn = libvirt.open(site.uri)
        try:
            here = libvirt.open("qemu:///system")
            assert conn.getHostname() == "rm-site-b" != here.getHostname()
            uuid_b = conn.getCapabilities().split("<uuid>")[1].split("<")[0]
            assert uuid_b != here.getCapabilities().split("<uuid>")[1].split("<")[0]
            assert conn.listAllDomains() == [] or not set(d.name() for d in conn.listAllDomains()) & \
                set(d.name() for d in here.listAllDomains())
            here.close()
        finally:
            conn.close()
        # its mount namespace: its own state folder at the same path, its own libvirt configuration
        marker = cfg.folder("state") / "site-b-marker"
        marker.write_text("b")
        seen = subprocess.run(site.enter(["cat", str(cfg.state / "site-b-marker")]), capture_output=True, text=True)
        assert seen.stdout == "b" and not (cfg.state / "site-b-marker").exists()
        host_uuid = subprocess.run(site.enter(["grep", "-c", "^host_uuid", "/etc/libvirt/libvirtd.conf"]),
                                   capture_output=True, text=True)
        assert host_uuid.stdout.strip() == "1"
        # a killed run: the test process dies, the daemons stay; start() takes over from there
        os.kill(first, signal.SIGSTOP)                      # even a stuck daemon is ended
        site.start()
        assert site.daemon_pid() != first and first not in site.pids()
        libvirt.open(site.uri).close()
        rx, tx = site.counters()
        assert rx > 0 and tx > 0                            # the qemu+tcp connections crossed the veth
    finally:
        site.stop(wipe=True)
    assert site.pids() == []
    assert cfg.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path(f"/sys/class/net/{cfg.host_if}").exists()
    assert not cfg.root.exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(cfg.root) not in mounts
