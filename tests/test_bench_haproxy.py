"""Two ``replay-migrate serve`` processes with one key file behind a real HAProxy (the shipped
``bench/haproxy.cfg``: TLS ends at the proxy, sessions routed by their path): a migration's peers
over real websockets, the instance holding their session SIGKILLed while the log streams, and the
session completes on the other instance with every frame and byte exactly once.  The killed
instance then comes back, and a peer that reconnects still goes where its session lives."""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.haproxy import CONFIG, SERVERS, HAProxy, Instance, fixed_port, haproxy_binary, proxy_env
from bench.loadgen import ACK_BYTES, END_BYTES, ROOTS, WALK_S2T, WALK_T2S
from server.backoff import ReconnectPolicy
from server.client import SessionClient, create_session
from server.clientcore import Frame, LogEnded
from server.credentials import write_secret_file
from server.keyring import MIN_KEY_BYTES
from server.wire import Phase, State, Stream

pytestmark = pytest.mark.timeout(90)

TOKEN = "haproxy-test-token-7d1e"
FAST = ReconnectPolicy(max_attempts=200, max_elapsed=30.0, initial_delay=0.02, max_delay=0.25)
LOG_FRAMES = 150
KILL_AT = 60                # the target has taken this many log frames when the holder dies
PAUSE_AT = 75               # the source sends the rest only once the holder is dead
BLOCKS = 4
BATCH = 256 * 1024


