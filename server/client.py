"""The peers' side of the session-handoff service over websockets: both the source and the target
use it.

Two layers, like the service: :class:`~server.clientcore.ClientState` (``server/clientcore.py``)
is sans-I/O (it owns the journal of what this side sent and decides, from the service's
``attached`` answer, exactly what to re-send after a reconnect), and :class:`SessionClient` here is
the asyncio adapter over ``websockets`` that connects with a role credential, reconnects with
:class:`~server.backoff.Backoff` and feeds the state object.  :func:`create_session` asks the
service for a new session with the shared token.

Usage::

    source, target = await create_session("wss://svc:8765", token, cafile=ca)   # at the source
    # ... hand str(target) to the target site (a 0600 file, see server/credentials.py) ...
    async with SessionClient("wss://svc:8765", target, cafile=ca) as c:
        while True:
            ev = await c.recv()          # Frame / LogEnded / StateChanged / Verified / Confirmed / Released / Reported
            ...

Payloads are opaque bytes.  A frame is acked when :meth:`SessionClient.recv` hands it over, so
"acked" means "consumed", and a sender's window only opens as fast as its receiver consumes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from replay_migrate import __version__
from replay_migrate.errors import AuthError, ProtocolError, ReplayMigrateError, TransportError, UsageError
from server.backoff import Backoff, ReconnectPolicy
from server.clientcore import ClientState, Event, Failed, Frame, SessionFailedError
from server.credentials import TOKEN_ENV
from server.keyring import CREATE_PATH, Credential
from server.limits import Limits
from server.wire import Phase, Reason, Role, State, Stream, decode, encode, frame_payload, message_type, state_reached

_DEFAULTS: Final = Limits()


_CONNECT_TAKES_PROXY: Final = "proxy" in inspect.signature(connect.__init__).parameters


def session_url(base: str, session_id: str) -> str:
    """``ws://host:port`` + id → the session's URL."""
    return f"{base.rstrip('/')}{CREATE_PATH}/{session_id}"


def _service_base(url: str) -> tuple[str, str]:
    """Check a service URL (``ws[s]://HOST:PORT``, no path); returns (url without a trailing /, host:port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise UsageError(f"bad service URL {url!r}: expected ws[s]://HOST:PORT")
    return url.rstrip("/"), parts.netloc


def check_service(url: str, cafile: str | os.PathLike[str] | None = None) -> None:
    """Refuse a bad service URL or CA file at once (UsageError): commands check it before they
    touch libvirt or a guest."""
    _service_base(url)
    _client_ssl(url, cafile)


def _client_ssl(url: str, cafile: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """TLS for a wss:// URL: the system's CAs, or only ``cafile`` (a self-signed service certificate)."""
    if not url.startswith("wss:"):
        if cafile is not None:
            raise UsageError("a CA file only makes sense with a wss:// URL")
        return None
    try:
        return ssl.create_default_context(cafile=os.fspath(cafile) if cafile is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the CA file {cafile}: {getattr(e, 'strerror', None) or e}") from None


def _refused(where: str, status: int, what: str) -> ReplayMigrateError | None:
    """The error for a handshake answered ``status`` (None: worth retrying)."""
    if status in (401, 403):
        return AuthError(f"the handoff service at {where} refused the {what} (HTTP {status})")
    if 400 <= status < 500:
        return ProtocolError(f"the handoff service at {where} refused the request (HTTP {status})")
    return None


def _connect_options() -> dict[str, Any]:
    # site to site: never through an environment proxy
    return {"proxy": None} if _CONNECT_TAKES_PROXY else {}


async def create_session(service: str, token: str | None = None, *, cafile: str | os.PathLike[str] | None = None,
                         open_timeout: float = 10.0) -> tuple[Credential, Credential]:
    """A new session at ``service`` (``ws[s]://HOST:PORT``) with the shared creation ``token``
    (default: ``$REPLAY_MIGRATE_TOKEN``); returns its (source, target) credentials."""
    base, where = _service_base(service)
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"no token to create a session with: set ${TOKEN_ENV} or pass a token file")
    tls = _client_ssl(base, cafile)
    try:
        async with asyncio.timeout(open_timeout):
            async with connect(f"{base}{CREATE_PATH}", additional_headers={"Authorization": f"Bearer {token}"},
                               compression=None, open_timeout=open_timeout, max_size=4096, ssl=tls,
                               user_agent_header=f"replay-migrate/{__version__}", **_connect_options()) as ws:
                await ws.send(encode("create"))
                data = await ws.recv()
    except InvalidStatus as e:
        status = e.response.status_code
        raise _refused(where, status, "token") or TransportError(
            f"the handoff service at {where} cannot create a session now (HTTP {status})") from None
    except ssl.SSLCertVerificationError as e:
        raise TransportError(f"TLS verification of {where} failed: {e.verify_message}") from None
    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
        raise TransportError(f"cannot create a session at {where}: {type(e).__name__}") from None
    if isinstance(data, str):
        raise ProtocolError(f"the handoff service at {where} sent a text frame")
    msg = decode(data, 4096)
    if msg["t"] == "error":
        raise ProtocolError(f"the handoff service at {where} refused to create a session: {msg['reason']}")
    if msg["t"] != "created":
        raise ProtocolError(f"the handoff service at {where} answered {msg['t']} to create")
    source, target = Credential.parse(msg["source"]), Credential.parse(msg["target"])
    if source is None or target is None or (source.role, target.role) != (Role.SOURCE, Role.TARGET) \
            or not source.session == target.session == msg["session"]:
        raise ProtocolError(f"the handoff service at {where} sent inconsistent credentials")
    return source, target


