"""The handoff service over real websockets on 127.0.0.1: credentials (what the shared token can and
cannot do), state errors, cuts and resume, a service that is stopped or SIGKILLed and restarted,
the connection limits and prompt slot release, failure, TLS and the ``serve``
command.  Payloads are opaque bytes."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from replay_migrate.errors import AuthError, LocalProtocolError, TransportError, UsageError
from server.backoff import ReconnectPolicy
from server.client import SessionClient, create_session
from server.clientcore import Frame, LogEnded, SessionFailedError
from server.credentials import KEY_ENV, TOKEN_ENV
from server.keyring import Credential, Keyring
from server.limits import Limits
from server.registry import SessionRegistry
from server.service import ServiceConfig, add_serve_arguments, config_from_args, parse_listen, start_service
from server.wire import Claim, Reason, Role, State, Stream, decode, encode

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-token-5f0c1d2e"
KEY = bytes(range(32))
ROOTS = {"memory": b"\x11" * 32, "disk": b"\x22" * 32}
SMALL = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, max_outgoing_bytes=128 * 1024)
FAST = ReconnectPolicy(max_attempts=50, max_elapsed=10.0, initial_delay=0.01, max_delay=0.2)
REPO = Path(__file__).resolve().parent.parent


def fixed_port() -> int:
    """A free port below the ephemeral range: a restarted service must get its port back, and a
    client reconnecting in a loop could otherwise connect to itself on a freed ephemeral port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(low // 2, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.fail("no free port below the ephemeral range")


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config(limits: Limits = SMALL, **kw: Any) -> ServiceConfig:
    kw.setdefault("port", 0)
    return ServiceConfig(token=TOKEN, key=KEY, host="127.0.0.1", limits=limits, tick_interval=0.05, **kw)


def registry(limits: Limits = SMALL) -> SessionRegistry:
    return SessionRegistry(Keyring(KEY, TOKEN), limits)


def client(url: str, credential: Credential, **kw: Any) -> SessionClient:
    kw.setdefault("reconnect", FAST)
    return SessionClient(url, credential, open_timeout=5.0, max_message_size=SMALL.max_message_size, **kw)


async def cut(c: SessionClient) -> None:
    """Drop the TCP connection abruptly (no close frame), as a network failure would."""
    await until(lambda: c.connection is not None)
    assert c.connection is not None
    c.connection.transport.abort()


async def next_frame(c: SessionClient) -> Frame | LogEnded:
    """The next frame or log end, past state notifications."""
    while True:
        ev = await c.recv(timeout=5)
        if isinstance(ev, Frame | LogEnded):
            return ev


async def both_back(peers: list[SessionClient], before: list[int]) -> None:
    """Until each peer has re-attached once more than ``before``: each outage hits both peers."""
    await until(lambda: all(p.reconnects > n for p, n in zip(peers, before, strict=True)))


class ManualClock:
    """A monotonic clock the test moves: the service's timeouts follow it, not the wall."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the service or a client reaches on its own (a tick, a close, a
    reconnect), polling it: no sleep stands in for the event itself."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def raw(url: str, header: str | None, path: str) -> Any:
    headers = {"Authorization": header} if header is not None else {}
    return connect(f"{url}{path}", additional_headers=headers, compression=None, max_size=None, proxy=None)


async def refusal(url: str, header: str | None, path: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as ei:
        async with raw(url, header, path):
            pass
    return ei.value.response.status_code, bytes(ei.value.response.body)


# ---- credentials: what the shared token can and cannot do -----------------------------------------
def test_the_token_creates_sessions_and_a_session_needs_its_role_credential() -> None:
    async def body() -> None:
        reg = registry()
        async with start_service(config(), registry=reg) as url:
            for header in (None, "Bearer nope", TOKEN, f"Bearer {TOKEN}x", f"Basic {TOKEN}"):
                assert (await refusal(url, header, "/sessions"))[0] == 401
            with pytest.raises(AuthError, match="token"):
                await create_session(url, "wrong")
            src, _tgt = await create_session(url, TOKEN)
            again, _ = await create_session(url, TOKEN)
            assert src.session != again.session and len(reg) == 0      # creating stores nothing
            assert (await refusal(url, f"Bearer {TOKEN}", "/elsewhere"))[0] == 404
            c = client(url, Credential(src.session, Role.SOURCE, bytes(32)))
            with pytest.raises(AuthError, match="credential"):
                await c.connect()
            await c.close()
            s = client(url, src)
            await s.connect()
            assert s.state is State.RECORDING and src.session in reg
            await s.close()
    run(body())


def test_a_token_holder_cannot_attach_resume_or_take_over_a_session_and_learns_nothing() -> None:
    async def body() -> None:
        reg = registry()
        async with start_service(config(), registry=reg) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            sid = src_cred.session
            src, tgt = client(url, src_cred), client(url, tgt_cred)
            await src.connect()
            await tgt.connect()
            await src.send_log(b"user keystrokes 1")
            assert (await next_frame(tgt)) == Frame(Stream.LOG, 1, b"user keystrokes 1")
            await src.send_log(b"user keystrokes 2")       # not acked yet: what a takeover would get
            await src.end_log()
            await src.suspend()
            await src.send_diff(b"a block")

            # the attacker: the shared token, then everything it can make of it
            ours, _ = await create_session(url, TOKEN)      # a session of its own, with its credentials
            forged = [Credential(sid, role, bytes(32)) for role in Role] \
                + [Credential(sid, role, Keyring(bytes(32), TOKEN).secret(sid, role)) for role in Role] \
                + [Credential(sid, Role.TARGET, ours.secret), Credential(sid, Role.SOURCE, tgt_cred.secret)]
            headers = [f"Bearer {TOKEN}", *(f"Bearer {c}" for c in forged)]
            answers = set()
            for header in headers:
                for path in (f"/sessions/{sid}", "/sessions/nosuchsession"):   # exists / does not: same answer
                    answers.add(await refusal(url, header, path))
            assert answers == {(401, b"missing or wrong credential\n")}
            # the token's own connection, the only one it can open, can create and nothing else
            async with raw(url, f"Bearer {TOKEN}", "/sessions") as ws:
                await ws.send(encode("attach", role="target", session=sid, resume_from={"log": 1, "s2t": 1},
                                     resume=True, claim=Claim.initial(Role.TARGET).to_wire()))
                [reply] = [decode(m, 1 << 20) async for m in _all(ws)]
                assert reply["t"] == "error" and reply["reason"] == "not_attached"
            # the rightful holders noticed nothing: no takeover, no reconnect, the stream goes on
            assert src.reconnects == tgt.reconnects == 0
            assert (await next_frame(tgt)) == Frame(Stream.LOG, 2, b"user keystrokes 2")
            assert isinstance(await next_frame(tgt), LogEnded)
            assert (await next_frame(tgt)) == Frame(Stream.S2T, 1, b"a block")
            # ... and the rightful holder can still resume
            await cut(tgt)
            await src.send_diff(b"after the cut")
            assert (await next_frame(tgt)) == Frame(Stream.S2T, 2, b"after the cut")
            assert tgt.reconnects == 1 and tgt.duplicates == 0
            session = reg.lookup(sid)
            assert session is not None and session.state is State.SUSPENDING
            await src.close()
            await tgt.close()
    run(body())


def test_the_credential_holder_takes_over_its_role_from_a_half_dead_connection() -> None:
    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src = client(url, src_cred)
            await src.connect()
            await src.send_log(b"k1")
            attach = encode("attach", role="target", session=src_cred.session, resume_from={"log": 1, "s2t": 1},
                            resume=False, claim=Claim.initial(Role.TARGET).to_wire())
            path = f"/sessions/{src_cred.session}"
            async with raw(url, f"Bearer {tgt_cred}", path) as dead, raw(url, f"Bearer {tgt_cred}", path) as new:
                await dead.send(attach)                    # then it stops reading: half-dead
                assert [decode(await dead.recv(), 1 << 20)["t"] for _ in range(2)] == ["attached", "log"]
                await new.send(encode("attach", role="target", session=src_cred.session,
                                      resume_from={"log": 1, "s2t": 1}, resume=True,
                                      claim=Claim.initial(Role.TARGET).to_wire()))
                got = [decode(await new.recv(), 1 << 20) for _ in range(2)]
                assert [m["t"] for m in got] == ["attached", "log"] and got[1]["data"] == b"k1"
                msgs = [decode(m, 1 << 20) async for m in _all(dead)]
                assert [m.get("reason") for m in msgs] == ["superseded"] and dead.close_code == 4001
            await src.close()
    run(body())


async def _all(ws: ClientConnection) -> Any:
    try:
        while True:
            yield await asyncio.wait_for(ws.recv(), 5)
    except ConnectionClosed:
        return


# ---- a whole exchange, with cuts and restarts -----------------------------------------------------
def _payloads(seed: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    rng = random.Random(seed)
    return ([rng.randbytes(rng.randint(1, 3000)) for _ in range(200)],
            [rng.randbytes(rng.randint(1, 60_000)) for _ in range(60)],
            [rng.randbytes(rng.randint(1, 8_000)) for _ in range(30)])


SOURCE_FIGURES = {"downtime_s": 2.5, "block_bytes": 4096, "replay_s": None, "divergent_blocks": {"memory": 3}}
TARGET_FIGURES = {"downtime_s": None, "block_bytes": 512, "replay_s": 9.75, "verified": True}


async def exchange(src: SessionClient, tgt: SessionClient, log: list[bytes], s2t: list[bytes], t2s: list[bytes],
                   hooks: dict[str, Callable[[], Awaitable[None]]]) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Both peers of a migration's message flow; ``hooks`` run at named points (cuts, restarts)."""
    one_at_a_time = asyncio.Lock()          # a hook in one peer must not overlap one in the other

    async def hook(name: str) -> None:
        if name in hooks:
            async with one_at_a_time:
                await hooks[name]()

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
                await hook("source log")
        await src.end_log()
        await src.suspend()
        reader = asyncio.create_task(read_t2s())
        for i, data in enumerate(s2t):
            await src.send_diff(data)
            if i == 30:
                await hook("source blocks")
        await reader
        await src.wait_confirmed()
        # each side's figures for the other (issue 12 item 5): the target's came after its resumed
        assert await src.wait_peer_report(10) == TARGET_FIGURES
        await src.report(SOURCE_FIGURES)
        await src.acknowledge_confirm()
        return got

    async def target_side() -> tuple[list[bytes], list[bytes]]:
        got_log: list[bytes] = []
        got_s2t: list[bytes] = []
        while True:
            ev = await tgt.recv()
            if isinstance(ev, Frame):
                assert ev.stream is Stream.LOG   # no diff message overtakes log_end
                got_log.append(ev.data)
                await tgt.replayed(ev.seq)      # replayed at once; the client throttles
                if len(got_log) == 120:
                    await hook("target log")
            elif isinstance(ev, LogEnded):
                break
        await tgt.phase("diffing")

        async def read_s2t() -> None:
            while len(got_s2t) < len(s2t):
                ev = await tgt.recv()
                if isinstance(ev, Frame):
                    got_s2t.append(ev.data)
                    if len(got_s2t) == 20:
                        await hook("target blocks")
        reader = asyncio.create_task(read_s2t())
        for data in t2s:
            await tgt.send_diff(data)
        await tgt.phase("transferring")
        await reader
        await tgt.verified(ROOTS)
        await tgt.resumed()
        await tgt.report(TARGET_FIGURES)
        await tgt.wait_released()
        assert tgt.peer_report == SOURCE_FIGURES        # relayed before released
        return got_log, got_s2t

    got_t2s, (got_log, got_s2t) = await asyncio.gather(source_side(), target_side())
    return got_log, got_s2t, got_t2s


def test_migration_survives_cuts_in_the_log_and_in_the_blocks() -> None:
    log, s2t, t2s = _payloads(7)

    async def body() -> None:
        reg = registry()
        async with start_service(config(), registry=reg) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src, tgt = client(url, src_cred), client(url, tgt_cred)
            await src.connect()
            await tgt.connect()
            hooks: dict[str, Callable[[], Awaitable[None]]] = {
                "source log": lambda: cut(src), "source blocks": lambda: cut(src),
                "target log": lambda: cut(tgt), "target blocks": lambda: cut(tgt)}
            got = await exchange(src, tgt, log, s2t, t2s, hooks)
            assert got == (log, s2t, t2s)                  # each exactly once, in order
            assert src.duplicates == tgt.duplicates == 0   # the service re-sent nothing twice
            assert src.reconnects >= 2 and tgt.reconnects >= 2
            assert src.confirmed and src.roots == ROOTS
            assert src.peer_replayed == len(log)           # the last one told reached the source
            session = reg.lookup(src_cred.session)
            assert session is not None and session.state is State.RESUMED
            await src.close()
            await tgt.close()
    run(body(), timeout=45)


def test_migration_survives_the_service_stopping_and_a_new_one_with_the_key() -> None:
    log, s2t, t2s = _payloads(11)

    async def body() -> None:
        port = fixed_port()
        instances: list[SessionRegistry] = []
        stop = asyncio.Event()
        up = asyncio.Event()

        async def serve_forever() -> None:
            while True:
                reg = registry()
                instances.append(reg)
                async with start_service(config(port=port), registry=reg):
                    up.set()
                    await stop.wait()
                stop.clear()

        peers: list[SessionClient] = []

        async def restart() -> None:
            before = [p.reconnects for p in peers]
            up.clear()
            stop.set()                                    # every connection of this instance goes
            await up.wait()
            await both_back(peers, before)

        server = asyncio.create_task(serve_forever())
        await up.wait()
        url = f"ws://127.0.0.1:{port}"
        src_cred, tgt_cred = await create_session(url, TOKEN)
        src, tgt = client(url, src_cred), client(url, tgt_cred)
        peers.extend((src, tgt))
        await src.connect()
        await tgt.connect()
        got = await exchange(src, tgt, log, s2t, t2s, {"source log": restart, "target blocks": restart})
        assert got == (log, s2t, t2s) and src.duplicates == tgt.duplicates == 0
        assert len(instances) == 3 and src.reconnects >= 2 and tgt.reconnects >= 2
        last = instances[-1].lookup(src_cred.session)
        assert last is not None and last.state is State.RESUMED and last.restored
        await src.close()
        await tgt.close()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
    run(body(), timeout=45)


def test_serve_killed_with_sigkill_and_restarted_loses_nothing(tmp_path: Path) -> None:
    """``replay-migrate serve`` as a process, SIGKILLed during the log and during the blocks, and
    started again on the same port with the same key file."""
    log, s2t, t2s = _payloads(13)
    key_file = tmp_path / "service.key"
    procs: list[subprocess.Popen[str]] = []

    def start(port: int) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "server.service", "--listen", f"127.0.0.1:{port}",
                                 "--key-file", str(key_file)], cwd=REPO, env={**os.environ, TOKEN_ENV: TOKEN},
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on ws://127.0.0.1:"), line
        return line.split()[-1]

    try:
        port = fixed_port()
        url = start(port)

        peers: list[SessionClient] = []

        async def kill_and_restart() -> None:
            before = [p.reconnects for p in peers]
            procs[-1].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[-1].wait, 10)
            assert procs[-1].returncode == -signal.SIGKILL
            await asyncio.to_thread(start, port)
            await both_back(peers, before)

        async def body() -> None:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src, tgt = client(url, src_cred), client(url, tgt_cred)
            peers.extend((src, tgt))
            await src.connect()
            await tgt.connect()
            got = await exchange(src, tgt, log, s2t, t2s,
                                 {"target log": kill_and_restart, "source blocks": kill_and_restart})
            assert got == (log, s2t, t2s) and src.duplicates == tgt.duplicates == 0
            assert src.reconnects >= 2 and tgt.reconnects >= 2 and src.confirmed
            await src.close()
            await tgt.close()
        run(body(), timeout=50)
        assert len(procs) == 3 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


