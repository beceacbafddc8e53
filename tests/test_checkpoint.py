"""Checkpoints: manifest, listing, clones and the refusal to delete a checkpoint in use."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from replay_migrate.errors import CheckpointError
from server import checkpoint as ckpt
from server.images import recipe_hash
from vm.machine import Hypervisor, Machine

pytestmark = pytest.mark.vm


def test_manifest_describes_the_checkpoint(checkpoint: ckpt.Checkpoint) -> None:
    m = checkpoint.manifest
    assert m.name == checkpoint.name == "test-desktop"
    assert m.image_recipe == recipe_hash() == checkpoint.image.recipe_hash
    assert m.memory_apparent_bytes == checkpoint.memory.stat().st_size
    assert 0 < m.memory_allocated_bytes < m.memory_apparent_bytes      # sparse
    assert m.boot_to_desktop_s > 0 and m.virt in ("qemu", "kvm")
    assert checkpoint.name in [c.name for c in ckpt.list_all()]
    assert (checkpoint.dir / "screen.png").read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_in_use_cannot_be_removed(make_clone: Callable[..., Machine], hv: Hypervisor,
                                               checkpoint: ckpt.Checkpoint) -> None:
    clone = make_clone()
    assert clone.name in ckpt.clones_of(checkpoint.name)
    assert (clone.run_dir / "disk.qcow2").is_file()
    with pytest.raises(CheckpointError, match="is used by"):
        ckpt.remove(hv, checkpoint.name)
    assert checkpoint.memory.is_file()


def test_clone_names_are_checked(hv: Hypervisor, checkpoint: ckpt.Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="bad name"):
        ckpt.start_clone(hv, checkpoint, "../escape")
