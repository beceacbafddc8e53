"""The I/O half of the diff protocol: the requests of a :mod:`differ.protocol` core fulfilled
against block sources and sinks, and the blocking adapter that drives a core with them.

:class:`LocalIO` does each request in the calling thread (the asyncio adapter,
``migration.diffio``, calls it in worker threads). :class:`BlockingSource` and
:class:`BlockingTarget` pair a core with its I/O for the synchronous users (``sync``, ``diff``,
benchmarks, tests): feed them wire messages, and every request is fulfilled before the call
returns. :func:`run_local` moves the messages between the two in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from differ.merkle import MerkleTree
from differ.protocol import (
    Abort,
    Commit,
    Event,
    HashImage,
    ImageSpec,
    Of,
    ProtocolParams,
    ReadLeaves,
    Request,
    Result,
    SetSize,
    Source,
    SourceState,
    Target,
    TargetState,
    TransferStats,
    WriteLeaves,
    fail_code,
)
from differ.protocol.params import READ_RUN
from differ.similar import SimilarityIndex
from differ.source import LEAF_SIZE, BlockSink, BlockSource
from replay_migrate.errors import LocalProtocolError, ProtocolError, ReplayMigrateError


@dataclass
class ReferenceImage:
    """Content a side holds besides its images (base image, checkpoint): a reference or a base.
    ``similar``: a similarity index of it (:mod:`differ.similar`), for a source's XSIM answers."""

    source: BlockSource
    tree: MerkleTree
    similar: SimilarityIndex | None = None


@dataclass
class SourceImage:
    """Image A. ``base``: the same image at the checkpoint both sides started from, for the
    base-relative walk (used when the target holds a base with the same root) and XOR answers."""

    name: str
    source: BlockSource
    tree: MerkleTree
    base: ReferenceImage | None = None


@dataclass
class TargetImage:
    """Image B: its original content (``source``, read for references and deltas, never written),
    its tree, and the sink that patches a copy (None only for a dry run). ``base``: the same image
    at the common checkpoint (read for leaves the source still holds at the base's content)."""

    name: str
    source: BlockSource
    tree: MerkleTree
    sink: BlockSink | None = None
    base: ReferenceImage | None = None


def _spec(name: str, source: BlockSource, tree: MerkleTree, base: ReferenceImage | None,
          *, similar: bool = False) -> ImageSpec:
    """``similar``: pass the base's similarity index on (a source's images; a target needs none)."""
    if (tree.size, tree.leaf_count) != (source.size, source.leaf_count):
        raise ValueError(f"image {name!r}: tree and source disagree on the size")
    if base is None:
        return ImageSpec(name, tree)
    return ImageSpec(name, tree, base.tree, base.similar if similar else None)


class LocalIO:
    """Fulfils a core's requests against block sources and sinks, in the calling thread."""

    def __init__(
        self,
        images: Mapping[str, BlockSource],
        *,
        bases: Mapping[str, BlockSource] | None = None,
        references: Mapping[str, BlockSource] | None = None,
        sinks: Mapping[str, BlockSink] | None = None,
    ) -> None:
        self.sources = {Of.IMAGE: dict(images), Of.BASE: dict(bases or {}), Of.REFERENCE: dict(references or {})}
        self.sinks = dict(sinks or {})
        self._patched: dict[str, BlockSource] = {}
        """Sources over the patched images, opened on the first read-back and kept until the
        next write (a qcow2 one costs a ``qemu-img map``)."""

    def fulfil(self, req: Request) -> Result:
        """Do ``req``; its result (errors are the block source's or sink's)."""
        if not isinstance(req, ReadLeaves):
            self._close_patched()        # a write, a commit or an abort: what was read back is past
        if isinstance(req, ReadLeaves):
            if req.holding.of is Of.PATCHED:
                return req.answer(read_leaves(self._patched_source(req.holding.name), req.leaves))
            return req.answer(read_leaves(self.sources[req.holding.of][req.holding.name], req.leaves))
        if isinstance(req, WriteLeaves):
            for w in req.writes:
                if w.data is None:
                    self.sinks[w.name].zero(w.leaf)
                else:
                    self.sinks[w.name].write(w.leaf, w.data)
            return req.done()
        if isinstance(req, SetSize):
            self.sinks[req.name].set_size(req.size)
            return req.done()
        if isinstance(req, HashImage):
            patched = self.sinks[req.name].source()
            try:
                tree = MerkleTree.build(patched, req.fanout)
                return req.answer(tree.root, tree)
            finally:
                patched.close()
        if isinstance(req, Commit):
            for name in req.names:
                self.sinks[name].commit()
            return req.done()
        assert isinstance(req, Abort)
        for name in req.names:
            try:
                self.sinks[name].abort()
            except Exception:  # abort the others whatever one of them does
                pass
        return req.done()


    def _patched_source(self, name: str) -> BlockSource:
        if name not in self._patched:
            self._patched[name] = self.sinks[name].source()
        return self._patched[name]

    def _close_patched(self) -> None:
        for source in self._patched.values():
            source.close()
        self._patched.clear()


