"""The sessions a handoff service holds, and what finished ones leave behind (sans-I/O).

Sessions exist only while a peer is attached, so a service keeps nothing its peers cannot give it
back: a restarted service (or this one, after both peers left) re-creates a session from the first
attach's claim.  Finished sessions leave a tombstone (state, reason) for ``finished_ttl``, so that
a late re-attach is answered as the session would have answered it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from server.keyring import SESSION_ID_BYTES, Credential, Keyring
from server.limits import Limits
from server.session import Session
from server.wire import Reason, Role, State

_log = logging.getLogger("replay_migrate.service")


@dataclass(frozen=True)
class _Tombstone:
    """What a finished session leaves: enough to answer a late re-attach as the session would."""

    state: State
    failure: Reason | None
    finished_at: float
    released: bool
    log_end: int | None
    roots: dict[str, bytes] | None


class SessionRegistry:
    """The sessions a service holds, by id, and the keyring that authorises them.

    Sessions exist only while a peer is attached: the first authorised attach creates (or, after a
    restart, re-creates) one, and the last detach drops it, leaving a tombstone if it had finished.
    """

    def __init__(self, keyring: Keyring, limits: Limits | None = None, *,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.keyring = keyring
        self.limits = limits if limits is not None else Limits()
        self.queued_bytes = 0
        """Frame bytes in the connections' output queues (the streams' buffers hold the rest)."""
        self._random = random_bytes
        self._sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, _Tombstone] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def ids(self) -> list[str]:
        return list(self._sessions)

    def lookup(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def memory_in_use(self) -> int:
        """Bytes in the core's queues: every stream's buffer and every connection's output."""
        return sum(s.buffered_total for s in self._sessions.values()) + self.queued_bytes

    def new_session(self) -> tuple[Credential, Credential]:
        """A fresh session id and its (source, target) credentials.  Nothing is stored: the session
        comes into being when one of them attaches."""
        return self.keyring.new_session(self._random(SESSION_ID_BYTES))

    def open(self, role: Role, session_id: str, now: float) -> Session | Reason:
        """The session an authorised attach goes to: the one held, or a new (re-created) one; the
        reason to refuse when it failed (a tombstone) or ``max_sessions`` are attached."""
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        tomb = self._tombstones.get(session_id)
        if tomb is not None and tomb.state is State.FAILED:
            return tomb.failure or Reason.INTERNAL
        if len(self._sessions) >= self.limits.max_sessions:
            self.expire(now)
            if len(self._sessions) >= self.limits.max_sessions:
                _log.warning("refused session %s: %d sessions held", session_id, len(self._sessions))
                return Reason.SESSION_LIMIT
        if tomb is not None:
            del self._tombstones[session_id]
            session = Session(session_id, self.limits, now, state=tomb.state, released=tomb.released)
            session.finished_at = tomb.finished_at
            session.log_end, session.roots = tomb.log_end, tomb.roots
        else:
            session = Session(session_id, self.limits, now)
        self._sessions[session_id] = session
        session.log.info("session opened by its %s", role.value)
        return session

    def release(self, session: Session, now: float) -> None:
        """Drop ``session`` if nobody is attached to it any more: its peers hold what a resume needs."""
        if not session.vacant or self._sessions.get(session.id) is not session:
            return
        del self._sessions[session.id]
        session.log.info("session released in state %s", session.state.value)
        if session.state.terminal:
            self._tombstones[session.id] = _Tombstone(
                session.state, session.failure, session.finished_at if session.finished_at is not None else now,
                session.released, session.log_end, session.roots)
            self._tombstones.move_to_end(session.id)
            while len(self._tombstones) > self.limits.max_tombstones:
                self._tombstones.popitem(last=False)

    def remove(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close_links()
            session.log.info("session removed in state %s", session.state.value)

    def expire(self, now: float) -> list[str]:
        """Fail sessions whose peers stayed away too long, close finished ones past their ttl,
        release vacant ones and forget old tombstones; returns the ids no longer held."""
        gone = []
        for session in list(self._sessions.values()):
            session.tick(now)
            if session.finished(now):
                session.close_links()
            self.release(session, now)
            if session.id not in self._sessions:
                gone.append(session.id)
        while self._tombstones:
            oldest = next(iter(self._tombstones.values()))
            if now - oldest.finished_at < self.limits.finished_ttl:
                break
            self._tombstones.popitem(last=False)
        return gone
