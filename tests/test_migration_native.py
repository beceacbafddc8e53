"""migration/native.py: the report of a native migration (the replay strategy's fields), the
sentence saying which strategy suits the link, and one real live migration of a clone from site A
to site B (two libvirt hosts, ``bench/sites.py``) through ``replay-migrate migrate --strategy native``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.sites import SiteB
from cli.fileargs import TEST_URI
from cli.main import main
from migration.native import FAT_LINK_BYTES_S, THIN_LINK_BYTES_S, advice, native_report
from migration.sides import Report
from replay_migrate.errors import UsageError
from store import checkpoint as ckpt
from vm.machine import Hypervisor, MachineState
from vm.native import NativeParams, NativeStats, Variant

STATS = NativeStats(total_s=2.6, downtime_s=0.159, memory_bytes=330 << 20, disk_bytes=8 << 20,
                    data_bytes=338 << 20, memory_total_bytes=1 << 30, iterations=3, dirty_rate_pages_s=10,
                    page_bytes=4096, postcopy_requests=0, compression_bytes=0)


def test_a_native_report_has_every_field_of_the_replay_report_and_says_what_it_cannot_know() -> None:
    r = native_report(STATS, NativeParams(variant=Variant.COMPRESSED, compression="zstd"), "zstd")
    assert set(Report().as_dict()) <= set(r)
    assert (r["strategy"], r["wire_bytes"], r["downtime_s"], r["total_s"]) == ("native", 338 << 20, 0.159, 2.6)
    assert r["baseline_bytes"] is None and r["savings"] is None and r["verified"] is None   # unknown, never 0
    assert r["events_replayed"] == 0 and r["log_bytes"] == 0                              # nothing replayed
    assert r["native"]["variant"] == "precopy-compressed" and r["native"]["compression"] == "zstd"
    assert "native suits this link" in r["advice"]                 # 130 MiB/s: a fat link
    json.dumps(r)


def test_the_advice_follows_the_link() -> None:
    n = 338 << 20
    assert "native suits" in advice("native", n, link_bytes_s=FAT_LINK_BYTES_S)
    slow = advice("native", n, link_bytes_s=THIN_LINK_BYTES_S)
    assert slow.startswith("replay would likely suit") and "284 s" in slow
    r = advice("replay", 500_000, native_bytes=100 << 20)
    assert r.startswith("replay suits thin links") and "84 s at 10 Mbit/s" in r
    assert "`--strategy native` takes ~8 s" in r
    assert "replay suits both" in advice("replay", 500_000, native_bytes=315 << 20)
    assert advice("replay", 500_000).startswith("replay suits thin links")


@pytest.mark.parametrize(("argv", "message"), [
    (["migrate", "rm-x", "--checkpoint", "c", "--strategy", "native"], "needs --target-connect"),
    (["migrate", "rm-x", "--checkpoint", "c", "--strategy", "native", "--target-connect", TEST_URI],
     "needs another host's libvirt"),
    (["migrate", "rm-x", "--checkpoint", "c", "--native-variant", "postcopy"], "apply to --strategy native only"),
    (["migrate", "rm-x", "--checkpoint", "c", "--migrate-uri", "tcp://h"], "apply to --strategy native only"),
    (["migrate", "rm-x", "--checkpoint", "c", "--strategy", "native", "--target-connect", "qemu+tcp://h/system",
      "--migrate-uri", "tcp://h; rm -rf /"], "tcp://HOST[:PORT]"),
    (["suspend", "rm-x", "--strategy", "native"], "needs --target-connect"),
    (["suspend", "rm-x", "--target-connect", "qemu+tcp://h/system"], "apply to --strategy native only"),
])
def test_the_strategy_options_are_checked_before_anything_starts(argv: list[str], message: str,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("REPLAY_MIGRATE_STATE", str(tmp_path))      # no checkpoint: the options come first
    assert main(["--connect", TEST_URI, *argv]) == UsageError.exit_code
    assert message in capsys.readouterr().err


@pytest.mark.vm
def test_a_clone_moves_from_site_a_to_site_b_by_libvirts_live_migration(
        hv: Hypervisor, checkpoint: ckpt.Checkpoint, site_b: SiteB, capsys: pytest.CaptureFixture[str]) -> None:
    site_b.copy_checkpoint(checkpoint.name)                  # the target holds the checkpoint (its overlay's base)
    source = ckpt.start_clone(hv, checkpoint, f"rm-test-{os.getpid()}-native", replace=True)
    target = f"{source.name}-b"
    with Hypervisor(site_b.uri) as hb:
        try:
            code = main(["migrate", source.name, "--checkpoint", checkpoint.name, "--strategy", "native",
                         "--target-connect", site_b.uri, "--target-name", target, "--duration", "1", "--json"])
            out = capsys.readouterr()
            assert code == 0, out.err
            report = json.loads(out.out)
            # the VM runs under site B's daemon, from site B's folder; nothing of it is left at site A
            assert hb.lookup(target).state is MachineState.RUNNING
            assert hb.lookup(target).wait_agent(timeout=60) >= 0
            assert not hv.exists(source.name) and not hv.exists(target)
            assert not ckpt.clone_dir(source.name).exists()
            there = site_b.cfg.folder("state") / "clones" / target
            assert (there / "disk.qcow2").is_file() and (there / "checkpoint").read_text() == f"{checkpoint.name}\n"
            assert report["strategy"] == "native" and report["native"]["variant"] == "precopy"
            assert report["wire_bytes"] >= report["native"]["memory_bytes"] > 100 << 20   # the guest's used RAM
            assert 0 < report["downtime_s"] < report["total_s"]
            print(f"\nnative: {report['wire_bytes']} B in {report['total_s']} s, downtime {report['downtime_s']} s")
        finally:
            if hb.exists(target):
                hb.lookup(target).remove()
            ckpt.remove_clone(hv, source.name)
