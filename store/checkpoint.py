"""Checkpoints: a booted, settled desktop saved as disk overlay + sparse memory image.

Both sites hold the same checkpoint before a migration; a clone starts from it by *restoring*
(seconds) instead of booting (~35 s under TCG). A checkpoint folder holds::

    disk.qcow2      qcow2 overlay over its base (never written again)
    memory.sav      libvirt sparse save image of the running desktop
    manifest.json   what it is: its origin and base, virt type, sizes, timings, later root hashes
    screen.png      the desktop at save time

A checkpoint comes from one of three places (``Manifest.origin``):

- ``image``: the guest image booted to its settled desktop (``create``); its disk is an overlay over
  the image's ``base.qcow2``, found by the image recipe's hash.
- ``domain``: a running domain of the user's (``store.fromdomain``); its disk is an overlay over the
  domain's own qcow2 image, which becomes read-only and is identified by its path and a digest
  (``Manifest.base``), and its virt type and machine come from the domain's XML (kept in the save
  image's header, and its persistent definition in ``domain.xml``).
- ``migration``: the state both sites verified at the end of a migration (``store.chain``): the
  next common checkpoint, whose disk is an overlay over an earlier checkpoint's (``Manifest.parent``
  and ``backing``) and whose trees the migration computed.

Clones live in ``<state>/clones/<name>/``: their own overlay over the checkpoint's disk, serial
log, recorder socket, and the name of their checkpoint (``checkpoint``). Every checkpoint or clone
name passes ``store.paths.named_path`` before it becomes a path: nothing here deletes or writes
outside those two folders, whatever the name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replay_migrate import savefmt
from replay_migrate.errors import BadNameError, CheckpointError, NoSuchDomainError, UsageError, VMError
from replay_migrate.files import atomic_write, locked
from store.images import ensure_image, prune_images
from store.paths import check_name, checkpoint_path, checkpoints_dir, clone_path, clones_dir, state_root
from vm.machine import Hypervisor, Machine, create_overlay, file_allocated, remove_run_dir
from vm.probe import choose_virt
from vm.spec import Boot, DomainSpec, GuestImage, VirtType, check_kernel_args

log = logging.getLogger("replay_migrate.checkpoint")
DOMAIN_PREFIX = "rm-"
"""Every domain this project defines is named with this prefix (clean-up finds them by it)."""
MEMORY_MIB = 1024
"""Guest memory of a checkpoint unless told otherwise (the desktop and the workloads fit in it)."""
SETTLE_S = 15.0
"""Idle time after the desktop is up before saving, so boot-time writers (font caches, udev,
journald) are done and clones start from a quiet guest."""
IMAGE_KERNEL_ARGS: tuple[str, ...] = ("init_on_free=1",)
"""The kernel arguments a checkpoint of this project's guest image boots with unless told otherwise
(``create``/``ensure`` with ``kernel_args=None``; `checkpoint create` without ``--kernel-arg``):
``init_on_free=1``, the guest kernel zeroes every page and slab object it frees. Memory a program
or the kernel freed then holds zeros on both sides of a migration instead of the different garbage
each left, and travels as a zero reference instead of bytes (bench/results/levers.md: the bytes it
saves and the time it costs, measured on real migrations). Cost: the zeroing on every free: a
compile in the guest took 8.7 % longer there (TCG), and no other change the user sees."""
MANIFEST_VERSION = 1
ORIGIN_IMAGE, ORIGIN_DOMAIN, ORIGIN_MIGRATION = "image", "domain", "migration"


@dataclass
class Manifest:
    name: str
    image_recipe: str
    image_dir: str
    virt: str
    memory_mib: int
    created: float
    boot_to_desktop_s: float
    save_s: float
    memory_apparent_bytes: int
    memory_allocated_bytes: int
    disk_allocated_bytes: int
    roots: dict[str, str] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    kernel_args: list[str] = field(default_factory=list)
    """Extra guest kernel arguments the checkpoint was booted with (guest settings such as
    ``norandmaps``): part of what the checkpoint is, like its image."""
    origin: str = ORIGIN_IMAGE
    """``image``, ``domain`` or ``migration`` (see the module docstring)."""
    base: dict[str, Any] = field(default_factory=dict)
    """A domain checkpoint's base image: path, format, size, mtime_ns and blake3 of its bytes."""
    parent: str = ""
    """A migration checkpoint's predecessor: the checkpoint the migration started from."""
    backing: str = ""
    """The checkpoint whose disk this one's disk.qcow2 is an overlay over (``parent``, or the chain's
    root when the chain was cut short: ``store.chain``)."""
    chain: str = ""
    """The root checkpoint (image or domain) a migration checkpoint's chain starts from."""
    lineage: str = ""
    """The first migration checkpoint of this one's chain: one lineage per VM (many VMs may start from
    one root), the unit ``store.chain.prune`` bounds."""
    depth: int = 0
    """How many migration checkpoints this one's disk stacks over the root's."""
    log_resume: int = 1
    log_origin_us: int = 0
    """The recorder agent's log in this checkpoint's state (``recorder.logformat.LogDecoder``): it was
    taken while the agent recorded (a domain's, or after a migration), so frames 1 .. log_resume - 1
    of the log with clock origin log_origin_us are in the state; a migration from a clone of it
    forwards the header and the frames from log_resume on, or the log was replayed twice."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of files both sites must hold byte for byte (a migration checkpoint's disk.qcow2)."""

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return cls(**data)
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no manifest (incomplete checkpoint)") from None
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable manifest: {e}") from e

    def save(self, path: Path) -> None:
        """Replace the manifest whole (a temporary file of its own, then a rename): a reader never
        sees half of it, and two writers never share a temporary file."""
        try:
            atomic_write(path, (json.dumps(asdict(self), indent=2) + "\n").encode())
        except OSError as e:
            raise CheckpointError(f"{path}: cannot write the manifest: {e.strerror}") from e


