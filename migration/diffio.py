"""The diff protocol's asyncio adapter: a :mod:`differ.protocol` core driven from the event loop,
its work done in worker threads.

Every request the core makes (read leaves, write verified leaves, set a size, rehash a patched
image, commit, abort) and the core's own handling of each message run through
:func:`migration.cancel.in_thread`: the loop that carries the session's websocket pings and acks
never waits on a disk, qemu-img or blake3 (the core's share is not small either: building the
content index and the resized trees of a 1 GiB memory image and a 4 GiB disk takes ~0.1-0.3 s).
The core is touched by one thread at a time, as every call is awaited before the next.

A cancellation waits for the work under way to end (``in_thread``), then fails the core: the peer
is told (its failed message is queued) and a target's patched copies are aborted, in a thread too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from differ.protocol import Abort, Event, Source, Target, TransferStats, fail_code
from differ.transfer import LocalIO
from migration.cancel import in_thread
from replay_migrate.errors import LocalProtocolError

T = TypeVar("T")
C = TypeVar("C", Source, Target)


class Runner(Protocol):
    """How blocking work is run: :func:`migration.cancel.in_thread` (tests pass others)."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


class AsyncAdapter(Generic[C]):
    """``core`` driven with ``io`` off the event loop. ``core`` stays readable (state, stats,
    roots) and its local calls that make no request (a target's ``start``) may be made directly."""

    def __init__(self, core: C, io: LocalIO, *, run: Runner = in_thread) -> None:
        self.core: C = core
        self.io = io
        self._run = run

    @property
    def stats(self) -> TransferStats:
        return self.core.stats

    async def receive_data(self, data: bytes) -> list[Event]:
        """Handle one wire message and fulfil every request that follows; returns the events.
        On any error or cancellation the side is FAILED, its patched copies aborted, and the error
        raised (the failed message for the peer is in :meth:`data_to_send`)."""
        return await self._drive(self.core.receive_data, data)

    def data_to_send(self) -> list[bytes]:
        return self.core.data_to_send()

    async def abort(self) -> None:
        self.core.abort()
        await self._undo()

    async def _drive(self, call: Callable[[bytes], list[Event]], data: bytes) -> list[Event]:
        try:
            events = await self._run(call, data)
            while (req := self.core.next_request()) is not None:
                result = await self._run(self.io.fulfil, req)
                events += await self._run(self.core.receive_result, result)
            return events
        except LocalProtocolError:
            raise  # our own call was refused: nothing changed, in the core or here
        except BaseException as e:
            self.core.abort(fail_code(e))  # nothing when the core failed already
            await self._undo()
            raise

    async def _undo(self) -> None:
        req = self.core.next_request()
        if isinstance(req, Abort):
            self.core.receive_result(await self._run(self.io.fulfil, req))
