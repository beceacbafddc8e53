"""Checkpoints: manifest, listing, clones, the refusal to delete a checkpoint in use, and names
that must never become paths outside the state folder."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from cli.fileargs import TEST_URI
from cli.main import main
from replay_migrate.errors import BadNameError, CheckpointError, ImageError, UsageError
from store import checkpoint as ckpt
from store.images import recipe_hash
from vm.machine import Hypervisor, Machine

BAD_NAMES = ["", ".", "..", "../../victim", "a/../b", "{victim}", "x.partial"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state folder with checkpoints ``a`` and ``b`` (folders with a manifest) and clone
    folders ``c1`` and ``c2``, beside a folder ``victim`` that is not the store's."""
    state = tmp_path / "state"
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(state))
    for name in ("a", "b"):
        (state / "checkpoints" / name).mkdir(parents=True)
        (state / "checkpoints" / name / "manifest.json").write_text("{}")
    for name in ("c1", "c2"):
        (state / "clones" / name).mkdir(parents=True)
        (state / "clones" / name / "checkpoint").write_text("a\n")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious").write_text("keep me")
    yield state


def _everything_is_there(store: Path) -> None:
    for p in ("checkpoints/a/manifest.json", "checkpoints/b/manifest.json", "clones/c1/checkpoint",
              "clones/c2/checkpoint", "../victim/precious"):
        assert (store / p).is_file(), p


