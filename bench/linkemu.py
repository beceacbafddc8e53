"""A userspace link emulator: a TCP proxy that forwards bytes at a link's rate and delay.

The migration benchmark times transfers over a shaped link. ``tc netem`` shapes it where the
kernel has ``sch_netem``; where it has not (``CONFIG_NET_SCH_NETEM`` unset, and ``tbf``/``htb``
give a rate but no delay), this proxy stands in for it:

    python -m bench.linkemu --rate-mbit 10 --rtt-ms 40 \\
        --forward 10.231.0.2:7700=127.0.0.1:7700 --forward 10.231.0.2:7701=127.0.0.1:7701

It prints ``ready`` once every listener is up and serves until SIGTERM or SIGINT (exit 0).

What it models, each direction with the same shape (one link for the whole process: every
connection of every ``--forward`` shares the two directions' rate and queue, as on a wire):

* the rate: bytes leave one after another, each read serialised after whatever is queued before
  it, in chunks of :data:`CHUNK_BYTES` so a large read does not arrive as one lump;
* the one-way delay, half the RTT, added to every chunk after it left;
* a bounded queue (:data:`QUEUE_BYTES`, netem's default); when it is full the proxy stops reading,
  so the sender is held back by TCP flow control where netem would drop packets;
* connection set-up: a new connection's bytes leave no earlier than one RTT after it was accepted
  (the SYN and SYN-ACK crossing the link).

What it does not model:

* the sender's TCP dynamics. The proxy terminates TCP: the sender's congestion control talks to
  it over a local hop with a ~0 RTT, so slow start, window growth and loss recovery over the
  emulated RTT do not happen. A transfer runs at the full rate at once, where over netem it ramps
  up over a few RTTs: short transfers come out somewhat faster than over netem;
* loss, jitter, reordering (none), and header bytes: the rate applies to TCP payload, where netem
  counts whole packets (~3-4 % more at a 1500-byte MTU);
* timer precision: chunks are written when the event loop wakes, usually well under 1 ms late;
  lateness never accumulates, because the times come from the model, not from the wake-ups.

:class:`LinkModel` is the sans-I/O core (times are numbers handed to it: no sockets, no clock);
:class:`Proxy` is the asyncio adapter; :func:`main` the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NoReturn

from replay_migrate.errors import HostError, UsageError

PACKET_BYTES = 1500
"""netem's packets are at most an MTU; used only to express its queue limit in bytes."""
QUEUE_PACKETS = 1000
"""netem's default ``limit`` (also :data:`bench.netns.NETEM_LIMIT_PACKETS`)."""
QUEUE_BYTES = QUEUE_PACKETS * PACKET_BYTES
"""Default bound on bytes pushed into one direction and not yet arrived: netem's default queue of
1000 full packets (1.5 MB: ~1.2 s at 10 Mbit/s, ~0.12 s at 100 Mbit/s). Beyond it the proxy stops
reading (back-pressure) instead of dropping."""
CHUNK_BYTES = 16 << 10
"""Default largest piece serialised and delivered as one (16 KiB: 13 ms at 10 Mbit/s, 1.3 ms at
100 Mbit/s), so one large read arrives as a stream rather than a lump, while the proxy wakes at most
~800 times a second per direction at 100 Mbit/s (cheap enough for Python)."""
READ_BYTES = 64 << 10
"""Largest read from a socket at a time (asyncio's stream buffer size): bounds how much one read
can push past the queue's limit when several connections share it."""
BACKLOG_BYTES = QUEUE_BYTES
"""Per connection and direction: most bytes the proxy holds (queued, in flight, or arrived but not
yet taken by a slow receiver) before it stops reading from that sender. A slow receiver thus
holds back its own sender, as TCP's window would, without stalling the other connections."""
HANDSHAKE_RTTS = 1.0
"""RTTs a new connection waits before its first byte leaves: SYN out, SYN-ACK back. The client's
``connect()`` returns at once (the proxy accepts locally), so its data waits here instead."""
STOP_TIMEOUT_S = 5.0
"""How long stopping waits for the connections' tasks to finish after cancelling them."""


# ---- the sans-I/O core -------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A piece of a push: its last bit leaves at ``sent_at`` and arrives at ``arrive_at``."""

    nbytes: int
    sent_at: float
    arrive_at: float