def _pem(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the peers' CA file) and HAProxy's PEM (cert + key)."""
    cert, key = tmp / "proxy.crt", tmp / "proxy.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    pem = tmp / "proxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    return cert, pem


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.ca, pem = _pem(tmp)
        key_file = tmp / "service.key"
        write_secret_file(key_file, secrets.token_hex(MIN_KEY_BYTES), "service key")     # one key, both
        # behind the proxy every connection comes from 127.0.0.1: the per-address cap is the proxy's
        self.instances = {name: Instance(fixed_port(), key_file, TOKEN, tmp / f"{name}.log",
                                         extra=["--max-connections-per-address", "24"]) for name in SERVERS}
        for inst in self.instances.values():
            inst.start()
        self.port = fixed_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.proxy = HAProxy(bind=f"127.0.0.1:{self.port}", pem=pem, admin=tmp / "admin.sock", log=tmp / "haproxy.log",
                             services=[i.address for i in self.instances.values()])
        self.proxy.wait_states(dict.fromkeys(SERVERS, "UP"))

    def stop(self) -> None:
        self.proxy.stop()
        for inst in self.instances.values():
            inst.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for something another process does (a log line, a health check), polling."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def _next_frame(c: SessionClient, stream: Stream) -> bytes:
    while True:
        ev = await c.recv(timeout=30)
        if isinstance(ev, Frame):
            assert ev.stream is stream, (ev.stream, ev.seq)
            return ev.data


def test_a_session_completes_on_another_instance_when_its_instance_is_killed(cluster: Cluster) -> None:
    rng = random.Random(15)
    log = [rng.randbytes(rng.randint(30, 160)) for _ in range(LOG_FRAMES)]
    t2s = [rng.randbytes(n) for n in WALK_T2S] + [rng.randbytes(ACK_BYTES) for _ in range(BLOCKS)] \
        + [rng.randbytes(END_BYTES)]
    s2t = [rng.randbytes(n) for n in WALK_S2T] + [rng.randbytes(BATCH) for _ in range(BLOCKS)] \
        + [rng.randbytes(END_BYTES)]
    proxy, instances = cluster.proxy, cluster.instances

    async def body() -> None:
        src_cred, tgt_cred = await create_session(cluster.url, TOKEN, cafile=cluster.ca)
        sid, path = src_cred.session, f"/sessions/{src_cred.session}"
        src = SessionClient(cluster.url, src_cred, cafile=cluster.ca, reconnect=FAST)
        tgt = SessionClient(cluster.url, tgt_cred, cafile=cluster.ca, reconnect=FAST)
        await src.connect()
        await tgt.connect()
        # both peers met on one instance, the one the path hashes (and now sticks) to
        await _until(lambda: any(i.holds(sid) for i in instances.values()))
        [holder] = [name for name, i in instances.items() if i.holds(sid)]
        [other] = [name for name in SERVERS if name != holder]
        assert proxy.stuck_to(path) == holder
        marks = {name: len(i.log_text()) for name, i in instances.items()}
        killed = asyncio.Event()
        got: dict[Stream, list[bytes]] = {Stream.LOG: [], Stream.S2T: [], Stream.T2S: []}

        async def source() -> None:
            for i, data in enumerate(log):
                if i == PAUSE_AT:
                    await killed.wait()
                await src.send_log(data)
            await src.end_log()
            await src.suspend()
            for k in range(len(WALK_S2T)):
                got[Stream.T2S].append(await _next_frame(src, Stream.T2S))
                await src.send_diff(s2t[k])
            got[Stream.T2S].append(await _next_frame(src, Stream.T2S))       # the wanted leaves
            for data in s2t[len(WALK_S2T):]:
                await src.send_diff(data)
            while len(got[Stream.T2S]) < len(t2s):
                got[Stream.T2S].append(await _next_frame(src, Stream.T2S))
            await src.wait_confirmed(timeout=30)
            await src.acknowledge_confirm(timeout=30)

        async def target() -> None:
            while True:
                ev = await tgt.recv(timeout=30)
                if isinstance(ev, LogEnded):
                    break
                if isinstance(ev, Frame):
                    assert ev.stream is Stream.LOG
                    got[Stream.LOG].append(ev.data)
                    if len(got[Stream.LOG]) == KILL_AT:
                        instances[holder].kill()             # mid-stream: the source holds back the rest
                        # the health checks take the dead instance out (the peers' reconnects
                        # were redispatched to the other one already, on their failed connect)
                        await asyncio.to_thread(proxy.wait_states, {holder: "DOWN", other: "UP"})
                        killed.set()
            await tgt.phase(Phase.DIFFING)
            await tgt.send_diff(t2s[0])
            for k in range(len(WALK_S2T)):
                got[Stream.S2T].append(await _next_frame(tgt, Stream.S2T))
                await tgt.send_diff(t2s[k + 1])
            await tgt.phase(Phase.TRANSFERRING)
            for k in range(BLOCKS):
                got[Stream.S2T].append(await _next_frame(tgt, Stream.S2T))
                await tgt.send_diff(t2s[len(WALK_T2S) + k])
                if k == 1:
                    await comeback()
            got[Stream.S2T].append(await _next_frame(tgt, Stream.S2T))
            await tgt.send_diff(t2s[-1])
            await tgt.verified(ROOTS)
            await tgt.resumed()
            await tgt.wait_released(timeout=30)

        async def comeback() -> None:
            """The killed instance starts again and HAProxy takes it back; then the target's
            connection drops: it must reconnect to where its session now lives."""
            marks[holder] = len(instances[holder].log_text())
            await asyncio.to_thread(instances[holder].start)
            await asyncio.to_thread(proxy.wait_states, {holder: "UP"})
            before = tgt.reconnects
            assert tgt.connection is not None
            tgt.connection.transport.abort()
            await _until(lambda: tgt.reconnects > before)

        await asyncio.gather(source(), target())
        try:
            sent = {Stream.LOG: log, Stream.S2T: s2t, Stream.T2S: t2s}
            lost = {s.name: len(sent[s]) - len(set(got[s]) & set(sent[s])) for s in sent}
            duplicated = {s.name: len(got[s]) - len(set(got[s])) for s in sent}
            assert all(len(set(frames)) == len(frames) for frames in sent.values())     # so a set counts them
            print(f"failover through HAProxy: {sum(map(len, sent.values()))} frames, lost {lost}, duplicated "
                  f"{duplicated}; the service delivered {src.duplicates + tgt.duplicates} twice (peers dropped them)")
            assert lost == dict.fromkeys(lost, 0), f"frames lost: {lost}"
            assert duplicated == dict.fromkeys(duplicated, 0), f"frames duplicated: {duplicated}"
            assert got == sent, "every frame arrived once, but not in the order sent"
            assert src.duplicates == 0 and tgt.duplicates == 0
            assert src.reconnects >= 1 and tgt.reconnects >= 2 and src.confirmed and src.state is State.RESUMED
            # the other instance re-created the session from the peers' claims and finished it;
            # the one that came back never saw it again, and the path sticks to where it lives
            assert instances[other].holds(sid, since=marks[other])
            assert f"replay_migrate.session.{sid}: verified -> resumed" in instances[other].log_text()
            assert not instances[holder].holds(sid, since=marks[holder])
            assert proxy.stuck_to(path) == other
        finally:
            await src.close()
            await tgt.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_the_shipped_config_is_valid_and_routes_what_the_service_serves(tmp_path: Path) -> None:
    """``haproxy -c`` accepts the shipped config as filled in; it names both instances and routes
    session paths by their hash."""
    _ca, pem = _pem(tmp_path)
    env = proxy_env("127.0.0.1:1", pem, ["127.0.0.1:2", "127.0.0.1:3"], tmp_path / "admin.sock")
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    text = CONFIG.read_text()
    for needle in ("balance uri", "hash-type consistent", "stick on path", "timeout tunnel", "option redispatch",
                   *(f"server {name} " for name in SERVERS)):
        assert needle in text
    with pytest.raises(ValueError):
        proxy_env("127.0.0.1:1", pem, ["127.0.0.1:2"], tmp_path / "admin.sock")
