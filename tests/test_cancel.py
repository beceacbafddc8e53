"""migration.cancel: parts that fail together, threads that are waited for, real signals.

Synchronisation is by events, never by sleeping: a part blocks on an event until the test (or
the cancellation under test) releases it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from migration import cancel
from migration.cancel import Interrupted, in_thread, raising_on_signals, stopping_on_signals, supervise
from replay_migrate.errors import ReplayError, VMError

pytestmark = pytest.mark.timeout(60)


def test_the_first_failure_cancels_the_others_after_their_cleanup() -> None:
    log: list[str] = []

    async def fails(started: asyncio.Event) -> None:
        await started.wait()
        raise ReplayError("the replay failed")

    async def runs_long(started: asyncio.Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()          # forever, unless cancelled
        finally:
            await asyncio.sleep(0)                # cleanup that itself awaits
            log.append("cleaned up")

    async def fails_later(started: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise VMError("a second error while being cancelled") from None

    async def main() -> None:
        started = asyncio.Event()
        await supervise(fails(started), runs_long(started), fails_later(started))

    with pytest.raises(ReplayError, match="the replay failed"):   # the first error, not the later one
        asyncio.run(main())
    assert log == ["cleaned up"]


def test_all_results_when_nothing_fails() -> None:
    async def value(x: int) -> int:
        await asyncio.sleep(0)
        return x

    async def main() -> list[int]:
        return await supervise(value(1), value(2))

    assert asyncio.run(main()) == [1, 2]


def test_cancelled_from_outside_every_part_cleans_up() -> None:
    log: list[str] = []

    async def part(name: str, ready: asyncio.Event) -> None:
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            log.append(name)

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(supervise(part("a", a), part("b", b)))
        await a.wait()
        await b.wait()
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    assert sorted(log) == ["a", "b"]


def test_a_cancelled_thread_is_told_to_stop_and_waited_for() -> None:
    stop = threading.Event()
    inside = threading.Event()
    finished: list[bool] = []

    def blocking() -> None:
        inside.set()
        stop.wait()                # a drive() or a save: ends only when told to (or when done)
        finished.append(True)

    async def main() -> None:
        task = asyncio.create_task(in_thread(blocking, on_cancel=stop.set))
        await asyncio.to_thread(inside.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [True]  # the thread ended before the cancellation was raised

    asyncio.run(main())


async def _loop_turns(n: int = 10) -> None:
    """Let the event loop run a few times: a signal's wake-up byte is read and its handler run."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def restored_signals() -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in cancel.CANCEL_SIGNALS}
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_cancels_the_command_once_and_the_cleanup_runs(sig: signal.Signals,
                                                                   restored_signals: None) -> None:
    log: list[str] = []

    async def main() -> str:
        try:
            os.kill(os.getpid(), sig)
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            os.kill(os.getpid(), sig)          # a second signal during the cleanup does not cut it short
            await _loop_turns()
            log.append("cleaned up")
            raise
        return "not reached"

    with pytest.raises(Interrupted) as e:
        cancel.run(main)
    assert e.value.signum == sig and e.value.exit_code == 128 + sig
    assert log == ["cleaned up"]


def test_after_the_point_of_no_return_a_signal_lets_the_work_complete(restored_signals: None) -> None:
    committed = [False]

    async def main() -> str:
        committed[0] = True
        os.kill(os.getpid(), signal.SIGTERM)
        await _loop_turns()                    # the signal is handled here, and does not cancel
        return "completed"

    assert cancel.run(main, deferred=lambda: committed[0]) == "completed"


def test_synchronous_commands_get_signals_as_interrupted(restored_signals: None) -> None:
    with raising_on_signals(), pytest.raises(Interrupted) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                           # interrupted at once by the handler
    assert e.value.exit_code == 143


def test_a_loop_that_can_stop_is_stopped_by_the_first_signal(restored_signals: None) -> None:
    with stopping_on_signals() as stopped:
        assert not stopped()
        os.kill(os.getpid(), signal.SIGINT)
        assert stopped()
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)    # a second one insists
            time.sleep(5)
