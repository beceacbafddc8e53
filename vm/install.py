"""Put the recorder agent into a running guest that does not have it, through the QEMU guest agent.

No network in the guest is needed: every file travels as ``guest-file-write`` and every step is a
``guest-exec`` of a short shell command. What ``install`` puts there, and ``remove`` takes away:

- ``/usr/local/lib/replay-migrate/``: the agent's sources (``recorder/``, ``replay_migrate/``, as the
  guest image installs them), its launcher ``start-agent`` and ``INSTALLED`` (version, files, user);
- ``/etc/xdg/autostart/replay-migrate-recorder.desktop``: the XDG autostart entry that GNOME, Xfce,
  KDE and the image's own session (dex) run at every login: the same file the image ships;
- ``/etc/udev/rules.d/70-replay-migrate.rules``: the virtio port belongs to the session's user (it is
  root's otherwise, and the agent runs as the user);
- the virtio-serial channel ``org.replaymigrate.log.0`` in the domain: hot-plugged into the running
  guest and added to its persistent definition (``Machine.attach_recorder_channel``).

Before it writes anything it checks the guest's ``/usr/bin/python3`` (3.10 or newer) and the agent's
runtime packages, and names the Debian/Ubuntu or Fedora package of any that is missing. Then it
starts the agent at once in the running graphical session, as that session's user with its
``DISPLAY`` and ``XAUTHORITY`` (found in the environment of the session's processes).

Everything read back from the guest is bounded and checked (``vm.guest``; the probe's output is
parsed line by line against an allow-list); values from the guest that go into a guest command are
shell-quoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from replay_migrate import __version__
from replay_migrate.errors import VMError
from vm.machine import Machine, MachineState
from vm.spec import RECORDER_CHANNEL

log = logging.getLogger("replay_migrate.install")
REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "vm-images" / "overlay"
GUEST_LIB = "/usr/local/lib/replay-migrate"
START_AGENT = f"{GUEST_LIB}/start-agent"
AUTOSTART = "/etc/xdg/autostart/replay-migrate-recorder.desktop"
UDEV_RULE = "/etc/udev/rules.d/70-replay-migrate.rules"
MANIFEST = f"{GUEST_LIB}/INSTALLED"
GUEST_PYTHON = "/usr/bin/python3"
MIN_PYTHON = (3, 10)
"""The agent's code needs 3.10 (``X | Y`` in isinstance, slotted dataclasses)."""
PACKAGES = {"Xlib": ("python3-xlib", "python3-xlib"), "msgpack": ("python3-msgpack", "python3-msgpack"),
            "pynput": ("python3-pynput", "python3-pynput")}
"""The agent's runtime modules → (Debian/Ubuntu package, Fedora package)."""
PROBE_MAX_OUTPUT = 64 << 10
"""Largest output of the probe (a few hundred bytes in practice)."""
MANIFEST_MAX_BYTES = 64 << 10
STOP_WAIT_S = 5
"""How long a running agent gets to end its log and exit when it is replaced or removed."""
EXEC_TIMEOUT_S = 60.0


# ---- what goes into the guest -------------------------------------------------------------------
@dataclass(frozen=True)
class GuestFile:
    path: str
    data: bytes
    mode: int


def agent_files() -> list[GuestFile]:
    """Every file ``install`` writes, with its guest path (the image installs the same)."""
    files = [GuestFile(f"{GUEST_LIB}/{pkg}/{p.name}", p.read_bytes(), 0o644)
             for pkg in ("recorder", "replay_migrate") for p in sorted((REPO / pkg).glob("*.py"))]
    files.append(GuestFile(START_AGENT, (OVERLAY / START_AGENT.lstrip("/")).read_bytes(), 0o755))
    files.append(GuestFile(AUTOSTART, (OVERLAY / AUTOSTART.lstrip("/")).read_bytes(), 0o644))
    return files


