"""What both protocol cores share: the state guard, requests one at a time, queued wire messages,
failing.

A side is driven with four calls, and does no I/O itself:

* ``receive_data(bytes) -> events``: one wire message from the peer. While a request is
  outstanding the message is queued (up to ``ProtocolParams.max_pending_bytes``) and handled once
  the request's result is in, in order (what is still queued when the side ends is dropped).
* ``next_request() -> request | None``: the one request the side waits for, if any (read leaves,
  write leaves, set a size, hash a patched image, commit, abort; :mod:`differ.protocol.events`).
* ``receive_result(result) -> events``: the adapter's answer to that request; the side goes on
  where it stopped, then handles the messages queued meanwhile.
* ``data_to_send() -> [bytes]``: wire messages for the peer, in order.

A handler is looked up by message type once the state table allowed the message
(:mod:`differ.protocol._state`). Handlers that need I/O are generators: they ``yield`` a request
and get its result back at that point, so each reads top to bottom although it spans several
calls. A handler's error fails the side: FAILED, a ``failed`` message queued for the peer (its code,
never the text), and for a target with patched copies an :class:`~differ.protocol.events.Abort`
request that the adapter must fulfil. Local misuse (a call the state does not allow, a result that
does not answer the outstanding request) raises :class:`LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Generic

from differ.merkle import DIGEST_SIZE, MerkleTree
from differ.protocol._state import Call, S, Table, allowed, terminal
from differ.protocol.events import (
    RESULT_OF,
    Abort,
    Event,
    Hashed,
    Holding,
    LeavesRead,
    PeerFailed,
    ReadLeaves,
    Request,
    Result,
)
from differ.protocol.framing import Framer, Message
from differ.protocol.messages import FailCode, MsgType, fail_code, integer
from differ.protocol.params import ProtocolParams
from differ.protocol.stats import TransferStats
from differ.similar import SimilarityIndex
from differ.source import LEAF_SIZE
from replay_migrate.errors import LocalProtocolError, ProtocolError

Handler = Generator[Request, Result, list[Event]]
"""A handler that needs I/O: yields requests, gets their results, returns its events."""
HandlerFn = Callable[[Message], "Handler | list[Event]"]


@dataclass(frozen=True)
class ImageSpec:
    """What a core knows of one image: its name, its tree and, for the base-relative walk, the
    tree of its base (the same image at the checkpoint both sides started from). The bytes stay
    with the adapter, which reads them when asked."""

    name: str
    tree: MerkleTree
    base: MerkleTree | None = None
    similar: SimilarityIndex | None = None
    """A similarity index of the base's leaves (source only: where to look for a leaf's most
    similar base leaf to XOR against; see :mod:`differ.similar`)."""


def check_images(images: Sequence[ImageSpec], params: ProtocolParams) -> None:
    """Refuse (ValueError: a caller's mistake) images a peer could not be told about."""
    names = [spec.name for spec in images]
    if not 1 <= len(images) <= params.max_images or len(set(names)) != len(names):
        raise ValueError("images must be 1..max_images with distinct names")
    for spec in images:
        if not 1 <= len(spec.name) <= params.max_name_len or spec.tree.leaf_count > params.max_leaves:
            raise ValueError(f"image {spec.name!r}: name or size outside the limits")
        if spec.base is not None and spec.base.leaf_size != spec.tree.leaf_size:
            raise ValueError(f"image {spec.name!r}: base tree with another leaf size")
        if spec.similar is not None and (spec.base is None or spec.similar.leaf_count != spec.base.leaf_count):
            raise ValueError(f"image {spec.name!r}: a similarity index that is not of its base")


def read_leaves(holding: Holding, leaves: Sequence[int]) -> Generator[Request, Result, tuple[bytes, ...]]:
    """``blocks = yield from read_leaves(...)`` in a handler: the blocks of ``leaves`` (ascending)."""
    result = yield ReadLeaves(holding, tuple(leaves))
    assert isinstance(result, LeavesRead)
    return result.blocks


class Endpoint(Generic[S]):
    """The driving calls and the failure rules of a side; the subclass has the handlers."""

    side = "side"

    def __init__(self, params: ProtocolParams | None, table: Table[S], initial: S, failed: S) -> None:
        self.params = params or ProtocolParams()
        self.stats = TransferStats()
        self.state: S = initial
        self._table: Table[S] = table
        self._failed: S = failed
        self._framer = Framer(self.params, self.stats, self._expected_bytes)
        self._out: deque[bytes] = deque()
        self._task: Handler | None = None
        self._task_name = ""
        self._task_to: frozenset[S] = frozenset()
        self._request: Request | None = None
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._ids = itertools.count(1)
        in_table = {t for row in table.values() for t in row if isinstance(t, MsgType)} - {MsgType.FAILED}
        if set(self._handlers()) != in_table:  # the table and the handlers drifted apart
            raise AssertionError(f"{self.side}: handlers for {sorted(self._handlers())}, table: {sorted(in_table)}")

    # -- the driving calls -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Handle one wire message from the peer (or queue it while a request is outstanding);
        returns what happened. Raises :class:`ProtocolError` / :class:`VerificationError` (the
        side is then FAILED and a failed message is queued for the peer)."""
        if terminal(self._table, self.state):
            # a finished transfer stays finished: a VERIFIED side has committed
            raise ProtocolError(f"message after the transfer ended ({self.state.value})")
        if self._request is not None:
            return self._safely(lambda: self._queue(data))
        return self._safely(lambda: self._handle(data))

    def next_request(self) -> Request | None:
        """The request this side waits for, if any: fulfil it and pass the result to
        :meth:`receive_result` (build it with the request's ``answer``/``done``)."""
        return self._request

    def receive_result(self, result: Result) -> list[Event]:
        """The result of :meth:`next_request`'s request; the side goes on, then handles the
        messages that were queued meanwhile (and raises what they raise)."""
        req = self._request
        if req is None:
            raise LocalProtocolError(f"{self.side}: a {type(result).__name__} result, but no request is outstanding "
                                     f"(state {self.state.value})")
        self._check_result(req, result)
        self._request = None
        if isinstance(req, Abort):
            return []
        events = self._safely(lambda: self._step(result))
        while self._inbox and self._request is None and not terminal(self._table, self.state):
            data = self._inbox.popleft()
            self._inbox_bytes -= len(data)
            events += self._safely(lambda: self._handle(data))  # noqa: B023 (called at once)
        if terminal(self._table, self.state):
            self._inbox.clear()  # a side that ended drops what came after it (see _state)
            self._inbox_bytes = 0
        return events

    def data_to_send(self) -> list[bytes]:
        """Messages to deliver to the peer, in order (each one wire message / websocket frame)."""
        out = list(self._out)
        self._out.clear()
        return out

    def abort(self, code: FailCode = FailCode.ABORTED) -> None:
        """Give up locally (user cancel, or ``code`` for a request the adapter could not fulfil:
        :func:`~differ.protocol.messages.fail_code` of its error): FAILED, the peer told, any
        outstanding request dropped (a target then asks for its patched copies to be aborted).
        Does nothing once the transfer ended."""
        if terminal(self._table, self.state):
            return
        allowed(self._table, self.state, Call.ABORT, self.side)
        self._fail(code)

    # -- for the subclasses --------------------------------------------------------------------

    def _handlers(self) -> dict[MsgType, HandlerFn]:
        raise NotImplementedError

    def _expected_bytes(self, mtype: MsgType) -> int:
        """The largest ``mtype`` message (reassembled) this side can legitimately receive now:
        derived from its own images and the sizes it accepted, so the fragments a peer announces
        are checked against it before they are buffered."""
        return self.params.max_logical_bytes

    def _abort_request(self) -> Abort | None:
        """What a failing side asks its adapter to undo (a target's patched copies)."""
        return None

    def _send(self, mtype: MsgType, body: Message) -> None:
        self._out.extend(self._framer.encode(mtype, body))

    def _call(self, call: Call) -> frozenset[S]:
        """Guard a local call: the states it may lead to, or :class:`LocalProtocolError`."""
        if self._request is not None:
            raise LocalProtocolError(f"{self.side}: {call.value} while a request is outstanding "
                                     f"({type(self._request).__name__} {self._request.id})")
        return allowed(self._table, self.state, call, self.side)

    def _run(self, name: str, handler: Handler | list[Event], to: frozenset[S]) -> list[Event]:
        """Start a handler (a local call's work too): run it up to its first request or its end."""
        if isinstance(handler, list):
            self._check_to(name, to)
            return handler
        self._task, self._task_name, self._task_to = handler, name, to
        return self._safely(lambda: self._step(None))

    # -- internals -------------------------------------------------------------------------------

    def _safely(self, step: Callable[[], list[Event]]) -> list[Event]:
        try:
            return step()
        except BaseException as e:
            self._fail(fail_code(e))
            raise

    def _queue(self, data: bytes) -> list[Event]:
        if self._inbox_bytes + len(data) > self.params.max_pending_bytes:
            raise ProtocolError(f"more than {self.params.max_pending_bytes} bytes of messages arrived while this "
                                "side was busy: the peer ignores flow control")
        self._inbox.append(data)
        self._inbox_bytes += len(data)
        return []

    def _handle(self, data: bytes) -> list[Event]:
        msg = self._framer.decode(data)
        if msg is None:
            return []
        mtype = MsgType(msg["t"])
        to = allowed(self._table, self.state, mtype, self.side)
        if mtype is MsgType.FAILED:
            code = FailCode(integer(msg, "c", min(FailCode), max(FailCode)))
            self._fail(code, tell_peer=False)
            return [PeerFailed(code)]
        return self._run(str(mtype), self._handlers()[mtype](msg), to)

    def _step(self, result: Result | None) -> list[Event]:
        task = self._task
        assert task is not None
        try:
            req = next(task) if result is None else task.send(result)
        except StopIteration as stop:
            self._task = None
            self._check_to(self._task_name, self._task_to)
            events: list[Event] = stop.value
            return events
        self._request = dataclasses.replace(req, id=next(self._ids))
        return []

    def _check_to(self, name: str, to: frozenset[S]) -> None:
        if self.state not in to:
            raise AssertionError(f"{self.side}: {name} left state {self.state.value}, the table allows "
                                 f"{sorted(s.value for s in to)}")

    def _check_result(self, req: Request, result: Result) -> None:
        want = RESULT_OF[type(req)]
        if result.id != req.id or not isinstance(result, want):
            raise LocalProtocolError(f"{self.side}: a {type(result).__name__} for request {result.id}, but the "
                                     f"outstanding request is {type(req).__name__} {req.id} "
                                     f"(answered by {want.__name__})")
        if isinstance(result, LeavesRead):
            assert isinstance(req, ReadLeaves)
            if len(result.blocks) != len(req.leaves) or any(
                not isinstance(b, bytes) or len(b) > LEAF_SIZE for b in result.blocks
            ):
                raise LocalProtocolError(f"{self.side}: {len(result.blocks)} blocks read for {len(req.leaves)} "
                                         f"leaves, or a block of more than {LEAF_SIZE} bytes")
        if isinstance(result, Hashed) and (not isinstance(result.root, bytes) or len(result.root) != DIGEST_SIZE):
            raise LocalProtocolError(f"{self.side}: a root of {DIGEST_SIZE} bytes expected")
        if isinstance(result, Hashed) and result.tree is not None and result.tree.root != result.root:
            raise LocalProtocolError(f"{self.side}: a tree whose root is not the root answered")

    def _fail(self, code: FailCode, tell_peer: bool = True) -> None:
        if terminal(self._table, self.state):
            return
        if self._task is not None:
            self._task.close()
            self._task = None
        self._request = None
        self._inbox.clear()
        self._inbox_bytes = 0
        self._framer.reset()
        self._out.clear()
        self.state = self._failed
        if tell_peer:
            self._send(MsgType.FAILED, {"c": int(code)})
        abort = self._abort_request()
        if abort is not None:
            self._request = dataclasses.replace(abort, id=next(self._ids))