# ---- state errors, limits, failure ----------------------------------------------------------------
def test_message_in_the_wrong_state_fails_the_session_for_both() -> None:
    async def body() -> None:
        reg = registry()
        async with start_service(config(), registry=reg) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src, tgt = client(url, src_cred), client(url, tgt_cred)
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
            await src.close()
            await tgt.close()
    run(body())


def test_oversized_message_is_closed_with_1009() -> None:
    async def body() -> None:
        async with start_service(config()) as url:
            src_cred, _ = await create_session(url, TOKEN)
            async with raw(url, f"Bearer {src_cred}", f"/sessions/{src_cred.session}") as ws:
                await ws.send(encode("attach", role="source", session=src_cred.session, resume_from={"t2s": 1},
                                     resume=False, claim=Claim.initial(Role.SOURCE).to_wire()))
                reply = await ws.recv()
                assert isinstance(reply, bytes) and decode(reply, 1 << 20)["t"] == "attached"
                await ws.send(encode("log", seq=1, data=b"x" * SMALL.max_message_size))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1009
            other, _ = await create_session(url, TOKEN)
            c = client(url, other)
            await c.connect()
            with pytest.raises(LocalProtocolError, match="split it"):   # the client refuses before sending
                await c.send_log(b"x" * SMALL.max_message_size)
            await c.close()
    run(body())