@dataclass(frozen=True)
class Checkpoint:
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def memory(self) -> Path:
        return self.dir / "memory.sav"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def manifest(self) -> Manifest:
        return Manifest.load(self.manifest_path)

    @property
    def image(self) -> GuestImage:
        m = self.manifest
        return GuestImage(Path(m.image_dir), m.image_recipe)

    @property
    def boot(self) -> GuestImage | Boot:
        """What a clone of this checkpoint may boot (``vm.spec.check_saved_domain``): the guest
        image's kernel and initrd, or for a user's domain the boot it had when it was checkpointed
        here (its save image's header); a migration checkpoint's is its chain root's."""
        ck, m = self, self.manifest
        if m.origin == ORIGIN_MIGRATION and m.chain:
            ck = Checkpoint(checkpoint_path(m.chain))
            m = ck.manifest
        if m.origin == ORIGIN_DOMAIN:
            return Boot.of(savefmt.read_header(ck.memory).xml)
        return ck.image

    def check(self) -> None:
        for p in (self.disk, self.memory, self.manifest_path):
            if not p.is_file():
                raise CheckpointError(f"checkpoint {self.name!r} is incomplete: {p.name} is missing")
        m = self.manifest
        if m.origin == ORIGIN_IMAGE:
            self.image.check()
        elif m.origin == ORIGIN_DOMAIN:
            base = Path(str(m.base.get("path", "")))
            if not base.is_file():
                raise CheckpointError(f"checkpoint {self.name!r}: its base image {base} is missing")
        elif m.origin == ORIGIN_MIGRATION:
            if not m.backing or not Checkpoint(checkpoint_path(m.backing)).disk.is_file():
                raise CheckpointError(f"checkpoint {self.name!r}: the checkpoint under its disk, "
                                      f"{m.backing!r}, is missing")
        else:
            raise CheckpointError(f"checkpoint {self.name!r}: unknown origin {m.origin!r}")

    @property
    def in_use_lock(self) -> Path:
        """A session that uses this checkpoint holds a shared lock on this file (``in_use``); pruning
        takes it exclusively or leaves the checkpoint alone."""
        return self.dir / IN_USE_LOCK


IN_USE_LOCK = ".in-use"