def udev_rule(user: str) -> bytes:
    """The recorder's virtio port owned by the session's user (root's otherwise)."""
    return (f'# replay-migrate: the recorder agent runs as {user}\n'
            f'SUBSYSTEM=="virtio-ports", ATTR{{name}}=="{RECORDER_CHANNEL}", OWNER="{user}", MODE="0600"\n').encode()


# ---- what the guest is ----------------------------------------------------------------------------
PROBE = r"""
py=/usr/bin/python3
if [ -x "$py" ]; then
  echo "python=$($py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
  for m in Xlib msgpack pynput; do
    $py -c "import importlib.util as u, sys; sys.exit(u.find_spec('$m') is None)" 2>/dev/null && echo "module=$m"
  done
fi
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os_id=${ID:-}"; echo "os_like=${ID_LIKE:-}"; fi
pick=; rank=9
for d in /proc/[0-9]*; do
  tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -q '^DISPLAY=.' || continue
  case "$(cat "$d/comm" 2>/dev/null)" in
    gnome-session*|xfce4-session|startplasma-x11|ksmserver|mate-session|cinnamon-sessio*) r=0;;
    lxsession|lxqt-session|rm-session) r=0;;
    gnome-shell|xfwm4|xfdesktop|kwin_x11|plasmashell|marco|openbox|i3|xinit) r=1;;
    *) r=5;;
  esac
  if [ "$r" -lt "$rank" ]; then rank=$r; pick=$d; fi
done
if [ -n "$pick" ]; then
  uid=$(awk '/^Uid:/ {print $2}' "$pick/status")
  echo "session_uid=$uid"
  echo "session_user=$(getent passwd "$uid" | cut -d: -f1)"
  tr '\0' '\n' < "$pick/environ" \
    | grep -E '^(DISPLAY|XAUTHORITY|XDG_RUNTIME_DIR|XDG_SESSION_TYPE|WAYLAND_DISPLAY)=' | sed 's/^/env_/'
fi
for d in /proc/[0-9]*; do
  tr '\0' '\n' < "$d/cmdline" 2>/dev/null | grep -qx 'recorder.agent' && echo "agent_pid=${d#/proc/}"
done
command -v runuser >/dev/null && echo have=runuser
command -v setsid >/dev/null && echo have=setsid
command -v udevadm >/dev/null && echo have=udevadm
true
"""

_VALUE = {
    "python": re.compile(r"\d{1,2}\.\d{1,3}"), "module": re.compile(r"Xlib|msgpack|pynput"),
    "os_id": re.compile(r"[a-z0-9._-]{0,64}"), "os_like": re.compile(r"[a-z0-9._ -]{0,128}"),
    "session_uid": re.compile(r"\d{1,10}"), "session_user": re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?"),
    "env_DISPLAY": re.compile(r"[A-Za-z0-9.-]{0,64}:\d{1,4}(\.\d{1,3})?"),
    "env_XAUTHORITY": re.compile(r"/[^\x00-\x1f]{0,1000}"), "env_XDG_RUNTIME_DIR": re.compile(r"/[^\x00-\x1f]{0,1000}"),
    "env_XDG_SESSION_TYPE": re.compile(r"[a-z0-9]{0,16}"), "env_WAYLAND_DISPLAY": re.compile(r"[^\x00-\x1f]{0,256}"),
    "agent_pid": re.compile(r"\d{1,10}"), "have": re.compile(r"runuser|setsid|udevadm"),
}


@dataclass(frozen=True)
class Session:
    """The running graphical session: who, on which display."""

    uid: int
    user: str
    display: str
    xauthority: str = ""
    runtime_dir: str = ""
    session_type: str = ""

    @property
    def wayland(self) -> bool:
        return self.session_type == "wayland"


