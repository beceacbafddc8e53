"""A migration, both ends: the source streams its recorder's log into a session and, at suspend,
answers the tree walk and ships blocks; the target replays the log into a clone of the shared
checkpoint as it arrives, then patches, verifies, restores and resumes, and confirms.

Both ends are asyncio code around blocking parts (libvirt, the recorder channel, hashing), which
run in worker threads. The order of a suspend, on both sides alike so their guests stay alike:
let the agent flush its last frames, sync and freeze the file systems, pause, save. Nothing is
resumed at the target unless every block and both roots verified; the source's VM is released
only after the target confirms, and on any failure it is restored and resumed where it was.

After the confirm the user's VM lives at the target, and the source's copy must never come back
by accident: :meth:`SourceSide.release` deletes everything it could be restored or booted from
(its domain is already gone: the save ended it). A guest resumed from a saved state has the clock
of the moment it was saved: the target's, and a source resumed after a failure, are set to the
host's (every clone is set so when it starts: ``checkpoint.start_clone``).

After a verified migration both sides register the state they now share as the next common
checkpoint (``store.chain``, from what each holds: the trees the migration computed, the verified
memory image, the disk built leaf by leaf), and the migrated VM runs over its disk: the way back
replays only what was done since and ships only what that left different. ``chain_limit`` bounds
the chain (``store.chain.DEFAULT_CHAIN_LIMIT``; 0: register nothing).

A cancellation (a signal, or another part of the command failing) is a failure like any other:
the source VM is put back as it was (resumed and thawed; restored if it was saved), the target
removes the clone it made, and the session is told so the other side does the same. Blocking VM
operations run through :func:`migration.cancel.in_thread`, so the cleanup never races one still
running. Each side's ``committing`` says it passed the point of no return (the target verified
every block and both roots): the commands let a signal that comes later complete the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from differ.merkle import MerkleTree
from differ.protocol import (
    BatchApplied,
    Commit,
    HashImage,
    Of,
    ProtocolParams,
    ReadLeaves,
    Request,
    Source,
    SourceState,
    Target,
    TargetState,
    TransferStats,
    WalkDone,
    WriteLeaves,
)
from differ.protocol import Verified as DiffVerified
from differ.source import BlockSink
from differ.transfer import ReferenceImage, make_source, make_target
from migration import halves
from migration.cancel import drop, in_thread, settle
from migration.catchup import CATCHUP_POLL_S, PauseGate, ReplayProgress, wait_to_pause
from migration.diffio import AsyncAdapter
from migration.halves import Figures, added, all_true, largest, local, measured_by, preferred
from migration.logbatch import LOG_BATCH_S, LogBatch
from migration.suspenddir import save_until_whole, suspend_image
from migration.syncdump import SyncDump
from migration.timeline import SOURCE, TARGET, Timeline, downtime_breakdown, excluded_seconds, merge
from recorder.agent import DEFAULT_FRAME_MS, DEFAULT_SYNC_IDLE_MS
from recorder.capture import DEFAULT_SYNC_SETTLE_MS
from recorder.logformat import Button, Key, LogDecoder, SyncMark
from replay_migrate import savefmt
from replay_migrate.errors import (
    ImageError,
    LogFormatError,
    NoSuchDomainError,
    ProtocolError,
    ReplayError,
    ReplayMigrateError,
    VerificationError,
    VMError,
)
from replay_migrate.safeopen import write_output
from replayer.link import RecorderLink
from replayer.logfeed import EventFeed, LogPump
from replayer.replay import ReplayConfig, Replayer, ReplayStats
from server.client import SessionClient
from server.clientcore import Frame, LogEnded, SessionFailedError
from server.wire import Reason, Role, State, Stream
from store import chain
from store import checkpoint as ckpt
from store.vmstate import (
    DISK,
    MEMORY,
    CheckpointTrees,
    VmState,
    checkpoint_images,
    checkpoint_trees,
    make_sinks,
    open_and_build,
    open_sources,
    open_target_images,
    plain_transfer_bytes,
    references,
    source_images,
)
from vm.machine import Hypervisor, Machine, MachineState, create_overlay, file_allocated

MARK_LATE_S = 1.0
"""How much later than ``DEFAULT_SYNC_IDLE_MS + DEFAULT_SYNC_SETTLE_MS`` after the last key the
agent's mark of a screen that held still at once may come: one sample period, and the guest's time to
copy and digest a window-sized region. Measured on ``unpack``'s recording under TCG: 0.13-0.48 s
(marks 1.43-1.78 s after the key); twice the worst as margin."""
FLUSH_S = (DEFAULT_SYNC_IDLE_MS + DEFAULT_SYNC_SETTLE_MS + DEFAULT_FRAME_MS) / 1000 + MARK_LATE_S
"""Longest the source's agent gets before the guest is frozen (2.55 s with the agent's defaults):
the last sync mark of a screen that held still comes ``DEFAULT_SYNC_IDLE_MS`` (0.3 s) after the last
key, once the region has held still for ``DEFAULT_SYNC_SETTLE_MS`` (1 s), give or take
``MARK_LATE_S``, and its frame is cut within ``DEFAULT_FRAME_MS`` (0.25 s). That mark matters: the
target waits for it, so it saves only once its screen looks like the source's. A screen still
changing gets its mark later or never; waiting for it would be the user's time, not the target's."""
MIN_FLUSH_S = 0.5
"""Shortest wait before freezing (two frame periods): once no key or button event came since the
log's last sync mark (the user was idle and the screen settled), nothing more is coming."""
SETTLE_S = 1.0
"""Time the target's guest gets after the last replayed event before it is frozen."""
SETTLED_S = 0.2
"""The same when the log's last sync mark was met with no key or button after it: the screen
already matched the source's, so only the last pointer motion may still be on its way."""
DRAIN_S = 0.5
"""Longest the source keeps reading the recorder channel after pausing, for frames in flight."""
DRAIN_QUIET_S = 0.1
"""It stops earlier once a read this long brings nothing: a paused guest writes no more, and what
it wrote is already in the channel's buffers (waiting the whole 0.5 s delayed the target's save)."""
ABORT_TIMEOUT_S = 10.0
"""How long a failing side tries to tell the session before it cleans up anyway."""
CONFIRM_TIMEOUT_S = 600.0
"""How long the source waits for the target's confirm after shipping the blocks."""
RELEASE_WAIT_S = CONFIRM_TIMEOUT_S
"""How long the resumed target stays attached for the source to get the confirm: a service that
restarts in between learns from the target (only) that it resumed, and confirms to the source.
As long as the source may wait, so that it never gives up on a target that did resume."""
LOG_POLL_S = 0.2
REPORT_WAIT_S = 30.0
"""How long the source waits, after the confirm, for the target's half of the report (the target
sends it right after its ``resumed``): a target that never sends one leaves its figures unknown."""
RELEASED_NOTE = "released"
"""The note a released source leaves in its clone folder (which keeps only its logs)."""