@pytest.mark.parametrize("name", BAD_NAMES)
def test_checkpoint_rm_refuses_names_that_are_not_a_checkpoint(
        name: str, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = name.format(victim=store.parent / "victim")
    assert main(["--connect", TEST_URI, "checkpoint", "rm", name]) == UsageError.exit_code
    assert "checkpoint" in capsys.readouterr().err
    _everything_is_there(store)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_vm_rm_refuses_names_that_are_not_a_clone(name: str, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = name.format(victim=store.parent / "victim")
    assert main(["--connect", TEST_URI, "vm", "rm", name]) == UsageError.exit_code
    assert "clone" in capsys.readouterr().err
    _everything_is_there(store)


def test_checkpoint_rm_of_a_symlink_out_of_the_store_is_refused(store: Path) -> None:
    (store / "checkpoints" / "link").symlink_to(store.parent / "victim")
    assert main(["--connect", TEST_URI, "checkpoint", "rm", "link"]) == UsageError.exit_code
    _everything_is_there(store)


def test_checkpoint_rm_removes_exactly_one_checkpoint(store: Path) -> None:
    assert main(["--connect", TEST_URI, "checkpoint", "rm", "b"]) == 0
    assert not (store / "checkpoints" / "b").exists()
    assert (store / "checkpoints" / "a" / "manifest.json").is_file()
    assert main(["--connect", TEST_URI, "checkpoint", "rm", "b"]) == CheckpointError.exit_code


def test_a_manifest_records_the_kernel_args_and_older_ones_load_without(tmp_path: Path) -> None:
    m = ckpt.Manifest(name="m", image_recipe="0" * 16, image_dir="/x", virt="qemu", memory_mib=1, created=0.0,
                      boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                      disk_allocated_bytes=0, kernel_args=["norandmaps"])
    path = tmp_path / "manifest.json"
    m.save(path)
    assert ckpt.Manifest.load(path).kernel_args == ["norandmaps"]
    old = json.loads(path.read_text())
    del old["kernel_args"]
    path.write_text(json.dumps(old))
    assert ckpt.Manifest.load(path).kernel_args == []


def test_the_image_checkpoints_boot_with_init_on_free_unless_told_otherwise() -> None:
    assert ckpt.IMAGE_KERNEL_ARGS == ("init_on_free=1",)
    assert ckpt.kernel_args_for(None) == ckpt.IMAGE_KERNEL_ARGS
    assert ckpt.kernel_args_for([]) == ()
    assert ckpt.kernel_args_for(["norandmaps"]) == ("norandmaps",)
    with pytest.raises(UsageError):
        ckpt.kernel_args_for(["init_on_free=1 quiet"])


def test_a_checkpoint_made_with_other_kernel_args_is_not_reused() -> None:
    """`ensure` remakes what `is_current` refuses: a checkpoint of the older default (no arguments,
    or a manifest from before they were recorded) is remade with init_on_free=1 for the bench, the
    demo and the tests; one made explicitly without arguments is reused when asked for that."""
    m = ckpt.Manifest(name="m", image_recipe="r" * 16, image_dir="/x", virt="qemu", memory_mib=1, created=0.0,
                      boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                      disk_allocated_bytes=0)
    assert not ckpt.is_current(m, "r" * 16, None)
    assert ckpt.is_current(m, "r" * 16, [])
    m.kernel_args = ["init_on_free=1"]
    assert ckpt.is_current(m, "r" * 16, None)
    assert not ckpt.is_current(m, "s" * 16, None)
    assert not ckpt.is_current(m, "r" * 16, ["init_on_free=1", "norandmaps"])


def test_manifest_saved_by_many_writers_at_once(tmp_path: Path) -> None:
    """Both sides of one-host migrate record the roots in the manifest: no shared temporary file
    (the second rename failed), no temporary file left, always a whole manifest."""
    import threading

    m = ckpt.Manifest(name="m", image_recipe="0" * 16, image_dir="/x", virt="qemu", memory_mib=1, created=0.0,
                      boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                      disk_allocated_bytes=0, roots={"memory": "ab" * 32})
    path = tmp_path / "manifest.json"
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def save() -> None:
        barrier.wait()
        try:
            for _ in range(30):
                m.save(path)
                assert ckpt.Manifest.load(path) == m
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def _complete_checkpoint(folder: Path, image: Path) -> None:
    """The files ``get`` checks, with an image folder of dummy files."""
    image.mkdir(parents=True, exist_ok=True)
    for f in ("base.qcow2", "vmlinuz", "initrd.img"):
        (image / f).write_bytes(b"x")
    folder.mkdir(parents=True)
    (folder / "disk.qcow2").write_bytes(b"x")
    (folder / "memory.sav").write_bytes(b"x")
    (folder / "manifest.json").write_text(json.dumps(dict(
        name=folder.name, image_recipe="0" * 16, image_dir=str(image), virt="qemu", memory_mib=1024, created=0.0,
        boot_to_desktop_s=1.0, save_s=1.0, memory_apparent_bytes=1, memory_allocated_bytes=1,
        disk_allocated_bytes=1)))


def test_get_finds_only_checkpoints_in_the_store(store: Path) -> None:
    _complete_checkpoint(store / "checkpoints" / "good", store / "image")
    _complete_checkpoint(store.parent / "outside", store / "image")
    assert ckpt.get("good").dir == store / "checkpoints" / "good"
    for name in ("../../outside", str(store.parent / "outside"), "", "."):
        with pytest.raises(UsageError, match="checkpoint"):
            ckpt.get(name)


def test_vm_rm_refuses_a_domain_that_is_not_ours(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vm rm`` destroys clones: a domain with no clone folder and a name without our prefix is
    someone else's, and stays defined."""
    name = f"rmtest-not-ours-{os.getpid()}"
    xml = (f"<domain type='test'><name>{name}</name><memory unit='MiB'>16</memory>"
           "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>")
    with Hypervisor(TEST_URI) as hv:             # libvirt's test driver: in this process, no daemon
        hv.conn.defineXML(xml)
        try:
            assert main(["--connect", TEST_URI, "vm", "rm", name]) == UsageError.exit_code
            assert "is not a clone made by replay-migrate" in capsys.readouterr().err
            assert hv.exists(name)
        finally:
            if hv.exists(name):
                hv.lookup(name).remove()


def test_a_clone_of_a_domain_we_would_not_define_is_never_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """libvirt restores the domain saved in a memory image as root: a checkpoint (or a migrated
    image) whose saved domain names another emulator is refused before libvirt sees it, and
    nothing of the clone is left."""
    from test_exchange import make_checkpoint, make_image

    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("REPLAY_MIGRATE_CACHE", str(tmp_path / "cache"))
    ck = make_checkpoint(make_image(tmp_path / "cache"), "evil", emulator="/tmp/evil-qemu")
    with Hypervisor("test:///default") as hv:
        with pytest.raises(ImageError, match="emulator is '/tmp/evil-qemu'"):
            ckpt.start_clone(hv, ck, "rm-evil")
        assert not hv.exists("rm-evil")
    assert not ckpt.clone_dir("rm-evil").exists()


@pytest.mark.vm
def test_manifest_describes_the_checkpoint(checkpoint: ckpt.Checkpoint) -> None:
    m = checkpoint.manifest
    assert m.name == checkpoint.name == "test-desktop"
    assert m.image_recipe == recipe_hash() == checkpoint.image.recipe_hash
    assert m.memory_apparent_bytes == checkpoint.memory.stat().st_size
    assert 0 < m.memory_allocated_bytes < m.memory_apparent_bytes      # sparse
    assert m.boot_to_desktop_s > 0 and m.virt in ("qemu", "kvm")
    assert checkpoint.name in [c.name for c in ckpt.list_all()]
    assert (checkpoint.dir / "screen.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.vm
def test_a_checkpoint_in_use_cannot_be_removed(make_clone: Callable[..., Machine], hv: Hypervisor,
                                               checkpoint: ckpt.Checkpoint) -> None:
    clone = make_clone()
    assert clone.name in ckpt.clones_of(checkpoint.name)
    assert (clone.run_dir / "disk.qcow2").is_file()
    with pytest.raises(CheckpointError, match="is used by"):
        ckpt.remove(hv, checkpoint.name)
    assert checkpoint.memory.is_file()


@pytest.mark.vm
def test_clone_names_are_checked(hv: Hypervisor, checkpoint: ckpt.Checkpoint) -> None:
    for name in ("../escape", "", ".", "x.partial"):
        with pytest.raises(UsageError, match="clone"):
            ckpt.start_clone(hv, checkpoint, name)
    assert not (checkpoint.dir.parent.parent / "escape").exists()


def clock_offset(m: Machine) -> float:
    """The guest's wall clock minus the host's, in seconds (guest agent guest-get-time)."""
    t = m.dom.getTime()
    return float(t["seconds"] + t["nseconds"] / 1e9 - time.time())


@pytest.mark.vm
def test_a_clone_starts_with_the_hosts_clock_and_no_copy_of_the_memory_image(
        make_clone: Callable[..., Machine], checkpoint: ckpt.Checkpoint) -> None:
    """A restored clone kept the checkpoint's wall-clock time (a guest showed 10:58 at 11:08), and
    its 1 GiB (apparent) copy of the memory image stayed in its folder after the restore. Its
    kernel runs with the checkpoint's default arguments (``IMAGE_KERNEL_ARGS``)."""
    age = time.time() - checkpoint.manifest.created
    if age < 10:            # not a wait for anything: a fresh checkpoint's clock is not behind yet
        time.sleep(10 - age)
    m = make_clone()
    assert abs(clock_offset(m)) < 2.0, clock_offset(m)
    assert sorted(p.name for p in m.run_dir.glob("*.sav")) == []
    # the kernel it runs was booted with the checkpoint's arguments (the image's defaults here)
    cmdline = m.exec("cat /proc/cmdline").stdout.split()
    assert checkpoint.manifest.kernel_args == list(ckpt.IMAGE_KERNEL_ARGS)
    assert set(ckpt.IMAGE_KERNEL_ARGS) <= set(cmdline), cmdline
    paused = make_clone(paused=True)            # a paused clone is the caller's to resume and set
    assert sorted(p.name for p in paused.run_dir.glob("*.sav")) == []


def _manifest(name: str, **kw: object) -> ckpt.Manifest:
    return ckpt.Manifest(name=name, image_recipe="", image_dir="", virt="qemu", memory_mib=1, created=0.0,
                         boot_to_desktop_s=0.0, save_s=0.0, memory_apparent_bytes=0, memory_allocated_bytes=0,
                         disk_allocated_bytes=0, **kw)  # type: ignore[arg-type]


def test_a_checkpoint_others_stack_on_is_removed_only_with_its_chain(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The next common checkpoints' disks are overlays over their root's: `checkpoint rm` of the root
    is refused while they exist, and a root recreated for a new image (``ensure``) takes its stale
    chain with it."""
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))
    for name, kw in (("root", {"origin": "domain"}),
                     ("root-1", {"origin": "migration", "chain": "root", "backing": "root", "parent": "root"}),
                     ("other", {"origin": "domain"})):
        d = tmp_path / "checkpoints" / name
        d.mkdir(parents=True)
        _manifest(name, **kw).save(d / "manifest.json")

    class NoDomains:
        def exists(self, name: str) -> bool:
            return False

    hv: Any = NoDomains()
    with pytest.raises(CheckpointError, match="overlays over 'root'"):
        ckpt.remove(hv, "root")
    ckpt.remove(hv, "root", with_chain=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["other"]


def test_vm_rm_deletes_the_image_a_killed_migration_left_in_the_suspend_folder(store: Path, tmp_path: Path) -> None:
    """A target killed with SIGKILL after its save runs no cleanup: its image stays in the tmpfs
    suspend folder (and in RAM). ``vm rm`` deletes it with the clone; nothing else there goes."""
    import signal
    import subprocess
    import sys

    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    saver = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom migration.suspenddir import suspend_image\n"
         "p = suspend_image(Path(sys.argv[1]), Path(sys.argv[2]), 1 << 20)\np.write_bytes(b'saved RAM')\n"
         "print(p, flush=True)\nsys.stdin.read()\n", str(store / "clones" / "c1"), str(shm)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert saver.stdout is not None
    image = Path(saver.stdout.readline().strip())
    saver.send_signal(signal.SIGKILL)
    assert saver.wait() == -signal.SIGKILL
    assert image.read_bytes() == b"saved RAM"
    other = image.with_name("c2.sav")
    other.write_bytes(b"another clone's")
    assert main(["--connect", TEST_URI, "vm", "rm", "c1", "--suspend-dir", str(shm)]) == 0
    assert not image.exists() and not (store / "clones" / "c1").exists()
    assert other.read_bytes() == b"another clone's" and (store / "clones" / "c2").is_dir()
    # the environment's folder is the default (a process of its own: main's parser is built once)
    r = subprocess.run([sys.executable, "-m", "cli.main", "--connect", TEST_URI, "vm", "rm", "c2"], text=True,
                       capture_output=True, env={**os.environ, "REPLAY_MIGRATE_SUSPEND_DIR": str(shm)}, check=False)
    assert r.returncode == 0, r.stderr
    assert not other.exists()


def test_creation_domain_is_named_after_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two state folders on one libvirt host making checkpoint ``demo`` at once boot two domains:
    one root's create must not remove the other's booting domain (it did when both were
    ``rm-ckpt-demo``)."""
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "one"))
    one = ckpt.creation_domain("demo")
    assert one == ckpt.creation_domain("demo")
    assert one.startswith(ckpt.DOMAIN_PREFIX + "ckpt-demo-")
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path / "two"))
    assert ckpt.creation_domain("demo") != one
    for bad in BAD_NAMES:
        with pytest.raises(BadNameError):
            ckpt.creation_domain(bad)


def test_create_waits_for_another_creation_of_the_same_name(store: Path) -> None:
    """A second ``create`` of a name waits for the first (they would share the ``.partial`` folder)
    and then finds the checkpoint made: refused, nothing booted (the libvirt connection is never used)."""
    lock = store / "checkpoints" / ckpt.CREATE_LOCK.format(name="a")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            ckpt.create(cast(Hypervisor, None), "a")
            outcome.append(None)
        except BaseException as e:      # the thread's outcome, checked below
            outcome.append(e)

    t = threading.Thread(target=second)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not outcome          # waiting on the lock
    os.close(fd)
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointError)
    assert "exists already" in str(outcome[0])
