"""The migration commands as a user runs them: every argument checked before anything starts, a
failure in any part failing the whole at once, and a signal leaving no debris.

The VM tests run `replay-migrate` as a child process on real clones and time their signals by
libvirt's own domain events (the target's clone started, the source paused for its suspend),
never by sleeping. Afterwards the source must run as it did (not paused, its file systems thawed:
the guest agent answers and a write in the guest succeeds) and nothing the command made at the
target may be left: no domain, no clone folder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from cli.fileargs import TEST_URI
from cli.main import main
from cli.migrate import hold_pid_file, migrate_embedded, print_report, recorder_pid
from migration.sides import Report, SourceSide, TargetSide, whole_report
from replay_migrate.errors import CheckpointError, ReplayError, UsageError, VMError
from replayer.drive import drive
from replayer.workload import parse_workload
from server.credentials import CREDENTIAL_ENV, TOKEN_ENV
from server.wire import Role
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine, MachineState

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cli.main"]
COMMAND_S = 240.0
"""Bound on a child command of these tests (a migration on a loaded 2-core TCG host takes ~1 min)."""


# ---- argument checks, no guest -------------------------------------------------------------------
def test_migrate_looks_up_the_workload_first(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """A workload is checked before the checkpoint, the hypervisor or any domain; `notes` is found
    by name as `workload list` shows it (it failed as a path before)."""
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    argv = ["--connect", TEST_URI, "migrate", "rm-no-such-domain", "--checkpoint", "no-such-checkpoint"]
    assert main([*argv, "--workload", "nosuch"]) == UsageError.exit_code
    assert "no workload 'nosuch'" in capsys.readouterr().err
    assert main([*argv, "--workload", "notes"]) == CheckpointError.exit_code     # the next check
    assert "no checkpoint named 'no-such-checkpoint'" in capsys.readouterr().err


def test_a_figure_no_side_could_tell_is_shown_as_unknown_never_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12 item 5: `follow` printed "downtime 0.0 s" and "savings 0.0 %", `suspend` "events
    replayed 0" and "replay 0.0 s", for figures only the other side knows."""
    whole = whole_report(Role.TARGET, Report(events_replayed=7, replay_s=2.5, verified=True).half(Role.TARGET), None)
    print_report(whole, False)
    out = capsys.readouterr().out
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in out.splitlines()[2:])}
    for name in ("downtime (source paused → target resumed)", "catch-up (VM running, target replaying)",
                 "savings vs baseline", "block bytes", "hash bytes",
                 "plain state transfer (baseline)", "wire bytes (all traffic)"):
        assert rows[name] == "unknown", name
    assert rows["sent as reference / delta / full"] == "unknown / unknown / unknown"
    assert rows["events replayed"] == "7 (sync marks met 0, failed 0)" and rows["replay"] == "2.5 s"
    assert rows["verified"] == "yes"
    print_report(whole, True)
    assert json.loads(capsys.readouterr().out) == whole
    assert whole["downtime_s"] is None


def _test_node(path: Path, *names: str, serial_dir: Path) -> str:
    """A libvirt test-driver URI whose node runs ``names`` (each with its serial log in ``serial_dir/NAME``)."""
    domains = "".join(f"<domain type='test'><name>{n}</name><memory>1024</memory><os><type>hvm</type></os>"
                      f"<devices><serial type='file'><source path='{serial_dir / n / 'serial.log'}'/>"
                      "<target port='0'/></serial></devices></domain>" for n in names)
    path.write_text(f"<node>{domains}</node>")
    return f"test://{path}"


