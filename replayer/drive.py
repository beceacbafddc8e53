"""Drive a scripted workload into a running VM as a person at its console would: each key,
button and pointer event injected through QMP at the time the synthetic user makes it, open loop.

This is how tests, the demo and benchmarks produce *real* X input in the source VM for the
recorder to capture; it is not replay (no log, no echo). A workload's checks run afterwards, in
the migrated VM (:func:`run_checks`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from recorder.logformat import Button, Key, Motion
from replay_migrate.errors import VMError
from replayer.workload import Action, Check, checks, timeline
from vm import input as vi
from vm.machine import Machine

MIN_EVENT_GAP_S = 0.004
"""Never inject faster than this (one event per QMP call reaches ~425/s with no loss)."""
CHECK_TIMEOUT_S = 300.0
"""Longest one check may run (a checksum over tens of MiB takes seconds under TCG)."""
CHECK_OUTPUT_CHARS = 2000
"""Characters of a check's output kept for a report (its tail)."""


@dataclass
class DriveStats:
    events: int
    seconds: float


def to_qmp(ev: Key | Button | Motion, screen: tuple[int, int]) -> list[vi.Event]:
    if isinstance(ev, Key):
        return [vi.key(ev.keycode, ev.down)]
    if isinstance(ev, Button):
        return [vi.button(ev.button, ev.down)]
    return vi.pointer(ev.x, ev.y, screen)


def drive(machine: Machine, actions: Sequence[Action], *, seed: int = 0, speed: float = 1.0,
          stop: threading.Event | None = None) -> DriveStats:
    """Inject ``actions`` (see ``replayer.workload``) into ``machine`` with human timing; return
    early once ``stop`` is set (the command was cancelled: the user stops typing at once)."""
    events, length = timeline(actions, seed=seed)
    halt = stop if stop is not None else threading.Event()
    t0 = time.monotonic()
    last = t0 - MIN_EVENT_GAP_S
    n = 0
    for ev in events:
        if not isinstance(ev, Key | Button | Motion):
            continue
        due = max(t0 + ev.t_us / 1e6 / speed, last + MIN_EVENT_GAP_S)
        left = due - time.monotonic()
        if halt.wait(left) if left > 0 else halt.is_set():
            return DriveStats(n, time.monotonic() - t0)
        machine.send_input(to_qmp(ev, machine.screen_size))
        last = time.monotonic()
        n += 1
    end = t0 + length / speed
    if end > time.monotonic():
        halt.wait(end - time.monotonic())       # trailing waits of the workload
    return DriveStats(n, time.monotonic() - t0)


@dataclass(frozen=True)
class CheckResult:
    """What one check printed and how it exited (-1: it could not run: guest agent, timeout)."""

    command: str
    exit_code: int
    output: str

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def run_checks(machine: Machine, actions: Sequence[Action], *,
               timeout: float = CHECK_TIMEOUT_S) -> list[CheckResult]:
    """Run the workload's checks in ``machine`` (the migrated VM) through its guest agent, in
    order; every one runs even when an earlier one failed, so a report shows them all."""
    out: list[CheckResult] = []
    for c in checks(actions):
        out.append(_run_check(machine, c, timeout))
    return out


def _run_check(machine: Machine, check: Check, timeout: float) -> CheckResult:
    try:
        r = machine.exec(check.command, timeout=timeout)
    except VMError as e:
        return CheckResult(check.command, -1, str(e)[-CHECK_OUTPUT_CHARS:])
    text = (r.stdout + r.stderr).strip()
    return CheckResult(check.command, r.exit_code, text[-CHECK_OUTPUT_CHARS:])