@dataclass
class Report:
    """DESIGN.md §9: what a migration cost and whether it verified.  Each side fills what it
    measures; how the two halves make the whole is declared per field (:mod:`migration.halves`)."""

    log_bytes: int = 0
    log_frames: int = 0
    hash_bytes: int = added()
    block_bytes: int = added()
    fingerprint_bytes: int = added()
    kind_bytes: int = added()
    """Per-leaf request and answer kinds of the diff (``TransferStats.kind_bytes``)."""
    framing_bytes: int = added()
    """The diff-protocol messages' envelopes (``TransferStats.framing_bytes``)."""
    wire_bytes: int = measured_by(Role.SOURCE)
    """All traffic of the source's connection to the session (the target's carries about as much)."""
    wire_detail: dict[str, int] = local()  # noqa: RUF009 (a dataclasses.field with a factory)
    """This side's connection by what it carries (``SessionClient.wire_detail``): log and diff
    payloads, their session envelopes, acks, replay progress, control messages."""
    baseline_bytes: int = measured_by(Role.SOURCE)
    savings: float = measured_by(Role.SOURCE, 0.0)
    divergent_blocks: dict[str, int] = largest()  # noqa: RUF009 (a dataclasses.field with a factory)
    referenced_blocks: int = added()
    """Blocks the target already held: references, duplicates, and its checkpoint's copy."""
    delta_blocks: int = added()
    """Blocks sent as changes: against the target's block (delta) or the checkpoint's (XOR)."""
    full_blocks: int = added()
    round_trips: int = added()
    events_replayed: int = measured_by(Role.TARGET)
    sync_marks_met: int = measured_by(Role.TARGET)
    sync_marks_failed: int = measured_by(Role.TARGET)
    replay_s: float = measured_by(Role.TARGET, 0.0)
    diff_s: float = preferred(Role.TARGET, 0.0)
    transfer_s: float = preferred(Role.TARGET, 0.0)
    downtime_s: float = measured_by(Role.SOURCE, 0.0)
    catchup_s: float = measured_by(Role.SOURCE, 0.0)
    """Seconds the source kept the VM running at suspend for the target's replay alone (its own
    screen had settled): not downtime, but part of the time from ``suspend`` to the resumed VM."""
    downtime_breakdown: dict[str, float] = local()  # noqa: RUF009 (a dataclasses.field with a factory)
    """Seconds per phase along the downtime's critical path (``migration.timeline``): both sides'
    phases in an embedded migration, this side's own otherwise."""
    timeline: list[list[object]] = local(list)  # noqa: RUF009
    """Every phase noted, ``[side, phase, start, end]`` on the host's monotonic clock (comparable
    between the two sides when both run on one host: the benchmark merges them)."""
    verified: bool = all_true()
    next_checkpoint: str = preferred(Role.TARGET, "")
    """The checkpoint both sites registered from the verified state (``store.chain``), which the
    migrated VM records against: the way back starts from it. Empty if it could not be registered."""

    def add_transfer(self, stats: TransferStats) -> None:
        """Take every number of the transfer's summary (``TransferSummary``: same names here)."""
        summary = stats.summary()
        for f in fields(summary):
            setattr(self, f.name, getattr(summary, f.name))

    def finish(self) -> None:
        self.savings = round(1 - self.wire_bytes / self.baseline_bytes, 4) if self.baseline_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("replay_s", "diff_s", "transfer_s", "downtime_s"):
            d[k] = round(d[k], 3)
        return d

    def half(self, role: Role) -> Figures:
        """What ``role`` measured (the rest None): what it sends the other side at the end."""
        return halves.half(Report, self.as_dict(), role)


def whole_report(role: Role, mine: Figures, theirs: Mapping[str, Any] | None) -> Figures:
    """The whole report as ``role`` sees it: its own half and the other side's, when that came
    and checks (else the other side's figures are unknown: None)."""
    checked = halves.check_half(Report, theirs, role.peer) if theirs is not None else None
    source, target = (mine, checked) if role is Role.SOURCE else (checked, mine)
    return halves.merge(Report, source, target)


def request_phase(req: Request) -> str:
    """The timeline's name for the time a diff-protocol request took."""
    if isinstance(req, WriteLeaves):
        return "patch"
    if isinstance(req, HashImage):
        return "verify"
    if isinstance(req, ReadLeaves):
        return "verify" if req.holding.of is Of.PATCHED else "read"
    if isinstance(req, Commit):
        return "commit"
    return type(req).__name__.lower()


async def _pump_diff(client: SessionClient, side: AsyncAdapter[Source] | AsyncAdapter[Target], *,
                     stream: Stream, until: Callable[[], bool],
                     on_event: Callable[[object], None] | None = None,
                     on_frame: Callable[[], None] | None = None) -> None:
    """Move diff-protocol messages between ``side`` and the session until ``until()``. The side's
    reads, writes and rehashes run in worker threads (``AsyncAdapter``): the loop stays free for
    the session's pings and acks while a batch is written or the patched images are verified."""
    for msg in side.data_to_send():
        await client.send_diff(msg)
    while not until():
        ev = await client.recv()
        if isinstance(ev, Frame) and ev.stream is stream:
            if on_frame is not None:
                on_frame()
            for dev in await side.receive_data(ev.data):
                if on_event is not None:
                    on_event(dev)
            for msg in side.data_to_send():
                await client.send_diff(msg)


def _open_checkpoint_images(ck: ckpt.Checkpoint, trees: CheckpointTrees,
                            stack: ExitStack) -> asyncio.Task[dict[str, ReferenceImage]]:
    """Open the checkpoint's images (``checkpoint_images``) onto ``stack`` in a thread, while the
    side hashes its saved state: they depend on the checkpoint only, and opening them is mostly
    waiting on ``qemu-img info`` and ``map`` of its disk (~25 ms inside the downtime otherwise).
    The thread has a stack of its own, entered in ``stack`` here; after a failure,
    :func:`_settled` waits for it, so what it opened is closed with ``stack``."""
    return asyncio.ensure_future(in_thread(checkpoint_images, ck, trees, stack.enter_context(ExitStack())))


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait for ``task`` to end whatever cancels the waiter; its exception counts as seen (the
    caller raises its own)."""
    await settle([task])
    drop(task)


def _wire(client: SessionClient) -> int:
    return client.wire_bytes_sent + client.wire_bytes_received


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 10 << 20 else f"{n / (1 << 20):.0f} MiB"


def _divergent(ev: WalkDone) -> str:
    """The walk's outcome for the progress line (its note while the blocks travel)."""
    return "divergent blocks: " + ", ".join(f"{name} {n}" for name, n in ev.divergent.items())


def _state_bytes(state: VmState) -> int:
    """What hashing a saved state reads (its memory image and disk overlay, allocated), for the
    progress line; 0 when a file is not there."""
    total = 0
    for f in (state.memory, state.disk):
        with contextlib.suppress(OSError):
            total += file_allocated(f)
    return total


def _reason(e: BaseException) -> Reason:
    """The session's word for why this side gives up (no exception text crosses the wire)."""
    if isinstance(e, ReplayError | LogFormatError):
        return Reason.REPLAY_FAILED
    if isinstance(e, VerificationError):
        return Reason.VERIFY_FAILED
    if isinstance(e, ProtocolError):
        return Reason.DIFF_FAILED
    if isinstance(e, VMError | ImageError):
        return Reason.VM_FAILED
    return Reason.CANCELLED


