"""The session-handoff service: a thin asyncio adapter over :mod:`server.session` (DESIGN.md §8).

It owns the sockets and the clock and nothing else: the bearer token is checked in
``process_request`` before any session exists, every binary message goes to the connection's
:class:`~server.session.Link`, and whatever the core queues is written back by one writer task
per connection (the peer's link is woken through ``on_output``).  ``compression=None`` because the
payloads are already zstd; ``max_size`` is the core's ``max_message_size``, so an oversized message
is closed with 1009 by websockets before it is even buffered.

``replay-migrate serve --listen HOST:PORT`` runs it; :func:`start_service` embeds it in-process
(tests, the single-host mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from replay_migrate.errors import HostError, ReplayMigrateError, UsageError
from replay_migrate.safeopen import check_regular
from server.session import TOKEN_ENV, Limits, Link, SessionRegistry

DEFAULT_LISTEN: Final = "127.0.0.1:8765"
_PATH: Final = re.compile(r"/sessions/([A-Za-z0-9_-]{1,64})")
_log = logging.getLogger("replay_migrate.service")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs; the session limits live in :class:`~server.session.Limits`."""

    token: str
    host: str = "127.0.0.1"
    port: int = 8765                        # 0: an ephemeral port (tests, embedded mode)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    ping_interval: float | None = 20.0      # keepalive pings: a silent dead peer is detached after
    ping_timeout: float | None = 20.0       # ping_interval + ping_timeout and may then resume
    open_timeout: float = 10.0              # TCP + TLS + HTTP handshake
    attach_timeout: float = 10.0            # from handshake to the attach message
    close_timeout: float = 5.0
    max_queue: int = 16                     # incoming messages buffered per connection before TCP pushes back
    tick_interval: float = 1.0              # how often idle and finished sessions are looked at

    def __post_init__(self) -> None:
        if not self.token:
            raise UsageError(f"the handoff service needs a token (--token or {TOKEN_ENV})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"bad port {self.port}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _server_ssl(config: ServiceConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    for path, what in ((config.tls_cert, "TLS certificate"), (config.tls_key, "TLS key")):
        check_regular(path, what)     # OpenSSL would wait on a FIFO
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the TLS certificate {config.tls_cert} / key {config.tls_key}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    return ctx


class HandoffService:
    """The adapter: one :class:`SessionRegistry`, a handler per connection and a ticker."""

    def __init__(self, config: ServiceConfig, registry: SessionRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else SessionRegistry(config.limits)
        self._expected = f"Bearer {config.token}".encode()

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """401 unless the bearer token matches (constant time); 404 unless the path is a session."""
        given = request.headers.get("Authorization", "")
        try:
            ok = hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._expected)
        except UnicodeEncodeError:
            ok = False
        if not ok:
            _log.info("refused a connection from %s: missing or wrong token", _peer(connection))
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="replay-migrate"'
            return response
        if _session_id(request.path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "expected /sessions/<id>\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Feed the peer's messages to its Link; a writer task sends what the core queues."""
        assert ws.request is not None
        session_id = _session_id(ws.request.path)
        assert session_id is not None  # process_request refused anything else
        wake = asyncio.Event()
        link = Link(self.registry, session_id, time.monotonic(), on_output=wake.set)
        writer = asyncio.create_task(self._write(ws, link, wake))
        try:
            data = await asyncio.wait_for(ws.recv(), self.config.attach_timeout)
            while True:
                self._feed(link, data)
                if link.closing:
                    break
                data = await ws.recv()
        except TimeoutError:
            link.attach_timeout(time.monotonic())
        except ConnectionClosed:
            pass
        finally:
            link.connection_lost(time.monotonic())   # detach; the writer still flushes what is queued
            wake.set()
            try:
                await asyncio.wait_for(writer, self.config.close_timeout)
            except (TimeoutError, ConnectionClosed):
                pass

    def _feed(self, link: Link, data: str | bytes) -> None:
        now = time.monotonic()
        try:
            if isinstance(data, str):
                link.receive_text(now)
            else:
                link.receive(data, now)
        except Exception:
            _log.exception("bug while handling a message for session %s", link.session_id)
            link.internal_error(now)

    @staticmethod
    async def _write(ws: ServerConnection, link: Link, wake: asyncio.Event) -> None:
        """Send in order what the core queued for this connection; close when it asks to."""
        while True:
            await wake.wait()
            wake.clear()
            try:
                for msg in link.data_to_send():
                    await ws.send(msg)
                if link.close_code is not None:
                    await ws.close(link.close_code)
                    return
            except ConnectionClosed:
                return
            if link.lost:
                return

    async def tick(self) -> None:
        """Fail sessions whose peers stayed away; drop finished sessions past their ttl."""
        while True:
            await asyncio.sleep(self.config.tick_interval)
            for session_id in self.registry.expire(time.monotonic()):
                _log.info("session %s dropped", session_id)


def _session_id(path: str) -> str | None:
    m = _PATH.fullmatch(path.partition("?")[0])
    return m.group(1) if m else None


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


@contextlib.asynccontextmanager
async def start_service(config: ServiceConfig, *, registry: SessionRegistry | None = None) -> AsyncIterator[str]:
    """Run the service in this event loop; yields its base URL (``ws[s]://host:port``).

    ``port=0`` picks an ephemeral port.  Pass ``registry`` to look at the sessions (tests).
    Leaving the block closes the listener and every connection.
    """
    service = HandoffService(config, registry)
    limits = service.registry.limits
    try:
        server_cm = serve(
            service.handle, config.host, config.port, process_request=service.process_request, compression=None,
            max_size=limits.max_message_size, max_queue=config.max_queue, ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout, open_timeout=config.open_timeout, close_timeout=config.close_timeout,
            ssl=_server_ssl(config), server_header="replay-migrate")
        server = await server_cm.__aenter__()
    except OSError as e:
        raise HostError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    ticker = asyncio.create_task(service.tick(), name="handoff-ticker")
    try:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        yield f"{'wss' if config.tls else 'ws'}://{host}:{port}"
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await server_cm.__aexit__(None, None, None)


async def run_service(config: ServiceConfig, *, stop: asyncio.Event | None = None,
                      ready: Callable[[str], None] | None = None) -> None:
    """Serve until ``stop`` is set (or forever); ``ready(url)`` is called once listening."""
    async with start_service(config) as url:
        _log.info("handoff service listening on %s", url)
        if ready is not None:
            ready(url)
        await (stop.wait() if stop is not None else asyncio.Future())


# ---- command line -------------------------------------------------------------------------------
def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad --listen {value!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token the peers must present (default: ${TOKEN_ENV}; prefer the "
                             "variable, a command line is visible to other users)")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="PEM certificate (enables wss)")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="PEM private key")
    parser.add_argument("--max-message-size", type=int, default=d.max_message_size, metavar="BYTES",
                        help="largest message; bigger ones are closed with 1009 (default: %(default)s)")
    parser.add_argument("--max-buffered-bytes", type=int, default=d.max_buffered_bytes, metavar="BYTES",
                        help="unacked payload kept per stream, the senders' window (default: %(default)s)")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="S",
                        help="a session fails when a peer stays away this long (default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions,
                        help="sessions held at once (default: %(default)s)")
    parser.add_argument("--ping-interval", type=float, default=20.0, metavar="S",
                        help="websocket keepalive interval (default: %(default)s)")
    parser.add_argument("--ping-timeout", type=float, default=20.0, metavar="S",
                        help="websocket keepalive timeout (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    host, port = parse_listen(args.listen)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    try:
        limits = Limits(max_message_size=args.max_message_size, max_buffered_bytes=args.max_buffered_bytes,
                        idle_timeout=args.idle_timeout, max_sessions=args.max_sessions)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ServiceConfig(token=token, host=host, port=port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         limits=limits, ping_interval=args.ping_interval, ping_timeout=args.ping_timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    """``replay-migrate serve``: run until SIGINT or SIGTERM, then close every connection and exit 0."""
    config = config_from_args(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_service(config, stop=stop, ready=lambda url: print(f"serving on {url}", flush=True))

    asyncio.run(main())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.service`` (the CLI's ``serve`` calls :func:`cmd_serve` instead)."""
    parser = argparse.ArgumentParser(prog="replay-migrate serve", description="Run the session-handoff service.")
    add_serve_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return cmd_serve(args)
    except ReplayMigrateError as e:
        print(f"replay-migrate: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
