"""Helpers for the tests of the service's sans-I/O core: a fake peer that talks to a
:class:`~server.link.Link` in memory, sessions driven to any state (``tests/test_session.py``,
``test_session_state.py``, ``test_link.py``, ``test_registry.py``, ``test_relay.py``); and the
fuzz target for the session messages with its seeds (``make fuzz`` imports it as
``tests.sessionkit``, so it needs nothing but the project's packages)."""

from __future__ import annotations

from typing import Any

from replay_migrate.errors import ReplayMigrateError
from server.clientcore import ClientState
from server.keyring import CREATE, Grant, Keyring
from server.limits import Limits
from server.link import Link
from server.registry import SessionRegistry
from server.session import Session
from server.wire import PROTOCOL_VERSION, Claim, Reason, Role, State, Stream, decode, encode

SID = "mig-1"
ROOTS = {"memory": b"\x01" * 32, "disk": b"\x02" * 32}
BIG = 1 << 30
V = PROTOCOL_VERSION
KEYRING = Keyring(b"k" * 32, "the-token")


def registry(limits: Limits | None = None) -> SessionRegistry:
    return SessionRegistry(KEYRING, limits)


class Peer:
    """A fake connection: sends encoded messages into a Link and decodes what the core queues."""

    def __init__(self, reg: SessionRegistry, role: Role, sid: str = SID) -> None:
        self.reg, self.role, self.sid = reg, role, sid
        self.link = Link(reg, Grant(sid, role), 0.0)

    def send(self, t: str, now: float = 0.0, **fields: Any) -> None:
        self.link.receive(encode(t, **fields), now)

    def attach(self, resume_from: dict[str, int] | None = None, resume: bool = False, now: float = 0.0,
               claim: Claim | None = None) -> None:
        if resume_from is None:
            resume_from = {s.value: 1 for s in self.role.receives}
        claim = claim if claim is not None else Claim.initial(self.role)
        self.send("attach", now, role=self.role.value, session=self.sid, resume_from=resume_from, resume=resume,
                  claim=claim.to_wire())

    def reconnect(self, now: float = 0.0) -> None:
        self.link.connection_lost(now)
        self.link = Link(self.reg, Grant(self.sid, self.role), now)

    def out(self) -> list[dict[str, Any]]:
        return [decode(m, BIG) for m in self.link.data_to_send()]

    def types(self) -> list[str]:
        return [m["t"] for m in self.out()]


def pair(limits: Limits | None = None) -> tuple[SessionRegistry, Session, Peer, Peer]:
    reg = registry(limits)
    src, tgt = Peer(reg, Role.SOURCE), Peer(reg, Role.TARGET)
    src.attach()
    tgt.attach()
    src.out()
    tgt.out()
    session = reg.lookup(SID)
    assert session is not None
    return reg, session, src, tgt


def drive_to(state: State, *, log_ended: bool = True) -> tuple[SessionRegistry, Session, Peer, Peer]:
    """A session in ``state`` with one log frame relayed and acked (and the log ended if asked)."""
    reg, s, src, tgt = pair()
    src.send("log", seq=1, data=b"L1")
    tgt.send("ack", stream="log", seq=1)
    if state is not State.RECORDING:
        if log_ended:
            src.send("log_end", seq=1)
        src.send("suspend")
    if state in (State.DIFFING, State.TRANSFERRING, State.VERIFIED, State.RESUMED):
        tgt.send("phase", phase="diffing")
    if state in (State.TRANSFERRING, State.VERIFIED, State.RESUMED):
        tgt.send("phase", phase="transferring")
    if state in (State.VERIFIED, State.RESUMED):
        tgt.send("verified", roots=ROOTS)
    if state is State.RESUMED:
        tgt.send("resumed")
    assert s.state is state
    src.out()
    tgt.out()
    return reg, s, src, tgt


def st(s: Session) -> State:
    """The state, un-narrowed (the session changes it behind mypy's back)."""
    return s.state