@contextlib.contextmanager
def in_use(ck: Checkpoint) -> Iterator[None]:
    """Hold checkpoint ``ck`` for the duration (a migration's side): it is not pruned meanwhile."""
    fd = os.open(ck.in_use_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def get(name: str) -> Checkpoint:
    """Checkpoint ``name`` of this host's store, complete (BadNameError for a name that is not
    one: a name read from a file or a peer passes here too)."""
    ck = Checkpoint(checkpoint_path(name))
    if not ck.dir.is_dir():
        raise CheckpointError(f"no checkpoint named {name!r} in {checkpoints_dir()}")
    ck.check()
    return ck


def list_all() -> list[Checkpoint]:
    d = checkpoints_dir()
    return sorted((Checkpoint(p) for p in d.iterdir() if _is_name(p.name) and (p / "manifest.json").is_file()),
                  key=lambda c: c.name) if d.is_dir() else []


def kernel_args_for(given: Sequence[str] | None) -> tuple[str, ...]:
    """The kernel arguments a checkpoint of the image boots with: ``given`` (checked), or
    :data:`IMAGE_KERNEL_ARGS` for None."""
    return check_kernel_args(IMAGE_KERNEL_ARGS if given is None else given)


CREATE_LOCK = ".create-{name}.lock"
"""Held (in the checkpoints folder) while checkpoint ``name`` is checked and made: two commands
making the same checkpoint at once would share its ``.partial`` folder and boot domain."""


def creation_domain(name: str) -> str:
    """The domain that boots checkpoint ``name`` while it is made: named after the state folder too
    (a short digest of its path), so that two state folders on one libvirt host (a test root and the
    user's, two sites' roots in a bench) making a checkpoint of the same name never remove each
    other's booting domain."""
    root = hashlib.sha256(os.fsencode(state_root().resolve())).hexdigest()[:8]
    return f"{DOMAIN_PREFIX}ckpt-{check_name(name, 'checkpoint')}-{root}"


def _creation_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """:data:`CREATE_LOCK` of checkpoint ``name`` (the name checked before it names a file)."""
    checkpoint_path(name)
    checkpoints_dir().mkdir(parents=True, exist_ok=True)
    return locked(checkpoints_dir() / CREATE_LOCK.format(name=name))


def create(hv: Hypervisor, name: str, *, memory_mib: int = MEMORY_MIB, settle_s: float = SETTLE_S,
           image: GuestImage | None = None, virt: VirtType | None = None,
           kernel_args: Sequence[str] | None = None) -> Checkpoint:
    """Boot the guest image to the settled desktop and save it as checkpoint ``name``;
    ``kernel_args`` are appended to the guest kernel's command line (checked first; None:
    :data:`IMAGE_KERNEL_ARGS`, ``()``: none)."""
    with _creation_lock(name):
        return _create(hv, name, memory_mib=memory_mib, settle_s=settle_s, image=image, virt=virt,
                       kernel_args=kernel_args)


def _create(hv: Hypervisor, name: str, *, memory_mib: int = MEMORY_MIB, settle_s: float = SETTLE_S,
            image: GuestImage | None = None, virt: VirtType | None = None,
            kernel_args: Sequence[str] | None = None) -> Checkpoint:
    """:func:`create`, its lock held (the lock is not re-entrant: :func:`ensure` calls this)."""
    ck = Checkpoint(checkpoint_path(name))
    args = kernel_args_for(kernel_args)
    if ck.dir.exists():
        raise CheckpointError(f"checkpoint {name!r} exists already (checkpoint rm {name})")
    image = image or ensure_image().image
    if virt is None:
        virt, why = choose_virt(image.kernel, image.dir.parent)
        log.info("virtualisation: %s (%s)", virt.name, why)
    log.info("creating checkpoint %s: booting the guest to its desktop (~1-2 min under TCG)", name)
    partial = ck.dir.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dom_name = creation_domain(name)
    _remove_domain(hv, dom_name)
    create_overlay(partial / "disk.qcow2", image.base)
    spec = DomainSpec(name=dom_name, image=image, disk=partial / "disk.qcow2",
                      run_dir=partial / "boot", virt=virt, memory_mib=memory_mib, kernel_args=args)
    m = hv.define(spec)
    try:
        t0 = time.monotonic()
        m.start()
        m.wait_mark("APPS_READY")
        m.wait_mark("AGENT_READY", timeout=60)
        boot_s = time.monotonic() - t0
        m.wait_agent()
        time.sleep(settle_s)
        # flush the page cache and the journal so the overlay holds a clean file system
        m.exec("sync")
        with m.frozen():
            pass
        time.sleep(1.0)
        (partial / "screen.png").write_bytes(m.screenshot().png())
        t1 = time.monotonic()
        m.save(partial / "memory.sav")
        save_s = time.monotonic() - t1
    except BaseException:
        _remove_domain(hv, dom_name)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    m.undefine()
    remove_run_dir(partial / "boot")
    mem = partial / "memory.sav"
    Manifest(name=name, image_recipe=image.recipe_hash, image_dir=str(image.dir), virt=virt.value,
             memory_mib=memory_mib, created=time.time(), boot_to_desktop_s=round(boot_s, 2),
             save_s=round(save_s, 2), memory_apparent_bytes=mem.stat().st_size,
             memory_allocated_bytes=file_allocated(mem),
             disk_allocated_bytes=file_allocated(partial / "disk.qcow2"), kernel_args=list(args)).save(
                 partial / "manifest.json")
    partial.rename(ck.dir)
    return ck


def is_current(m: Manifest, recipe_hash: str, kernel_args: Sequence[str] | None) -> bool:
    """Whether a checkpoint with manifest ``m`` is the one ``ensure`` would make: of image recipe
    ``recipe_hash``, booted with exactly :func:`kernel_args_for` ``(kernel_args)``."""
    return m.image_recipe == recipe_hash and m.kernel_args == list(kernel_args_for(kernel_args))


def ensure(hv: Hypervisor, name: str, **kw: Any) -> tuple[Checkpoint, bool]:
    """Checkpoint ``name`` for the current image recipe and ``kernel_args`` (None or not given:
    :data:`IMAGE_KERNEL_ARGS`): reused if it exists and matches, (re)created otherwise, so a
    checkpoint booted with other arguments (an older default) is remade. Returns (checkpoint, created)."""
    with _creation_lock(name):
        return _ensure(hv, Checkpoint(checkpoint_path(name)), name, **kw)


def _ensure(hv: Hypervisor, ck: Checkpoint, name: str, **kw: Any) -> tuple[Checkpoint, bool]:
    """:func:`ensure`, its lock held."""
    image = ensure_image().image
    want_args = list(kernel_args_for(kw.get("kernel_args")))
    if ck.manifest_path.is_file():
        try:
            m = ck.manifest
            if is_current(m, image.recipe_hash, want_args):
                ck.check()
                return ck, False
        except CheckpointError as e:
            log.warning("recreating checkpoint %s: %s", name, e)
        remove(hv, name, with_chain=True)
    ck = _create(hv, name, **{**kw, "image": image, "kernel_args": want_args})
    for old in prune_images({image.recipe_hash} | {c.manifest.image_recipe for c in list_all()}):
        log.info("removed the unused guest image %s", old.name)
    return ck, True


def remove(hv: Hypervisor, name: str, *, with_chain: bool = False) -> None:
    """Delete checkpoint ``name`` (and nothing else: see ``named_path``); refused while clones of
    it are defined or other checkpoints stack on it. ``with_chain``: first the migration checkpoints
    whose chain starts from it (a root whose image changed: they are stale too), refused while one
    of them has clones."""
    d = checkpoint_path(name)
    if not d.is_dir():
        raise CheckpointError(f"no checkpoint named {name!r}")
    if with_chain:
        members = [c for c in list_all() if c.name != name and _chain_of(c) == name]
        users = [f"{c} (of {m.name})" for m in members for c in clones_of(m.name) if hv.exists(c)]
        if users:
            raise CheckpointError(f"checkpoints after {name!r} are used by {', '.join(users)}: remove them first")
        for m in members:
            shutil.rmtree(m.dir)
    users = [c for c in clones_of(name) if hv.exists(c)]
    if users:
        raise CheckpointError(f"checkpoint {name!r} is used by {', '.join(users)}: remove them first")
    over = [c.name for c in list_all() if c.name != name and _backing_of(c) == name]
    if over:
        raise CheckpointError(f"the disks of checkpoints {', '.join(over)} are overlays over {name!r}'s: "
                              "remove them first")
    shutil.rmtree(d)


def _chain_of(c: Checkpoint) -> str:
    try:
        m = c.manifest
    except CheckpointError:
        return ""
    return m.chain if m.origin == ORIGIN_MIGRATION else ""


def _backing_of(c: Checkpoint) -> str:
    try:
        return c.manifest.backing
    except CheckpointError:     # not a checkpoint we can read: nothing of it stacks on another
        return ""


def clones_of(name: str) -> list[str]:
    out = []
    for p in clones_dir().iterdir() if clones_dir().is_dir() else []:
        origin = p / "checkpoint"
        if origin.is_file() and origin.read_text().strip() == name:
            out.append(p.name)
    return sorted(out)


def clone_names() -> list[str]:
    """The clone folders of the store (a folder whose name is not a clone name is not one)."""
    d = clones_dir()
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _is_name(p.name)) if d.is_dir() else []