def test_migrate_checks_the_target_name_at_the_target_daemon(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`migrate --target-connect URI` opens the target side's hypervisor on URI: a target name that
    is free at the source's daemon but taken at the target's is refused before anything starts."""
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "state"))
    image = tmp_path / "image"
    image.mkdir()
    for f in ("base.qcow2", "vmlinuz", "initrd.img"):
        (image / f).write_bytes(b"")
    ck = tmp_path / "state" / "checkpoints" / "c"
    ck.mkdir(parents=True)
    for f in ("disk.qcow2", "memory.sav"):
        (ck / f).write_bytes(b"")
    ckpt.Manifest(name="c", image_recipe="0" * 16, image_dir=str(image), virt="qemu", memory_mib=1, created=0.0,
                  boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                  disk_allocated_bytes=0).save(ck / "manifest.json")
    clones = tmp_path / "state" / "clones"
    (clones / "rm-x").mkdir(parents=True)
    (clones / "rm-x" / "checkpoint").write_text("c\n")
    source = _test_node(tmp_path / "a.xml", "rm-x", serial_dir=clones)
    target = _test_node(tmp_path / "b.xml", "rm-x-migrated", serial_dir=tmp_path / "elsewhere")
    argv = ["--connect", source, "migrate", "rm-x", "--checkpoint", "c", "--target-connect", target]
    assert main(argv) == UsageError.exit_code
    assert "a domain named 'rm-x-migrated' exists already" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--duration", "0"], ["--duration", "-5"], ["--duration", "nan"],
                                 ["--gap-cap", "inf"], ["--target-name", "../etc"], ["--target-name", "rm-x"]])
def test_migrate_refuses_bad_numbers_and_names(bad: list[str], capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    argv = ["--connect", TEST_URI, "migrate", "rm-x", "--checkpoint", "c", *bad]
    try:
        code = main(argv)
    except SystemExit as e:           # argparse
        code = int(str(e.code))
    assert code == UsageError.exit_code, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["record", "rm-x", "--to", "ws://127.0.0.1:1", "--session", "s", "--duration", "0"],
    ["suspend", "rm-x", "--timeout", "-1"],
    ["follow", "--from", "ws://127.0.0.1:1", "--session", "s", "--checkpoint", "c", "--gap-cap", "0"],
    ["replay", "log", "--into", "rm-x", "--echo-timeout", "0"],
    ["vm", "exec", "rm-x", "true", "--timeout", "nan"],
    ["checkpoint", "create", "c", "--memory-mib", "0"],
])
def test_durations_and_sizes_must_be_positive(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--connect", TEST_URI, *argv])
    assert e.value.code == UsageError.exit_code


def test_the_session_is_checked_before_the_hypervisor(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bad service URL or credential is refused (64) before libvirt is asked about the domain
    (which the test driver does not have: reaching it would give 5)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(CREDENTIAL_ENV, raising=False)
    bad = tmp_path / "bad.cred"
    bad.write_text("not a credential\n")
    bad.chmod(0o600)
    argv = ["--connect", TEST_URI, "record", "rm-x", "--to", "http://h:1", "--credential", str(bad)]
    assert main(argv) == UsageError.exit_code
    assert "bad service URL" in capsys.readouterr().err
    argv = ["--connect", TEST_URI, "record", "rm-x", "--to", "ws://h:1", "--credential", str(bad)]
    assert main(argv) == UsageError.exit_code
    assert "credential" in capsys.readouterr().err
    argv = ["--connect", TEST_URI, "follow", "--from", "ws://h:1", "--checkpoint", "c", "--credential", str(bad)]
    assert main(argv) == UsageError.exit_code
    assert "credential" in capsys.readouterr().err


HOLDER = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])   # before any import starts a thread
from pathlib import Path
from cli.migrate import hold_pid_file
fd = hold_pid_file(Path(sys.argv[1]), "rm-x")
print("holding", flush=True)
signal.sigwait([signal.SIGUSR1])
"""


def test_suspend_signals_only_a_live_recorder(tmp_path: Path) -> None:
    """The pid file of a `record --to` that was killed names a pid any process may have now:
    SIGUSR1 (whose default action ends a process) goes only to a recorder that holds its lock."""
    pid_file = tmp_path / "record.pid"
    bystander = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        pid_file.write_text(f"{bystander.pid}\n")          # stale: nobody holds it
        assert recorder_pid(pid_file) is None
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(pid_file)], env=env, stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        assert recorder_pid(pid_file) == holder.pid
        with pytest.raises(UsageError, match=f"runs already \\(pid {holder.pid}\\)"):
            hold_pid_file(pid_file, "rm-x")
        os.kill(holder.pid, signal.SIGUSR1)
        assert holder.wait(timeout=30) == 0
        assert recorder_pid(pid_file) is None                # its lock went with it
        assert bystander.poll() is None                     # never signalled
    finally:
        bystander.kill()
        bystander.wait()


# ---- VM tests ----------------------------------------------------------------------------------
_event_loop_started = threading.Lock()
_event_loop: list[threading.Thread] = []


