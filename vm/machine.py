"""The VM layer: every libvirt call of the project goes through here (source and target alike).

``Hypervisor`` is one connection to ``qemu:///system``; ``Machine`` is one of our domains. A
machine's state is libvirt's (queried, never cached) and every operation states the states it
accepts (``_require``): injecting input into a paused guest or resuming a running one is refused
with a clear error instead of a libvirt message from deep down.

Clones of a checkpoint are started by *restoring* its memory image (0.8-1.9 s under TCG, versus
~35 s for a boot): the clone gets its own sparse copy of the image whose header XML carries the
clone's identity (``replay_migrate.savefmt``), and its own qcow2 overlay over the checkpoint's. A restore
*consumes* the clone's own image (deleted once the domain runs from it: 1 GiB apparent each, and a
stale copy of a VM that runs elsewhere must not be restorable by accident). A restored guest's
wall clock goes on from the time it was saved: ``sync_clock`` sets it to the host's.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from replay_migrate import savefmt
from replay_migrate.errors import HostError, ImageError, NoSuchDomainError, VMError
from replay_migrate.sparse import sparse_copy
from replay_migrate.tools import run_tool
from vm import guest
from vm.guest import ExecResult
from vm.screen import Screenshot
from vm.spec import (
    RECORDER_CHANNEL,
    SCREEN,
    Boot,
    DomainSpec,
    GuestImage,
    check_saved_domain,
    clone_xml,
    domain_name,
    refuse_doctype,
)

URI = "qemu:///system"
CONNECT_TIMEOUT_S = 20.0
"""How long to wait for libvirtd to answer before calling the daemon dead."""
AGENT_TIMEOUT_S = 30
"""Default time one guest-agent command may take."""
EXEC_TIMEOUT_S = 120.0
"""Default time a guest-exec'd shell command may run."""
MARK_TIMEOUT_S = 240.0
"""Default wait for a serial-console mark (a TCG boot to the desktop takes ~35 s)."""
SAVE_CHANNELS = 1
"""Channels that write (and read back) a saved state's RAM: 1, one multifd stream (see ``Machine.save``).
QEMU writes the guest's ~300 MiB in ~0.3-0.4 s with one. Two saved in 0.48 s against 0.67 s and
restored in 0.68 s against 0.73 s (bench/results/savepath.md, libvirtd under a reaper); not the
default until a migration run measures it (the image is the same sparse format either way)."""