def assert_failed(s: Session, src: Peer, tgt: Peer, reason: Reason) -> None:
    assert s.state is State.FAILED and s.failure is reason
    for peer, keep in ((src, True), (tgt, False)):
        errors = [m for m in peer.out() if m["t"] == "error"]
        assert errors == [{"v": V, "t": "error", "code": reason.code, "reason": reason.value, "keep_vm": keep}]
        assert peer.link.close_code is not None


def claim_of(state: State, role: Role, *, nxt: dict[Stream, int] | None = None, acked: dict[Stream, int] | None = None,
             log_end: int | None = None, roots: dict[str, bytes] | None = None) -> Claim:
    base = Claim.initial(role)
    return Claim(state, {**base.next, **(nxt or {})}, {**base.acked, **(acked or {})}, log_end, roots)


# ---- fuzzing: only the project's own errors come out of the session message decoder -------------
_FUZZ_LIMIT = 1 << 16
FUZZ_TEMPLATES: list[dict[str, Any]] = [
    {"t": "create"},
    {"t": "attach", "role": "target", "session": SID, "resume_from": {"log": 1, "s2t": 1}, "resume": True,
     "claim": Claim.initial(Role.TARGET).to_wire()},
    {"t": "log", "seq": 1, "data": b"x"}, {"t": "log_end", "seq": 0}, {"t": "suspend"},
    {"t": "replayed", "seq": 1},
    {"t": "diff", "dir": "s2t", "seq": 1, "data": b""}, {"t": "ack", "stream": "log", "seq": 1},
    {"t": "phase", "phase": "diffing"}, {"t": "verified", "roots": ROOTS}, {"t": "resumed"}, {"t": "released"},
    {"t": "abort", "reason": "cancelled"},
    {"t": "report", "figures": {"block_bytes": 1, "replay_s": 0.5, "verified": True, "downtime_s": None,
                                "strategy": "replay", "divergent_blocks": {"memory": 3, "disk": None}}},
    {"t": "attached", "session": SID, "state": "recording", "next": {"log": 1}, "acked": {"log": 0}, "window": 1,
     "max_message": 1, "log_end": None, "roots": None},
    {"t": "created", "session": SID, "source": str(KEYRING.credential(SID, Role.SOURCE)),
     "target": str(KEYRING.credential(SID, Role.TARGET))},
    {"t": "error", "code": 400, "reason": "bad_message", "keep_vm": True}, {"t": "confirm"},
    {"t": "state", "state": "failed"},
]

FUZZ_SEEDS: list[bytes] = [encode(str(t["t"]), **{k: v for k, v in t.items() if k != "t"}) for t in FUZZ_TEMPLATES]
"""Valid messages of every type, for ``make fuzz`` to mutate."""


def fuzz_session_message(data: bytes) -> None:
    """The fuzz target (``make fuzz``): ``data`` as a message to the decoder, to a service
    connection that created a session, to one attached to a session in every state, and to both
    clients.  Anything but a ReplayMigrateError escaping is a failure; the core never raises."""
    try:
        decode(data, _FUZZ_LIMIT)
    except ReplayMigrateError:
        pass
    reg = registry(Limits(max_message_size=_FUZZ_LIMIT, max_buffered_bytes=4 * _FUZZ_LIMIT))
    Link(reg, CREATE, 0.0).receive(data, 0.0)
    Link(reg, Grant(SID, Role.TARGET), 0.0).receive(data, 0.0)
    for state in (State.RECORDING, State.TRANSFERRING, State.RESUMED):
        _, _, src, tgt = drive_to(state)
        src.link.receive(data, 0.0)
        tgt.link.receive(data, 0.0)
        src.link.data_to_send()
        tgt.link.data_to_send()
    for role in Role:
        client = ClientState(role, SID)
        client.attach_message()
        try:
            client.receive(encode("attached", session=SID, state="recording",
                                  next={s.value: 1 for s in role.sends}, acked={s.value: 0 for s in role.sends},
                                  window=1 << 20, max_message=1 << 20, log_end=None, roots=None))
            client.receive(data)
        except ReplayMigrateError:
            pass
