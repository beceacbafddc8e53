"""The asyncio session client (server/client.py) over real websockets on 127.0.0.1: its arguments,
its reconnect budget against a service that went away.  (Whole exchanges through the service, cuts,
restarts and TLS: tests/test_service.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from replay_migrate.errors import TransportError, UsageError
from server.backoff import ReconnectPolicy
from server.client import SessionClient, create_session, session_url
from server.clientcore import Frame
from server.keyring import Keyring
from server.limits import Limits
from server.service import ServiceConfig, start_service
from server.wire import Role

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-token-5f0c1d2e"
KEY = bytes(range(32))
SMALL = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, max_outgoing_bytes=128 * 1024)
FAST = ReconnectPolicy(max_attempts=50, max_elapsed=10.0, initial_delay=0.01, max_delay=0.2)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config() -> ServiceConfig:
    return ServiceConfig(token=TOKEN, key=KEY, host="127.0.0.1", port=0, limits=SMALL, tick_interval=0.05)


def client(url: str, credential: Any, **kw: Any) -> SessionClient:
    kw.setdefault("reconnect", FAST)
    return SessionClient(url, credential, open_timeout=5.0, max_message_size=SMALL.max_message_size, **kw)


def test_reconnect_gives_up_within_its_budget() -> None:
    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, _ = await create_session(url, TOKEN)
            c = client(url, src_cred, reconnect=ReconnectPolicy(max_attempts=4, max_elapsed=1.0,
                                                                initial_delay=0.05, max_delay=0.2))
            await c.connect()
        # the service is gone: the client retries, then gives up
        with pytest.raises(TransportError, match="could not get back"):
            await c.wait_confirmed(timeout=10)
        await c.close()
    run(body())


def test_client_arguments() -> None:
    cred = Keyring(KEY, TOKEN).credential("abc", Role.TARGET)
    c = SessionClient("ws://127.0.0.1:1/", str(cred))
    assert c.url == "ws://127.0.0.1:1/sessions/abc" and c.role is Role.TARGET
    for bad in ("http://h:1", "ws://h:1/sessions/abc", "ws://:1", "ws://h:1?x"):
        with pytest.raises(UsageError, match="service URL"):
            SessionClient(bad, cred)
    with pytest.raises(UsageError, match="credential"):
        SessionClient("ws://h:1", "rm1.abc.target.short")
    assert session_url("ws://h:1/", "abc") == "ws://h:1/sessions/abc"


def test_the_reconnect_budget_runs_on_the_clock_it_is_given() -> None:
    readings: list[float] = []

    def clock() -> float:
        """Four seconds pass between two looks (no test waits them)."""
        readings.append(4.0 * len(readings))
        return readings[-1]

    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, _ = await create_session(url, TOKEN)
            c = client(url, src_cred, clock=clock, reconnect=ReconnectPolicy(
                max_attempts=1000, max_elapsed=10.0, initial_delay=0.01, max_delay=0.05))
            await c.connect()
        # the service is gone: attempts at 0, 4 and 8 s of the client's clock, and at 12 s it gives up
        with pytest.raises(TransportError, match=r"within 3 attempts / 12\.0 s"):
            await c.wait_confirmed(timeout=10)
        await c.close()
    run(body())


def test_wire_detail_accounts_every_byte_of_the_connection() -> None:
    """A source that sends log frames, reads the target's replay progress and exchanges diff
    messages: its bytes by kind add up to all it sent and received, and the payloads are exact."""
    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src, tgt = client(url, src_cred), client(url, tgt_cred)
            await src.connect()
            await tgt.connect()
            for k in range(5):
                await src.send_log(bytes([k]) * (100 + k))
            seen = 0
            while seen < 5:
                ev = await tgt.recv(5)
                if isinstance(ev, Frame):
                    seen += 1
                    await tgt.replayed(ev.seq)
            await src.end_log()
            await src.suspend()
            await tgt.send_diff(b"d" * 300)
            while not isinstance(await src.recv(5), Frame):
                pass
            await src.send_diff(b"e" * 200)
            while not isinstance(await tgt.recv(5), Frame):
                pass
            await src.drain(5)
            await src.close()
            await tgt.close()
            detail = src.wire_detail()
            assert sum(detail.values()) == src.wire_bytes_sent + src.wire_bytes_received
            assert detail["log_data"] == sum(100 + k for k in range(5))
            assert detail["diff_data"] == 500
            assert detail["log_envelopes"] > 0 and detail["diff_envelopes"] > 0
            assert detail["acks"] > 0 and detail["replayed"] > 0 and detail["control"] > 0
    run(body())