def read_leaves(source: BlockSource, leaves: Sequence[int]) -> list[bytes]:
    """``source``'s blocks at ``leaves`` (ascending); consecutive leaves are read in one call (a
    qcow2 source spawns qemu-img per call for compressed clusters), at most ``READ_RUN`` at once."""
    out: list[bytes] = []
    k = 0
    while k < len(leaves):
        run = 1
        while k + run < len(leaves) and leaves[k + run] == leaves[k] + run and run < READ_RUN:
            run += 1
        data = source.read(leaves[k], run)
        out += [data[j * LEAF_SIZE : (j + 1) * LEAF_SIZE] for j in range(run)]
        k += run
    return out


def make_source(images: Sequence[SourceImage], params: ProtocolParams | None = None, *,
                measure_plain: bool = False) -> tuple[Source, LocalIO]:
    """A source core over ``images`` and the I/O that reads them."""
    core = Source([_spec(im.name, im.source, im.tree, im.base, similar=True) for im in images], params,
                  measure_plain=measure_plain)
    io = LocalIO({im.name: im.source for im in images},
                 bases={im.name: im.base.source for im in images if im.base is not None})
    return core, io


def make_target(
    images: Sequence[TargetImage],
    params: ProtocolParams | None = None,
    *,
    references: Sequence[ReferenceImage] = (),
    dry_run: bool = False,
    key: bytes | None = None,
    verify_untouched: bool = True,
    verify_written: bool = False,
    max_sizes: Mapping[str, int] | None = None,
) -> tuple[Target, LocalIO]:
    """A target core over ``images`` (see :class:`~differ.protocol.Target`) and the I/O that
    reads them, their bases and ``references`` and patches them through their sinks."""
    if not dry_run and any(im.sink is None for im in images):
        raise ValueError("every image needs a sink unless dry_run")
    refs = {f"reference {k}": r for k, r in enumerate(references)}
    core = Target([_spec(im.name, im.source, im.tree, im.base) for im in images], params,
                  references={name: r.tree for name, r in refs.items()}, dry_run=dry_run, key=key,
                  verify_untouched=verify_untouched, verify_written=verify_written, max_sizes=max_sizes)
    io = LocalIO({im.name: im.source for im in images},
                 bases={im.name: im.base.source for im in images if im.base is not None},
                 references={name: r.source for name, r in refs.items()},
                 sinks={im.name: im.sink for im in images if im.sink is not None and not dry_run})
    return core, io


C = TypeVar("C", Source, Target)