# libvirt prints every error to stderr by default; we raise ours instead
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class MachineState(enum.Enum):
    """Our view of libvirt's domain states (virDomainState), reduced to what callers act on."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"


def _state_of(code: int) -> MachineState:
    if code == libvirt.VIR_DOMAIN_RUNNING:
        return MachineState.RUNNING
    if code in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return MachineState.PAUSED
    if code in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_CRASHED):
        return MachineState.SHUTOFF
    return MachineState.OTHER


def create_overlay(path: Path, backing: Path) -> None:
    """A new empty qcow2 overlay at ``path`` over ``backing`` (which must exist)."""
    if not backing.is_file():
        raise ImageError(f"backing image {backing} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path)],
             what=f"{path}: qemu-img create (a new overlay)", error=ImageError)


class Hypervisor:
    """One connection to libvirt's system daemon."""

    def __init__(self, uri: str = URI, *, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.uri = uri
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.conn = libvirt.open(uri)
                break
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise HostError(f"libvirt at {uri} does not answer: {e.get_error_message()} "
                                    "(is libvirtd running? scripts/setup-host.sh starts it)") from e
                time.sleep(0.5)

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, name: str) -> Machine:
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NoSuchDomainError(f"no domain named {name!r}") from e
            raise VMError(f"looking up {name!r}: {e.get_error_message()}") from e
        return Machine(self, dom)

    def exists(self, name: str) -> bool:
        try:
            self.lookup(name)
        except NoSuchDomainError:
            return False
        return True

    def names(self, prefix: str = "") -> list[str]:
        return sorted(d.name() for d in self.conn.listAllDomains() if d.name().startswith(prefix))

    def define(self, spec: DomainSpec) -> Machine:
        """Define (not start) a domain from ``spec``; its run folder is created empty."""
        spec.image.check()
        if self.exists(spec.name):
            raise VMError(f"a domain named {spec.name!r} already exists")
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        spec.serial_log.unlink(missing_ok=True)
        try:
            dom = self.conn.defineXML(spec.xml())
        except libvirt.libvirtError as e:
            raise VMError(f"defining {spec.name!r}: {e.get_error_message()}") from e
        return Machine(self, dom)

    def restore_clone(self, memory_image: Path, *, name: str, disk: Path, run_dir: Path,
                      paused: bool = False, copy: bool = True, consume: bool = True,
                      uuid_: str | None = None, guest: GuestImage | Boot | None = None,
                      channels: int = SAVE_CHANNELS) -> Machine:
        """Start domain ``name`` from ``memory_image`` with a clone's identity.

        ``disk`` must already hold the clone's overlay (the disk state that goes with the memory
        image). With ``copy`` the image is copied to ``run_dir/memory.sav`` first and only read,
        so any number of clones can be made from one checkpoint; without, the image's own header
        is rewritten (a migrated image the target now owns). Either way the image the domain was
        restored from is deleted once it runs (see :meth:`restore`; not with ``consume=False``:
        the caller takes it, e.g. into the next checkpoint); ``memory_image`` itself is kept when
        it was copied. ``uuid_``: the clone's UUID (default: a new one). With ``guest`` (the guest
        image the domain runs, or a user's domain's boot), the saved domain must be one this project
        defines (``vm.spec.check_saved_domain``) before libvirt, which runs it as root, sees it: a
        checkpoint from another site or a peer's patched image.
        """
        if self.exists(name):
            raise VMError(f"a domain named {name!r} already exists")
        if not disk.is_file():
            raise ImageError(f"clone disk {disk} does not exist")
        header = savefmt.read_header(memory_image)
        if guest is not None:
            refuse_doctype(header.xml)
        xml = clone_xml(header.xml, name, disk, run_dir, uuid_=uuid_)
        if guest is not None:       # what libvirt will run: a user's domain's pty serial is a file by now
            check_saved_domain(xml, guest)
        image = memory_image
        if copy:
            image = run_dir / "memory.sav"
            run_dir.mkdir(parents=True, exist_ok=True)
            sparse_copy(memory_image, image, replace=True)
        (run_dir / "serial.log").unlink(missing_ok=True)
        try:
            savefmt.rewrite_xml(image, xml)
        except BaseException:
            if copy:
                image.unlink(missing_ok=True)
            raise
        return self.restore(image, paused=paused, consume=consume or copy, channels=channels)

    def restore(self, memory_image: Path, *, paused: bool = False, consume: bool = False,
                channels: int = SAVE_CHANNELS) -> Machine:
        """Restore the domain saved in ``memory_image`` under the identity in its header.

        ``consume``: delete the image once the domain runs (or is paused) from it: QEMU has read
        all of it when the restore returns, and the running domain is its newer state. A failed
        restore keeps it (it may be the only copy of that state). ``channels`` > 1: read the RAM
        through that many parallel channels (see :meth:`Machine.save`)."""
        name = domain_name(savefmt.read_header(memory_image).xml)
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        params: dict[str, str | int] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(memory_image)}
        if channels > 1:
            params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = channels
        try:
            self.conn.restoreParams(params, flags)
        except libvirt.libvirtError as e:
            raise VMError(f"restoring {name!r} from {memory_image}: {e.get_error_message()}") from e
        if consume:
            memory_image.unlink(missing_ok=True)
        return self.lookup(name)


