"""Every bound of the handoff service in one place (DESIGN.md §8, README "Security model").

Each is a ``serve`` option with the default below; :attr:`Limits.worst_case_memory` adds up every
queue they allow, and a set of limits whose worst case exceeds ``memory_budget`` is refused before
the service starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from server.wire import ENVELOPE_OVERHEAD, FRAME_COST, MAX_REPORT_MESSAGE, Role, Stream

KiB: Final = 1024
MiB: Final = 1024 * KiB
#: what one tombstone (a finished session's id, state and reason) costs, generously
TOMBSTONE_BYTES: Final = 512
#: the most a socket read hands websockets at once (asyncio's selector transports read 256 KiB)
READ_CHUNK: Final = 256 * KiB


@dataclass(frozen=True)
class Limits:
    """Every bound of the service, and the memory they add up to (:attr:`worst_case_memory`, which
    must fit ``memory_budget``).  The defaults make 444.1 MiB of a 512 MiB budget."""

    #: largest websocket message, envelope included (also websockets' ``max_size``, each way); the
    #: diff protocol's messages are at most 1 MiB
    max_message_size: int = 2 * MiB
    #: bytes kept per stream until the receiver acks them (payload + FRAME_COST per frame); announced
    #: to senders as ``window``
    max_buffered_bytes: int = 8 * MiB
    #: frame bytes queued for one connection's writer; the rest waits in the stream's buffer
    max_outgoing_bytes: int = 2 * MiB
    #: websockets' incoming frame queue per connection (its high-water mark, ``max_queue``)
    max_queue: int = 2
    #: websockets' outgoing transport buffer per connection (its high-water mark, ``write_limit``)
    write_limit: int = 64 * KiB
    #: open websocket connections (handshakes beyond it are answered 503)
    max_connections: int = 24
    #: open connections from one client address (behind a proxy: the proxy's)
    max_connections_per_address: int = 8
    #: sessions with an attached peer; a session nobody is attached to is dropped at once
    max_sessions: int = 8
    #: finished sessions remembered (state and reason, for a late re-attach)
    max_tombstones: int = 1024
    #: a live session fails when one of its roles is detached (or never came) for this long
    #: while the other is attached; an attached but quiet peer is not idle (pings police it)
    idle_timeout: float = 120.0
    #: how long a finished session is remembered, and how long a finished session may stay attached
    finished_ttl: float = 600.0
    #: what :attr:`worst_case_memory` may reach
    memory_budget: int = 512 * MiB

    def __post_init__(self) -> None:
        ints = ("max_message_size", "max_buffered_bytes", "max_outgoing_bytes", "max_queue", "write_limit",
                "max_connections", "max_connections_per_address", "max_sessions", "max_tombstones",
                "memory_budget")
        for name in ints:
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.max_message_size < 4 * ENVELOPE_OVERHEAD:
            raise ValueError(f"max_message_size must be at least {4 * ENVELOPE_OVERHEAD}")
        if self.max_buffered_bytes < self.max_message_size + FRAME_COST:
            raise ValueError("max_buffered_bytes must be at least max_message_size (a frame must fit the window)")
        if self.max_outgoing_bytes < self.max_message_size:
            raise ValueError("max_outgoing_bytes must be at least max_message_size")
        if self.max_connections_per_address > self.max_connections:
            raise ValueError("max_connections_per_address must not exceed max_connections")
        if self.idle_timeout <= 0 or self.finished_ttl < 0:
            raise ValueError("idle_timeout must be > 0 and finished_ttl >= 0")
        if self.worst_case_memory > self.memory_budget:
            raise ValueError(f"these limits need up to {self.worst_case_memory / MiB:.1f} MiB, more than "
                             f"memory_budget ({self.memory_budget / MiB:.1f} MiB): lower max_sessions, "
                             "max_connections, max_buffered_bytes, max_queue or max_message_size")

    @property
    def max_payload(self) -> int:
        """The largest ``data`` a peer may put in one log or diff message."""
        return self.max_message_size - ENVELOPE_OVERHEAD

    @property
    def connection_memory(self) -> int:
        """One connection at worst: websockets' queued frames, the frame being parsed and one socket
        read; the core's output queue, the message being written and the transport's buffer."""
        incoming = (self.max_queue + 1) * self.max_message_size + READ_CHUNK
        outgoing = self.max_outgoing_bytes + self.max_message_size + self.write_limit
        return incoming + outgoing

    @property
    def worst_case_memory(self) -> int:
        """Every queue of the service at once: the streams' buffers of every session, every
        connection's queues, the one message being decoded (and its payload), the tombstones and
        each session's two reports."""
        return (self.max_sessions * (len(Stream) * self.max_buffered_bytes + len(Role) * MAX_REPORT_MESSAGE)
                + self.max_connections * self.connection_memory
                + 2 * self.max_message_size
                + self.max_tombstones * TOMBSTONE_BYTES)