class Blocking(Generic[C]):
    """A core and the I/O that fulfils its requests, in the calling thread: each call returns once
    the core waits for the peer again. If anything fails, the side is FAILED and a target's
    patched copies are aborted before the error is raised."""

    def __init__(self, core: C, io: LocalIO) -> None:
        self.core: C = core
        self.io = io

    @property
    def stats(self) -> TransferStats:
        return self.core.stats

    def receive_data(self, data: bytes) -> list[Event]:
        return self._drive(lambda: self.core.receive_data(data))

    def data_to_send(self) -> list[bytes]:
        return self.core.data_to_send()

    def abort(self) -> None:
        self.core.abort()
        self._undo()

    def _drive(self, call: Callable[[], list[Event]]) -> list[Event]:
        try:
            events = call()
            while (req := self.core.next_request()) is not None:
                events += self.core.receive_result(self.io.fulfil(req))
            return events
        except LocalProtocolError:
            raise  # our own call was refused: nothing changed, in the core or here
        except BaseException as e:
            self.core.abort(fail_code(e))  # nothing when the core failed already
            self._undo()
            raise

    def _undo(self) -> None:
        """Fulfil the abort a failed target asks for (its patched copies are dropped)."""
        req = self.core.next_request()
        if isinstance(req, Abort):
            self.core.receive_result(self.io.fulfil(req))


class BlockingSource(Blocking[Source]):
    @property
    def state(self) -> SourceState:
        return self.core.state

    def resume(self, next_batch: int) -> None:
        """Re-emit batches from ``next_batch`` (see :meth:`differ.protocol.Source.resume`)."""
        def call() -> list[Event]:
            self.core.resume(next_batch)
            return []

        self._drive(call)


class BlockingTarget(Blocking[Target]):
    @property
    def state(self) -> TargetState:
        return self.core.state

    @property
    def roots(self) -> dict[str, bytes]:
        return self.core.roots

    @property
    def progress(self) -> tuple[int, int]:
        return self.core.progress

    def start(self) -> None:
        self.core.start()

    def resume(self) -> None:
        self.core.resume()


def blocking_source(images: Sequence[SourceImage], params: ProtocolParams | None = None, *,
                    measure_plain: bool = False) -> BlockingSource:
    return BlockingSource(*make_source(images, params, measure_plain=measure_plain))


def blocking_target(images: Sequence[TargetImage], params: ProtocolParams | None = None, *,
                    references: Sequence[ReferenceImage] = (), dry_run: bool = False, key: bytes | None = None,
                    verify_untouched: bool = True, verify_written: bool = False,
                    max_sizes: Mapping[str, int] | None = None) -> BlockingTarget:
    return BlockingTarget(*make_target(images, params, references=references, dry_run=dry_run, key=key,
                                       verify_untouched=verify_untouched, verify_written=verify_written,
                                       max_sizes=max_sizes))


def _live(side: BlockingSource | BlockingTarget) -> bool:
    return side.state.value not in ("verified", "failed")


def run_local(source: BlockingSource, target: BlockingTarget, *, max_steps: int = 1 << 24) -> TransferStats:
    """Run a whole transfer in memory (CLI ``diff``/``sync``, tests); returns both sides' stats
    merged. Raises what either side raised, after delivering its failed message to the other (so
    the target's sinks are aborted whichever side failed)."""
    sides: tuple[tuple[BlockingSource | BlockingTarget, BlockingSource | BlockingTarget], ...] = (
        (target, source), (source, target))
    if target.state is TargetState.IDLE:
        target.start()
    try:
        for _ in range(max_steps):
            moved = False
            for sender, receiver in sides:
                for data in sender.data_to_send():
                    moved = True
                    receiver.receive_data(data)
            if not moved:
                break
    except BaseException:
        for sender, receiver in sides:  # tell the other side, whichever failed
            for data in sender.data_to_send():
                if _live(receiver):
                    try:
                        receiver.receive_data(data)
                    except ReplayMigrateError:
                        pass
        if _live(target):
            target.abort()
        raise
    if target.state is not TargetState.VERIFIED or source.state is not SourceState.VERIFIED:
        target.abort()
        raise ProtocolError(f"transfer stalled (source {source.state.value}, target {target.state.value})")
    return source.stats.merged(target.stats)