class SessionClient:
    """One peer of one session over websockets, surviving dropped connections.

    ``send_*`` return once the message is journalled and inside the window (backpressure);
    ``suspend``/``phase``/``verified``/``resumed`` once the service applied them; ``recv`` yields
    events in order.  The session failing raises :class:`SessionFailedError` (``keep_vm`` tells the
    source to keep its VM); a connection not restored within ``reconnect`` raises TransportError; a
    refused credential AuthError.  Use as ``async with``, or call :meth:`connect` and :meth:`close`.

    ``service`` is the service's ``ws[s]://HOST:PORT``; ``credential`` (or its text) names the
    session and the role, and is the only secret this side presents.  ``clock`` (monotonic
    seconds) times the reconnect budget.
    """

    def __init__(self, service: str, credential: Credential | str, *,
                 cafile: str | os.PathLike[str] | None = None, reconnect: ReconnectPolicy | None = None,
                 open_timeout: float = 10.0, close_timeout: float = 5.0, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, max_message_size: int = _DEFAULTS.max_message_size,
                 max_queue: int = 16, clock: Callable[[], float] = time.monotonic) -> None:
        base, where = _service_base(service)
        cred = credential if isinstance(credential, Credential) else Credential.parse(credential)
        if cred is None:
            raise UsageError("that is not a replay-migrate session credential (rm1.SESSION.ROLE.SECRET)")
        self.url = session_url(base, cred.session)
        self.role = cred.role
        self._where = where
        self._authorization = f"Bearer {cred}"
        self._ssl = _client_ssl(base, cafile)
        self._policy = reconnect if reconnect is not None else ReconnectPolicy()
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._ping = (ping_interval, ping_timeout)
        self._max_message = max_message_size
        self._max_queue = max_queue
        self._clock = clock
        self._core = ClientState(self.role, cred.session, max_message_size=max_message_size)
        self.log = logging.getLogger(f"replay_migrate.session.{cred.session}")
        self._events: deque[Event] = deque()
        self._changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: ReplayMigrateError | None = None
        self._closing = False
        self.reconnects = 0
        self.wire_bytes_sent = 0
        self.wire_bytes_received = 0
        self.wire_by_type: dict[str, int] = {}
        """Bytes sent and received per message type (``server.wire.message_type``): where the
        session's bytes go (:meth:`wire_detail`)."""
        self.payload_bytes = 0
        """Payload bytes of the log and diff frames sent and received (every transmission)."""
        self.log_payload_bytes = 0

    # -- properties
    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def state(self) -> State | None:
        return self._core.state

    @property
    def confirmed(self) -> bool:
        return self._core.confirmed

    @property
    def roots(self) -> Mapping[str, bytes] | None:
        return self._core.roots

    @property
    def max_payload(self) -> int:
        return self._core.max_payload

    @property
    def duplicates(self) -> int:
        """Frames the service delivered twice and this side dropped (0 when the protocol holds)."""
        return self._core.duplicates

    @property
    def connection(self) -> ClientConnection | None:
        """The current websocket, if any (tests cut it with ``connection.transport.abort()``)."""
        return self._ws

    def wire_detail(self) -> dict[str, int]:
        """This connection's bytes by what they carry: log frames and diff-protocol messages
        (``log_data``, ``diff_data``), their session envelopes (``log_envelopes``,
        ``diff_envelopes``), the acks, the target's replay progress (``replayed``) and every other
        session message (``control``: attach, states, phases, suspend, verified, confirm...).
        The values add up to :attr:`wire_bytes_sent` + :attr:`wire_bytes_received`."""
        by = dict(self.wire_by_type)
        log, diff = self.log_payload_bytes, self.payload_bytes - self.log_payload_bytes
        out = {"log_data": log, "log_envelopes": by.pop("log", 0) - log, "diff_data": diff,
               "diff_envelopes": by.pop("diff", 0) - diff, "acks": by.pop("ack", 0),
               "replayed": by.pop("replayed", 0)}
        out["control"] = sum(by.values())
        return out

    def _count(self, data: bytes) -> int:
        """Account one message sent or received (:meth:`wire_detail`); its length."""
        t = message_type(data)
        self.wire_by_type[t] = self.wire_by_type.get(t, 0) + len(data)
        if t in ("log", "diff"):
            payload = frame_payload(data)
            self.payload_bytes += payload
            if t == "log":
                self.log_payload_bytes += payload
        return len(data)

    # -- lifecycle
    async def __aenter__(self) -> SessionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and attach (retrying per the policy); returns once attached."""
        if self._task is not None:
            raise UsageError("this client is already connected")
        self._task = asyncio.create_task(self._supervise(), name=f"session-{self.session_id}-{self.role.value}")
        await self._wait(lambda: self._core.ever_attached)

    async def close(self) -> None:
        """Stop (re)connecting and close the connection.  Unsent journal entries are dropped."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._notify()

    # -- sending
    async def send_log(self, data: bytes) -> int:
        """(Source) one opaque log frame; returns its seq."""
        return await self._send_frame(Stream.LOG, data)

    async def end_log(self) -> int:
        """(Source) no more log frames; returns the last seq."""
        self._check()
        seq = self._core.end_log()
        await self._flush()
        return seq

    async def suspend(self) -> None:
        """(Source) RECORDING → SUSPENDING; returns once the service moved."""
        await self._control(self._core.suspend, State.SUSPENDING)

    async def replayed(self, seq: int) -> None:
        """(Target) the replay went through log frame ``seq`` (and all before it): told to the
        source, throttled (:data:`~server.clientcore.REPLAYED_INTERVAL_S`, at once on reaching the
        last frame received).  Returns once it is on the wire, or dropped by the throttle."""
        self._check()
        if self._core.replay_progress(seq, self._clock()):
            await self._flush()

    @property
    def peer_replayed(self) -> int:
        """(Source) the last log frame the target said it replayed (0 before it said anything)."""
        return self._core.replayed if self.role is Role.SOURCE else 0

    async def send_diff(self, data: bytes) -> int:
        """One opaque diff-protocol message to the other side; returns its seq.  The target's first
        one waits until the session is SUSPENDING (the source's doing)."""
        if self.role is Role.TARGET:
            self._check()
            await self._wait(self._core.may_send_diff)
        return await self._send_frame(Stream.S2T if self.role is Role.SOURCE else Stream.T2S, data)

    async def phase(self, phase: Phase | str) -> None:
        """(Target) announce diffing (waits for SUSPENDING first) or transferring; returns once the
        service moved."""
        p = Phase(phase)
        if p is Phase.DIFFING:
            self._check()
            await self._wait(lambda: state_reached(self._core.state, State.SUSPENDING))
        await self._control(lambda: self._core.phase(p),
                            State.DIFFING if p is Phase.DIFFING else State.TRANSFERRING)

    async def verified(self, roots: Mapping[str, bytes]) -> None:
        """(Target) the patched images hash to ``roots``; returns once the session is VERIFIED."""
        await self._control(lambda: self._core.verified(roots), State.VERIFIED)

    async def resumed(self) -> None:
        """(Target) the VM runs; returns once the session is RESUMED (the source gets confirm)."""
        await self._control(self._core.resumed, State.RESUMED)

    async def acknowledge_confirm(self, timeout: float | None = None) -> None:
        """(Source) after the confirm: tell the target it may go; returns once the service took it."""
        self._check()
        self._core.acknowledge_confirm()
        await self._flush()
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.released)

    async def wait_released(self, timeout: float | None = None) -> None:
        """(Target) after ``resumed``: until the source has the confirm.  Staying attached until
        then lets a restarted service learn from this side that the target resumed."""
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.released)

    async def report(self, figures: Mapping[str, Any]) -> None:
        """This side's figures of the migration, for the other side (the target's after
        ``resumed``, the source's after the confirm and before :meth:`acknowledge_confirm`);
        returns once they are on the wire (the service may still be catching up after a reconnect:
        they stay journalled until ``released``)."""
        self._check()
        self._core.report(figures)
        await self._flush()

    async def wait_peer_report(self, timeout: float | None = None) -> Mapping[str, Any] | None:
        """The other side's figures once they came, or None after ``timeout`` (its report is a
        courtesy of a finished migration: nothing waits on it for long)."""
        try:
            async with asyncio.timeout(timeout):
                await self._wait(lambda: self._core.peer_report is not None)
        except TimeoutError:
            return None
        return self._core.peer_report

    def in_flight(self, stream: Stream) -> int:
        """Bytes of ``stream`` this side sent that its receiver has not consumed yet (how far the
        target is behind the source's log, at the source)."""
        return self._core.in_flight(stream)

    @property
    def peer_report(self) -> Mapping[str, Any] | None:
        return self._core.peer_report

    async def abort(self, reason: Reason | str) -> None:
        """Give up the session (either side); returns once the service failed it."""
        r = Reason(reason)
        self._check()
        self._core.abort(r)
        await self._flush()
        await self._wait(lambda: self._core.failed is not None)

    # -- receiving and waiting
    async def recv(self, timeout: float | None = None) -> Event:
        """The next event, in order.  Frames are acked as they are handed over.  Raises
        SessionFailedError when the failure is next, the fatal error once nothing is left."""
        async with asyncio.timeout(timeout):
            while not self._events:
                if self._fatal is not None:
                    raise self._fatal
                await self._changed.wait()
        ev = self._events.popleft()
        if isinstance(ev, Failed):
            raise SessionFailedError(self.session_id, ev)
        if isinstance(ev, Frame) and (self._core.consumed(ev) or not self._events):
            await self._flush()
        return ev

    async def wait_state(self, state: State, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._wait(lambda: state_reached(self._core.state, state))

    async def wait_confirmed(self, timeout: float | None = None) -> None:
        """(Source) until the target has resumed; only then may the source release its VM."""
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._core.confirmed)

    async def drain(self, timeout: float | None = None) -> None:
        """Until the receiver has acked every frame this side sent."""
        async with asyncio.timeout(timeout):
            await self._wait(self._core.all_acked)

    # -- internals
    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._task is None:
            raise UsageError("the session client is not connected")

    async def _send_frame(self, stream: Stream, data: bytes) -> int:
        self._check()
        seq = self._core.send_frame(stream, bytes(data))
        await self._flush()
        await self._wait(lambda: self._core.transmitted(stream, seq))
        return seq

    async def _control(self, apply: Callable[[], None], wanted: State) -> None:
        self._check()
        apply()
        await self._flush()
        await self._wait(lambda: state_reached(self._core.state, wanted))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._fatal is not None:
                raise self._fatal
            await self._changed.wait()

    async def _flush(self) -> None:
        async with self._send_lock:
            ws = self._ws
            if ws is None:
                return
            for msg in self._core.data_to_send():
                try:
                    await ws.send(msg)
                except ConnectionClosed:
                    return  # the reader notices; the next attach re-plans what to send
                self.wire_bytes_sent += self._count(msg)

    async def _supervise(self) -> None:
        backoff: Backoff | None = None
        try:
            while not self._closing:
                attached = await self._connection_round()
                if self._closing:
                    return
                now = self._clock()
                if attached or backoff is None:
                    backoff = Backoff(self._policy, now)
                delay = backoff.next_delay(now)
                if delay is None:
                    raise TransportError(
                        f"session {self.session_id}: lost the handoff service at {self._where} and could not get "
                        f"back within {backoff.attempts} attempts / {now - backoff.started:.1f} s")
                self.log.info("%s: reconnecting in %.2f s (attempt %d)", self.role.value, delay, backoff.attempts)
                await asyncio.sleep(delay)
        except ReplayMigrateError as e:
            self.log.warning("%s: %s", self.role.value, e)
            self._fatal = e
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("%s: bug in the session client", self.role.value)
            self._fatal = TransportError(f"session {self.session_id}: internal error in the client")
        finally:
            self._notify()

    async def _open(self) -> ClientConnection | None:
        try:
            return await connect(
                self.url, additional_headers={"Authorization": self._authorization}, compression=None,
                open_timeout=self._open_timeout, close_timeout=self._close_timeout, ping_interval=self._ping[0],
                ping_timeout=self._ping[1], max_size=self._max_message, max_queue=self._max_queue, ssl=self._ssl,
                user_agent_header=f"replay-migrate/{__version__}", **_connect_options())
        except InvalidStatus as e:
            status = e.response.status_code
            error = _refused(self._where, status, f"{self.role.value} credential")
            if error is not None:
                raise error from None
            self.log.info("%s: handshake answered HTTP %d", self.role.value, status)
        except ssl.SSLCertVerificationError as e:
            raise TransportError(f"TLS verification of {self._where} failed: {e.verify_message}") from None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as e:
            self.log.info("%s: cannot connect to %s: %s", self.role.value, self._where, type(e).__name__)
        return None

    async def _connection_round(self) -> bool:
        """One connection: attach, then read until it drops.  True if it got attached."""
        ws = await self._open()
        if ws is None:
            return False
        self._ws = ws
        attached, resumed = False, self._core.ever_attached
        try:
            async with asyncio.timeout(self._open_timeout):
                attach = self._core.attach_message()
                await ws.send(attach)
                self.wire_bytes_sent += self._count(attach)
                data = await ws.recv()
            while True:
                if isinstance(data, str):
                    raise ProtocolError("the handoff service sent a text frame")
                self.wire_bytes_received += self._count(data)
                events = self._core.receive(data)
                if self._core.attached and not attached:
                    attached = True
                    if resumed:
                        self.reconnects += 1
                    self.log.info("%s: %s in state %s", self.role.value, "re-attached" if resumed else "attached",
                                  self._core.state.value if self._core.state else "?")
                self._events.extend(events)
                if self._core.failed is not None:
                    raise SessionFailedError(self.session_id, self._core.failed)
                await self._flush()
                self._notify()
                data = await ws.recv()
        except ConnectionClosed as e:
            codes = {c.code for c in (e.rcvd, e.sent) if c is not None}
            if 1009 in codes:
                raise ProtocolError(f"session {self.session_id}: a message was too big for the other end "
                                    "(close code 1009)") from None
            self.log.info("%s: connection lost (%s)", self.role.value, sorted(codes) or "no close frame")
        except TimeoutError:
            self.log.info("%s: no answer to attach within %.1f s", self.role.value, self._open_timeout)
        except OSError as e:
            self.log.info("%s: connection error %s", self.role.value, type(e).__name__)
        finally:
            self._ws = None
            self._core.connection_lost()
            self._notify()
            await ws.close()
        return attached
