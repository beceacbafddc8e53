"""bench/netns.py: the namespace/veth/netem commands, and a real link where root can make one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.netns import (
    NETEM_MISSING,
    SHAPER_EMULATOR,
    SHAPER_NETEM,
    SHAPES,
    LinkConfig,
    NetnsLink,
    Shape,
    emulator_argv,
    netem_commands,
    netem_unknown,
    ns_exec,
    setup_commands,
    teardown_commands,
    unshape_commands,
)
from replay_migrate.errors import HostError

CFG = LinkConfig()


def test_shapes_are_the_issues_links() -> None:
    assert [(s.rate_mbit, s.rtt_ms) for s in SHAPES] == [(10, 40), (100, 5)]
    assert SHAPES[0].key == "10M-40ms"
    assert SHAPES[0].name == "10 Mbit/s, 40 ms RTT"
    assert SHAPES[1].bytes_per_s == 12.5e6


def test_setup_puts_each_end_in_its_namespace_with_its_address() -> None:
    cmds = setup_commands(CFG)
    assert cmds[0] == ["ip", "netns", "add", "rm-bench-src"]
    assert cmds[1] == ["ip", "netns", "add", "rm-bench-tgt"]
    assert cmds[2] == ["ip", "link", "add", "name", "rmb-src", "netns", "rm-bench-src", "type", "veth",
                       "peer", "name", "rmb-tgt", "netns", "rm-bench-tgt"]
    assert ["ip", "-n", "rm-bench-src", "addr", "add", "10.231.0.1/30", "dev", "rmb-src"] in cmds
    assert ["ip", "-n", "rm-bench-tgt", "addr", "add", "10.231.0.2/30", "dev", "rmb-tgt"] in cmds
    for ns, dev in (("rm-bench-src", "rmb-src"), ("rm-bench-tgt", "rmb-tgt")):
        assert ["ip", "-n", ns, "link", "set", dev, "up"] in cmds
        assert ["ip", "-n", ns, "link", "set", "lo", "up"] in cmds


def test_netem_on_both_ends_with_half_the_rtt_each() -> None:
    cmds = netem_commands(CFG, Shape(10, 40), limit=500)
    assert cmds == [
        ["ip", "netns", "exec", "rm-bench-src", "tc", "qdisc", "replace", "dev", "rmb-src", "root", "netem",
         "delay", "20ms", "rate", "10mbit", "limit", "500"],
        ["ip", "netns", "exec", "rm-bench-tgt", "tc", "qdisc", "replace", "dev", "rmb-tgt", "root", "netem",
         "delay", "20ms", "rate", "10mbit", "limit", "500"],
    ]
    assert netem_commands(CFG, Shape(100, 5))[0][-5:-2] == ["2.5ms", "rate", "100mbit"]


def test_teardown_and_unshape() -> None:
    assert teardown_commands(CFG) == [["ip", "netns", "delete", "rm-bench-src"],
                                      ["ip", "netns", "delete", "rm-bench-tgt"]]
    assert unshape_commands(CFG)[1] == ns_exec("rm-bench-tgt", ["tc", "qdisc", "del", "dev", "rmb-tgt", "root"])


def test_config_refuses_bad_names() -> None:
    with pytest.raises(ValueError):
        LinkConfig(src_if="a-name-longer-than-15")
    with pytest.raises(ValueError):
        LinkConfig(src_ns="x", tgt_ns="x")


def test_tc_complaint_about_a_missing_qdisc() -> None:
    assert netem_unknown("Error: Specified qdisc kind is unknown.\n")
    assert netem_unknown('Unknown qdisc "netem", hence option "delay" is unparsable')
    assert not netem_unknown("Error: Exclusivity flag on, cannot modify.")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_real_link_carries_bytes_and_is_removed() -> None:
    cfg = LinkConfig(src_ns="rm-benchtest-src", tgt_ns="rm-benchtest-tgt", src_if="rmbt-src",
                     tgt_if="rmbt-tgt", src_addr="10.231.0.5", tgt_addr="10.231.0.6")
    with NetnsLink(cfg) as link:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert str(cfg.src_ns) in names and cfg.tgt_ns in names
        if link.netem:
            link.shape(SHAPES[1])
            qdisc = subprocess.run(link.src(["tc", "qdisc", "show", "dev", cfg.src_if]), capture_output=True,
                                   text=True).stdout
            assert "netem" in qdisc and "delay 2.5ms" in qdisc
        else:
            with pytest.raises(HostError, match="sch_netem"):
                link.shape(SHAPES[0])
        # a real transfer from the source namespace to a receiver in the target namespace
        recv = subprocess.Popen(link.tgt([sys.executable, "-m", "bench.linksend", "recv", "--listen",
                                          f"{cfg.tgt_addr}:7799"]), stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
        try:
            assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
            out = subprocess.run(link.src([sys.executable, "-m", "bench.linksend", "send", "--to",
                                           f"{cfg.tgt_addr}:7799", "--bytes", "100000"]),
                                 capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parent.parent).stdout
            assert '"bytes": 100000' in out
        finally:
            recv.terminate()
            recv.wait(10)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert str(cfg.src_ns) not in names and cfg.tgt_ns not in names


def test_netem_missing_message_says_what_to_do() -> None:
    assert "sch_netem" in NETEM_MISSING and "CONFIG_NET_SCH_NETEM" in NETEM_MISSING


def test_the_emulator_runs_in_the_target_namespace_forwarding_each_port_to_localhost() -> None:
    assert emulator_argv(CFG, Shape(10, 40), (7700, 7701), python="/venv/bin/python") == [
        "ip", "netns", "exec", "rm-bench-tgt", "/venv/bin/python", "-m", "bench.linkemu",
        "--rate-mbit", "10", "--rtt-ms", "40",
        "--forward", "10.231.0.2:7700=127.0.0.1:7700", "--forward", "10.231.0.2:7701=127.0.0.1:7701"]
    assert emulator_argv(CFG, Shape(100, 5), (1,))[-5:-2] == ["100", "--rtt-ms", "5"]


def test_shaper_and_where_the_target_serves() -> None:
    plain = NetnsLink(CFG)                                  # no ports: no emulator
    assert (plain.shaper, plain.emulated, plain.serve_host) == (None, False, "10.231.0.2")
    with pytest.raises(HostError, match="sch_netem"):
        plain.shape(SHAPES[0])
    emu = NetnsLink(CFG, ports=(7700,))
    assert (emu.shaper, emu.emulated, emu.serve_host) == (SHAPER_EMULATOR, True, "127.0.0.1")
    netem = NetnsLink(CFG, ports=(7700,))
    netem.netem = True                                      # as probed on a kernel with netem
    assert (netem.shaper, netem.emulated, netem.serve_host) == (SHAPER_NETEM, False, "10.231.0.2")
    assert "TCP terminated" in SHAPER_EMULATOR


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_real_link_is_shaped_with_netem_or_the_emulator(tmp_path: Path) -> None:
    cfg = LinkConfig(src_ns="rm-benchemu-src", tgt_ns="rm-benchemu-tgt", src_if="rmbe-src",
                     tgt_if="rmbe-tgt", src_addr="10.231.0.9", tgt_addr="10.231.0.10")
    port, shape, size = 7798, Shape(8, 100), 200_000                  # 0.2 s of serialisation
    repo = Path(__file__).resolve().parent.parent
    with NetnsLink(cfg, ports=(port,), log=tmp_path / "emu.log") as link:
        recv = subprocess.Popen(link.tgt([sys.executable, "-m", "bench.linksend", "recv", "--listen",
                                          f"{link.serve_host}:{port}"]), stdout=subprocess.PIPE, text=True,
                                cwd=repo)
        try:
            assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
            link.shape(shape)
            link.shape(shape)                                         # the same shape: nothing restarts
            out = subprocess.run(link.src([sys.executable, "-m", "bench.linksend", "send", "--to",
                                           f"{cfg.tgt_addr}:{port}", "--bytes", str(size)]),
                                 capture_output=True, text=True, check=True, cwd=repo).stdout
            [timed] = json.loads(out)
            model = size * 8 / (shape.rate_mbit * 1e6) + shape.rtt_ms / 1000
            assert model <= timed["seconds"] < 3 * model + 1.0
            link.unshape()
            if link.emulated:                                         # no forwarder: nothing answers
                r = subprocess.run(link.src([sys.executable, "-m", "bench.linksend", "send", "--to",
                                             f"{cfg.tgt_addr}:{port}", "--bytes", "1"]),
                                   capture_output=True, text=True, cwd=repo)
                assert r.returncode != 0
        finally:
            recv.terminate()
            recv.wait(10)
    assert link.shaped is None


def test_one_end_may_stay_in_the_hosts_namespace() -> None:
    """A second libvirt host (bench/sites.py): its namespace joined to the host's own."""
    cfg = LinkConfig(src_ns=None, tgt_ns="rm-site-b", src_if="rm-sa", tgt_if="rm-sb", src_addr="10.232.0.1",
                     tgt_addr="10.232.0.2")
    cmds = setup_commands(cfg)
    assert cmds[0] == ["ip", "netns", "add", "rm-site-b"]
    assert ["ip", "netns", "add", None] not in cmds and len([c for c in cmds if c[:3] == ["ip", "netns", "add"]]) == 1
    assert cmds[1] == ["ip", "link", "add", "name", "rm-sa", "type", "veth", "peer", "name", "rm-sb",
                       "netns", "rm-site-b"]
    assert ["ip", "addr", "add", "10.232.0.1/30", "dev", "rm-sa"] in cmds
    assert ["ip", "link", "set", "rm-sa", "up"] in cmds
    assert ["ip", "link", "set", "lo", "up"] not in cmds                     # the host's loopback is left alone
    assert ["ip", "-n", "rm-site-b", "link", "set", "lo", "up"] in cmds
    assert teardown_commands(cfg) == [["ip", "netns", "delete", "rm-site-b"], ["ip", "link", "delete", "rm-sa"]]
    assert netem_commands(cfg, Shape(10, 40))[0][:4] == ["tc", "qdisc", "replace", "dev"]
    assert ns_exec(None, ["true"]) == ["true"]