@dataclass
class Probe:
    python: tuple[int, int] | None = None
    modules: set[str] = field(default_factory=set)
    os_id: str = ""
    os_like: str = ""
    session: Session | None = None
    agent_pids: list[int] = field(default_factory=list)
    tools: set[str] = field(default_factory=set)

    @property
    def missing(self) -> list[str]:
        return [m for m in PACKAGES if m not in self.modules]


def parse_probe(text: str) -> Probe:
    """The probe's ``key=value`` lines, each checked against what that key may hold (VMError else)."""
    p = Probe()
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        pattern = _VALUE.get(key)
        if not sep or pattern is None or not pattern.fullmatch(value):
            raise VMError(f"the guest's probe printed an unexpected line: {line[:80]!r}")
        if key == "module":
            p.modules.add(value)
        elif key == "agent_pid":
            p.agent_pids.append(int(value))
        elif key == "have":
            p.tools.add(value)
        else:
            values[key] = value
    if values.get("python"):
        major, minor = values["python"].split(".")
        p.python = (int(major), int(minor))
    p.os_id, p.os_like = values.get("os_id", ""), values.get("os_like", "")
    if "env_DISPLAY" in values and "session_uid" in values and values.get("session_user"):
        p.session = Session(int(values["session_uid"]), values["session_user"], values["env_DISPLAY"],
                            values.get("env_XAUTHORITY", ""), values.get("env_XDG_RUNTIME_DIR", ""),
                            values.get("env_XDG_SESSION_TYPE", ""))
    return p


def probe(m: Machine) -> Probe:
    r = m.exec(PROBE, timeout=EXEC_TIMEOUT_S, max_output=PROBE_MAX_OUTPUT, env=_PATH_ENV)
    if r.exit_code != 0:
        raise VMError(f"probing the guest of {m.name!r} failed (exit {r.exit_code}): {r.stderr.strip()[:300]}")
    return parse_probe(r.stdout)


_PATH_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root")


def install_hint(os_id: str, os_like: str, missing: list[str]) -> str:
    """The command that installs ``missing`` modules' packages on this distribution."""
    family = {os_id, *os_like.split()}
    debian = [PACKAGES[m][0] for m in missing]
    fedora = [PACKAGES[m][1] for m in missing]
    if family & {"debian", "ubuntu"}:
        return "apt-get install " + " ".join(debian)
    if family & {"fedora", "rhel", "centos"}:
        return "dnf install " + " ".join(fedora)
    return f"Debian/Ubuntu: apt-get install {' '.join(debian)}; Fedora: dnf install {' '.join(fedora)}"


