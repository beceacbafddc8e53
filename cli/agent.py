"""``replay-migrate agent install|status|remove DOMAIN``: the recorder agent in a guest of the user's.

The work in the guest is ``vm.install``'s; here the commands wait for the agent's hello on the
recorder channel (``replayer.link``), which says it runs, which version and which capture backend.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.argtypes import positive
from cli.report import emit_json, table
from recorder.channel import Hello
from replay_migrate.errors import ReplayError, ReplayMigrateError, TransportError, VMError
from replayer.link import RecorderLink
from replayer.logfeed import LogPump
from store import checkpoint as ckpt
from vm import install
from vm.machine import Hypervisor, Machine

HELLO_TIMEOUT_S = 30.0
"""How long ``agent install`` waits for the agent it started to answer (its first start in a TCG
guest imports pynput and python-xlib: a few seconds)."""


def _busy(m: Machine) -> int | None:
    """The pid of a ``record --to`` of this domain (it holds the channel; a second host must not attach)."""
    from cli.migrate import PID_FILE, recorder_pid

    try:
        run_dir = ckpt.run_dir_of(m)
    except ReplayMigrateError:
        return None
    return recorder_pid(run_dir / PID_FILE)


def hello_of(m: Machine, timeout: float) -> Hello | None:
    """The agent's hello on the recorder channel, or None if it does not answer in ``timeout``."""
    try:
        with RecorderLink(m) as link:
            return link.open(timeout=timeout)
    except (ReplayError, TransportError, VMError):
        return None


DRAIN_QUIET_S = 0.3
"""A paused guest's agent writes nothing more: the channel is drained once a read this long brings nothing."""


class ChannelLogCut:
    """``store.fromdomain.LogCut`` over the recorder channel: attached while the domain runs, then
    (paused) every frame read; the log stands at the next frame seq."""

    def __init__(self, timeout: float = HELLO_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._link: RecorderLink | None = None
        self._pump = LogPump(require_end=False)

    def open(self, m: Machine) -> None:
        self._link = RecorderLink(m)
        self._link.open(timeout=self.timeout)
        self._read(0.2)

    def _read(self, quiet_s: float) -> None:
        assert self._link is not None
        while frames := self._link.frames(quiet_s):
            for fr in frames:
                self._pump.feed(fr.data)
                self._link.ack(fr.seq)

    def cut(self) -> tuple[int, int]:
        assert self._link is not None
        try:
            self._read(DRAIN_QUIET_S)
        finally:
            self._link.close()
        header = self._pump.header
        if header is None:
            raise VMError("the recorder agent sent no log header")
        return self._pump.decoder.next_seq, header.clock_origin_us


def _hello_dict(h: Hello | None) -> dict[str, Any]:
    if h is None:
        return {"connected": False}
    return {"connected": True, "version": h.agent_version, "backend": h.backend or "unknown",
            "screen": f"{h.width}x{h.height}", "keymap": h.keymap}


def cmd_install(args: argparse.Namespace) -> int:
    with Hypervisor(args.connect) as hv:
        m = hv.lookup(args.domain)
        rep = install.install(m, start=not args.no_start)
        hello = hello_of(m, args.timeout) if rep.started else None
    out = {"domain": args.domain, "version": rep.version, "files": rep.files,
           "user": rep.session.user if rep.session else None,
           "display": rep.session.display if rep.session else None,
           "channel": {"live": rep.channel_live, "persistent": rep.channel_persistent},
           "replaced_pids": rep.stopped, "started": rep.started, "agent": _hello_dict(hello), "notes": rep.notes}
    if args.json:
        emit_json(out)
    else:
        table([["files", f"{rep.files} written, checked (version {rep.version})"],
               ["session", f"{rep.session.user} on {rep.session.display}" if rep.session else "none running"],
               ["recorder channel", ("live" if rep.channel_live else "not live") + ", "
                + ("persistent" if rep.channel_persistent else "not in a persistent definition")],
               ["agent", _agent_line(out["agent"]) if rep.started else "not started"]],
              [f"agent install {args.domain}", ""])
        for note in rep.notes:
            print(f"note: {note}", file=sys.stderr)
    if rep.started and hello is None:
        raise VMError(f"the agent was started in {args.domain!r} but did not answer in {args.timeout:.0f} s "
                      "(its errors: $XDG_RUNTIME_DIR/replay-migrate/agent.err in the guest)")
    return 0


def _agent_line(a: Any) -> str:
    if not a.get("connected"):
        return "not connected"
    return f"connected: version {a['version']}, backend {a['backend']}, {a['screen']}, keymap {a['keymap']}"


def cmd_status(args: argparse.Namespace) -> int:
    with Hypervisor(args.connect) as hv:
        m = hv.lookup(args.domain)
        st = install.status(m)
        busy = _busy(m)
        hello = None if busy is not None or not st.channel_live else hello_of(m, args.timeout)
    agent: dict[str, Any] = ({"connected": True, "recording": busy} if busy is not None else _hello_dict(hello))
    out = {"domain": args.domain, "installed": st.installed, "running_pids": st.agent_pids,
           "channel": {"live": st.channel_live, "persistent": st.channel_persistent}, "agent": agent}
    if args.json:
        emit_json(out)
        return 0
    table([["installed", f"version {st.installed['version']}" if st.installed else "no"],
           ["running", ", ".join(map(str, st.agent_pids)) or "no"],
           ["recorder channel", ("live" if st.channel_live else "not live") + ", "
            + ("persistent" if st.channel_persistent else "not persistent")],
           ["agent", f"recording (record --to, pid {busy})" if busy is not None else _agent_line(agent)]],
          [f"agent status {args.domain}", ""])
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with Hypervisor(args.connect) as hv:
        m = hv.lookup(args.domain)
        busy = _busy(m)
        if busy is not None:
            raise VMError(f"a `replay-migrate record {args.domain} --to` (pid {busy}) records it: stop that first")
        for line in install.remove(m):
            print(line)
    return 0


def add_arguments(sub: Any, add: Any) -> None:
    """The ``agent`` command group (``add`` is cli.main's helper that registers a subcommand)."""
    ag = sub.add_parser("agent", help="the recorder agent in a guest").add_subparsers(dest="sub", required=True)
    p = add(ag, "install", cmd_install, "install the recorder agent into a running guest (guest agent; no network) "
            "and start it in the user's session")
    p.add_argument("domain")
    p.add_argument("--no-start", action="store_true", help="install only; it starts at the next login")
    p.add_argument("--timeout", type=positive, default=HELLO_TIMEOUT_S,
                   help="seconds to wait for the started agent's hello (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p = add(ag, "status", cmd_status, "whether the agent is installed, runs and answers (version, backend)")
    p.add_argument("domain")
    p.add_argument("--timeout", type=positive, default=5.0, help="seconds to wait for a hello (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p = add(ag, "remove", cmd_remove, "undo `agent install`: stop the agent, delete its files and autostart "
            "entry, take the channel out of the domain")
    p.add_argument("domain")