def _is_name(name: str) -> bool:
    try:
        check_name(name, "clone")
    except BadNameError:
        return False
    return True


def clone_dir(name: str) -> Path:
    """The folder of clone ``name`` (checked: see ``store.paths.named_path``)."""
    return clone_path(name)


def run_dir_of(m: Machine) -> Path:
    """The clone folder of a running domain, refused unless the domain is one of our clones: its
    serial log (and so its files) are in ``clone_dir(m.name)``. The folder a domain's XML names
    could be anywhere; only this one is ours to write in and delete from."""
    d = clone_dir(m.name)
    if m.run_dir.resolve() != d.resolve():
        raise UsageError(f"{m.name!r} is not a clone of a checkpoint (its files are in {m.run_dir}, not {d})")
    return d


def start_clone(hv: Hypervisor, ck: Checkpoint, name: str, *, paused: bool = False,
                replace: bool = False, uuid_: str | None = None) -> Machine:
    """Start domain ``name`` as a clone of checkpoint ``ck`` (restore, not boot), with the host's
    wall-clock time (the checkpoint's is minutes or days old). Every clone is set so when it starts,
    the source's and the target's alike, so both keep one clock. A migration's checkpoint was saved
    with the guest's file systems frozen (the target's suspend): its clones are thawed first.
    ``paused``: the caller resumes it, thaws it (``Machine.fsthaw``) and calls ``Machine.sync_clock``."""
    run_dir = clone_dir(name)
    ck.check()
    if hv.exists(name):
        if not replace:
            raise VMError(f"a domain named {name!r} already exists")
        hv.lookup(name).remove()
    remove_run_dir(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint").write_text(ck.name + "\n")
    create_overlay(run_dir / "disk.qcow2", ck.disk)
    try:
        m = hv.restore_clone(ck.memory, name=name, disk=run_dir / "disk.qcow2", run_dir=run_dir,
                             paused=paused, uuid_=uuid_, guest=ck.boot)
        if not paused:
            m.wait_agent()
            if ck.manifest.origin == ORIGIN_MIGRATION:
                m.fsthaw()      # a migration's state was saved frozen (its guest agent refuses the clock)
            offset = m.sync_clock()
            log.info("%s: clock set to the host's (off by %.3f s now)", name, offset)
        return m
    except BaseException:
        _remove_domain(hv, name)
        remove_run_dir(run_dir)
        raise


def remove_run_dir_of(name: str) -> None:
    """Delete clone ``name``'s folder (checked name), if there is one."""
    remove_run_dir(clone_dir(name))


def remove_clone(hv: Hypervisor, name: str) -> None:
    """Destroy and undefine clone ``name`` and delete its folder (either may be gone already). A
    domain that has no clone folder and no name of ours (DOMAIN_PREFIX) is someone else's: refused."""
    run_dir = clone_dir(name)
    if not run_dir.is_dir() and not name.startswith(DOMAIN_PREFIX) and hv.exists(name):
        raise UsageError(f"{name!r} is not a clone made by replay-migrate (no {run_dir}): not removing it")
    _remove_domain(hv, name)
    remove_run_dir(run_dir)


def _remove_domain(hv: Hypervisor, name: str) -> None:
    try:
        hv.lookup(name).remove()
    except NoSuchDomainError:
        pass