def check_runtime(p: Probe) -> None:
    """VMError naming what to install if the guest cannot run the agent."""
    if p.python is None:
        raise VMError(f"the guest has no {GUEST_PYTHON}: install Python 3 (Debian/Ubuntu: apt-get install "
                      "python3; Fedora: dnf install python3)")
    if p.python < MIN_PYTHON:
        raise VMError(f"the guest's {GUEST_PYTHON} is {p.python[0]}.{p.python[1]}; the agent needs "
                      f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    if p.missing:
        raise VMError(f"the guest's python3 lacks {', '.join(p.missing)}, which the agent needs: in the guest, "
                      f"{install_hint(p.os_id, p.os_like, p.missing)}")
    needed = {"setsid", "udevadm"} | ({"runuser"} if p.session is not None and p.session.uid != 0 else set())
    if needed - p.tools:
        raise VMError(f"the guest lacks {', '.join(sorted(needed - p.tools))} (util-linux, udev)")


# ---- install, status, remove --------------------------------------------------------------------
@dataclass
class InstallReport:
    version: str
    files: int
    session: Session | None
    channel_live: bool
    channel_persistent: bool
    started: bool
    stopped: list[int]
    notes: list[str] = field(default_factory=list)


def _run(m: Machine, shell: str, what: str) -> str:
    r = m.exec(shell, timeout=EXEC_TIMEOUT_S, max_output=PROBE_MAX_OUTPUT, env=_PATH_ENV)
    if r.exit_code != 0:
        raise VMError(f"{what} in {m.name!r} failed (exit {r.exit_code}): {(r.stderr or r.stdout).strip()[:300]}")
    return r.stdout


def require_guest_agent(m: Machine) -> None:
    if m.state is not MachineState.RUNNING:
        raise VMError(f"{m.name!r} is {m.state.value}: the agent is installed into a running guest")
    try:
        m.wait_agent(timeout=10)
    except VMError:
        raise VMError(f"{m.name!r} has no QEMU guest agent answering: install qemu-guest-agent in the guest "
                      "(its virtio channel org.qemu.guest_agent.0 must be in the domain)") from None


def stop_agents(m: Machine, pids: list[int]) -> list[int]:
    """End running agents (each ends its log and exits on SIGTERM); wait up to STOP_WAIT_S."""
    if not pids:
        return []
    ps = " ".join(str(int(p)) for p in pids)
    _run(m, f"kill -TERM {ps} 2>/dev/null; i=0; while [ $i -lt {STOP_WAIT_S * 10} ]; do alive=; "
            f"for p in {ps}; do [ -d /proc/$p ] && alive=1; done; [ -z \"$alive\" ] && exit 0; "
            f"sleep 0.1; i=$((i+1)); done; kill -KILL {ps} 2>/dev/null; true", "stopping the recorder agent")
    return pids


def start_command(s: Session) -> str:
    """Start the agent in session ``s``, detached (setsid), as its user (runuser), with its display."""
    env = [f"DISPLAY={s.display}"] + [f"{k}={v}" for k, v in (("XAUTHORITY", s.xauthority),
                                                              ("XDG_RUNTIME_DIR", s.runtime_dir)) if v]
    inner = "env " + " ".join(shlex.quote(e) for e in env) + " " + shlex.quote(START_AGENT)
    if s.uid != 0:
        inner = f"runuser -u {shlex.quote(s.user)} -- {inner}"
    return f"setsid -f {inner} </dev/null >/dev/null 2>&1"


def install(m: Machine, *, start: bool = True) -> InstallReport:
    """Install (or update) the agent in running domain ``m`` and start it in its session."""
    require_guest_agent(m)
    p = probe(m)
    check_runtime(p)
    notes: list[str] = []
    s = p.session
    if s is None:
        notes.append("no graphical session runs in the guest now: the agent starts at the next login")
    elif s.wayland:
        notes.append(f"{s.user}'s session is Wayland: the agent records X input only (X clients through "
                     "Xwayland); log in to an X session (e.g. 'GNOME on Xorg') to record everything")
    files = agent_files()
    staging = GUEST_LIB + ".new"
    dirs = sorted({str(Path(f.path).parent).replace(GUEST_LIB, staging, 1) for f in files
                   if f.path.startswith(GUEST_LIB)})
    dirs += [str(Path(AUTOSTART).parent), str(Path(UDEV_RULE).parent)]
    _run(m, f"rm -rf {staging} && mkdir -p " + " ".join(shlex.quote(d) for d in dirs), "preparing the files")
    for f in files:
        m.write_file(f.path.replace(GUEST_LIB, staging, 1) if f.path.startswith(GUEST_LIB) else f.path + ".new",
                     f.data)
    manifest = json.dumps({"version": __version__, "files": [f.path for f in files],
                           "user": s.user if s else ""}, indent=1).encode()
    m.write_file(f"{staging}/INSTALLED", manifest)
    # every byte arrived: check before anything is switched over
    staged = {(f.path.replace(GUEST_LIB, staging, 1) if f.path.startswith(GUEST_LIB) else f.path + ".new"): f
              for f in files}
    out = _run(m, "sha256sum " + " ".join(shlex.quote(path) for path in staged), "checking the files")
    got = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        got[path] = digest
    bad = [path for path, f in staged.items() if got.get(path) != hashlib.sha256(f.data).hexdigest()]
    if bad:
        raise VMError(f"files written into {m.name!r} do not read back as sent: {', '.join(bad[:5])}")
    modes = " ; ".join(f"chmod {f.mode:o} {shlex.quote(path)}" for path, f in staged.items())
    rule = udev_rule(s.user if s is not None and s.uid != 0 else "root")
    m.write_file(UDEV_RULE, rule)
    _run(m, f"{modes} ; rm -rf {GUEST_LIB}.old && {{ [ ! -e {GUEST_LIB} ] || mv {GUEST_LIB} {GUEST_LIB}.old; }} "
            f"&& mv {staging} {GUEST_LIB} && mv {shlex.quote(AUTOSTART)}.new {shlex.quote(AUTOSTART)} "
            f"&& rm -rf {GUEST_LIB}.old && {GUEST_PYTHON} -m compileall -q {GUEST_LIB} >/dev/null "
            f"&& udevadm control --reload", "installing the files")
    live, persistent = m.attach_recorder_channel()
    if not live:
        notes.append("the running guest did not take the recorder channel: restart the domain (shut it down "
                     "and start it) and the agent connects at the next login")
    elif s is not None and s.uid != 0:
        # a port that was there before the rule (a reinstall) gets its owner now
        _run(m, "udevadm trigger --action=change --subsystem-match=virtio-ports", "applying the port's owner")
    if not persistent:
        notes.append("the domain is transient: its recorder channel lasts until it stops")
    stopped = stop_agents(m, p.agent_pids) if live and s is not None and start else []
    started = False
    if start and live and s is not None:
        _run(m, start_command(s), "starting the agent")
        started = True
    return InstallReport(__version__, len(files), s, live, persistent, started, stopped, notes)


@dataclass
class GuestStatus:
    installed: dict[str, object] | None
    """The guest's INSTALLED manifest (version, files, user), None if the agent is not installed."""
    agent_pids: list[int]
    channel_live: bool
    channel_persistent: bool


def status(m: Machine) -> GuestStatus:
    """What is installed and running in the guest (the CLI adds whether the agent answers)."""
    require_guest_agent(m)
    p = probe(m)
    installed: dict[str, object] | None = None
    if "yes" in _run(m, f"[ -f {MANIFEST} ] && echo yes || echo no", "looking for the agent"):
        try:
            raw = json.loads(m.read_file(MANIFEST, max_bytes=MANIFEST_MAX_BYTES))
        except ValueError as e:
            raise VMError(f"{MANIFEST} in {m.name!r} is not JSON: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("version"), str):
            raise VMError(f"{MANIFEST} in {m.name!r} is not an install manifest")
        installed = raw
    live = m.recorder_channel() is not None
    persistent = m.persistent and m.recorder_channel(live=False) is not None
    return GuestStatus(installed, p.agent_pids, live, persistent)


def remove(m: Machine) -> list[str]:
    """Undo ``install``: stop the agent, delete its files, autostart entry and udev rule, and take the
    channel out of the domain. Returns what was done."""
    require_guest_agent(m)
    p = probe(m)
    done = []
    if stop_agents(m, p.agent_pids):
        done.append(f"stopped the agent (pid {', '.join(map(str, p.agent_pids))})")
    _run(m, f"rm -rf {GUEST_LIB} {GUEST_LIB}.new {GUEST_LIB}.old {shlex.quote(AUTOSTART)} "
            f"{shlex.quote(AUTOSTART)}.new {UDEV_RULE} && udevadm control --reload", "removing the files")
    done.append(f"deleted {GUEST_LIB}, {AUTOSTART}, {UDEV_RULE}")
    if m.recorder_channel() is not None or (m.persistent and m.recorder_channel(live=False) is not None):
        m.detach_recorder_channel()
        done.append("removed the recorder channel from the domain")
    return done