class LinkModel:
    """One direction of a link: rate, one-way delay and a queue bound; times in seconds.

    :meth:`push` tells when pushed bytes arrive: each chunk starts serialising when the link is
    free (``max(now, previous sent_at)``), takes ``nbytes * 8 / rate_bps``, and arrives ``delay_s``
    later. :meth:`room` says how many more bytes fit before the queue is full; bytes count as held
    from their push until their arrival time. The model never drops: respecting ``room`` is the
    caller's back-pressure (a push beyond it is accepted, so a read already made is never lost).
    """

    def __init__(self, rate_bps: float, delay_s: float, *, queue_bytes: int = QUEUE_BYTES,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        if not (math.isfinite(rate_bps) and rate_bps > 0):
            raise ValueError(f"rate must be a positive number of bits/s, not {rate_bps!r}")
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay must be >= 0 s, not {delay_s!r}")
        if queue_bytes <= 0 or chunk_bytes <= 0:
            raise ValueError("queue and chunk sizes must be positive")
        self.rate_bps = rate_bps
        self.delay_s = delay_s
        self.queue_bytes = queue_bytes
        self.chunk_bytes = chunk_bytes
        self._free_at = -math.inf
        self._held: deque[Chunk] = deque()   # arrive_at never decreases: FIFO, constant delay
        self._held_bytes = 0

    def push(self, now: float, nbytes: int) -> list[Chunk]:
        """``nbytes`` handed to the link at ``now``, split into chunks, in order."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._expire(now)
        out = []
        left = nbytes
        while left > 0:
            n = min(left, self.chunk_bytes)
            sent = max(now, self._free_at) + n * 8 / self.rate_bps
            self._free_at = sent
            chunk = Chunk(n, sent, sent + self.delay_s)
            self._held.append(chunk)
            self._held_bytes += n
            out.append(chunk)
            left -= n
        return out

    def held(self, now: float) -> int:
        """Bytes pushed and not yet arrived at ``now`` (queued or in flight)."""
        self._expire(now)
        return self._held_bytes

    def room(self, now: float) -> int:
        """Bytes that may still be pushed at ``now`` before the queue is full."""
        return max(0, self.queue_bytes - self.held(now))

    def next_arrival(self) -> float | None:
        """When the oldest held chunk arrives (room grows then); None when nothing is held."""
        return self._held[0].arrive_at if self._held else None

    def _expire(self, now: float) -> None:
        while self._held and self._held[0].arrive_at <= now:
            self._held_bytes -= self._held.popleft().nbytes


# ---- the asyncio adapter ------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """Accept on ``listen``, connect to ``connect`` for each connection."""

    listen: tuple[str, int]
    connect: tuple[str, int]


class Link:
    """Both directions of the emulated link, shared by every connection of a :class:`Proxy`."""

    def __init__(self, rate_bps: float, rtt_s: float, *, queue_bytes: int = QUEUE_BYTES,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.rtt_s = rtt_s
        self.up = LinkModel(rate_bps, rtt_s / 2, queue_bytes=queue_bytes, chunk_bytes=chunk_bytes)
        """Listening side to connecting side."""
        self.down = LinkModel(rate_bps, rtt_s / 2, queue_bytes=queue_bytes, chunk_bytes=chunk_bytes)
        """Connecting side back to the listening side."""


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Every chunk goes out when it arrives: Nagle would hold small ones back for an ACK."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of one connection: read, hold each chunk until the model says it arrived,
    write it on; the reader's EOF becomes a half-close once the last byte was written."""

    def __init__(self, model: LinkModel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.model = model
        self.reader = reader
        self.writer = writer
        self.pending: deque[tuple[float, bytes]] = deque()
        self.pending_bytes = 0
        self.eof = False
        self.wake = asyncio.Event()
        """Set by the reader: new chunks or EOF."""
        self.space = asyncio.Event()
        """Set by the writer: bytes delivered, the backlog shrank."""

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            room = self.model.room(now)
            if room <= 0:
                nxt = self.model.next_arrival()
                await asyncio.sleep(0.0 if nxt is None else max(0.0, nxt - now))
                continue
            if self.pending_bytes >= BACKLOG_BYTES:
                self.space.clear()
                await self.space.wait()
                continue
            data = await self.reader.read(min(room, READ_BYTES))
            if not data:
                self.eof = True
                self.wake.set()
                return
            off = 0
            for c in self.model.push(loop.time(), len(data)):
                self.pending.append((c.arrive_at, data[off:off + c.nbytes]))
                off += c.nbytes
            self.pending_bytes += len(data)
            self.wake.set()

    async def deliver_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self.eof:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            wait = self.pending[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            out = []
            while self.pending and self.pending[0][0] <= now:
                out.append(self.pending.popleft()[1])
            if not out:
                continue
            data = b"".join(out)
            self.writer.write(data)
            await self.writer.drain()
            self.pending_bytes -= len(data)
            self.space.set()


class Proxy:
    """Listeners for some :class:`Forward` s, every connection carried over one :class:`Link`."""

    def __init__(self, link: Link, *, handshake_rtts: float = HANDSHAKE_RTTS,
                 log: Callable[[str], None] | None = None) -> None:
        self.link = link
        self.handshake_s = handshake_rtts * link.rtt_s
        self._log = log or (lambda msg: print(f"linkemu: {msg}", file=sys.stderr, flush=True))
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, forwards: Sequence[Forward]) -> list[tuple[str, int]]:
        """Listen on every forward's address; returns the bound addresses (port 0 picks one).
        On a failure the listeners already up are closed and HostError says which one failed."""
        bound = []
        try:
            for fwd in forwards:
                host, port = fwd.listen
                try:
                    server = await asyncio.start_server(partial(self._handle, fwd), host, port,
                                                        reuse_address=True, limit=READ_BYTES)
                except OSError as e:
                    raise HostError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
                self._servers.append(server)
                bound.append(server.sockets[0].getsockname()[:2])
        except BaseException:
            await self.close()
            raise
        return bound

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        conns = list(self._conns)
        for task in conns:
            task.cancel()
        if conns:
            await asyncio.wait(conns, timeout=STOP_TIMEOUT_S)

    async def _handle(self, fwd: Forward, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        writers = [c_writer]
        clean = False
        try:
            loop = asyncio.get_running_loop()
            accepted = loop.time()
            _nodelay(c_writer)
            try:
                u_reader, u_writer = await asyncio.open_connection(*fwd.connect, limit=READ_BYTES)
            except OSError as e:
                self._log(f"cannot connect to {fwd.connect[0]}:{fwd.connect[1]}: {e.strerror or e}")
                return
            writers.append(u_writer)
            _nodelay(u_writer)
            await asyncio.sleep(max(0.0, accepted + self.handshake_s - loop.time()))
            pipes = (_Pipe(self.link.up, c_reader, u_writer), _Pipe(self.link.down, u_reader, c_writer))
            try:
                async with asyncio.TaskGroup() as tg:
                    for p in pipes:
                        tg.create_task(p.read_loop())
                        tg.create_task(p.deliver_loop())
                clean = True
            except* OSError:       # a reset or a broken pipe on either side: cut both
                pass
        finally:
            for w in writers:
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            self._conns.discard(task)


# ---- the command line ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), as ``replay-migrate``'s own do, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


def parse_addr(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {value!r}: expected HOST:PORT")
    return host, int(port)


def parse_forward(value: str) -> Forward:
    """``LISTEN=CONNECT``, each ``HOST:PORT``."""
    listen, sep, connect = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"bad forward {value!r}: expected LISTEN_HOST:PORT=CONNECT_HOST:PORT")
    try:
        return Forward(parse_addr(listen), parse_addr(connect))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type[int] | type[float], *, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero_ok else '> 0'}: {value!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m bench.linkemu", description=__doc__.splitlines()[0])
    ap.add_argument("--rate-mbit", type=_positive(float), required=True, help="link rate each way, Mbit/s")
    ap.add_argument("--rtt-ms", type=_positive(float, zero_ok=True), required=True,
                    help="round-trip time, ms (half of it added each way)")
    ap.add_argument("--forward", type=parse_forward, action="append", required=True,
                    metavar="LISTEN=CONNECT", help="HOST:PORT=HOST:PORT; repeat for more ports")
    ap.add_argument("--queue-bytes", type=_positive(int), default=QUEUE_BYTES,
                    help="queue bound per direction (default: %(default)s, netem's 1000 packets)")
    ap.add_argument("--chunk-bytes", type=_positive(int), default=CHUNK_BYTES,
                    help="bytes serialised and delivered as one piece (default: %(default)s)")
    return ap


async def serve(link: Link, forwards: Sequence[Forward], *, stop: asyncio.Event,
                ready: Callable[[list[tuple[str, int]]], None] = lambda _: None) -> None:
    """Forward until ``stop`` is set; ``ready`` gets the bound addresses once all listen."""
    proxy = Proxy(link)
    try:
        ready(await proxy.start(forwards))
        await stop.wait()
    finally:
        await proxy.close()


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link = Link(args.rate_mbit * 1e6, args.rtt_ms / 1000, queue_bytes=int(args.queue_bytes),
                chunk_bytes=int(args.chunk_bytes))
    await serve(link, args.forward, stop=stop, ready=lambda _: print("ready", flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(_main(args))
    except HostError as e:
        print(f"linkemu: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
