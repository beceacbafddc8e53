"""A lean session peer for the load generator: two sans-I/O cores on a plain asyncio protocol.

:class:`~server.client.SessionClient` is the peers' real adapter, and its per-message cost (a task
switch, an ``asyncio.Event`` and an async lock per message, websockets' asyncio connection around
every send and receive) is about 1.5 times what the service spends relaying the same message.  A
load generator built on it saturates its core long before the service saturates its own, and then
measures itself.  :class:`LeanPeer` speaks the same wire with less around it: websockets'
:class:`~websockets.client.ClientProtocol` (the real websocket framing, masking, pings, close)
and the peers' :class:`~server.client.ClientState` (the real session protocol: attach, journal,
window, acks), fed straight from ``data_received``.  A log frame reaches ``on_frame`` without a
task switch and its ack leaves in the same callback, as ``SessionClient`` acks it (one ack per
batch of frames read together).  No reconnects: a dropped connection fails the peer, which is
what a load test should count.  ``ws://`` only (the load runs on loopback).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from replay_migrate.errors import ProtocolError, ReplayMigrateError, TransportError
from server.client import session_url
from server.clientcore import ClientState, Event, Failed, Frame, SessionFailedError
from server.keyring import Credential
from server.wire import Phase, Role, State, Stream, state_reached

HANDSHAKE_TIMEOUT_S: Final = 30.0


class _Transport(asyncio.Protocol):
    def __init__(self, peer: LeanPeer) -> None:
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.peer._transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer._data(data)

    def eof_received(self) -> bool | None:
        self.peer._eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer._lost()


class LeanPeer:
    """One role of one session over one websocket connection.

    ``on_frame`` takes the frames of ``stream_hook`` (the log, at the target) as they arrive; every
    other event waits in order for :meth:`recv`.  Sends are synchronous (journalled, written
    within the window); the ``async`` methods wait for the service's answer.
    """

    def __init__(self, base_url: str, credential: Credential, *, max_message_size: int,
                 on_frame: Callable[[Frame], None] | None = None, stream_hook: Stream = Stream.LOG) -> None:
        if not base_url.startswith("ws://"):
            raise ValueError("the lean peer speaks ws:// only (a load test on loopback)")
        self.credential = credential
        self.role = credential.role
        self.core = ClientState(credential.role, credential.session, max_message_size=max_message_size)
        self._uri = parse_uri(session_url(base_url, credential.session))
        self.ws = ClientProtocol(self._uri, max_size=max_message_size)
        self.on_frame = on_frame
        self.stream_hook = stream_hook
        self.events: deque[Event] = deque()
        self.fatal: ReplayMigrateError | None = None
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._open = False
        self.wire_bytes_sent = 0
        """Bytes of the session messages sent after the attach (as SessionClient counts them)."""
        self.hold = False
        """Leave what the session core has to send (acks) for the next :meth:`flush` instead of
        sending it from the read callback (an experiment: acks coalesced by time)."""

    @property
    def reconnects(self) -> int:
        """Always 0: a lean peer never reconnects, a drop fails it."""
        return 0

    @property
    def duplicates(self) -> int:
        return self.core.duplicates

    @property
    def state(self) -> State | None:
        return self.core.state

    # -- connection
    async def connect(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """TCP, the websocket handshake with the credential, then attach; returns once attached."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            try:
                await loop.create_connection(lambda: _Transport(self), self._uri.host, self._uri.port)
            except OSError as e:
                raise TransportError(f"cannot connect: {type(e).__name__}") from None
            request = self.ws.connect()
            request.headers["Authorization"] = f"Bearer {self.credential}"
            self.ws.send_request(request)
            self._write()
            await self.wait(lambda: self.core.attached)

    async def close(self) -> None:
        """Close the websocket (best effort) and the connection."""
        if self._transport is not None and not self._transport.is_closing():
            if self._open:
                self.ws.send_close(1000)
                self._write()
            self._transport.close()

    # -- sending (journalled at once, transmitted within the window)
    def write_log(self, data: bytes) -> int:
        """(Source) one log frame, now: the generator's hot path, no coroutine."""
        self._check()
        seq = self.core.send_frame(Stream.LOG, data)
        self._flush()
        return seq

    async def send_log(self, data: bytes) -> int:
        return self.write_log(data)

    async def send_diff(self, data: bytes) -> int:
        self._check()
        seq = self.core.send_frame(Stream.S2T if self.role is Role.SOURCE else Stream.T2S, data)
        self._flush()
        return seq

    async def end_log(self) -> int:
        self._check()
        seq = self.core.end_log()
        self._flush()
        return seq

    async def suspend(self) -> None:
        await self._control(self.core.suspend, State.SUSPENDING)

    async def phase(self, phase: Phase) -> None:
        if phase is Phase.DIFFING:
            await self.wait(lambda: state_reached(self.core.state, State.SUSPENDING))
        await self._control(lambda: self.core.phase(phase),
                            State.DIFFING if phase is Phase.DIFFING else State.TRANSFERRING)

    async def verified(self, roots: Mapping[str, bytes]) -> None:
        await self._control(lambda: self.core.verified(roots), State.VERIFIED)

    async def resumed(self) -> None:
        await self._control(self.core.resumed, State.RESUMED)

    async def wait_confirmed(self) -> None:
        await self.wait(lambda: self.core.confirmed)

    async def acknowledge_confirm(self) -> None:
        await self.wait_confirmed()
        self.core.acknowledge_confirm()
        self._flush()
        await self.wait(lambda: self.core.released)

    async def wait_released(self) -> None:
        await self.wait(lambda: self.core.released)

    async def _control(self, apply: Callable[[], None], wanted: State) -> None:
        self._check()
        apply()
        self._flush()
        await self.wait(lambda: state_reached(self.core.state, wanted))

    # -- receiving
    async def recv(self) -> Event:
        """The next event (frames of other streams than ``stream_hook`` included), in order."""
        await self.wait(lambda: bool(self.events))
        ev = self.events.popleft()
        if isinstance(ev, Frame):
            self.core.consumed(ev)
            self._flush()
        return ev

    async def wait(self, done: Callable[[], bool]) -> None:
        while not done():
            self._check()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _check(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    # -- the transport's callbacks
    def _data(self, data: bytes) -> None:
        self.ws.receive_data(data)
        try:
            self._events()
        except ReplayMigrateError as e:
            self._fail(e)
            return
        if self.hold:
            self._write()               # pongs, the close handshake
        else:
            self._flush()
        self._wake()

    def _events(self) -> None:
        for ev in self.ws.events_received():
            if isinstance(ev, Response):
                if self.ws.handshake_exc is not None:
                    raise TransportError(f"handshake refused: HTTP {ev.status_code}")
                self._open = True
                assert self._transport is not None
                attach = self.core.attach_message()
                self.ws.send_binary(attach)
                self.wire_bytes_sent += len(attach)     # as SessionClient counts it
                continue
            if not isinstance(ev, WsFrame):
                continue
            if ev.opcode is Opcode.CLOSE:
                raise TransportError(f"the service closed the connection ({self.ws.close_code})")
            if ev.opcode is Opcode.TEXT:
                raise ProtocolError("the service sent a text frame")
            if ev.opcode is not Opcode.BINARY:
                continue                     # ping (the protocol queued the pong), pong
            for e in self.core.receive(bytes(ev.data)):
                if isinstance(e, Failed):
                    raise SessionFailedError(self.core.session_id, e)
                if isinstance(e, Frame) and e.stream is self.stream_hook and self.on_frame is not None:
                    self.on_frame(e)
                    self.core.consumed(e)
                else:
                    self.events.append(e)

    def flush(self) -> None:
        """Send what the session core has queued (acks held back by :attr:`hold`)."""
        self._flush()

    def _flush(self) -> None:
        if self._open and self.fatal is None:
            for msg in self.core.data_to_send():
                self.ws.send_binary(msg)
                self.wire_bytes_sent += len(msg)
        self._write()

    def _write(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self.ws.data_to_send()
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    def _eof(self) -> None:
        self.ws.receive_eof()
        self._fail(TransportError("the service closed the connection"))

    def _lost(self) -> None:
        self._fail(TransportError("connection lost"))

    def _fail(self, e: ReplayMigrateError) -> None:
        if self.fatal is None:
            self.fatal = e
        if self._transport is not None:
            self._transport.close()
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)