def test_connections_beyond_the_limits_are_refused_until_one_closes() -> None:
    limits = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, max_outgoing_bytes=128 * 1024,
                    max_connections=3, max_connections_per_address=2)

    async def body() -> None:
        async with start_service(config(limits)) as url:
            creds = [await create_session(url, TOKEN) for _ in range(3)]
            conns = [raw(url, f"Bearer {c[0]}", f"/sessions/{c[0].session}") for c in creds]
            first = await conns[0].__aenter__()
            second = await conns[1].__aenter__()
            status, body = await refusal(url, f"Bearer {creds[2][0]}", f"/sessions/{creds[2][0].session}")
            assert (status, body) == (503, b"too many connections\n")
            with pytest.raises(TransportError, match="cannot create a session now"):
                await create_session(url, TOKEN)            # creation counts too
            await first.close()
            await conns[0].__aexit__(None, None, None)
            async with raw(url, f"Bearer {creds[2][0]}", f"/sessions/{creds[2][0].session}"):
                pass                                        # room again
            await second.close()
            await conns[1].__aexit__(None, None, None)
    run(body())


def test_a_session_slot_is_released_as_soon_as_both_peers_leave() -> None:
    limits = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, max_outgoing_bytes=128 * 1024,
                    max_sessions=1)

    async def body() -> None:
        reg = registry(limits)
        async with start_service(config(limits), registry=reg) as url:
            a_src, a_tgt = await create_session(url, TOKEN)
            b_src, _ = await create_session(url, TOKEN)
            a1, a2 = client(url, a_src), client(url, a_tgt)
            await a1.connect()
            await a2.connect()
            await a1.send_log(b"x")
            b = client(url, b_src)
            with pytest.raises(SessionFailedError) as ei:
                await b.connect()                           # all slots held
            assert ei.value.reason is Reason.SESSION_LIMIT
            await b.close()
            await a1.close()
            await a2.close()
            await until(lambda: len(reg) == 0)              # no 120 s hold: gone with its peers
            b = client(url, b_src)
            await b.connect()
            assert b_src.session in reg
            a1 = client(url, a_src)                         # a's source comes back: the other session holds the slot
            with pytest.raises(SessionFailedError):
                await a1.connect()
            await a1.close()
            await b.close()
    run(body())


