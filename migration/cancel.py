"""Stopping a command cleanly: signals, parts that fail together, blocking work that is waited for.

A migration has parts that run at once (the user's work, the log stream, the target's replay) and
blocking VM operations in worker threads. Three rules keep a stopped or failed one clean:

- :func:`supervise`: the first part to fail cancels the others at once, their cleanup is waited
  for, and the whole fails with that part's error (in seconds, with its message and exit code);
- :func:`in_thread`: a cancelled wait for a blocking operation still waits for its thread (and
  tells it to stop, when it can): a save or a freeze still running would change the VM behind the
  cleanup's back, and a thread typing into a VM would go on typing;
- :func:`run` with :class:`SignalCancel`: SIGINT, SIGTERM and SIGHUP cancel the command's main task
  once (later ones only say that the cleanup runs), unless the migration has committed (``deferred``
  says so: the target verified every block), in which case it completes. A cancelled command exits
  with :attr:`Interrupted.exit_code`, 128 + the signal's number, as a shell reports a killed one.

Synchronous commands get the same signals as :class:`Interrupted` raised in the main thread
(:func:`raising_on_signals`): a ``KeyboardInterrupt``, so ``except Exception`` does not swallow it
and every ``finally`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("replay_migrate.cancel")

CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What stops a command: Ctrl-C, ``kill``, a closed terminal."""
CLEANUP_WAIT_S = 120.0
"""Longest a failed or cancelled command waits for its other parts to clean up after themselves
(they take seconds: destroy a clone, restore a VM); past it they are abandoned with a warning."""


class Interrupted(KeyboardInterrupt):
    """The command was stopped by signal ``signum``: exit 128 + signum (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's exception as seen (its failure was reported otherwise)."""
    if task.done() and not task.cancelled():
        task.exception()


def drop(task: asyncio.Future[Any]) -> None:
    """Cancel a task whose outcome no longer matters (its exception, if any, counts as seen)."""
    task.cancel()
    _retrieve(task)


async def settle(tasks: Iterable[asyncio.Future[Any]], timeout: float = CLEANUP_WAIT_S) -> None:
    """Wait until every task ended, up to ``timeout``, whatever cancels the waiter meanwhile: a
    second signal must not cut a cleanup short."""
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            log.warning("gave up waiting for %d part(s) to clean up after %.0f s", len(pending), timeout)
            return
        with contextlib.suppress(asyncio.CancelledError):
            _, pending = await asyncio.wait(pending, timeout=left)


async def supervise(*parts: Awaitable[Any]) -> list[Any]:
    """Run ``parts`` at once until all end; their results, in order. The first part to fail
    cancels the others, whose cleanup is waited for; then its exception is raised. Cancelled from
    outside (a signal), every part is cancelled and waited for, then CancelledError is raised."""
    tasks = [asyncio.ensure_future(p) for p in parts]
    ended: list[asyncio.Future[Any]] = []
    for t in tasks:
        t.add_done_callback(ended.append)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await settle(tasks)
        for t in tasks:
            _retrieve(t)
        raise
    first = next((t for t in ended if t.cancelled() or t.exception() is not None), None)
    if first is None:
        return [t.result() for t in tasks]
    for t in tasks:
        t.cancel()
    await settle(tasks)
    for t in tasks:
        _retrieve(t)
    if first.cancelled():
        raise asyncio.CancelledError
    exc = first.exception()
    assert exc is not None
    raise exc


async def in_thread(fn: Callable[..., T], /, *args: Any, on_cancel: Callable[[], object] | None = None,
                    **kwargs: Any) -> T:
    """``asyncio.to_thread(fn, ...)``, except that a cancellation calls ``on_cancel`` (to make a
    function that can stop early do so, e.g. set the event it watches) and waits for the thread
    to end before it is raised."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await settle([task])
        _retrieve(task)
        raise


def say(message: str) -> None:
    """One line for the person at the terminal (stderr; never fails)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"replay-migrate: {message}", file=sys.stderr, flush=True)


class SignalCancel:
    """While entered (in a running event loop), :data:`CANCEL_SIGNALS` cancel ``task`` once.

    ``deferred()`` is asked when a signal comes: True means the work has passed its point of no
    return (a migration the target verified) and completes; the signal is remembered and said.
    ``on_cancel`` is what the person is told happens now (the cleanup a command does)."""

    def __init__(self, task: asyncio.Task[Any], *, deferred: Callable[[], bool] = lambda: False,
                 on_cancel: str = "stopping") -> None:
        self.task = task
        self.deferred = deferred
        self.on_cancel = on_cancel
        self.signum: int | None = None
        """The first signal received, if any."""
        self.cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            say(f"{name}: already {'finishing' if not self.cancelled else 'cleaning up'}; "
                "SIGKILL would leave the VMs as they are now")
            return
        self.signum = signum
        if self.deferred():
            say(f"{name}: the migration has committed (the target verified every block): it completes")
            return
        say(f"{name}: {self.on_cancel}")
        self.cancelled = True
        self.task.cancel()

    def __enter__(self) -> SignalCancel:
        self._loop = asyncio.get_running_loop()
        for sig in CANCEL_SIGNALS:
            self._loop.add_signal_handler(sig, self._handle, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        for sig in CANCEL_SIGNALS:
            self._loop.remove_signal_handler(sig)
        _install_raising()       # until the process ends, as for a synchronous command


def run(main: Callable[[], Coroutine[Any, Any, T]], *, deferred: Callable[[], bool] = lambda: False,
        on_cancel: str = "stopping") -> T:
    """``asyncio.run(main())`` with :class:`SignalCancel` around it: a signal cancels ``main``,
    which cleans up as for any failure, and then :class:`Interrupted` is raised."""
    handler: list[SignalCancel] = []

    async def wrapper() -> T:
        task = asyncio.current_task()
        assert task is not None
        with SignalCancel(task, deferred=deferred, on_cancel=on_cancel) as sc:
            handler.append(sc)
            return await main()

    try:
        return asyncio.run(wrapper())
    except asyncio.CancelledError:
        if handler and handler[0].cancelled and handler[0].signum is not None:
            raise Interrupted(handler[0].signum) from None
        raise


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _install_raising() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in CANCEL_SIGNALS:
            signal.signal(sig, _raise)


@contextlib.contextmanager
def raising_on_signals() -> Iterator[None]:
    """For a synchronous command: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the
    main thread (SIGTERM and SIGHUP would otherwise end the process without any cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in CANCEL_SIGNALS}
    _install_raising()
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[Callable[[], bool]]:
    """For a synchronous loop that can stop cleanly (``record --out``): the first SIGINT, SIGTERM
    or SIGHUP makes the yielded ``stopped()`` true; a second one raises :class:`Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    got: list[int] = []

    def flag(signum: int, frame: FrameType | None) -> None:
        if got:
            raise Interrupted(signum)
        got.append(signum)
        say(f"{signal.Signals(signum).name}: stopping")

    old = {sig: signal.getsignal(sig) for sig in CANCEL_SIGNALS}
    for sig in CANCEL_SIGNALS:
        signal.signal(sig, flag)
    try:
        yield lambda: bool(got)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