async def _acknowledge_confirm(client: SessionClient, log: logging.Logger) -> None:
    """(Source) let the target go; the migration is done whatever happens here."""
    try:
        await client.acknowledge_confirm(ABORT_TIMEOUT_S)
    except (ReplayMigrateError, TimeoutError) as err:
        log.warning("could not tell the target that the confirm arrived: %s", err)


def _set_clock(m: Machine, log: logging.Logger) -> None:
    """Set a guest's clock to the host's after it resumed from a saved state. A failure is logged,
    not raised: the VM runs the user's state, and a clock is no reason to take it away."""
    try:
        log.info("%s: clock set to the host's (off by %.3f s now)", m.name, m.sync_clock())
    except ReplayMigrateError as e:
        log.warning("could not set the clock of %s to the host's: %s", m.name, e)


async def _save_ended(saving: asyncio.Task[None] | None, tl: Timeline) -> None:
    """Wait for the save call whose image was whole before (``save_until_whole``; the hashing read
    it meanwhile): its error, if any, raised here, before the walk relies on the saved state."""
    if saving is not None:
        with tl.phase("save end"):
            await saving


async def _save_settled(saving: asyncio.Task[None] | None, log: logging.Logger) -> None:
    """On a failure: wait for a save call still running to end (nothing may touch the domain, to put
    it back or discard it, before libvirt is done with it); its own error only logged."""
    if saving is None:
        return
    await settle([saving])
    if saving.done() and not saving.cancelled() and saving.exception() is not None:
        log.warning("the save failed too: %s", saving.exception())


async def _give_up(client: SessionClient, e: BaseException, log: logging.Logger) -> None:
    """Fail the session so the peer learns at once (unless the session already ended)."""
    if isinstance(e, SessionFailedError):
        return
    try:
        await asyncio.wait_for(client.abort(_reason(e)), ABORT_TIMEOUT_S)
    except (ReplayMigrateError, TimeoutError) as err:
        log.warning("could not tell the session that this side failed: %s", err)