@pytest.mark.parametrize("how", ["target vanishes", "target aborts"])
def test_session_that_cannot_finish_fails_and_the_source_keeps_its_vm(how: str) -> None:
    async def body() -> None:
        limits = Limits(max_message_size=64 * 1024, max_buffered_bytes=256 * 1024, max_outgoing_bytes=128 * 1024)
        clock = ManualClock()                             # the session's idle_timeout runs on it
        reg = registry(limits)
        async with start_service(config(limits), registry=reg, clock=clock) as url:
            src_cred, tgt_cred = await create_session(url, TOKEN)
            src, tgt = client(url, src_cred), client(url, tgt_cred)
            await src.connect()
            await tgt.connect()
            await src.send_log(b"opaque")
            await src.end_log()
            await src.suspend()
            if how == "target vanishes":
                await tgt.close()
                session = reg.lookup(src_cred.session)
                assert session is not None
                await until(lambda: not session.attached(Role.TARGET))   # it left at clock.now
                clock.now += limits.idle_timeout                          # (120 s, none of them waited)
                expected = Reason.IDLE_TIMEOUT
            else:
                await tgt.abort("verify_failed")
                expected = Reason.VERIFY_FAILED
            with pytest.raises(SessionFailedError) as ei:
                await src.wait_confirmed(timeout=10)
            assert ei.value.reason is expected and ei.value.keep_vm and not src.confirmed
            await src.close()
            await tgt.close()
    run(body())


