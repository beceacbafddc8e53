"""bench/linkemu.py: the link model on a fake clock, and the proxy for real on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.linkemu import (
    CHUNK_BYTES,
    QUEUE_BYTES,
    Forward,
    Link,
    LinkModel,
    Proxy,
    build_parser,
    main,
    parse_forward,
)
from bench.netns import NETEM_LIMIT_PACKETS

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
RATE = 8e6
"""8 Mbit/s: 1 MB takes 1 s."""
RTT = 0.1
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ---- the model ---------------------------------------------------------------------------------
def test_defaults_are_netems_queue_and_16_kib_chunks() -> None:
    assert QUEUE_BYTES == NETEM_LIMIT_PACKETS * 1500
    assert CHUNK_BYTES == 16 * 1024


def test_a_push_is_serialised_at_the_rate_then_delayed() -> None:
    m = LinkModel(8000, 0.5, chunk_bytes=10_000)         # 1000 B/s
    [c] = m.push(10.0, 1000)
    assert (c.nbytes, c.sent_at, c.arrive_at) == (1000, 11.0, 11.5)


def test_bytes_queue_behind_earlier_ones_and_an_idle_link_starts_at_once() -> None:
    m = LinkModel(8000, 0.5, chunk_bytes=10_000)
    m.push(0.0, 1000)
    [second] = m.push(0.2, 500)                           # the link is busy until 1.0
    assert second.sent_at == pytest.approx(1.5) and second.arrive_at == pytest.approx(2.0)
    [later] = m.push(5.0, 1000)                           # idle since 1.5
    assert later.sent_at == pytest.approx(6.0) and later.arrive_at == pytest.approx(6.5)


def test_delay_is_added_after_the_last_bit_left() -> None:
    for delay in (0.0, 0.02, 3.0):
        [c] = LinkModel(1e6, delay).push(1.0, 125)        # 1 ms at 1 Mbit/s
        assert c.arrive_at - c.sent_at == pytest.approx(delay)
        assert c.sent_at == pytest.approx(1.001)


def test_large_pushes_are_chunked_and_arrive_as_a_stream() -> None:
    m = LinkModel(8e6, 0.01, chunk_bytes=16384)           # 1 MB/s
    chunks = m.push(0.0, 40_000)
    assert [c.nbytes for c in chunks] == [16384, 16384, 7232]
    assert [c.sent_at for c in chunks] == pytest.approx([0.016384, 0.032768, 0.04])
    assert [c.arrive_at for c in chunks] == pytest.approx([0.026384, 0.042768, 0.05])
    assert m.push(1.0, 0) == []


def test_a_full_queue_leaves_no_room_until_bytes_arrive() -> None:
    m = LinkModel(8000, 0.5, queue_bytes=3000, chunk_bytes=1000)
    assert m.room(0.0) == 3000 and m.next_arrival() is None
    m.push(0.0, 3000)                                     # arrive at 1.5, 2.5, 3.5
    assert m.held(0.0) == 3000 and m.room(0.0) == 0
    assert m.next_arrival() == pytest.approx(1.5)
    assert m.room(1.49) == 0
    assert m.room(1.5) == 1000 and m.next_arrival() == pytest.approx(2.5)
    assert m.room(3.5) == 3000 and m.held(3.5) == 0 and m.next_arrival() is None
    # a push past the room is still accepted (never drop a read already made), room stays 0
    m.push(4.0, 2000)
    m.push(4.0, 2000)
    assert m.held(4.0) == 4000 and m.room(4.0) == 0


def test_bad_parameters_are_refused() -> None:
    for kw in ({"rate_bps": 0, "delay_s": 0}, {"rate_bps": float("inf"), "delay_s": 0},
               {"rate_bps": 1, "delay_s": -1}, {"rate_bps": 1, "delay_s": float("nan")}):
        with pytest.raises(ValueError):
            LinkModel(**kw)
    with pytest.raises(ValueError):
        LinkModel(1, 0, queue_bytes=0)
    with pytest.raises(ValueError):
        LinkModel(1, 0).push(0, -1)


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 100_000)), max_size=30),
       st.floats(1e3, 1e9), st.floats(0, 1))
@example(pushes=[(0.0, 2)], rate=754563270.0, delay=1.0)   # found by hypothesis: float rounding
def test_model_never_beats_the_rate_and_keeps_order(pushes: list[tuple[float, int]], rate: float,
                                                    delay: float) -> None:
    m = LinkModel(rate, delay, chunk_bytes=5000)
    now, first, total, last_arrival, last_sent = 0.0, None, 0, -1.0, 0.0
    for gap, n in pushes:
        now += gap
        chunks = m.push(now, n)
        assert sum(c.nbytes for c in chunks) == n and all(0 < c.nbytes <= 5000 for c in chunks)
        for c in chunks:
            assert c.arrive_at >= last_arrival                              # in order
            assert c.sent_at >= now + c.nbytes * 8 / rate * (1 - 1e-9)      # never before its own bits
            assert c.arrive_at == pytest.approx(c.sent_at + delay)
            last_arrival, last_sent = c.arrive_at, c.sent_at
        if n and first is None:
            first = now
        total += n
    if first is not None:   # everything pushed since the first push leaves no faster than the rate
        # (on the send times: arrive_at - delay loses the last bits of a nanosecond-scale send time)
        assert last_sent - first >= total * 8 / rate * (1 - 1e-9)


# ---- the proxy, for real -----------------------------------------------------------------------
def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


@asynccontextmanager
async def proxied(handler: Handler, link: Link | None = None) -> AsyncIterator[tuple[Proxy, int]]:
    """An upstream server running ``handler`` and a proxy in front of it; yields the proxy's port."""
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    proxy = Proxy(link or Link(RATE, RTT))
    [(_, port)] = await proxy.start([Forward(("127.0.0.1", 0), ("127.0.0.1", up_port))])
    try:
        yield proxy, port
    finally:
        await proxy.close()
        upstream.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, answer how many bytes arrived, close."""
    n = 0
    while data := await reader.read(65536):
        n += len(data)
    writer.write(f"{n}".encode())
    await writer.drain()
    writer.close()


def test_a_round_trip_takes_the_rtt_and_a_new_connection_one_more() -> None:
    async def go() -> tuple[float, float]:
        async with proxied(echo) as (_, port):
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            first = time.monotonic() - t0
            t1 = time.monotonic()
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            second = time.monotonic() - t1
            writer.close()
            return first, second

    first, second = run(go())
    assert first >= 2 * RTT                 # handshake + the round trip
    assert RTT <= second < 3 * RTT


def test_one_megabyte_takes_its_serialisation_time_and_the_queue_stays_bounded() -> None:
    size = 1_000_000
    queue = 50_000

    async def go() -> tuple[float, bytes, int]:
        link = Link(RATE, RTT, queue_bytes=queue)
        async with proxied(count_then_reply, link) as (_, port):
            peak = 0
            done = asyncio.Event()

            async def watch() -> None:
                nonlocal peak
                loop = asyncio.get_running_loop()
                while not done.is_set():
                    peak = max(peak, link.up.held(loop.time()))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(os.urandom(size))
            writer.write_eof()
            reply = await reader.read()
            elapsed = time.monotonic() - t0
            done.set()
            await watcher
            writer.close()
            return elapsed, reply, peak

    elapsed, reply, peak = run(go())
    assert reply == str(size).encode()
    model = size * 8 / RATE + 1.5 * RTT      # serialisation, handshake, the last byte's one-way delay
    assert model <= elapsed < 3 * model
    assert 0 < peak <= queue + 65536          # back-pressure: at most one read beyond the bound


def test_bytes_arrive_intact_and_in_order_both_ways() -> None:
    payload = os.urandom(300_000)

    async def go() -> bytes:
        async with proxied(echo, Link(80e6, 0.02)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def write() -> None:
                for i in range(0, len(payload), 7777):    # odd-sized writes
                    writer.write(payload[i:i + 7777])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(write())
            got = await reader.read()                     # until the echo's half-close came through
            await sender
            writer.close()
            return got

    assert run(go()) == payload


def test_eof_propagates_after_the_last_byte_each_way() -> None:
    async def go() -> tuple[bytes, bytes, bool]:
        upstream_saw = asyncio.get_running_loop().create_future()

        async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_saw.set_result(await reader.read())  # everything, then EOF
            writer.write(b"bye")
            writer.write_eof()
            await writer.drain()
            writer.close()

        async with proxied(reply_after_eof) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"last words")
            writer.write_eof()                            # half-close: we can still read
            reply = await reader.read()
            at_eof = reader.at_eof()
            writer.close()
            return await upstream_saw, reply, at_eof

    seen, reply, at_eof = run(go())
    assert seen == b"last words" and reply == b"bye" and at_eof


def test_an_unreachable_upstream_closes_the_client() -> None:
    async def go() -> bytes:
        logged: list[str] = []
        proxy = Proxy(Link(RATE, RTT), log=logged.append)
        [(_, port)] = await proxy.start([Forward(("127.0.0.1", 0), ("127.0.0.1", 1))])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                got = await reader.read()
            except ConnectionResetError:
                got = b""
            writer.close()
            assert logged and "cannot connect to 127.0.0.1:1" in logged[0]
            return got
        finally:
            await proxy.close()

    assert run(go()) == b""


def test_websockets_work_through_it() -> None:
    msgs = [os.urandom(n) for n in (1, 1000, 100_000)]

    async def go() -> tuple[list[bytes], float]:
        async def ws_echo(conn: ServerConnection) -> None:
            async for msg in conn:
                await conn.send(msg)

        async with ws_serve(ws_echo, "127.0.0.1", 0) as server:
            up_port = next(iter(server.sockets)).getsockname()[1]
            proxy = Proxy(Link(RATE, RTT))
            [(_, port)] = await proxy.start([Forward(("127.0.0.1", 0), ("127.0.0.1", up_port))])
            try:
                async with ws_connect(f"ws://127.0.0.1:{port}/sessions/x", compression=None) as ws:
                    t0 = time.monotonic()
                    got = []
                    for m in msgs:
                        await ws.send(m)
                        reply = await ws.recv()
                        assert isinstance(reply, bytes)
                        got.append(reply)
                    elapsed = time.monotonic() - t0
                return got, elapsed
            finally:
                await proxy.close()

    got, elapsed = run(go())
    assert got == msgs
    assert elapsed >= 3 * RTT + 2 * 100_000 * 8 / RATE


def test_two_forwards_in_one_process() -> None:
    async def go() -> list[bytes]:
        servers = [await asyncio.start_server(echo, "127.0.0.1", 0) for _ in range(2)]
        proxy = Proxy(Link(80e6, 0.01))
        bound = await proxy.start([Forward(("127.0.0.1", 0), ("127.0.0.1", s.sockets[0].getsockname()[1]))
                                   for s in servers])
        try:
            out = []
            for i, (_, port) in enumerate(bound):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"to {i}".encode())
                writer.write_eof()
                out.append(await reader.read())
                writer.close()
            return out
        finally:
            await proxy.close()
            for s in servers:
                s.close()

    assert run(go()) == [b"to 0", b"to 1"]


# ---- the command line --------------------------------------------------------------------------
def test_forward_and_argument_parsing() -> None:
    f = parse_forward("10.231.0.2:7700=127.0.0.1:7700")
    assert f == Forward(("10.231.0.2", 7700), ("127.0.0.1", 7700))
    args = build_parser().parse_args(["--rate-mbit", "10", "--rtt-ms", "40", "--forward", "a:1=b:2",
                                      "--forward", "[::1]:3=c:4"])
    assert args.rate_mbit == 10 and args.rtt_ms == 40
    assert [fw.listen for fw in args.forward] == [("a", 1), ("::1", 3)]


@pytest.mark.parametrize("argv", [
    [],
    ["--rate-mbit", "10", "--rtt-ms", "40"],                                   # no forward
    ["--rate-mbit", "0", "--rtt-ms", "40", "--forward", "a:1=b:2"],
    ["--rate-mbit", "10", "--rtt-ms", "-1", "--forward", "a:1=b:2"],
    ["--rate-mbit", "10", "--rtt-ms", "40", "--forward", "a:1"],
    ["--rate-mbit", "10", "--rtt-ms", "40", "--forward", "a:1=b:99999"],
    ["--rate-mbit", "x", "--rtt-ms", "40", "--forward", "a:1=b:2"],
])
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_a_busy_port_is_a_host_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["--rate-mbit", "10", "--rtt-ms", "0", "--forward", f"127.0.0.1:{port}=127.0.0.1:1"]) == 3
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_the_command_says_ready_forwards_and_stops_cleanly_on_sigterm() -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        up_port = upstream.getsockname()[1]
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "bench.linkemu", "--rate-mbit", "10", "--rtt-ms", "10",
                              "--forward", f"127.0.0.1:{port}=127.0.0.1:{up_port}",
                              "--forward", f"127.0.0.1:{free_port()}=127.0.0.1:1"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"hello")
                conn, _ = upstream.accept()
                with conn:
                    conn.settimeout(5)
                    assert conn.recv(5) == b"hello"
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
