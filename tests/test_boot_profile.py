"""Boot profiles and proof polling: what cut the failover's click-to-proof overhead.

- An export records the data chunks a client reads, in first-read order; a second export warmed
  with that list answers the same reads from its cache without touching the store again.
- A failover keeps what its proven boot read, and the next failover of the VM warms its exports
  with it (real QEMU under TCG, the busybox test guest).
- Checks that reach into the guest are polled only after the serial console matched.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, SMALL_PACKS, set_engine_env

from appliance.engine import Appliance
from image.boot_proof import poll_checks
from image.failover import FailoverManager
from image.nbd_client import NbdClient
from image.nbd_export import export_image_over_nbd
from image.testguest import MARKER, build_test_guest, copy_sparse

CHUNK = 64 * 1024
SIZE = 32 * CHUNK


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


class _Recorded:
    """A check whose result the test sets, counting how often it was polled."""

    def __init__(self, name: str, reaches_guest: bool) -> None:
        self.name = name
        self.reaches_guest = reaches_guest
        self.passed_at: float | None = None
        self.ready = False
        self.polls = 0

    def poll(self, now: float) -> bool:
        self.polls += 1
        if self.ready and self.passed_at is None:
            self.passed_at = now
        return self.passed_at is not None

    def failure(self) -> str:
        return f"{self.name} not ready"


def test_guest_checks_wait_for_the_serial_console() -> None:
    serial, http = _Recorded("serial", False), _Recorded("http", True)
    http.ready = True
    assert poll_checks([serial, http], 1.0) == [serial, http]
    assert http.polls == 0  # the guest is not asked while its console has not matched
    serial.ready = True
    assert poll_checks([serial, http], 2.0) == []
    assert http.polls == 1 and serial.passed_at == 2.0 and http.passed_at == 2.0


def test_a_warmed_export_answers_the_recorded_reads_from_its_cache(tmp_path: Path) -> None:
    rng = random.Random(3)
    data = bytearray(SIZE)
    for chunk in (0, 1, 4, 9, 10, 30):
        data[chunk * CHUNK : (chunk + 1) * CHUNK] = rng.randbytes(CHUNK)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(data))
    app, _ = Appliance.init(str(tmp_path / "app"), PASSPHRASE, pack_size=SMALL_PACKS)
    try:
        manifest = app.manifest(app.backup_image([str(disk)], "vm").point.id)
        reads = [(9 * CHUNK + 10, 100), (0, 2 * CHUNK), (2 * CHUNK, CHUNK), (30 * CHUNK, 512)]
        first = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "a.sock"))
        try:
            with NbdClient.connect_unix(first.socket_path, "disk") as client:
                for offset, length in reads:
                    assert client.pread(offset, length) == data[offset : offset + length]
            # Chunk 2 is all zero: never stored, so never part of a profile.
            assert first.source.read_order == [9, 0, 1, 30]
        finally:
            first.stop()

        second = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "b.sock"))
        try:
            second.warm([*first.source.read_order, 2, 999, -1])
            deadline = time.monotonic() + 10
            while second.stats.chunks_warmed < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert second.stats.chunks_warmed == 4
            assert second.stats.chunks_from_store == 4
            with NbdClient.connect_unix(second.socket_path, "disk") as client:
                for offset, length in reads:
                    assert client.pread(offset, length) == data[offset : offset + length]
            stats = second.stats
            assert stats.chunks_from_store == 4  # every read was answered from the warm cache
            assert stats.cache_hits >= 4 and second.errors == []
        finally:
            second.stop()
    finally:
        app.close()


@pytest.mark.qemu
@pytest.mark.slow
def test_the_next_failover_warms_with_what_the_last_boot_read(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("QEMU missing: run scripts/setup (apt-get install -y qemu-system-x86)")
    disk = str(tmp_path / "web.raw")
    copy_sparse(build_test_guest(), disk)
    vm = {"name": "web", "memory_mib": 256, "disks": [{"name": "web", "bus": "virtio"}]}
    proof = {"serial": MARKER, "http_port": 80, "http_expect": "OK", "timeout": 120}
    app, _ = Appliance.init(str(tmp_path / "app"), PASSPHRASE)
    manager = FailoverManager(app, accel="tcg")
    try:
        app.backup_image([disk], "web", vm_spec=vm)
        assert manager.boot_profile("web") == {}
        first = manager.start("web", proof=proof)
        manager.stop(first.id, grace=0)
        assert first.details["export_stats"]["chunks_warmed"] == 0
        profile = manager.boot_profile("web")["web"]
        # The guest read its boot chunks (MBR and boot partition first), each recorded once.
        assert profile[0] == 0 and len(profile) == len(set(profile)) > 50

        second = manager.start("web", proof=proof)
        manager.stop(second.id, grace=0)
        stats = second.details["export_stats"]
        # QEMU and the firmware take a while before the first disk read: the warm-up is ahead,
        # so few of the guest's reads have to fetch a chunk themselves.
        assert stats["chunks_warmed"] > len(profile) // 2
        fetched_by_reads = stats["chunks_from_store"] - stats["chunks_warmed"]
        assert fetched_by_reads < first.details["export_stats"]["chunks_from_store"] // 2
    finally:
        manager.shutdown(grace=0)
        app.close()