# ---- the source ----------------------------------------------------------------------------------
class SourceSide:
    """The source site's half: ``stream_log`` while the user works, then ``suspend``."""

    def __init__(self, hv: Hypervisor, machine: Machine, checkpoint: ckpt.Checkpoint, client: SessionClient,
                 *, params: ProtocolParams | None = None, suspend_dir: Path | None = None,
                 chain_limit: int = chain.DEFAULT_CHAIN_LIMIT, log_batch_s: float = LOG_BATCH_S) -> None:
        self.hv = hv
        self._held = LogBatch(log_batch_s)
        """Agent frames read but not yet forwarded (``migration.logbatch``; ``log_batch_s`` 0: none)."""
        self._holding = True
        """Whether frames may be held (while the user works; never from the suspend on)."""
        self.machine = machine
        self.suspend_dir = suspend_dir
        """Where to save the VM at suspend (``migration.suspenddir``: a tmpfs folder; None, or no
        room there: the clone's folder)."""
        self.checkpoint = checkpoint
        self.client = client
        self.params = params
        self.chain_limit = chain_limit
        self._verified: tuple[dict[str, bytes], dict[str, MerkleTree], CheckpointTrees] | None = None
        """(roots, trees, the checkpoint's trees) of the verified state: the next checkpoint's."""
        self._ck_manifest = checkpoint.manifest
        self.log_end = (1, 0)
        """(the end-of-log frame's seq, the log's clock origin): where the saved state's log stands."""
        self.report = Report()
        self.whole: Figures = self.report.half(Role.SOURCE)
        """The whole report: this side's half and, once the migration is done, the target's."""
        self.stats: TransferStats | None = None
        self.state_files: VmState | None = None
        self.saved_allocated_bytes = 0
        """Disk space the saved memory image took (it is deleted at release)."""
        self.run_dir = ckpt.run_dir_of(machine)
        """The source clone's folder (checked: the only folder ``release`` deletes from)."""
        self.progress: Callable[[str, int, int], None] = lambda what, done, total: None
        """(phase, done, total): the CLI passes a terminal progress line (``cli.report.Progress``)."""
        self.progress_note: Callable[[str], None] = lambda text: None
        """A detail of the current phase for the progress line."""
        self.screenshot_at_suspend: Path | None = None
        """Where to save the source's screen at the moment it is paused (the demo shows it)."""
        self.sync_dump: SyncDump | None = None
        """Keeps every sync mark's region as the screen shows it when the mark arrives, and the
        log as forwarded (``migration.syncdump``: diagnosis of failed marks)."""
        self.link = RecorderLink(machine)
        self._log = LogPump()
        """What was forwarded, decoded: checked before it is sent on, and ended at suspend."""
        self._trees: asyncio.Task[CheckpointTrees] | None = None
        self._image: Path | None = None
        self._saving: asyncio.Task[None] | None = None
        """The save call at suspend, running on after its image is whole (``save_until_whole``)."""
        """Where ``suspend`` saves the VM (known before the save starts: a cancelled save may
        still have completed, and the cleanup restores from it)."""
        self.committing = False
        """The target verified every block and both roots: from here the migration completes."""
        self.settled = False
        """Whether no key or button event came since the log's last sync mark (the agent takes one
        after them once the screen settles; pointer motion alone brings none)."""
        self.flush_s = 0.0
        """How long ``suspend`` waited before freezing the guest: for the agent's last frames, then
        for the target to replay them (``migration.catchup``): the VM ran meanwhile."""
        self.catchup_s = 0.0
        """The part of ``flush_s`` spent waiting for the target alone (its screen had settled)."""
        self.caught_up = False
        """Whether the target had replayed every frame forwarded when the VM was paused."""
        self._sent_log = 0
        """The seq of the last log frame sent into the session."""
        self._gate: PauseGate | None = None
        self.timeline = Timeline(SOURCE)
        """This side's phases (``migration.timeline``): where its share of the downtime went."""
        self.t_paused = 0.0
        self.t_confirmed = 0.0
        self.log = logging.getLogger(f"replay_migrate.source.{machine.name}")

    def _in_checkpoint(self, seq: int) -> bool:
        """Whether agent frame ``seq`` is in the checkpoint's state already (``Manifest.log_resume``):
        fed to the source's own decoder, not forwarded (the target's decoder expects the cut too)."""
        m = self._ck_manifest
        header = self._log.header
        return (0 < seq < m.log_resume and header is not None
                and header.clock_origin_us == m.log_origin_us)

    async def _forward(self, poll_s: float, *, show: bool = True) -> int:
        frames = await in_thread(self.link.frames, poll_s)
        for fr in frames:
            dump = self.sync_dump
            if dump is not None:
                dump.log_frame(fr.data)
            for ev in self._log.feed(fr.data):
                if isinstance(ev, SyncMark):
                    self.settled = True
                    if dump is not None:
                        await in_thread(dump.source_mark, self.machine, ev)
                elif isinstance(ev, (Key, Button)):     # pointer motion alone brings no new mark
                    self.settled = False
                    if self._gate is not None:          # typed while the suspend waits
                        self._gate.input(time.monotonic())
            if self._in_checkpoint(fr.seq):
                self.link.ack(fr.seq)
                continue
            self._held.add(fr.seq, fr.data, time.monotonic())
        await self._forward_held(force=not self._holding)
        if show:
            behind = self.client.in_flight(Stream.LOG)
            self.progress_note(f"{self.report.log_frames} frames; the target is {_kib(behind)} behind")
            self.progress("recording", self.report.log_bytes, 0)
        return len(frames)

    async def _forward_held(self, *, force: bool) -> None:
        """Forward the held agent frames once they are due (``migration.logbatch``), or at once when
        ``force``d; each is acked to the agent only once its session frame is journalled."""
        if not self._held.due(time.monotonic(), force=force):
            return
        for last, data in self._held.take(self.client.max_payload):
            self._sent_log = await self.client.send_log(data)
            self.link.ack(last)          # journalled in the session: the agent may forget it
            self.report.log_bytes += len(data)
            self.report.log_frames += 1

    def _show_catch_up(self, sent: int, replayed: int) -> None:
        self.progress_note(f"the target replayed log frame {replayed} of {sent}; the VM runs on")
        self.progress("catch-up", replayed, sent)

    async def _end_log(self) -> None:
        """Close the forwarded log with its end-of-log event (the agent records on until the VM is
        saved, so it never writes one itself): the target then tells a whole log from a cut one."""
        await self._forward_held(force=True)
        self.log_end = (self._log.decoder.next_seq, self._log.header.clock_origin_us if self._log.header else 0)
        data = self._log.end_frame()
        await self.client.send_log(data)
        self.report.log_bytes += len(data)
        self.report.log_frames += 1

    async def open(self) -> None:
        """Connect to the source's recorder agent (a command does this before it makes a target:
        a source whose agent does not answer fails the command before anything else starts)."""
        if self.link.hello is None:
            await in_thread(self.link.open)

    async def stream_log(self, stop: asyncio.Event) -> None:
        """Forward the recorder's frames into the session until ``stop`` is set. The checkpoint's
        trees are loaded (or computed, the first time) meanwhile, off the suspend's critical path.
        A failure or cancellation here fails the session (the target then removes its clone); the
        VM itself was not touched."""
        # ends only by raising, when the session fails meanwhile (the target gave up or was
        # cancelled): a source whose user is idle sends nothing and would not notice otherwise
        failed = asyncio.create_task(self.client.wait_confirmed())
        try:
            self._trees = asyncio.create_task(asyncio.to_thread(checkpoint_trees, self.checkpoint))
            await self.open()
            while not stop.is_set():
                await self._forward(LOG_POLL_S)
                if failed.done():
                    failed.result()
        except BaseException as e:
            drop(failed)
            if self._trees is not None:
                self._trees.cancel()
            await asyncio.shield(_give_up(self.client, e, self.log))
            self.link.close()
            raise
        drop(failed)

    async def suspend(self) -> Report:
        """End the log, quiesce, pause, save; answer the walk and ship blocks; wait for the confirm.
        On any failure or cancellation before the confirm, the VM is put back as it was."""
        m = self.machine
        tl = self.timeline
        t_pause = time.monotonic()
        self._holding = False           # the target needs every frame now: none is held from here on
        try:
            t0 = time.monotonic()
            self._gate = gate = PauseGate(t0, FLUSH_S, MIN_FLUSH_S)
            with tl.phase("flush"):
                while not (gate.flushed(time.monotonic(), self.settled) or gate.timed_out(time.monotonic())):
                    await self._forward(0.1)
            t_flushed = time.monotonic()
            with tl.phase("catch-up"):      # the VM runs on: before the pause, not downtime
                waited = await wait_to_pause(
                    gate, lambda: self._forward(CATCHUP_POLL_S, show=False),
                    lambda: (self.settled, self._sent_log, self.client.peer_replayed), on_wait=self._show_catch_up)
            self._gate = None
            self.caught_up = waited.caught_up
            self.flush_s = time.monotonic() - t0
            self.catchup_s = time.monotonic() - t_flushed
            self.log.info("paused %.2f s after the suspend began (%.2f s for the target, which %s)", self.flush_s,
                          self.catchup_s, "caught up" if waited.caught_up
                          else f"replayed frame {waited.replayed} of {waited.sent}: the rest is in the downtime")
            self.progress("saving", 0, 0)
            # freezing flushes each file system first (FIFREEZE syncs it); a separate `sync` through
            # the guest agent cost another 0.1-0.7 s under TCG
            with tl.phase("freeze"):
                await in_thread(m.fsfreeze)
            with tl.phase("pause"):
                await in_thread(m.pause)
            self.t_paused = t_pause = time.monotonic()
            if self.screenshot_at_suspend is not None:
                with tl.phase("screenshot"):
                    shot = await in_thread(m.screenshot)
                    write_output(self.screenshot_at_suspend, shot.png(), "screenshot")
            with tl.phase("drain"):
                t_drain = time.monotonic()
                while await self._forward(DRAIN_QUIET_S) and time.monotonic() < t_drain + DRAIN_S:
                    pass
                self.link.close()
                await self._end_log()
                await self.client.suspend()
                await self.client.end_log()
            self._image = image = await in_thread(self._suspend_image)
            with tl.phase("save"):
                self._saving = await save_until_whole(m, image)
            self.saved_allocated_bytes = file_allocated(image)
            self.progress("saving", self.saved_allocated_bytes, 0)
            self.state_files = VmState(image, self.run_dir / "disk.qcow2", self.checkpoint)
            trees = await self._answer_walk()
            self.progress("restore", 0, 0)           # the target restores its VM; the confirm follows
            with tl.phase("confirm"):
                await self.client.wait_confirmed(CONFIRM_TIMEOUT_S)
            self.t_confirmed = time.monotonic()
        except BaseException as e:
            await asyncio.shield(_save_settled(self._saving, self.log))
            if self.client.confirmed or (isinstance(e, SessionFailedError) and not e.keep_vm):
                raise      # the target runs the VM now: the source must not come back too
            await asyncio.shield(_give_up(self.client, e, self.log))
            self.link.close()
            await asyncio.shield(in_thread(self._restore))
            raise
        self.report.downtime_s = self.t_confirmed - t_pause
        self.report.catchup_s = round(self.catchup_s, 3)
        self.report.verified = True
        self.report.wire_bytes = self.client.wire_bytes_sent + self.client.wire_bytes_received
        self.report.wire_detail = self.client.wire_detail()
        # the report's baseline, once the VM runs at the target: never inside the downtime (it
        # reads and compresses every leaf that changed since the checkpoint, on the cores the
        # target's restore needs)
        with tl.phase("baseline"):
            try:
                self.report.baseline_bytes = await asyncio.to_thread(self._baseline, trees)
            except ReplayMigrateError as e:     # a number for the report: the migration is done
                self.log.warning("could not measure the plain transfer's bytes: %s", e)
        self.report.timeline = [span.as_list() for span in tl.spans]
        self.report.downtime_breakdown = downtime_breakdown(tl.spans, t_pause, self.t_confirmed)
        self.report.finish()
        await self._exchange_reports()
        await _acknowledge_confirm(self.client, self.log)
        return self.report

    async def _exchange_reports(self) -> None:
        """Wait (briefly) for the target's half, send ours before ``released`` (the target goes
        once it has that), and make the whole.  The migration is done: nothing here fails it."""
        try:
            theirs = await self.client.wait_peer_report(REPORT_WAIT_S)
        except ReplayMigrateError as e:     # the session is gone: the target runs the VM all the same
            self.log.warning("no report from the target: %s", e)
            theirs = None
        if theirs is None:
            self.log.warning("the target sent no report within %.0f s: its figures are unknown", REPORT_WAIT_S)
        mine = self.report.half(Role.SOURCE)
        try:
            await self.client.report(mine)
        except ReplayMigrateError as e:
            self.log.warning("could not send this side's report to the target: %s", e)
        self.whole = whole_report(Role.SOURCE, mine, theirs)

    def _suspend_image(self) -> Path:
        return suspend_image(self.run_dir, self.suspend_dir, self.machine.memory_bytes())

    def _baseline(self, trees: dict[str, MerkleTree]) -> int:
        """DESIGN.md §9 ``baseline_bytes`` of the saved state, from the trees the walk used (no
        page is hashed again): zstd of every leaf that differs from the checkpoint's."""
        assert self.state_files is not None
        ck_trees = checkpoint_trees(self.checkpoint)
        with open_sources(self.state_files, ck_trees) as sources:
            return plain_transfer_bytes(sources, trees, ck_trees)

    async def _answer_walk(self) -> dict[str, MerkleTree]:
        """Hash the saved state, answer the target's walk and ship the blocks; returns the trees."""
        assert self.state_files is not None
        tl = self.timeline
        self.progress("hashing", 0, 0)
        with tl.phase("checkpoint trees"):
            trees = await (self._trees or asyncio.to_thread(checkpoint_trees, self.checkpoint))
        with ExitStack() as stack:
            self.progress("hashing", _state_bytes(self.state_files), 0)
            t0 = time.monotonic()
            opening = _open_checkpoint_images(self.checkpoint, trees, stack)
            try:
                with tl.phase("hash"):      # the disk overlay is opened while the memory image hashes
                    sources, mine = await in_thread(open_and_build, self.state_files, trees,
                                                    stack.enter_context(ExitStack()))
                await _save_ended(self._saving, tl)
            except BaseException:
                await _settled(opening)
                raise
            with tl.phase("open"):
                bases = await opening
                core, io = make_source(source_images(sources, mine, bases), self.params)
            src = AsyncAdapter(core, io, on_request=self._note_request)
            tl.ready()
            walked = [0.0]
            at = [_wire(self.client)]

            def seen(ev: object) -> None:
                if isinstance(ev, WalkDone):
                    walked[0] = time.monotonic()
                    tl.add("walk", t0_walk, walked[0])
                    at[0] = _wire(self.client)
                    self.progress("blocks", 0, 0)
                    self.progress_note(_divergent(ev))

            def moved() -> None:
                self.progress("blocks" if walked[0] else "walk", _wire(self.client) - at[0], 0)

            self.progress("walk", 0, 0)
            t0_walk = time.monotonic()
            await _pump_diff(self.client, src, stream=Stream.T2S, on_event=seen, on_frame=moved,
                             until=lambda: src.core.state in (SourceState.VERIFIED, SourceState.FAILED))
            if src.core.state is not SourceState.VERIFIED:
                raise VerificationError("the target did not verify the transfer")
            tl.add("blocks", walked[0] or t0_walk)
            with tl.phase("verified"):
                await self.client.wait_state(State.VERIFIED, CONFIRM_TIMEOUT_S)
            self.committing = True
            want = {MEMORY: mine[MEMORY].root, DISK: mine[DISK].root}
            if dict(self.client.roots or {}) != want:
                raise VerificationError("the target reports roots other than the source's")
            self._verified = (want, mine, trees)
            self.stats = src.stats
            self.report.add_transfer(src.stats)
            self.report.diff_s = (walked[0] or time.monotonic()) - t0
            self.report.transfer_s = time.monotonic() - (walked[0] or t0)
        return mine

    def _note_request(self, req: Request, start: float, end: float) -> None:
        self.timeline.add(request_phase(req), start, end)

    def _restore(self) -> None:
        """Put the source VM back as it was (the migration did not finish)."""
        try:
            back = put_back(self.hv, self.machine.name, self._image)
            self.log.warning("migration stopped: %s runs on at the source", back.name)
        except ReplayMigrateError as e:
            image = self._image
            self.log.error("could not resume the source VM %s: %s (its state is in %s)", self.machine.name, e,
                           image if image is not None and image.is_file() else "the domain")
            return
        _set_clock(back, self.log)      # it was paused (and saved) for a while

    async def release(self) -> None:
        """After the target's confirm, release the source: the user's VM lives at the target now,
        and the source's copy must never come back by accident.

        Its domain is gone already (the save ended a restored clone; one that is still defined,
        shut off, is undefined here). Deleted: the saved state (``suspend.sav``, 1 GiB apparent),
        the clone's memory copy and its disk overlay, everything it could be restored or booted
        from, and its ``checkpoint`` file (it is no clone of it any more). Its folder keeps the
        logs and a note (``released``) until ``vm rm`` or ``make clean-vms``. Who wants to look at
        the source's state does so before: ``TargetSide.on_verified`` (the demo and the tests
        compare both states there), or hard links (``bench.sides``)."""
        if not self.client.confirmed:
            raise VMError(f"not releasing {self.machine.name!r}: the target has not confirmed")
        await asyncio.to_thread(self._release)

    def _register_next(self) -> None:
        """The verified state becomes the next common checkpoint here too: the saved image moves in,
        the disk is built from the overlay (``store.chain``). A failure is logged: the migration is done."""
        if self._verified is None or self.chain_limit < 1:
            return
        roots, trees, ck_trees = self._verified
        try:
            nxt = chain.register(self.checkpoint, roots, self._image or self.run_dir / "suspend.sav",
                                 self.run_dir / "disk.qcow2",
                                 trees, ck_trees, log_cut=self.log_end, chain_limit=self.chain_limit)
        except ReplayMigrateError as e:
            self.log.error("could not register the next checkpoint here: %s", e)
            return
        self.report.next_checkpoint = nxt.name
        self.log.info("next common checkpoint: %s", nxt.name)

    def _release(self) -> None:
        name = self.machine.name
        try:
            left = self.hv.lookup(name)
        except NoSuchDomainError:
            pass
        else:
            if left.state is not MachineState.SHUTOFF:
                raise VMError(f"{name!r} runs again at the source after it migrated: not releasing it")
            left.undefine()
        self._register_next()
        for f in ("suspend.sav", "memory.sav", "disk.qcow2", "checkpoint"):
            (self.run_dir / f).unlink(missing_ok=True)
        if self._image is not None:
            self._image.unlink(missing_ok=True)     # saved into the suspend folder
        (self.run_dir / RELEASED_NOTE).write_text(
            f"{name} migrated; its state here was deleted at {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
        self.log.info("released %s: the VM runs at the target", name)


def put_back(hv: Hypervisor, name: str, image: Path | None) -> Machine:
    """Domain ``name`` as it was before its migration, from what it is now: saved (a clone is a
    transient domain: once saved it is gone, its state in ``image``): restored from the image,
    which is deleted once the domain runs; paused: resumed; then its file systems thawed (a no-op
    when they are not frozen). For a migration that failed or was cancelled, and for
    ``replay-migrate vm resume`` after one that was killed."""
    m: Machine | None
    try:
        m = hv.lookup(name)
        state = m.state
    except NoSuchDomainError:
        m, state = None, MachineState.SHUTOFF
    if state is MachineState.SHUTOFF and image is not None and image.is_file():
        back = hv.restore(image, consume=True)    # the running VM is newer: never restore it again
    elif m is None:
        raise NoSuchDomainError(f"no domain named {name!r}, and no saved state of it to restore")
    else:
        back = m
        if state is MachineState.PAUSED:
            back.resume()
        elif state is not MachineState.RUNNING:
            raise VMError(f"{name!r} is {state.value} and has no saved state to restore")
    back.wait_agent(30)
    back.fsthaw()
    if image is not None:
        image.unlink(missing_ok=True)     # consumed by the restore, or a save that did not finish
    return back


# ---- the target ----------------------------------------------------------------------------------
class TargetSide:
    """The target site's half: a clone of the checkpoint that follows the source's log, then takes
    over the source's state."""

    def __init__(self, hv: Hypervisor, checkpoint: ckpt.Checkpoint, client: SessionClient, name: str,
                 *, replay: ReplayConfig | None = None, params: ProtocolParams | None = None,
                 in_place: bool = True, verify_written: bool = True, suspend_dir: Path | None = None,
                 chain_limit: int = chain.DEFAULT_CHAIN_LIMIT) -> None:
        self.hv = hv
        self.checkpoint = checkpoint
        self.suspend_dir = suspend_dir
        """Where to save the replayed clone at suspend, patch it and restore it from
        (``migration.suspenddir``: a tmpfs folder; None, or no room there: the clone's folder)."""
        self._image: Path | None = None
        self._saving: asyncio.Task[None] | None = None
        """The save call at suspend, running on after its image is whole (``save_until_whole``)."""
        self.in_place = in_place
        """Patch the clone's own images (``differ.patch``: no copy; an abort deletes them, and the
        clone is discarded on any failure anyway). False: patch copies, as ``sync`` does."""
        self.verify_written = verify_written
        """Verify by reading back the leaves written (``differ.protocol.target``). False: rehash
        both patched images whole."""
        self.client = client
        self.name = name
        self.chain_limit = chain_limit
        self._feed: EventFeed | None = None
        self._next: tuple[ckpt.Checkpoint, Path, bytes, Mapping[str, MerkleTree]] | None = None
        """(next checkpoint, the verified memory image, its original head, its tree) until the image
        is handed to the checkpoint after the resume."""
        self.replay_config = replay or ReplayConfig()
        self.params = params
        self.report = Report()
        self.whole: Figures = self.report.half(Role.TARGET)
        """The whole report: this side's half and, once the migration is done, the source's."""
        self.stats: TransferStats | None = None
        self.replay_stats: ReplayStats | None = None
        self.machine: Machine | None = None
        self.t_resumed = 0.0
        self.inspect_s = 0.0
        """Time ``on_verified`` took: not part of a real migration, left out of its downtime."""
        self._trees: asyncio.Task[CheckpointTrees] | None = None
        self.progress: Callable[[str, int, int], None] = lambda what, done, total: None
        """(phase, done, total): the CLI passes a terminal progress line (``cli.report.Progress``)."""
        self.progress_note: Callable[[str], None] = lambda text: None
        """A detail of the current phase for the progress line."""
        self.on_verified: Callable[[VmState], None] | None = None
        """Called with the patched, verified state before the VM is restored from it (the demo and
        the tests compare it with the source's there: once the guest runs, it writes)."""
        self.sync_dump: SyncDump | None = None
        """Keeps the region of every sync mark whose wait ran out as the target's screen shows it
        then, with what it showed meanwhile (``migration.syncdump``)."""
        self.on_saved: Callable[[VmState], None] | None = None
        """Called with the replayed clone's own state right after it is saved, before the walk
        patches it (the benchmark keeps it there to find what replay left divergent)."""
        self.started = asyncio.Event()
        """Set once the clone runs and replays (tests wait for it to fail a migration midway)."""
        self.committing = False
        """Every block and both roots verified: from here the migration completes."""
        self._resuming = False
        self.timeline = Timeline(TARGET)
        """This side's phases (``migration.timeline``): where its share of the downtime went."""
        self.t_log_ended = 0.0
        """When the source's end of log arrived (this side's view of the source's pause)."""
        self.t_last_event = 0.0
        """When the replay went through its last event (the settle before the freeze counts from it)."""
        self.log = logging.getLogger(f"replay_migrate.target.{name}")

    async def run(self) -> Report:
        """Start the clone, follow the log, take over. On any failure or cancellation the clone
        is removed (never a domain this side did not make: an existing one is refused first)."""
        if await asyncio.to_thread(self.hv.exists, self.name):
            raise VMError(f"a domain named {self.name!r} exists already: the target makes its own clone "
                          "(remove it with `replay-migrate vm rm`, or choose another name)")
        try:
            self._trees = asyncio.create_task(asyncio.to_thread(checkpoint_trees, self.checkpoint))
            m = await in_thread(ckpt.start_clone, self.hv, self.checkpoint, self.name)
            self.machine = m
            self.started.set()
            await self._follow(m)
            await self._take_over(m)
        except BaseException as e:
            if self._resuming:
                # the service may have confirmed to the source, which then released its VM:
                # removing this one could lose the user's VM; two running is the lesser harm
                self.log.error("%s failed while confirming its resume (%s): the clone is kept", self.name, e)
                raise
            if self._trees is not None:
                self._trees.cancel()
            await asyncio.shield(_save_settled(self._saving, self.log))
            await asyncio.shield(_give_up(self.client, e, self.log))
            await asyncio.shield(in_thread(self._discard))
            raise
        await asyncio.to_thread(self._complete_next)
        mine = self.report.half(Role.TARGET)
        try:                    # the source waits for it before it lets this side go
            await self.client.report(mine)
        except ReplayMigrateError as e:
            self.log.warning("could not send this side's report to the source: %s", e)
        # it resumed with the source's clock at suspend, the downtime behind. After the confirm
        # (the source waits for it; hwclock in the guest takes ~2 s), and outside the try above:
        # nothing after the confirm may discard the VM, which now lives only here
        await asyncio.to_thread(_set_clock, self.machine or m, self.log)
        # the VM runs here now, whatever happens next; stay until the source has the confirm
        try:
            await self.client.wait_released(RELEASE_WAIT_S)
        except (ReplayMigrateError, TimeoutError) as err:
            self.log.warning("the source did not acknowledge the confirm: %s", err or "timeout")
        self.report.wire_bytes = self.client.wire_bytes_sent + self.client.wire_bytes_received
        self.report.wire_detail = self.client.wire_detail()
        # the source's half comes before its released (unless a service restart lost it)
        if self.client.peer_report is None:
            self.log.warning("the source sent no report: its figures are unknown")
        self.whole = whole_report(Role.TARGET, mine, self.client.peer_report)
        return self.report

    async def _follow(self, m: Machine) -> None:
        """Replay the log as it arrives, until the source ends it."""
        link = RecorderLink(m)
        await in_thread(link.open)
        m_ck = self.checkpoint.manifest
        feed = EventFeed(LogPump(decoder=LogDecoder(resume_at=m_ck.log_resume, origin_us=m_ck.log_origin_us)))
        self._feed = feed
        replayer = Replayer(m, link, self.replay_config)
        dump = self.sync_dump
        if dump is not None:
            replayer.on_unmet = lambda mark, wait: dump.target_unmet(m, mark, wait)
        received = [0]
        # how far the replay is, told to the source: it waits for it before it pauses (migration.catchup)
        position = ReplayProgress()
        loop = asyncio.get_running_loop()
        moved = asyncio.Event()

        def replayed(n: int) -> None:      # (in the replay thread)
            self.t_last_event = time.monotonic()
            self.progress_note(f"{received[0] - n} events behind the source")
            self.progress("replay", n, received[0])
            if position.went_through(n):
                loop.call_soon_threadsafe(moved.set)

        following = [True]

        async def tell_source() -> None:
            while True:
                await moved.wait()
                moved.clear()
                if not following[0]:
                    return
                try:
                    await self.client.replayed(position.replayed)
                except ReplayMigrateError as e:     # the session failing: recv() raises it too
                    self.log.info("replay progress not told: %s", e)
                    return

        replayer.on_progress = replayed
        result: list[ReplayStats | BaseException] = []

        def run_replay() -> None:
            try:
                result.append(replayer.replay(feed))
            except BaseException as e:
                result.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=run_replay, name=f"replay-{m.name}", daemon=True)
        worker.start()
        teller = asyncio.create_task(tell_source())
        try:
            while not (result and isinstance(result[0], BaseException)):
                try:
                    ev = await self.client.recv(timeout=LOG_POLL_S)
                except TimeoutError:
                    continue
                if isinstance(ev, Frame) and ev.stream is Stream.LOG:
                    events = feed.put(ev.data)
                    received[0] += events
                    if position.arrived(ev.seq, events):
                        moved.set()
                    self.report.log_bytes += len(ev.data)
                    self.report.log_frames += 1
                elif isinstance(ev, LogEnded):
                    self.t_log_ended = time.monotonic()
                    feed.end()              # a log cut short is a LogFormatError, not a replay
                    replayer.log_ended()
                    break
        except BaseException:
            replayer.stop()            # not through every event still queued
            raise
        finally:
            feed.close()
            await in_thread(worker.join)
            following[0] = False        # not cancelled: a flush cut short would lose the acks it took
            moved.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(teller), ABORT_TIMEOUT_S)
            drop(teller)
            link.close()
            self.timeline.add("replay", t0)
        if isinstance(result[0], BaseException):
            raise result[0]
        stats = result[0]
        self.replay_stats = stats
        self.report.replay_s = time.monotonic() - t0
        self.report.events_replayed = stats.injected
        self.report.sync_marks_met = stats.sync_met
        self.report.sync_marks_failed = len(stats.sync_failed)

    async def _take_over(self, m: Machine) -> None:
        """Quiesce like the source did, then walk, patch, verify, restore and resume."""
        tl = self.timeline
        t_end = time.monotonic()
        settled = self.replay_stats is not None and self.replay_stats.settled
        with tl.phase("settle"):        # from the last event: a target that caught up before the
            # source paused (migration.catchup) has had its settle already
            wait = (SETTLED_S if settled else SETTLE_S) - (t_end - (self.t_last_event or t_end))
            if wait > 0:
                await asyncio.sleep(wait)
        with tl.phase("freeze"):
            await in_thread(m.fsfreeze)            # flushes, like the source's (no extra sync)
        with tl.phase("pause"):
            await in_thread(m.pause)
        run_dir = m.run_dir
        self.progress("saving", 0, 0)
        self._image = image = await in_thread(suspend_image, run_dir, self.suspend_dir, m.memory_bytes())
        with tl.phase("save"):
            self._saving = await save_until_whole(m, image)
        state = VmState(image, run_dir / "disk.qcow2", self.checkpoint)
        self.progress("saving", file_allocated(image), 0)
        if self.on_saved is not None:
            with tl.phase("keep state"):
                await in_thread(self.on_saved, state)
        self.progress("hashing", 0, 0)
        with tl.phase("checkpoint trees"):
            trees = await (self._trees or asyncio.to_thread(checkpoint_trees, self.checkpoint))
        self.log.info("saved and ready to diff %.2f s after the log ended", time.monotonic() - t_end)
        t0 = time.monotonic()
        walked = [0.0]
        with ExitStack() as stack:
            self.progress("hashing", _state_bytes(state), 0)

            def copy() -> dict[str, BlockSink]:
                with tl.phase("copy"):
                    return make_sinks(state, trees, durable=False, in_place=self.in_place)

            # sinks (copies, unless in place) made while hashing; nothing fsynced: restored at once
            copying = asyncio.create_task(asyncio.to_thread(copy))
            opening = _open_checkpoint_images(self.checkpoint, trees, stack)
            try:
                try:
                    with tl.phase("hash"):  # the disk overlay is opened while the memory image hashes
                        sources, mine = await in_thread(open_and_build, state, trees, stack.enter_context(ExitStack()))
                    await _save_ended(self._saving, tl)
                except BaseException:
                    with contextlib.suppress(BaseException):
                        for sink in (await copying).values():
                            sink.abort()
                    raise
                sinks = await copying
            except BaseException:
                await _settled(opening)
                raise
            with tl.phase("open"):
                bases = await opening
                images = stack.enter_context(open_target_images(state, trees, sources, mine, bases=bases,
                                                                sinks=sinks))
                core, io = make_target(images, self.params, references=references(bases),
                                       verify_written=self.verify_written,
                                       verify_untouched=not self.verify_written)
            tgt = AsyncAdapter(core, io, on_request=self._note_request)
            await self.client.phase("diffing")
            tgt.core.start()
            tl.ready()
            pending: list[object] = []
            divergent = [""]
            at = _wire(self.client)

            def seen(ev: object) -> None:
                if isinstance(ev, WalkDone):
                    walked[0] = time.monotonic()
                    divergent[0] = _divergent(ev)
                    tl.add("walk", t0_walk, walked[0])
                elif isinstance(ev, BatchApplied):
                    self.progress("transfer", ev.done, ev.total)
                    self.progress_note(divergent[0])
                    if ev.done >= ev.total:
                        self.progress("verify", _state_bytes(state), 0)     # the patched images rehash
                pending.append(ev)

            def moved() -> None:
                if not walked[0]:
                    self.progress("walk", _wire(self.client) - at, 0)

            self.progress("walk", 0, 0)

            def finished() -> bool:
                return tgt.core.state in (TargetState.VERIFIED, TargetState.FAILED)

            # walk, announce the block phase to the session, then receive the blocks
            t0_walk = time.monotonic()
            await _pump_diff(self.client, tgt, stream=Stream.S2T, on_event=seen, on_frame=moved,
                             until=lambda: finished() or bool(walked[0]))
            if walked[0]:
                await self.client.phase("transferring")
            await _pump_diff(self.client, tgt, stream=Stream.S2T, on_event=seen, until=finished)
            tl.add("blocks", walked[0] or t0_walk)
            if tgt.core.state is not TargetState.VERIFIED or not any(isinstance(e, DiffVerified) for e in pending):
                raise VerificationError("the transfer did not verify: nothing was resumed")
            for msg in tgt.data_to_send():
                await self.client.send_diff(msg)
            self.stats = tgt.stats
            self.report.add_transfer(tgt.stats)
            roots = tgt.core.roots
            verified = tgt.core.verified_trees
        self.report.diff_s = (walked[0] or time.monotonic()) - t0
        self.report.transfer_s = time.monotonic() - (walked[0] or t0)
        self.log.info("verified: walk %.2f s, blocks %.2f s", self.report.diff_s, self.report.transfer_s)
        self.committing = True
        with tl.phase("verified"):
            await self.client.verified(roots)
        if self.on_verified is not None:
            t_inspect = time.monotonic()
            with tl.phase("inspect"):
                await in_thread(self.on_verified, state)
            self.inspect_s = time.monotonic() - t_inspect
        disk = state.disk
        nxt = await in_thread(self._prepare_next, roots, state, verified, trees)
        if nxt is not None:
            disk = run_dir / "disk.qcow2"
            await in_thread(self._over_next, nxt, disk, run_dir)
        self.progress("restore", 0, 0)
        with tl.phase("restore"):
            back = await in_thread(self.hv.restore_clone, image, name=m.name, disk=disk,
                                   run_dir=run_dir, paused=False, copy=False, consume=nxt is None,
                                   guest=self.checkpoint.boot)
        with tl.phase("agent"):
            await in_thread(back.wait_agent)
        with tl.phase("thaw"):
            await in_thread(back.fsthaw)
        self.machine = back
        self.t_resumed = time.monotonic()
        self.log.info("resumed %.2f s after the log ended", self.t_resumed - t_end)
        self._resuming = True
        await self.client.resumed()
        self.report.verified = True
        self.report.timeline = [span.as_list() for span in tl.spans]
        self.report.downtime_breakdown = downtime_breakdown(tl.spans, self.t_log_ended or t_end, self.t_resumed)

    def _note_request(self, req: Request, start: float, end: float) -> None:
        self.timeline.add(request_phase(req), start, end)

    def _prepare_next(self, roots: dict[str, bytes], state: VmState, verified: Mapping[str, MerkleTree],
                      trees: CheckpointTrees) -> ckpt.Checkpoint | None:
        """The next common checkpoint's disk, built from the verified state before the VM is restored
        over it (a failure: logged, and the VM resumes over its patched overlay as before)."""
        if self.chain_limit < 1 or set(verified) != {MEMORY, DISK}:
            return None
        try:
            dec = self._feed.pump.decoder if self._feed is not None else None
            if dec is None or dec.header is None or not dec.ended:
                return None
            log_cut = (dec.next_seq - 1, dec.header.clock_origin_us)    # the end-of-log frame's seq
            nxt = chain.prepare(self.checkpoint, roots, state.disk, verified, trees, log_cut=log_cut,
                                chain_limit=self.chain_limit)
            head = savefmt.read_header(state.memory).qemu_offset
            with open(state.memory, "rb") as f:
                # the memory tree is built (Target.verified_trees) only once the VM runs again
                self._next = (nxt, state.memory, f.read(head), verified)
        except (ReplayMigrateError, OSError) as e:
            self.log.error("could not register the next checkpoint: %s", e)
            return None
        return nxt

    def _over_next(self, nxt: ckpt.Checkpoint, disk: Path, run_dir: Path) -> None:
        """The VM's disk becomes a new overlay over the next checkpoint's (which holds its content now)."""
        disk.unlink(missing_ok=True)
        create_overlay(disk, nxt.disk)
        (run_dir / "checkpoint").write_text(nxt.name + "\n")

    def _complete_next(self) -> None:
        """After the resume: the verified memory image (its head, which the restore rewrote, put back)
        goes into the next checkpoint, and the chain is pruned. Logged, never raised: the VM runs."""
        if self._next is None:
            return
        nxt, image, head, trees = self._next
        self._next = None
        try:
            with open(image, "r+b") as f:
                f.write(head)
            chain.complete(nxt, image, trees[MEMORY])
            chain.prune(nxt.manifest.lineage, keep=nxt.name)
        except (ReplayMigrateError, OSError) as e:
            self.log.error("could not complete the next checkpoint %s: %s", nxt.name, e)
            image.unlink(missing_ok=True)
            return
        self.report.next_checkpoint = nxt.name

    def _discard(self) -> None:
        """The migration failed: the target's clone is not the user's VM; remove it."""
        try:
            ckpt.remove_clone(self.hv, self.name)
        except ReplayMigrateError as e:
            self.log.error("could not remove the target clone %s: %s", self.name, e)
        if self._image is not None:
            self._image.unlink(missing_ok=True)    # saved into the suspend folder: not the clone's