def _start_libvirt_events() -> None:
    with _event_loop_started:
        if not _event_loop:
            libvirt.virEventRegisterDefaultImpl()

            def run() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()

            t = threading.Thread(target=run, name="libvirt-events", daemon=True)
            t.start()
            _event_loop.append(t)


class DomainEvents:
    """libvirt's lifecycle events of every domain while it listens (a connection of its own)."""

    def __init__(self) -> None:
        _start_libvirt_events()
        self.conn = libvirt.open("qemu:///system")
        self.seen: list[tuple[str, int, int]] = []
        self._cond = threading.Condition()
        self._id = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on, None)

    def _on(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        with self._cond:
            self.seen.append((dom.name(), event, detail))
            self._cond.notify_all()

    def wait_for(self, name: str, event: int, timeout: float = COMMAND_S, after: int = 0) -> int:
        """Block until ``name`` had ``event`` (among the events from index ``after``); its index."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.seen)):
                    if self.seen[i][:2] == (name, event):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no event {event} for {name} in {timeout:.0f} s: {self.seen}")
                self._cond.wait(left)

    def names(self) -> set[str]:
        with self._cond:
            return {n for n, _, _ in self.seen}

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self._id)
        self.conn.close()


@pytest.fixture
def events(hv: Hypervisor) -> Iterator[DomainEvents]:
    ev = DomainEvents()
    yield ev
    ev.close()


def _barrier(events: DomainEvents, m: Machine) -> None:
    """Make sure every event before now was delivered: pause and resume ``m`` and wait for its
    RESUMED (events of one connection arrive in order)."""
    mark = len(events.seen)
    m.pause()
    m.resume()
    events.wait_for(m.name, libvirt.VIR_DOMAIN_EVENT_RESUMED, after=mark)


def assert_source_runs_as_it_was(hv: Hypervisor, name: str) -> None:
    back = hv.lookup(name)
    assert back.state is MachineState.RUNNING
    back.wait_agent(60)
    r = back.exec("echo written > /root/after-cancel.txt && sync && cat /root/after-cancel.txt", timeout=60)
    assert r.stdout == "written\n"                         # not frozen: the write went through
    assert not (back.run_dir / "suspend.sav").exists()     # no saved state left behind


def assert_no_target(hv: Hypervisor, name: str) -> None:
    assert not hv.exists(name)
    assert not ckpt.clone_dir(name).exists()


def _child(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([*CLI, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    code, _, err = _outputs(p)
    return code, err


def _outputs(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=COMMAND_S)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        raise AssertionError(f"{p.args!r} did not end in {COMMAND_S:.0f} s:\n{err}") from None
    return p.returncode, out, err


@pytest.mark.vm
def test_a_bad_workload_fails_at_once_and_starts_nothing(make_clone: Callable[..., Machine], hv: Hypervisor,
                                                         checkpoint: ckpt.Checkpoint, events: DomainEvents) -> None:
    """Issue 10, finding 11: `migrate DOM --checkpoint C --workload nosuch` printed nothing for
    2.5 minutes (the service, both sides and the target's clone were up first) and then failed."""
    source = make_clone()
    source.wait_agent()
    target = f"{source.name}-migrated"
    mark = len(events.seen)
    code, err = _finish(_child(["migrate", source.name, "--checkpoint", checkpoint.name, "--workload", "nosuch"]))
    assert code == UsageError.exit_code, err
    assert "no workload 'nosuch'" in err and "Traceback" not in err
    _barrier(events, source)
    assert target not in {n for n, _, _ in events.seen[mark:]}     # its clone was never even defined
    assert_no_target(hv, target)
    assert source.state is MachineState.RUNNING
    # the other checks that need the hypervisor, equally before anything starts
    code, err = _finish(_child(["migrate", source.name, "--checkpoint", checkpoint.name, "--target-name",
                                source.name]))
    assert code == UsageError.exit_code and "a name of its own" in err
    source.pause()
    try:
        code, err = _finish(_child(["migrate", source.name, "--checkpoint", checkpoint.name]))
        assert code == VMError.exit_code and "must be running" in err
    finally:
        source.resume()


@pytest.mark.vm
def test_a_failure_in_one_part_ends_the_migration_at_once(make_clone: Callable[..., Machine], hv: Hypervisor,
                                                          checkpoint: ckpt.Checkpoint) -> None:
    """A failure in the user's part, once the target's clone replays: the command fails with that
    error in seconds (it waited CLEANUP_WAIT_S, 120 s, for the target before), the target's clone
    is removed and the source runs on."""
    source = make_clone()
    source.wait_agent()
    target = f"{source.name}-failed"
    failed_at: list[float] = []
    with Hypervisor() as hv2:
        both: list[TargetSide] = []

        def keep(src: SourceSide, tgt: TargetSide) -> None:
            both.append(tgt)

        async def user() -> None:
            await asyncio.to_thread(drive, source, parse_workload('click 250 400\ntype "echo hi\\n"'))
            await both[0].started.wait()            # the target's clone runs and replays
            failed_at.append(time.monotonic())
            raise ReplayError("injected: the user's part failed")

        with pytest.raises(ReplayError, match="injected"):
            asyncio.run(migrate_embedded(hv, hv2, source, checkpoint, target, user=user, on_started=keep))
    took = time.monotonic() - failed_at[0]
    assert took < 60, f"the failure took {took:.0f} s to end the migration"
    assert_no_target(hv, target)
    assert_source_runs_as_it_was(hv, source.name)


@pytest.mark.vm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_recording_cancels_the_migration(sig: signal.Signals, make_clone: Callable[..., Machine],
                                                        hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                                                        events: DomainEvents) -> None:
    """Issue 10, finding 12: SIGTERM to `migrate` left the source and the half-made target clone
    running (Python's default SIGTERM ends the process without any cleanup)."""
    source = make_clone()
    source.wait_agent()
    target = f"{source.name}-migrated"
    mark = len(events.seen)
    p = _child(["migrate", source.name, "--checkpoint", checkpoint.name, "--duration", "600"])
    events.wait_for(target, libvirt.VIR_DOMAIN_EVENT_STARTED, after=mark)    # the target replays now
    p.send_signal(sig)
    code, err = _finish(p)
    assert code == 128 + sig, err
    assert "Traceback" not in err and "cancelling the migration" in err
    assert_no_target(hv, target)
    assert_source_runs_as_it_was(hv, source.name)


@pytest.mark.vm
@pytest.mark.parametrize(("when", "event"), [("paused", libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
                                             ("saved", libvirt.VIR_DOMAIN_EVENT_STOPPED)])
def test_a_signal_during_the_suspend_restores_the_source(when: str, event: int, make_clone: Callable[..., Machine],
                                                         hv: Hypervisor, checkpoint: ckpt.Checkpoint,
                                                         events: DomainEvents) -> None:
    """SIGTERM as the source is paused for its suspend (its file systems frozen just before, its
    save about to start), or once it is saved (the walk and the transfer under way): the source
    comes back running and thawed (restored from its saved state, which is then deleted), and
    the target's clone is removed."""
    source = make_clone()
    source.wait_agent()
    target = f"{source.name}-migrated"
    mark = len(events.seen)
    p = _child(["migrate", source.name, "--checkpoint", checkpoint.name, "--duration", "3"])
    events.wait_for(source.name, event, after=mark)
    p.send_signal(signal.SIGTERM)
    code, err = _finish(p)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert_no_target(hv, target)
    assert_source_runs_as_it_was(hv, source.name)


@dataclass(frozen=True)
class Served:
    """A running ``serve`` and one session made there by ``session new``: its credential files."""

    url: str
    source: Path
    target: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The README's first two steps, each its own process: ``serve`` on a free loopback port, then
    ``session new`` there; the service gets SIGTERM (and must end) after the test."""
    env_token = {TOKEN_ENV: os.urandom(12).hex()}
    serve = _child(["serve", "--listen", "127.0.0.1:0"], env=env_token)
    try:
        assert serve.stdout is not None
        url = serve.stdout.readline().split()[-1]           # "serving on ws://127.0.0.1:PORT"
        assert url.startswith("ws://"), url
        creds = Served(url, tmp_path / "source.credential", tmp_path / "target.credential")
        made = _child(["session", "new", "--to", url, "--source-credential", str(creds.source),
                       "--target-credential", str(creds.target)], env=env_token)
        code, err = _finish(made)
        assert code == 0, err
        yield creds
    finally:
        serve.send_signal(signal.SIGTERM)
        _finish(serve)


@pytest.mark.vm
@pytest.mark.parametrize("stopped", ["record", "follow"])
def test_separate_processes_cancel_each_other(stopped: str, make_clone: Callable[..., Machine], hv: Hypervisor,
                                              checkpoint: ckpt.Checkpoint, events: DomainEvents,
                                              served: Served) -> None:
    """`record --to` and `follow` as the two sites run them: SIGTERM to one while the log streams
    ends both. The one signalled exits 143; the other learns from the session at once and exits
    with its error; the source runs on untouched and the target's clone is removed."""
    source = make_clone()
    source.wait_agent()
    target = f"{ckpt.DOMAIN_PREFIX}test-{os.getpid()}-{stopped}-target"
    mark = len(events.seen)
    follow = _child(["follow", "--from", served.url, "--credential", str(served.target), "--checkpoint",
                     checkpoint.name, "--name", target])
    record = _child(["record", source.name, "--to", served.url, "--credential", str(served.source)])
    events.wait_for(target, libvirt.VIR_DOMAIN_EVENT_STARTED, after=mark)
    (record if stopped == "record" else follow).send_signal(signal.SIGTERM)
    (rc, rerr), (fc, ferr) = _finish(record), _finish(follow)
    signalled, other = ((rc, rerr), (fc, ferr)) if stopped == "record" else ((fc, ferr), (rc, rerr))
    assert signalled[0] == 128 + signal.SIGTERM, signalled[1]
    assert other[0] not in (0, 1), other[1]                 # the project's error, not a traceback
    assert "Traceback" not in rerr + ferr
    assert_no_target(hv, target)
    assert_source_runs_as_it_was(hv, source.name)


@pytest.mark.vm
def test_separate_processes_print_the_same_whole_report(make_clone: Callable[..., Machine], hv: Hypervisor,
                                                        checkpoint: ckpt.Checkpoint, events: DomainEvents,
                                                        served: Served) -> None:
    """Issue 12 item 5: the README's recipe, each step its own process (`serve`; `follow` at the
    target; `record --to` and `suspend` at the source). Each side printed only its half and zeros
    for the rest; now `follow --json` and `suspend --json` print the same object, every figure
    known, and the recording process wrote it for `suspend` too."""
    source = make_clone()
    source.wait_agent()
    target = f"{ckpt.DOMAIN_PREFIX}test-{os.getpid()}-whole-target"
    mark = len(events.seen)
    follow = _child(["follow", "--from", served.url, "--credential", str(served.target), "--checkpoint",
                     checkpoint.name, "--name", target, "--json"])
    record = _child(["record", source.name, "--to", served.url, "--credential", str(served.source), "--json"])
    events.wait_for(target, libvirt.VIR_DOMAIN_EVENT_STARTED, after=mark)
    drive(source, parse_workload('click 250 400\ntype "echo whole > /root/whole.txt; sync\\n"\nwait 1'))
    suspend = _child(["suspend", source.name, "--json"])
    (sc, sout, serr), (rc, rout, rerr), (fc, fout, ferr) = _outputs(suspend), _outputs(record), _outputs(follow)
    assert (sc, rc, fc) == (0, 0, 0), serr + rerr + ferr
    at_source, by_recorder, at_target = json.loads(sout), json.loads(rout), json.loads(fout)
    assert at_source == by_recorder == at_target
    assert None not in at_source.values(), at_source
    assert at_source["verified"] is True and at_source["events_replayed"] > 0 and at_source["downtime_s"] > 0
    assert at_source["block_bytes"] > 0 and at_source["baseline_bytes"] > 0
    try:
        assert hv.lookup(target).state is MachineState.RUNNING
    finally:
        ckpt.remove_clone(hv, target)


@pytest.mark.vm
@pytest.mark.parametrize("saved", [False, True])
def test_vm_resume_puts_back_what_a_killed_migration_left(saved: bool, make_clone: Callable[..., Machine],
                                                          hv: Hypervisor, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL runs no cleanup: the source may be left frozen and paused, or saved. `vm resume`
    brings it back as the cleanup would have."""
    source = make_clone()
    source.wait_agent()
    source.fsfreeze()
    source.pause()
    image = source.run_dir / "suspend.sav"
    if saved:
        source.save(image)
        assert not hv.exists(source.name)           # a clone is transient: saved, it is gone
    assert main(["vm", "resume", source.name]) == 0, capsys.readouterr().err
    assert_source_runs_as_it_was(hv, source.name)
    assert not image.exists()
