"""The session-handoff service: a thin asyncio adapter over the sans-I/O core (DESIGN.md §8).

It owns the sockets, the clock and the connection counts, and nothing else: the credential (the
shared token on ``/sessions``, a role credential on ``/sessions/<id>``) is checked in
``process_request`` by the core's :class:`~server.keyring.Keyring` before any websocket opens, every
binary message goes to the connection's :class:`~server.link.Link`, and whatever the core queues
is written back by one writer task per connection, one message at a time (the peer's link is woken
through ``on_output``).  ``compression=None`` because the payloads are already zstd; ``max_size``,
``max_queue`` and ``write_limit`` come from :class:`~server.limits.Limits`, whose
``worst_case_memory`` counts them.

``replay-migrate serve --listen HOST:PORT`` runs it; :func:`start_service` embeds it in-process
(tests, the single-host mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import secrets
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
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from replay_migrate.errors import HostError, ReplayMigrateError, UsageError
from replay_migrate.safeopen import check_regular
from server.credentials import KEY_ENV, TOKEN_ENV, load_or_create_key, load_token
from server.keyring import MIN_KEY_BYTES, Grant, Keyring, known_path
from server.limits import Limits, MiB
from server.link import CLOSE_POLICY, Link
from server.registry import SessionRegistry

DEFAULT_LISTEN: Final = "127.0.0.1:8765"
CLOSE_TRY_AGAIN: Final = 1013
_log = logging.getLogger("replay_migrate.service")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs; the session limits live in :class:`~server.limits.Limits`."""

    token: str                              # the shared token: it only creates sessions
    key: bytes                              # derives every role secret; keep it to survive a restart
    host: str = "127.0.0.1"
    port: int = 8765                        # 0: an ephemeral port (tests, embedded mode)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    ping_interval: float | None = 20.0      # keepalive pings: a silent dead peer is detached after
    ping_timeout: float | None = 20.0       # ping_interval + ping_timeout and may then resume
    open_timeout: float = 10.0              # TCP + TLS + HTTP handshake
    attach_timeout: float = 10.0            # from handshake to the attach (or create) message
    close_timeout: float = 5.0
    tick_interval: float = 1.0              # how often idle, vacant and finished sessions are looked at

    def __post_init__(self) -> None:
        if not self.token:
            raise UsageError(f"the handoff service needs a token (${TOKEN_ENV} or --token-file)")
        if len(self.key) < MIN_KEY_BYTES:
            raise UsageError(f"the service key must have at least {MIN_KEY_BYTES} bytes")
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
    """The adapter: one :class:`SessionRegistry`, a handler per connection, the connection counts
    (``max_connections``, ``max_connections_per_address``) and a ticker.  ``clock`` (monotonic
    seconds) is the ``now`` every call into the core gets."""

    def __init__(self, config: ServiceConfig, registry: SessionRegistry | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry if registry is not None else SessionRegistry(Keyring(config.key, config.token),
                                                                            config.limits)
        self.limits = self.registry.limits
        self.connections = 0
        self._per_address: dict[str, int] = {}

    def _grant(self, request: Request) -> Grant | None:
        values = request.headers.get_all("Authorization")
        if len(values) != 1:
            return None
        return self.registry.keyring.authorize(request.path.partition("?")[0], values[0])

    def _has_room(self, address: str) -> bool:
        return (self.connections < self.limits.max_connections
                and self._per_address.get(address, 0) < self.limits.max_connections_per_address)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """404 for a path the service does not serve; 401, the same for every refusal, unless the
        credential is good for this path; 503 when the connection limits are reached."""
        if not known_path(request.path.partition("?")[0]):
            return connection.respond(HTTPStatus.NOT_FOUND, "expected /sessions or /sessions/<id>\n")
        address = _peer(connection)
        if self._grant(request) is None:
            _log.info("refused a connection from %s: missing or wrong credential", address)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong credential\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="replay-migrate"'
            return response
        if not self._has_room(address):
            _log.warning("refused a connection from %s: %d open, %d from there", address, self.connections,
                         self._per_address.get(address, 0))
            return Response(HTTPStatus.SERVICE_UNAVAILABLE.value, "Service Unavailable",
                            Headers({"Retry-After": "1", "Content-Type": "text/plain"}), b"too many connections\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Feed the peer's messages to its Link; a writer task sends what the core queues."""
        assert ws.request is not None
        address = _peer(ws)
        if not self._has_room(address):     # several handshakes passed process_request at once
            await ws.close(CLOSE_TRY_AGAIN, "too many connections")
            return
        grant = self._grant(ws.request)
        if grant is None:                   # process_request refused it already
            await ws.close(CLOSE_POLICY)
            return
        self.connections += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            await self._serve(ws, grant)
        finally:
            self.connections -= 1
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]

    async def _serve(self, ws: ServerConnection, grant: Grant) -> None:
        wake = asyncio.Event()
        link = Link(self.registry, grant, self.clock(), on_output=wake.set)
        writer = asyncio.create_task(self._write(ws, link, wake))
        try:
            # no reference to a message is kept across an await: the core has what it needs
            self._feed(link, await asyncio.wait_for(ws.recv(), self.config.attach_timeout))
            while not link.closing:
                self._feed(link, await ws.recv())
        except TimeoutError:
            link.attach_timeout(self.clock())
        except ConnectionClosed:
            pass
        finally:
            link.connection_lost(self.clock())   # detach; the writer still flushes what is queued
            wake.set()
            try:
                await asyncio.wait_for(writer, self.config.close_timeout)
            except (TimeoutError, ConnectionClosed):
                pass
            link.discard()

    def _feed(self, link: Link, data: str | bytes) -> None:
        now = self.clock()
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
                while (msg := link.next_message()) is not None:
                    await ws.send(msg)
                if link.close_code is not None:
                    await ws.close(link.close_code)
                    return
            except ConnectionClosed:
                return
            if link.lost:
                return

    async def tick(self) -> None:
        """Fail sessions whose peers stayed away; drop vacant and long-finished sessions."""
        while True:
            await asyncio.sleep(self.config.tick_interval)
            for session_id in self.registry.expire(self.clock()):
                _log.info("session %s released", session_id)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _peer(connection: ServerConnection) -> str:
    """The client's address (its host: the connection limits count per host, not per port)."""
    try:
        return str(connection.remote_address[0])
    except Exception:
        return "?"


@contextlib.asynccontextmanager
async def start_service(config: ServiceConfig, *, registry: SessionRegistry | None = None,
                        clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """Run the service in this event loop; yields its base URL (``ws[s]://host:port``).

    ``port=0`` picks an ephemeral port.  Pass ``registry`` to look at the sessions and ``clock`` to
    drive the sessions' timeouts (tests).  Leaving the block closes the listener and every connection.
    """
    service = HandoffService(config, registry, clock=clock)
    limits = service.registry.limits
    try:
        server_cm = serve(
            service.handle, config.host, config.port, process_request=service.process_request, compression=None,
            max_size=limits.max_message_size, max_queue=limits.max_queue, write_limit=limits.write_limit,
            ping_interval=config.ping_interval, ping_timeout=config.ping_timeout, open_timeout=config.open_timeout,
            close_timeout=config.close_timeout, ssl=_server_ssl(config), server_header="replay-migrate")
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


#: ``serve`` options for every :class:`Limits` field: (metavar, help); defaults come from Limits
_LIMIT_OPTIONS: Final[dict[str, tuple[str, str]]] = {
    "max_message_size": ("BYTES", "largest message, envelope included; bigger ones are closed with 1009"),
    "max_buffered_bytes": ("BYTES", "bytes kept per stream until the receiver acks them (the senders' window)"),
    "max_outgoing_bytes": ("BYTES", "frame bytes queued per connection for its writer"),
    "max_queue": ("N", "incoming frames websockets buffers per connection before TCP pushes back"),
    "write_limit": ("BYTES", "outgoing transport buffer per connection"),
    "max_connections": ("N", "open connections; more handshakes are answered 503"),
    "max_connections_per_address": ("N", "open connections from one client address"),
    "max_sessions": ("N", "sessions with an attached peer"),
    "max_tombstones": ("N", "finished sessions remembered for a late re-attach"),
    "idle_timeout": ("S", "a session fails when one peer stays away this long"),
    "finished_ttl": ("S", "how long a finished session is remembered"),
    "memory_budget": ("BYTES", "what the limits above may add up to at worst (checked at start)"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--key-file", type=Path, default=None, metavar="FILE",
                        help=f"the service key, created (0600) if missing; default: ${KEY_ENV} (hex), else a new "
                             "key each start: every credential then dies with the process")
    parser.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                        help=f"the shared token that creates sessions (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="PEM certificate (enables wss)")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="PEM private key")
    for name, (metavar, help_text) in _LIMIT_OPTIONS.items():
        default = getattr(d, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, metavar=metavar,
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--ping-interval", type=float, default=20.0, metavar="S",
                        help="websocket keepalive interval (default: %(default)s)")
    parser.add_argument("--ping-timeout", type=float, default=20.0, metavar="S",
                        help="websocket keepalive timeout (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    host, port = parse_listen(args.listen)
    token = load_token(args.token_file) or ""
    try:
        limits = Limits(**{name: getattr(args, name) for name in _LIMIT_OPTIONS})
    except ValueError as e:
        raise UsageError(str(e)) from None
    key = load_or_create_key(args.key_file)
    if key is None:
        print(f"replay-migrate serve: no --key-file or ${KEY_ENV}: a new service key for this run; "
              "sessions will not survive a restart", file=sys.stderr)
        key = secrets.token_bytes(MIN_KEY_BYTES)
    return ServiceConfig(token=token, key=key, host=host, port=port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         limits=limits, ping_interval=args.ping_interval, ping_timeout=args.ping_timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    """``replay-migrate serve``: run until SIGINT or SIGTERM, then close every connection and exit 0."""
    config = config_from_args(args)
    _log.info("limits: worst case %.1f MiB of %.1f MiB budget", config.limits.worst_case_memory / MiB,
              config.limits.memory_budget / MiB)
    if not config.tls and not _loopback(config.host):
        print(f"replay-migrate serve: no TLS on {config.host}: credentials and keystrokes cross the network "
              "in clear (--tls-cert/--tls-key)", file=sys.stderr)

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
