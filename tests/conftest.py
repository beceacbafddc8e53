"""Shared fixtures. VM tests (``@pytest.mark.vm``) share one checkpoint per image recipe: it is
made once per machine (boot ~35-90 s under TCG) and reused by later runs, like the image itself.
If libvirt or QEMU is missing, VM tests fail with a message saying so; they are never skipped.

Everything that needs libvirt's daemon is marked ``vm``, and that is checked: a test that asks for
a fixture below without the mark is a collection error, and one that opens a libvirt connection
other than the in-process test driver (``test:///default``) without it fails, so ``-m "not vm"``
runs on a host with no daemon at all."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from bench.sites import SiteB
from cli.cleanup import cleanup
from replay_migrate.errors import HostError, ReplayMigrateError
from store import checkpoint as ckpt
from vm.machine import Hypervisor, Machine

TEST_CHECKPOINT = "test-desktop"
CLONE_PREFIX = "rm-test-"


def _require_host() -> None:
    missing = [t for t in ("virsh", "qemu-system-x86_64", "qemu-img", "qemu-io", "mmdebstrap")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"VM tests need {', '.join(missing)}: run `make test` (scripts/setup-host.sh "
                    "installs libvirt, QEMU and the image tools)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (libvirt's system daemon)", pytrace=False)


@pytest.fixture(scope="session")
def hv() -> Iterator[Hypervisor]:
    _require_host()
    try:
        h = Hypervisor(connect_timeout=10)
    except HostError as e:
        pytest.fail(f"VM tests need libvirtd: {e}", pytrace=False)
    cleanup(h, CLONE_PREFIX)          # leftovers of an interrupted run
    remove_test_checkpoints()
    yield h
    cleanup(h, CLONE_PREFIX)
    remove_test_checkpoints()
    h.close()


def remove_test_checkpoints() -> list[str]:
    """The checkpoints VM tests made besides the shared one: every migration registers the next
    common checkpoint (store.chain; ~300 MiB of memory image each) in the test checkpoint's chain,
    and tests checkpoint domains of their own (named CLONE_PREFIX...). Called with no clone left."""
    removed = []
    for ck in ckpt.list_all():
        try:
            m = ck.manifest
        except ReplayMigrateError:
            continue
        if ck.name.startswith(CLONE_PREFIX) or (m.origin == ckpt.ORIGIN_MIGRATION
                                                and (m.chain == TEST_CHECKPOINT or m.chain.startswith(CLONE_PREFIX))):
            shutil.rmtree(ck.dir)
            removed.append(ck.name)
    return removed


@pytest.fixture(scope="session")
def checkpoint(hv: Hypervisor) -> ckpt.Checkpoint:
    """The shared test checkpoint for the current image recipe (created if needed).

    ``REPLAY_MIGRATE_TEST_STALE_OK=1`` reuses an existing test checkpoint even if the recipe
    changed since (a developer's shortcut while editing host-side code; CI never sets it)."""
    if os.environ.get("REPLAY_MIGRATE_TEST_STALE_OK") == "1":
        try:
            return ckpt.get(TEST_CHECKPOINT)
        except ReplayMigrateError:
            pass
    ck, _created = ckpt.ensure(hv, TEST_CHECKPOINT)
    return ck


_counter = itertools.count()


@pytest.fixture
def make_clone(hv: Hypervisor, checkpoint: ckpt.Checkpoint) -> Iterator[Callable[..., Machine]]:
    """``make_clone(paused=False)`` → a running clone of the test checkpoint, removed afterwards."""
    made: list[str] = []

    def make(paused: bool = False) -> Machine:
        name = f"{CLONE_PREFIX}{os.getpid()}-{next(_counter)}"
        made.append(name)
        return ckpt.start_clone(hv, checkpoint, name, paused=paused, replace=True)

    yield make
    for name in made:
        ckpt.remove_clone(hv, name)


@pytest.fixture(scope="module")
def site_b(hv: Hypervisor, checkpoint: ckpt.Checkpoint) -> Iterator[SiteB]:
    """A second libvirt host on this machine (``bench/sites.py``: its own network and mount
    namespaces, libvirtd and folders) holding the test checkpoint's guest image, for the tests of
    one module; stopped at the module's end, its folders deleted, whatever happened."""
    site = SiteB()
    try:
        site.start()
    except HostError as e:
        site.stop(wipe=True)
        pytest.fail(f"the second libvirt host did not start: {e}", pytrace=False)
    try:
        site.link_image(checkpoint.image)
        yield site
    finally:
        site.stop(wipe=True)


DAEMON_FIXTURES = frozenset({"hv", "checkpoint", "make_clone"})
"""The fixtures that reach libvirt's daemon (and build the image and checkpoint)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items if item.get_closest_marker("vm") is None
                and DAEMON_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("tests that use libvirt's daemon must be marked @pytest.mark.vm:\n  "
                                + "\n  ".join(unmarked))


def _guarded(real: Callable[..., Any], nodeid: str) -> Callable[..., Any]:
    def connect(uri: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if not (uri or "").startswith("test:"):
            pytest.fail(f"{nodeid} connects to libvirt at {uri or 'its default URI'}: mark it "
                        "@pytest.mark.vm (or use the in-process test driver, test:///default)", pytrace=False)
        return real(uri, *args, **kwargs)

    return connect


@pytest.fixture(autouse=True)
def _no_daemon_unless_marked_vm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a test not marked ``vm``, a libvirt connection to anything but the test driver fails it."""
    if request.node.get_closest_marker("vm") is None:
        for name in ("open", "openReadOnly", "openAuth"):
            monkeypatch.setattr(libvirt, name, _guarded(getattr(libvirt, name), request.node.nodeid))
