"""The handoff service over real websockets on 127.0.0.1: auth, state errors, cuts and resume,
limits, failure, TLS, the reconnect budget and the ``serve`` command.  Payloads are opaque bytes."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from replay_migrate.errors import AuthError, ProtocolError, TransportError, UsageError
from server.client import Frame, LogEnded, ReconnectPolicy, SessionClient, SessionFailedError, session_url
from server.service import ServiceConfig, add_serve_arguments, config_from_args, parse_listen, start_service
from server.session import TOKEN_ENV, Limits, Reason, SessionRegistry, State, Stream, decode, encode

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-token-5f0c1d2e"
SID = "mig-ws"
ROOTS = {"memory": b"\x11" * 32, "disk": b"\x22" * 32}
SMALL = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024)
FAST = ReconnectPolicy(max_attempts=50, max_elapsed=10.0, initial_delay=0.01, max_delay=0.2)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config(limits: Limits = SMALL, **kw: Any) -> ServiceConfig:
    return ServiceConfig(token=TOKEN, host="127.0.0.1", port=0, limits=limits, tick_interval=0.05, **kw)


def client(url: str, role: str, **kw: Any) -> SessionClient:
    kw.setdefault("reconnect", FAST)
    return SessionClient(session_url(url, SID), role, token=TOKEN, open_timeout=5.0,
                         max_message_size=SMALL.max_message_size, **kw)


async def cut(c: SessionClient) -> None:
    """Drop the TCP connection abruptly (no close frame), as a network failure would."""
    while c.connection is None:
        await asyncio.sleep(0.005)
    c.connection.transport.abort()


def test_bad_or_missing_token_is_401_and_creates_nothing() -> None:
    async def body() -> None:
        reg = SessionRegistry(SMALL)
        async with start_service(config(), registry=reg) as url:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN},
                            {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
                with pytest.raises(InvalidStatus) as ei:
                    async with connect(session_url(url, SID), additional_headers=headers, proxy=None):
                        pass
                assert ei.value.response.status_code == 401
            c = SessionClient(session_url(url, SID), "source", token="wrong", reconnect=FAST)
            with pytest.raises(AuthError):
                await c.connect()
            await c.close()
            with pytest.raises(InvalidStatus) as ei:      # right token, not a session path
                async with connect(f"{url}/elsewhere", additional_headers={"Authorization": f"Bearer {TOKEN}"},
                                   proxy=None):
                    pass
            assert ei.value.response.status_code == 404
            assert len(reg) == 0
    run(body())


def test_migration_survives_cuts_in_the_log_and_in_the_blocks() -> None:
    rng = random.Random(7)
    log = [rng.randbytes(rng.randint(1, 3000)) for _ in range(200)]
    s2t = [rng.randbytes(rng.randint(1, 60_000)) for _ in range(60)]
    t2s = [rng.randbytes(rng.randint(1, 8_000)) for _ in range(30)]

    async def body() -> None:
        reg = SessionRegistry(SMALL)
        async with start_service(config(), registry=reg) as url:
            src, tgt = client(url, "source"), client(url, "target")
            await src.connect()
            await tgt.connect()

            async def source_side() -> list[bytes]:
                got: list[bytes] = []

                async def read_t2s() -> None:
                    while len(got) < len(t2s):
                        ev = await src.recv()
                        if isinstance(ev, Frame):
                            got.append(ev.data)
                for i, data in enumerate(log):
                    await src.send_log(data)
                    if i == 80:
                        await cut(src)                   # sender cut in the middle of the log
                await src.end_log()
                await src.suspend()
                reader = asyncio.create_task(read_t2s())
                for i, data in enumerate(s2t):
                    await src.send_diff(data)
                    if i == 30:
                        await cut(src)                   # sender cut in the middle of the blocks
                await reader
                await src.wait_confirmed()
                return got

            async def target_side() -> tuple[list[bytes], list[bytes]]:
                got_log: list[bytes] = []
                got_s2t: list[bytes] = []
                while True:
                    ev = await tgt.recv()
                    if isinstance(ev, Frame):
                        assert ev.stream is Stream.LOG   # no diff message overtakes log_end
                        got_log.append(ev.data)
                        if len(got_log) == 120:
                            await cut(tgt)               # receiver cut in the middle of the log
                    elif isinstance(ev, LogEnded):
                        break
                await tgt.phase("diffing")

                async def read_s2t() -> None:
                    while len(got_s2t) < len(s2t):
                        ev = await tgt.recv()
                        if isinstance(ev, Frame):
                            got_s2t.append(ev.data)
                            if len(got_s2t) == 20:
                                await cut(tgt)           # receiver cut in the middle of the blocks
                reader = asyncio.create_task(read_s2t())
                for data in t2s:
                    await tgt.send_diff(data)
                await tgt.phase("transferring")
                await reader
                await tgt.verified(ROOTS)
                await tgt.resumed()
                return got_log, got_s2t

            got_t2s, (got_log, got_s2t) = await asyncio.gather(source_side(), target_side())
            assert got_log == log and got_s2t == s2t and got_t2s == t2s      # each exactly once, in order
            assert src.duplicates == tgt.duplicates == 0                    # the service re-sent nothing twice
            assert src.reconnects >= 2 and tgt.reconnects >= 2
            assert src.confirmed and src.roots == ROOTS
            session = reg.lookup(SID)
            assert session is not None and session.state is State.RESUMED
            await src.close()
            await tgt.close()
    run(body(), timeout=45)


def test_message_in_the_wrong_state_fails_the_session_for_both() -> None:
    async def body() -> None:
        reg = SessionRegistry(SMALL)
        async with start_service(config(), registry=reg) as url:
            src, tgt = client(url, "source"), client(url, "target")
            await src.connect()
            await tgt.connect()
            await src.send_log(b"opaque")
            with pytest.raises(SessionFailedError) as te:
                await tgt.resumed()                       # RECORDING: resumed is not allowed
            assert te.value.reason is Reason.WRONG_STATE and not te.value.keep_vm
            with pytest.raises(SessionFailedError) as se:
                while True:
                    await src.recv(timeout=5)
            assert se.value.reason is Reason.WRONG_STATE and se.value.keep_vm
            assert "must stay intact" in str(se.value)
            session = reg.lookup(SID)
            assert session is not None and session.state is State.FAILED
            await src.close()
            await tgt.close()
    run(body())


def test_oversized_message_is_closed_with_1009() -> None:
    async def body() -> None:
        reg = SessionRegistry(SMALL)
        async with start_service(config(), registry=reg) as url:
            async with connect(session_url(url, SID), additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               compression=None, max_size=None, proxy=None) as ws:
                await ws.send(encode("attach", role="source", session=SID, resume_from={"t2s": 1}, resume=False))
                reply = await ws.recv()
                assert isinstance(reply, bytes) and decode(reply, 1 << 20)["t"] == "attached"
                await ws.send(encode("log", seq=1, data=b"x" * SMALL.max_message_size))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1009
            c = client(url, "source")
            await c.connect()
            with pytest.raises(ProtocolError, match="split it"):   # the client refuses before sending
                await c.send_log(b"x" * SMALL.max_message_size)
            await c.close()
    run(body())


@pytest.mark.parametrize("how", ["target vanishes", "target aborts"])
def test_session_that_cannot_finish_fails_and_the_source_keeps_its_vm(how: str) -> None:
    async def body() -> None:
        reg = SessionRegistry(Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, idle_timeout=0.5))
        async with start_service(config(reg.limits), registry=reg) as url:
            src, tgt = client(url, "source"), client(url, "target")
            await src.connect()
            await tgt.connect()
            await src.send_log(b"opaque")
            await src.end_log()
            await src.suspend()
            if how == "target vanishes":
                await tgt.close()
                expected = Reason.IDLE_TIMEOUT
            else:
                await tgt.abort("verify_failed")
                expected = Reason.VERIFY_FAILED
            with pytest.raises(SessionFailedError) as ei:
                await src.wait_confirmed(timeout=10)
            assert ei.value.reason is expected and ei.value.keep_vm and not src.confirmed
            session = reg.lookup(SID)
            assert session is not None and session.state is State.FAILED
            await src.close()
            await tgt.close()
    run(body())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    # `cryptography` is not installed here, so openssl(1) makes the certificate
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs openssl (or the cryptography package): neither is installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)

    async def body() -> None:
        async with start_service(config(tls_cert=cert, tls_key=key)) as url:
            assert url.startswith("wss://127.0.0.1:")
            src, tgt = client(url, "source", cafile=cert), client(url, "target", cafile=cert)
            await src.connect()
            await tgt.connect()
            await src.send_log(b"over tls")
            ev = await tgt.recv(timeout=5)
            while not isinstance(ev, Frame):
                ev = await tgt.recv(timeout=5)
            assert ev.data == b"over tls"
            await src.close()
            await tgt.close()
            untrusting = client(url, "source")           # system CAs do not know our certificate
            with pytest.raises(TransportError, match="TLS verification"):
                await untrusting.connect()
            await untrusting.close()
    run(body())


def test_reconnect_gives_up_within_its_budget() -> None:
    async def body() -> None:
        async with start_service(config()) as url:
            c = client(url, "source", reconnect=ReconnectPolicy(max_attempts=4, max_elapsed=1.0,
                                                                initial_delay=0.05, max_delay=0.2))
            await c.connect()
        # the service is gone: the client retries, then gives up
        with pytest.raises(TransportError, match="could not get back"):
            await c.wait_confirmed(timeout=10)
        await c.close()
    run(body())


def test_serve_arguments() -> None:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert parse_listen("[::1]:9000") == ("::1", 9000) and parse_listen(":7") == ("127.0.0.1", 7)
    with pytest.raises(UsageError):
        parse_listen("nohost")
    os.environ.pop(TOKEN_ENV, None)
    with pytest.raises(UsageError, match="token"):
        config_from_args(p.parse_args(["--listen", "127.0.0.1:0"]))
    with pytest.raises(UsageError, match="go together"):
        config_from_args(p.parse_args(["--token", "t", "--tls-cert", "c.pem"]))
    cfg = config_from_args(p.parse_args(["--token", "t", "--listen", "127.0.0.1:0", "--idle-timeout", "5"]))
    assert cfg.port == 0 and cfg.limits.idle_timeout == 5.0


def test_serve_command_runs_and_stops_on_sigterm() -> None:
    env = {**os.environ, TOKEN_ENV: TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "server.service", "--listen", "127.0.0.1:0"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on ws://127.0.0.1:"), line
        url = line.split()[-1]

        async def body() -> None:
            c = SessionClient(session_url(url, SID), "source", token=TOKEN, reconnect=FAST)
            await c.connect()
            assert c.state is State.RECORDING
            await c.close()
        run(body())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
