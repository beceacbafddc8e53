"""Who may do what with the service: the service key, the creation token and the role credentials
derived from them (DESIGN.md §8).  Sans-I/O: the adapter hands :meth:`Keyring.authorize` the
request's path and ``Authorization`` header before any websocket opens.

The shared bearer *token* only lets its holder create sessions (``/sessions``).  Creating one
returns a fresh random session id and one credential per role, ``rm1.<id>.<role>.<secret>``, where
``secret = HMAC-SHA256(service key, id, role)``.  A connection to ``/sessions/<id>`` must present its
role's credential (checked in constant time before the websocket opens) and can then attach as that
role of that session and nothing else.  The secrets are derived, not stored: a restarted service
(or another instance with the same key) verifies them without any state of its own.

Where the secrets come from (files, the environment) is :mod:`server.credentials`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Final

from server.wire import CREDENTIAL_RE, Role

SESSION_ID_BYTES: Final = 16          # 128 random bits, 22 characters
SECRET_BYTES: Final = 32
MIN_KEY_BYTES: Final = 32
CREATE_PATH: Final = "/sessions"
SESSION_PATH_RE: Final = re.compile(r"/sessions/([A-Za-z0-9_-]{1,64})")
_SECRET_LABEL: Final = b"replay-migrate role secret v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Credential:
    """One role of one session: what a peer presents as ``Authorization: Bearer <str(credential)>``.
    The secret stays out of ``repr`` (and so out of tracebacks and logs)."""

    session: str
    role: Role
    secret: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"rm1.{self.session}.{self.role.value}.{_b64(self.secret)}"

    @staticmethod
    def parse(text: str) -> Credential | None:
        """The credential in ``text`` (surrounding white space allowed), or None if it is not one."""
        m = CREDENTIAL_RE.fullmatch(text.strip())
        if m is None:
            return None
        return Credential(m[1], Role(m[2]), base64.urlsafe_b64decode(m[3] + "="))


@dataclass(frozen=True)
class Grant:
    """What one connection was authorised for: creating sessions (``session`` None: the shared
    token) or one role of one session (its credential)."""

    session: str | None = None
    role: Role | None = None

    @property
    def creates(self) -> bool:
        return self.session is None


CREATE: Final = Grant()


class Keyring:
    """The service key and the creation token, and everything derived from them.

    Role secrets are ``HMAC-SHA256(key, label, session id, role)``: nothing is stored, so whoever
    holds the key (this instance after a restart, another instance behind a proxy) verifies them.
    Every comparison is constant time, and none of them depends on whether a session exists.
    """

    def __init__(self, key: bytes, token: str | None) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the service key must have at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._token = token.encode("utf-8") if token else None

    def secret(self, session_id: str, role: Role) -> bytes:
        msg = b"\0".join((_SECRET_LABEL, session_id.encode("ascii"), role.value.encode("ascii")))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def credential(self, session_id: str, role: Role) -> Credential:
        return Credential(session_id, role, self.secret(session_id, role))

    def new_session(self, seed: bytes) -> tuple[Credential, Credential]:
        """A new session id from ``seed`` (random bytes) and its (source, target) credentials."""
        if len(seed) < SESSION_ID_BYTES:
            raise ValueError(f"a session id needs {SESSION_ID_BYTES} random bytes")
        session_id = _b64(seed[:SESSION_ID_BYTES])
        return self.credential(session_id, Role.SOURCE), self.credential(session_id, Role.TARGET)

    def authorize(self, path: str, authorization: str) -> Grant | None:
        """The grant for a request to ``path`` (no query) with this ``Authorization`` header, or None.
        The token opens only :data:`CREATE_PATH`; a session path needs that session's credential."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return None
        if path == CREATE_PATH:
            if self._token is None:
                return None
            try:
                given = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return None
            return CREATE if hmac.compare_digest(given, self._token) else None
        m = SESSION_PATH_RE.fullmatch(path)
        cred = Credential.parse(value) if m is not None else None
        if m is None or cred is None or cred.session != m[1]:
            return None
        if not hmac.compare_digest(self.secret(cred.session, cred.role), cred.secret):
            return None
        return Grant(cred.session, cred.role)


def known_path(path: str) -> bool:
    """Whether ``path`` is one the service answers at all (the rest is 404, before any auth)."""
    return path == CREATE_PATH or SESSION_PATH_RE.fullmatch(path) is not None