def merged_report(src: SourceSide, tgt: TargetSide) -> Report:
    """One report from both sides of an embedded migration (each side counts what it sent); its
    downtime runs from the source's pause to the target's resume, the hooks left out, and its
    breakdown lays both sides' phases on the critical path."""
    r = src.report
    if src.stats is not None and tgt.stats is not None:
        r.add_transfer(src.stats.merged(tgt.stats))
    r.events_replayed = tgt.report.events_replayed
    r.sync_marks_met = tgt.report.sync_marks_met
    r.sync_marks_failed = tgt.report.sync_marks_failed
    r.replay_s = tgt.report.replay_s
    r.diff_s = tgt.report.diff_s
    r.transfer_s = tgt.report.transfer_s
    spans = merge(src.timeline.spans, tgt.timeline.spans)
    if src.t_paused and tgt.t_resumed:
        r.downtime_s = max(0.0, tgt.t_resumed - src.t_paused - excluded_seconds(spans, src.t_paused, tgt.t_resumed))
        r.downtime_breakdown = downtime_breakdown(spans, src.t_paused, tgt.t_resumed)
    r.timeline = [span.as_list() for span in spans]
    r.verified = src.report.verified and tgt.report.verified
    r.next_checkpoint = tgt.report.next_checkpoint or src.report.next_checkpoint
    r.finish()
    return r
