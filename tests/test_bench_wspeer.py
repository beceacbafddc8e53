"""The load generator's lean peer against the real service on 127.0.0.1: a whole migration's
message flow, the same session messages on the wire as SessionClient's, a refused credential, a
service that goes away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.wspeer import LeanPeer
from replay_migrate.errors import TransportError
from server.client import SessionClient, create_session
from server.clientcore import Frame, LogEnded
from server.keyring import Credential, Keyring
from server.service import ServiceConfig, start_service
from server.wire import Phase, Role, State, Stream

pytestmark = pytest.mark.timeout(60)

TOKEN = "wspeer-token"
KEY = bytes(range(32))
ROOTS = {"memory": b"\x11" * 32}
MAX = 2 * 1024 * 1024


def run(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config() -> ServiceConfig:
    return ServiceConfig(token=TOKEN, key=KEY, port=0, tick_interval=0.05)


async def _frame(p: LeanPeer, stream: Stream) -> bytes:
    while True:
        ev = await p.recv()
        if isinstance(ev, Frame):
            assert ev.stream is stream
            return ev.data


def test_a_migration_between_two_lean_peers() -> None:
    log = [bytes([i]) * (30 + i) for i in range(50)]
    blocks = [bytes([i]) * 300_000 for i in range(3)]

    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            got: list[bytes] = []
            src = LeanPeer(url, src_cred, max_message_size=MAX)
            tgt = LeanPeer(url, tgt_cred, max_message_size=MAX, on_frame=lambda f: got.append(f.data))
            await src.connect()
            await tgt.connect()
            for data in log:
                src.write_log(data)
            await src.end_log()
            await src.suspend()
            ev = await tgt.recv()
            while not isinstance(ev, LogEnded):          # the log went to on_frame, not here
                assert not isinstance(ev, Frame)
                ev = await tgt.recv()
            assert got == log and ev.seq == len(log)
            await tgt.phase(Phase.DIFFING)
            await tgt.send_diff(b"hello")
            assert await _frame(src, Stream.T2S) == b"hello"
            for b in blocks:
                await src.send_diff(b)
            await tgt.phase(Phase.TRANSFERRING)
            assert [await _frame(tgt, Stream.S2T) for _ in blocks] == blocks
            await tgt.verified(ROOTS)
            await tgt.resumed()
            await src.acknowledge_confirm()
            await tgt.wait_released()
            assert src.state is State.RESUMED and src.duplicates == tgt.duplicates == 0
            await src.close()
            await tgt.close()
    run(body())


def test_the_lean_peer_puts_the_same_session_messages_on_the_wire_as_session_client() -> None:
    """One frame at a time, each acked before the next: both kinds of peers send the same bytes
    (frames from the source, one ack per frame from the target), so the service sees one load."""
    log = [bytes([i]) * (20 + i) for i in range(20)]

    async def lean(url: str, src_cred: Credential, tgt_cred: Credential) -> tuple[int, int]:
        got: list[bytes] = []
        src = LeanPeer(url, src_cred, max_message_size=MAX)
        tgt = LeanPeer(url, tgt_cred, max_message_size=MAX, on_frame=lambda f: got.append(f.data))
        await src.connect()
        await tgt.connect()
        for data in log:
            src.write_log(data)
            await src.wait(src.core.all_acked)
        assert got == log
        await src.close()
        await tgt.close()
        return src.wire_bytes_sent, tgt.wire_bytes_sent

    async def client(url: str, src_cred: Credential, tgt_cred: Credential) -> tuple[int, int]:
        src, tgt = SessionClient(url, src_cred), SessionClient(url, tgt_cred)
        await src.connect()
        await tgt.connect()
        for data in log:
            await src.send_log(data)
            ev = await tgt.recv(timeout=5)
            while not isinstance(ev, Frame):
                ev = await tgt.recv(timeout=5)
            assert ev.data == data
            await src.drain(timeout=5)
        await src.close()
        await tgt.close()
        return src.wire_bytes_sent, tgt.wire_bytes_sent

    async def body() -> None:
        async with start_service(config()) as url:
            a = await lean(url, *await create_session(url, TOKEN))
            b = await client(url, *await create_session(url, TOKEN))
            assert a == b and a[1] > 0
    run(body())


def test_a_refused_credential_and_a_service_that_goes_away_fail_the_lean_peer() -> None:
    async def body() -> None:
        async with start_service(config()) as url:
            forged = Keyring(bytes(32), TOKEN).credential("nosuchsession", Role.SOURCE)
            with pytest.raises(TransportError, match="HTTP 401"):
                await LeanPeer(url, forged, max_message_size=MAX).connect()
            src_cred, _ = await create_session(url, TOKEN)
            src = LeanPeer(url, src_cred, max_message_size=MAX)
            await src.connect()
        with pytest.raises(TransportError):         # no reconnect: the load test counts the drop
            while True:
                await src.recv()                    # its last events, then the error
        with pytest.raises(TransportError):
            src.write_log(b"after")
        with pytest.raises(ValueError, match="ws://"):
            LeanPeer("wss://127.0.0.1:1", src_cred, max_message_size=MAX)
    run(body())