class Machine:
    """One domain. Operations check the domain's live state first (see MachineState)."""

    def __init__(self, hv: Hypervisor, dom: Any) -> None:
        self.hv = hv
        self.dom = dom
        self.name: str = dom.name()
        self.log = logging.getLogger(f"replay_migrate.vm.{self.name}")

    def __repr__(self) -> str:
        return f"Machine({self.name!r})"

    # ---- state ---------------------------------------------------------------------------
    @property
    def state(self) -> MachineState:
        try:
            code, _reason = self.dom.state()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NoSuchDomainError(f"domain {self.name!r} is gone") from e
            raise VMError(f"{self.name}: cannot read state: {e.get_error_message()}") from e
        return _state_of(code)

    def _require(self, action: str, *allowed: MachineState) -> None:
        st = self.state
        if st not in allowed:
            want = " or ".join(s.value for s in allowed)
            raise VMError(f"cannot {action} {self.name!r}: it is {st.value}, needs {want}")

    def _call(self, action: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise VMError(f"{action} {self.name!r}: {e.get_error_message()}") from e

    @property
    def xml(self) -> str:
        return str(self._call("reading the XML of", self.dom.XMLDesc, 0))

    @property
    def run_dir(self) -> Path:
        """The folder of the domain's serial log and recorder socket (from its XML)."""
        el = ET.fromstring(self.xml).find("devices/serial[@type='file']/source")
        if el is None or not el.get("path"):
            raise VMError(f"{self.name!r} is not one of ours: no serial log file")
        return Path(str(el.get("path"))).parent

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._require("start", MachineState.SHUTOFF)
        self._call("starting", self.dom.create)

    def pause(self) -> None:
        self._require("pause", MachineState.RUNNING)
        self._call("pausing", self.dom.suspend)

    def resume(self) -> None:
        self._require("resume", MachineState.PAUSED)
        self._call("resuming", self.dom.resume)

    def destroy(self) -> None:
        """Power off at once (no guest shutdown); a no-op on a domain that is off."""
        if self.state is not MachineState.SHUTOFF:
            self._call("destroying", self.dom.destroy)

    def undefine(self) -> None:
        self._require("undefine", MachineState.SHUTOFF)
        self._call("undefining", self.dom.undefine)

    def remove(self) -> None:
        """Destroy and undefine; tolerant of a domain that is already gone."""
        try:
            self.destroy()
            self.undefine()
        except NoSuchDomainError:
            pass

    def memory_bytes(self) -> int:
        """The guest's RAM size (libvirt's maximum memory): what a saved image may allocate at most."""
        return int(self._call("reading the memory size of", self.dom.maxMemory)) * 1024

    def save(self, path: Path, *, channels: int = SAVE_CHANNELS) -> None:
        """Save memory + device state in the sparse format; the domain is gone afterwards.
        ``channels`` > 1: that many parallel channels write the RAM (libvirt's
        ``parallel.channels``, QEMU's multifd over the sparse format). Never with
        ``VIR_DOMAIN_SAVE_BYPASS_CACHE`` on the restore before it: that save crashed QEMU twice
        (bench/results/savepath.md)."""
        self._require("save", MachineState.RUNNING, MachineState.PAUSED)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        params: dict[str, str | int] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(path),
                                        libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT: "sparse"}
        if channels > 1:
            params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = channels
        self._call("saving", self.dom.saveParams, params, 0)

    # ---- screen and input ----------------------------------------------------------------
    def screenshot(self) -> Screenshot:
        """The guest's screen. Through QMP ``screendump`` in PPM into the run folder: libvirt's
        own screenshot API hands back whatever QEMU picks (PNG on QEMU 10), which would need a
        PNG decoder here for no gain."""
        self._require("take a screenshot of", MachineState.RUNNING, MachineState.PAUSED)
        # a name of its own: two threads of one process may take screenshots of one domain; in the
        # run folder of ours, in a private one of a domain that has none (a user's, before it is a clone)
        try:
            folder, scratch = self.run_dir, None
        except VMError:
            folder = scratch = Path(tempfile.mkdtemp(prefix="rm-screendump-"))
        path = folder / f".screendump-{os.getpid()}-{secrets.token_hex(6)}.ppm"
        try:
            self.qmp("screendump", filename=str(path), format="ppm")
            return Screenshot.from_ppm(path.read_bytes())
        except OSError as e:
            raise VMError(f"screenshot of {self.name!r}: {e}") from e
        finally:
            path.unlink(missing_ok=True)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command through libvirt's monitor passthrough."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        raw = self._call(f"QMP {command} on", libvirt_qemu.qemuMonitorCommand, self.dom,
                         json.dumps(msg), 0)
        reply = json.loads(raw)
        if "error" in reply:
            raise VMError(f"QMP {command} on {self.name!r}: {reply['error'].get('desc', reply)}")
        return reply.get("return")

    def send_input(self, events: Sequence[dict[str, Any]]) -> None:
        """Inject QMP InputEvents (build them with ``vm.input``). One call per *event* is the
        reliable rate: batching overflows the PS/2 queue and reorders buttons (DESIGN.md §7)."""
        self._require("send input to", MachineState.RUNNING)
        self.qmp("input-send-event", events=list(events))

    # ---- guest agent ---------------------------------------------------------------------
    def agent(self, command: str, timeout: int = AGENT_TIMEOUT_S, **arguments: Any) -> Any:
        self._require(f"run guest-agent {command} in", MachineState.RUNNING)
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            raw = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as e:
            raise VMError(f"guest agent {command} in {self.name!r}: {e.get_error_message()}") from e
        return json.loads(raw).get("return")

    def wait_agent(self, timeout: float = 60.0) -> float:
        """Wait until the guest agent answers; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                self.agent("guest-ping", timeout=2)
                return time.monotonic() - t0
            except VMError:
                if time.monotonic() - t0 > timeout:
                    raise VMError(f"the guest agent of {self.name!r} did not answer in "
                                  f"{timeout:.0f} s") from None
                time.sleep(0.2)

    def exec(self, shell: str, *, timeout: float = EXEC_TIMEOUT_S,
             env: Sequence[str] = ("DISPLAY=:0", "HOME=/root",
                                   "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
             max_output: int = guest.DEFAULT_MAX_OUTPUT, stdin: bytes | None = None) -> ExecResult:
        """Run ``shell`` with /bin/sh in the guest and wait for it; its stdout and stderr may be at
        most ``max_output`` bytes each (VMError beyond: the guest decides what it prints)."""
        args: dict[str, Any] = {"capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = guest.exec_pid(self.agent("guest-exec", path="/bin/sh", arg=["-c", shell], env=list(env), **args))
        deadline = time.monotonic() + timeout
        while True:
            result = guest.exec_status(self.agent("guest-exec-status", pid=pid), max_output)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise VMError(f"guest command in {self.name!r} did not finish in {timeout:.0f} s: "
                              f"{shell[:80]!r}")
            time.sleep(0.05)

    def read_file(self, path: str, *, max_bytes: int = guest.DEFAULT_MAX_FILE) -> bytes:
        """Read a guest file through the agent (guest-file-open/read), at most ``max_bytes``: every
        chunk is checked against what was asked before it is decoded."""
        handle = guest.file_handle(self.agent("guest-file-open", path=path, mode="rb"))
        data = bytearray()
        try:
            while True:
                ask = min(guest.READ_CHUNK, max_bytes + 1 - len(data))
                chunk, eof = guest.read_chunk(self.agent("guest-file-read", handle=handle, count=ask), ask)
                data += chunk
                if len(data) > max_bytes:
                    raise VMError(f"{path} in {self.name!r} is larger than {max_bytes} bytes")
                if eof or not chunk:
                    break
        finally:
            self.agent("guest-file-close", handle=handle)
        return bytes(data)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or truncate guest file ``path`` and write ``data`` (guest-file-open/write/close):
        the guest agent runs as root, so the caller picks the path with care."""
        handle = guest.file_handle(self.agent("guest-file-open", path=path, mode="wb"))
        try:
            for off in range(0, len(data), guest.WRITE_CHUNK):
                piece = data[off : off + guest.WRITE_CHUNK]
                args: dict[str, Any] = {"handle": handle, "buf-b64": base64.b64encode(piece).decode()}
                guest.written(self.agent("guest-file-write", **args), len(piece))
        finally:
            self.agent("guest-file-close", handle=handle)

    def sync_clock(self) -> float:
        """Set the guest's wall clock to the host's; returns guest minus host (s) afterwards.

        A restored guest's clock goes on from the moment it was saved (a clone: the checkpoint's;
        a migrated VM: the source's at suspend). Set through the guest agent's ``guest-set-time``
        with an explicit time (libvirt ``virDomainSetTime``, as ``virsh domtime --time``), not
        ``--sync``, which sets it from the RTC: measured here, that left the guest 0.5 s off (the
        RTC counts whole seconds) against 0.04 s. The agent then runs ``hwclock -w``, which writes
        /etc/adjtime, so the file systems must not be frozen; it takes ~2 s under TCG."""
        self._require("set the clock of", MachineState.RUNNING)
        now = time.time_ns()
        self._call("setting the clock of", self.dom.setTime,
                   {"seconds": now // 1_000_000_000, "nseconds": now % 1_000_000_000}, 0)
        return self.clock_offset()

    def clock_offset(self) -> float:
        """The guest's wall clock minus the host's, in seconds (guest agent ``guest-get-time``)."""
        self._require("read the clock of", MachineState.RUNNING)
        t = self._call("reading the clock of", self.dom.getTime, 0)
        return float(t["seconds"] + t["nseconds"] / 1e9 - time.time())

    def fsfreeze(self) -> int:
        """Flush and freeze the guest's file systems (clean journal for the disk diff)."""
        return int(self._call("freezing the file systems of", self.dom.fsFreeze, None, 0))

    def fsthaw(self) -> int:
        return int(self._call("thawing the file systems of", self.dom.fsThaw, None, 0))

    @contextmanager
    def frozen(self) -> Iterator[None]:
        self.fsfreeze()
        try:
            yield
        finally:
            if self.state is MachineState.RUNNING:
                self.fsthaw()

    # ---- serial console and the recorder channel -----------------------------------------
    def wait_mark(self, mark: str, timeout: float = MARK_TIMEOUT_S, *, after: int = 0) -> float:
        """Wait for ``RM_MARK <mark>`` on the serial console (written by the guest session);
        returns the guest uptime it reports. ``after`` skips that many bytes of the log."""
        path = self.run_dir / "serial.log"
        needle = f"RM_MARK {mark} "
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(path, "rb") as f:
                    f.seek(after)
                    for line in f.read().decode("utf-8", "replace").splitlines():
                        if needle in line:
                            try:
                                return float(line.split("uptime=")[1].split()[0])
                            except (IndexError, ValueError):
                                return 0.0
            except FileNotFoundError:
                pass
            if self.state is not MachineState.RUNNING:
                raise VMError(f"{self.name!r} stopped before {mark} ({path})")
            if time.monotonic() > deadline:
                raise VMError(f"{self.name!r} did not reach {mark} in {timeout:.0f} s "
                              f"(serial console: {path})")
            time.sleep(0.1)

    def recorder_channel(self, *, live: bool = True) -> ET.Element | None:
        """The recorder's virtio-serial channel in the domain's live (or persistent) definition."""
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        root = ET.fromstring(str(self._call("reading the XML of", self.dom.XMLDesc, flags)))
        for ch in root.findall("devices/channel"):
            target = ch.find("target")
            if target is not None and target.get("type") == "virtio" and target.get("name") == RECORDER_CHANNEL:
                return ch
        return None

    def recorder_socket(self) -> Path:
        """The host end of the recorder channel: the unix socket its live definition names (our
        clones name one in their folder; libvirt makes one for a channel attached without a path)."""
        ch = self.recorder_channel()
        src = ch.find("source") if ch is not None else None
        if ch is None or ch.get("type") != "unix" or src is None or not src.get("path"):
            raise VMError(f"{self.name!r} has no recorder channel ({RECORDER_CHANNEL}): "
                          f"`replay-migrate agent install {self.name}` adds it")
        return Path(str(src.get("path")))

    @property
    def persistent(self) -> bool:
        return bool(self._call("asking whether it is persistent:", self.dom.isPersistent))

    def attach_recorder_channel(self) -> tuple[bool, bool]:
        """Add the recorder's virtio-serial channel where it is missing: hot-plugged into the running
        domain and into its persistent definition (a transient domain has none). Returns (live,
        persistent): whether the running guest and the definition have it now. A live attach libvirt
        or QEMU refuses leaves the definition changed (the next start has the channel)."""
        xml = (f"<channel type='unix'><source mode='bind'/>"
               f"<target type='virtio' name='{RECORDER_CHANNEL}'/></channel>")
        live = self.recorder_channel() is not None
        config = not self.persistent or self.recorder_channel(live=False) is not None
        if not config:
            self._call("adding the recorder channel to the definition of", self.dom.attachDeviceFlags, xml,
                       libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            config = True
        if not live and self.state is not MachineState.SHUTOFF:
            try:
                self.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                live = True
            except libvirt.libvirtError as e:
                self.log.warning("hot-plugging the recorder channel failed: %s", e.get_error_message())
        return live, config and self.persistent

    def detach_recorder_channel(self) -> None:
        """Remove the recorder channel from the running domain and from its definition, where present."""
        ch = self.recorder_channel()
        if ch is not None and self.state is not MachineState.SHUTOFF:
            self._call("unplugging the recorder channel of", self.dom.detachDeviceFlags,
                       ET.tostring(ch, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        if self.persistent:
            ch = self.recorder_channel(live=False)
            if ch is not None:
                self._call("removing the recorder channel from the definition of", self.dom.detachDeviceFlags,
                           ET.tostring(ch, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def open_recorder(self, timeout: float = 10.0) -> socket.socket:
        """Connect to the host end of the recorder's virtio-serial channel (a unix socket)."""
        self._require("connect to the recorder of", MachineState.RUNNING, MachineState.PAUSED)
        path = self.recorder_socket()
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise VMError(f"cannot connect to the recorder channel of {self.name!r} at "
                                  f"{path}: {e.strerror}") from e
                time.sleep(0.1)

    @property
    def screen_size(self) -> tuple[int, int]:
        return SCREEN


def remove_run_dir(run_dir: Path) -> None:
    """Delete a clone's folder (overlay, memory copy, logs)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def file_allocated(path: Path) -> int:
    """Bytes allocated on disk for ``path`` (a sparse image's real cost)."""
    return os.stat(path).st_blocks * 512