# ---- TLS, the command ---------------------------------------------------------------------------
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
            with pytest.raises(TransportError, match="TLS verification"):
                await create_session(url, TOKEN)            # system CAs do not know our certificate
            src_cred, tgt_cred = await create_session(url, TOKEN, cafile=cert)
            src, tgt = client(url, src_cred, cafile=cert), client(url, tgt_cred, cafile=cert)
            await src.connect()
            await tgt.connect()
            await src.send_log(b"over tls")
            ev = await tgt.recv(timeout=5)
            while not isinstance(ev, Frame):
                ev = await tgt.recv(timeout=5)
            assert ev.data == b"over tls"
            await src.close()
            await tgt.close()
            untrusting = client(url, src_cred)
            with pytest.raises(TransportError, match="TLS verification"):
                await untrusting.connect()
            await untrusting.close()
    run(body())
    with pytest.raises(UsageError, match="CA file"):
        SessionClient("ws://127.0.0.1:1", Keyring(KEY, TOKEN).credential("x", Role.SOURCE), cafile=cert)
    with pytest.raises(UsageError, match="CA file"):
        SessionClient("wss://127.0.0.1:1", Keyring(KEY, TOKEN).credential("x", Role.SOURCE),
                      cafile=tmp_path / "missing.pem")


def test_serve_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert parse_listen("[::1]:9000") == ("::1", 9000) and parse_listen(":7") == ("127.0.0.1", 7)
    with pytest.raises(UsageError):
        parse_listen("nohost")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    key_file = tmp_path / "k"
    with pytest.raises(UsageError, match="token"):
        config_from_args(p.parse_args(["--listen", "127.0.0.1:0", "--key-file", str(key_file)]))
    monkeypatch.setenv(TOKEN_ENV, "t")
    with pytest.raises(UsageError, match="go together"):
        config_from_args(p.parse_args(["--tls-cert", "c.pem", "--key-file", str(key_file)]))
    cfg = config_from_args(p.parse_args(["--listen", "127.0.0.1:0", "--idle-timeout", "5", "--key-file", str(key_file),
                                         "--max-connections", "10", "--max-connections-per-address", "3"]))
    assert cfg.port == 0 and cfg.limits.idle_timeout == 5.0 and cfg.limits.max_connections == 10
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and cfg.key == bytes.fromhex(key_file.read_text())
    assert config_from_args(p.parse_args(["--key-file", str(key_file)])).key == cfg.key     # the same key again
    with pytest.raises(UsageError, match="memory_budget"):
        config_from_args(p.parse_args(["--key-file", str(key_file), "--max-sessions", "100"]))
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    token_file.chmod(0o644)
    with pytest.raises(UsageError, match="readable by others"):
        config_from_args(p.parse_args(["--key-file", str(key_file), "--token-file", str(token_file)]))
    token_file.chmod(0o600)
    assert config_from_args(p.parse_args(["--key-file", str(key_file), "--token-file", str(token_file)])).token \
        == "from-a-file"
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert config_from_args(p.parse_args([])).key == b"\xab" * 32
    monkeypatch.setenv(KEY_ENV, "ab" * 8)
    with pytest.raises(UsageError, match="at least 32 bytes"):
        config_from_args(p.parse_args([]))


def test_serve_command_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, TOKEN_ENV: TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "server.service", "--listen", "127.0.0.1:0", "--key-file",
                             str(tmp_path / "key")], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on ws://127.0.0.1:"), line
        url = line.split()[-1]

        async def body() -> None:
            src_cred, _ = await create_session(url, TOKEN)
            c = SessionClient(url, src_cred, reconnect=FAST)
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
