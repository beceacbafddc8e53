"""vm.install without a guest: the files it writes are the image's, the probe's output is checked line by
line, missing packages are named per distribution, guest values are quoted in guest commands. (The
install into a real guest: tests/test_ownvm.py.)"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from replay_migrate.errors import VMError
from vm import install
from vm.install import Probe, Session, parse_probe

GOOD = """python=3.11
module=Xlib
module=msgpack
module=pynput
os_id=debian
os_like=
session_uid=1000
session_user=alice
env_DISPLAY=:0
env_XAUTHORITY=/run/user/1000/gdm/Xauthority
env_XDG_RUNTIME_DIR=/run/user/1000
env_XDG_SESSION_TYPE=x11
agent_pid=4242
have=runuser
have=setsid
have=udevadm
"""


def test_the_files_are_the_ones_the_image_installs() -> None:
    files = {f.path: f for f in install.agent_files()}
    assert f"{install.GUEST_LIB}/recorder/agent.py" in files
    assert f"{install.GUEST_LIB}/recorder/pynput_xorg.py" in files
    assert f"{install.GUEST_LIB}/replay_migrate/errors.py" in files
    assert files[install.START_AGENT].mode == 0o755
    desktop = files[install.AUTOSTART].data.decode()
    assert f"Exec={install.START_AGENT}" in desktop and "Type=Application" in desktop
    # the launcher is a valid sh script
    subprocess.run(["sh", "-n"], input=files[install.START_AGENT].data, check=True)


def test_the_probe_is_parsed_and_checked() -> None:
    p = parse_probe(GOOD)
    assert p.python == (3, 11) and p.missing == [] and p.agent_pids == [4242]
    assert p.session == Session(1000, "alice", ":0", "/run/user/1000/gdm/Xauthority", "/run/user/1000", "x11")
    install.check_runtime(p)
    for bad in ("python=3.11; rm -rf /", "nonsense", "session_user=a b", "env_DISPLAY=:0\n" * 1 + "x=y",
                "agent_pid=12a", "env_XAUTHORITY=relative/path"):
        with pytest.raises(VMError, match="unexpected line"):
            parse_probe(bad)


def test_what_is_missing_is_named_as_the_distribution_packages_it() -> None:
    p = parse_probe(GOOD.replace("module=pynput\n", "").replace("module=Xlib\n", ""))
    with pytest.raises(VMError, match=r"lacks Xlib, pynput.*apt-get install python3-xlib python3-pynput"):
        install.check_runtime(p)
    p.os_id = "fedora"
    with pytest.raises(VMError, match="dnf install python3-xlib python3-pynput"):
        install.check_runtime(p)
    p.os_id = "arch"
    with pytest.raises(VMError, match=r"Debian/Ubuntu: apt-get install .*; Fedora: dnf install"):
        install.check_runtime(p)
    with pytest.raises(VMError, match=r"3\.10 or newer"):
        install.check_runtime(Probe(python=(3, 9)))
    with pytest.raises(VMError, match="no /usr/bin/python3"):
        install.check_runtime(Probe())


def test_the_start_command_quotes_what_the_guest_said() -> None:
    s = Session(1000, "alice", ":0", "/home/alice/.Xauth'; touch /pwned; '", "/run/user/1000", "x11")
    cmd = install.start_command(s)
    words = shlex.split(cmd)
    assert words[:5] == ["setsid", "-f", "runuser", "-u", "alice"]
    assert "XAUTHORITY=/home/alice/.Xauth'; touch /pwned; '" in words
    assert shlex.split(install.start_command(Session(0, "root", ":0")))[:3] == ["setsid", "-f", "env"]


def test_udev_rule_gives_the_port_to_the_user() -> None:
    assert b'ATTR{name}=="org.replaymigrate.log.0", OWNER="alice"' in install.udev_rule("alice")
