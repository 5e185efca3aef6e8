"""VMs of a libvirt host, backed up over SSH on loopback and failed over on the appliance.

Real parts only: an sshd on a free 127.0.0.1 port with its own host key, virtlogd and libvirtd
started by hand (``libvirt_support``), the failover test guest defined as a TCG domain (qcow2,
no network) and booted once for the module. The appliance reaches libvirt only through
``qemu+ssh`` with its own key and pinned host key; the backup job's NBD socket is forwarded over
SSH and read by the project's NBD client.

Order matters (module state): full backup, guest writes, incremental (changed blocks only),
restore byte-identical, failover of the incremental point; then the refusals. A missing libvirtd
or sshd FAILS with the install step (never skips).
"""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, StepClock, set_engine_env
from guest_support import guest_image_path
from libvirt_support import (
    LibvirtDaemons,
    TestSshd,
    defined_guest,
    require_libvirt,
    virsh,
)

from appliance.engine import Appliance
from appliance.errors import BackupCancelled
from appliance.sources.ssh_identity import (
    HostKey,
    appliance_identity,
    pin_host_key,
    scan_host_key,
)
from image.failover import FailoverManager
from image.libvirt import (
    CannotBackUpLive,
    HostKeyRefused,
    LibvirtHost,
    backup_domain,
    list_domains,
)
from image.testguest import MARKER

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]

ASSET = "libvirt-web"
MIB = 1024 * 1024
KIB = 1024
#: Guest writes land past the guest's partitions (they end at 65 MiB): nothing reads them there.
WRITES = [(100 * MIB, 512 * KIB, 0x33), (150 * MIB + 4 * KIB, 64 * KIB, 0x44)]
CHUNK = 64 * KIB
#: Numbers measured by the tests, printed at the end of the module (docs/libvirt.md cites them).
MEASURED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_libvirt()
    image = guest_image_path()
    base = tmp_path_factory.mktemp("libvirt")
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    daemons = LibvirtDaemons(str(base))
    sshd = TestSshd(str(base / "sshd"))
    try:
        app, _ = Appliance.init(str(base / "app"), PASSPHRASE, clock=StepClock())
        sshd.authorize(appliance_identity(app.data_dir.path).public_line)
        pin_host_key(
            app.data_dir.path, "127.0.0.1", sshd.port, scan_host_key("127.0.0.1", sshd.port)
        )
        host = LibvirtHost(app.data_dir.path, "127.0.0.1", sshd.port, "root")
        with defined_guest(str(base / "guests"), image) as guest:
            started = time.monotonic()
            virsh("start", guest.name)
            guest.wait_for(MARKER, timeout=180)
            MEASURED["guest_boot_seconds"] = round(time.monotonic() - started, 1)
            yield {
                "app": app,
                "host": host,
                "guest": guest,
                "base": base,
                "sshd": sshd,
                "image": image,
            }
        app.close()
    finally:
        sshd.stop()
        daemons.stop()
        mp.undo()
        print("\nlibvirt measurements:", MEASURED)


def test_list_domains_sees_the_running_guest(lab: dict[str, Any]) -> None:
    started = time.monotonic()
    domains = {d.name: d for d in list_domains(lab["host"])}
    MEASURED["list_domains_seconds"] = round(time.monotonic() - started, 2)
    info = domains[lab["guest"].name]
    assert info.uuid == lab["guest"].uuid
    assert info.state == "running"
    assert info.live_backup and info.reason is None and info.incremental
    assert [(d.target, d.format, d.source) for d in info.disks] == [
        ("vda", "qcow2", lab["guest"].disk)
    ]
    assert not info.guest_agent
    assert info.to_dict()["live_backup"] is True


def test_full_then_incremental_reads_only_changed_blocks(lab: dict[str, Any]) -> None:
    app: Appliance = lab["app"]
    host: LibvirtHost = lab["host"]
    guest = lab["guest"]

    full = backup_domain(app, host, guest.name, ASSET, mode="full")
    stats = full.stats
    assert full.point.kind == "image" and full.point.asset == ASSET
    assert stats["source_mode"] == "live" and stats["consistency"] == "crash"
    assert [w["code"] for w in full.warnings] == ["crash_consistent"]
    assert stats["checkpoint"] and stats["incremental_since"] is None
    size = stats["logical_bytes"]
    assert size == 256 * MIB
    # The guest's partitions (65 MiB, mostly allocated) were read, not the empty rest.
    assert 1 * MIB < stats["bytes_read"] < 80 * MIB
    manifest = app.manifest(full.point.id)
    assert manifest["vm"]["disks"] == [{"name": "vda", "bus": "virtio", "format": "qcow2"}]
    assert manifest["vm"]["machine"] == "pc" and manifest["vm"]["memory_mib"] == 256
    assert manifest["source_details"]["checkpoint"] == stats["checkpoint"]
    MEASURED["full"] = {k: stats[k] for k in ("bytes_read", "wire_bytes", "seconds")}
    assert virsh("checkpoint-list", guest.name, "--name").stdout.split() == [stats["checkpoint"]]

    for offset, length, pattern in WRITES:
        guest.guest_write(offset, length, pattern)
    written = sum(length for _, length, _ in WRITES)

    # Pause the guest and flush QEMU's qcow2 caches, so the image file holds exactly the state
    # the incremental backs up (the comparison below reads the file).
    virsh("suspend", guest.name)
    try:
        guest.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"')
        inc = backup_domain(app, host, guest.name, ASSET)
        s = inc.stats
        assert inc.point.mode == "incremental" and inc.point.parent_id == full.point.id
        assert (
            s["incremental_since"] == stats["checkpoint"] and s["checkpoint"] != stats["checkpoint"]
        )
        # Changed bytes: the writes plus what the guest wrote itself meanwhile (its boot log,
        # and ext4's lazy inode-table init, a few MiB when the host is slow).
        assert written <= s["changed_bytes"] < written + 16 * MIB
        # Only changed chunks were read: the changed bytes rounded out to 64 KiB chunks.
        assert 0 < s["bytes_read"] <= s["changed_bytes"] + 2 * CHUNK * 8
        assert s["bytes_read"] < size // 10
        assert s["changed_chunks"] >= written // CHUNK
        assert not [w for w in inc.warnings if w["code"] == "full_read"]
        MEASURED["incremental"] = {
            k: s[k] for k in ("bytes_read", "changed_bytes", "wire_bytes", "seconds")
        }
        MEASURED["incremental"]["guest_writes"] = written

        # The point restores byte-identical to the disk as it was backed up.
        restored = str(lab["base"] / "restored.raw")
        app.restore(inc.point.id, restored)
        compare = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", restored, guest.disk],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        os.unlink(restored)
    finally:
        virsh("resume", guest.name)
    # The appliance keeps one checkpoint per domain: the older one merged away.
    assert virsh("checkpoint-list", guest.name, "--name").stdout.split() == [s["checkpoint"]]
    assert virsh("domjobinfo", guest.name).stdout.split()[2] == "None"
    lab["incremental"] = inc.point.id


def test_the_incremental_point_fails_over_on_the_appliance(lab: dict[str, Any]) -> None:
    app: Appliance = lab["app"]
    point = lab.get("incremental")
    assert point, "the incremental backup test must run first"
    manager = FailoverManager(app, accel="tcg")
    try:
        started = time.monotonic()
        record = manager.start(ASSET, point, proof={"serial": MARKER, "timeout": 120})
        MEASURED["failover_seconds"] = round(time.monotonic() - started, 1)
        assert MARKER in manager.serial_log(record.id)
        manager.stop(record.id)
    finally:
        manager.shutdown(grace=2)


def test_a_missing_checkpoint_falls_back_to_a_full_read(lab: dict[str, Any]) -> None:
    app: Appliance = lab["app"]
    guest = lab["guest"]
    for name in virsh("checkpoint-list", guest.name, "--name").stdout.split():
        virsh("checkpoint-delete", guest.name, name)
    out = backup_domain(app, lab["host"], guest.name, ASSET)
    assert [w["code"] for w in out.warnings if w["code"] == "full_read"] == ["full_read"]
    assert out.stats["incremental_since"] is None
    assert out.stats["bytes_read"] > 1 * MIB
    assert virsh("checkpoint-list", guest.name, "--name").stdout.split() == [
        out.stats["checkpoint"]
    ]


def test_a_cancelled_backup_ends_the_job_and_keeps_the_checkpoint_chain(
    lab: dict[str, Any],
) -> None:
    app: Appliance = lab["app"]
    guest = lab["guest"]
    before = virsh("checkpoint-list", guest.name, "--name").stdout.split()
    points = len(app.catalog.list_points(asset=ASSET))
    tunnels = set(glob.glob("/tmp/appliance-libvirt-*"))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BackupCancelled):
        backup_domain(app, lab["host"], guest.name, ASSET, mode="full", cancel=cancel)
    assert virsh("domjobinfo", guest.name).stdout.split()[2] == "None"
    assert virsh("checkpoint-list", guest.name, "--name").stdout.split() == before
    assert set(glob.glob("/tmp/appliance-libvirt-*")) <= tunnels  # the forward is gone
    assert len(app.catalog.list_points(asset=ASSET)) == points
    # The chain still works: the next incremental reads changed blocks only.
    out = backup_domain(app, lab["host"], guest.name, ASSET)
    assert out.stats["incremental_since"] == before[0]
    assert out.stats["bytes_read"] < 4 * MIB


def test_unpinned_and_changed_host_keys_are_refused(lab: dict[str, Any], tmp_path: Path) -> None:
    port = lab["sshd"].port
    data = str(tmp_path / "other")
    lab["sshd"].authorize(appliance_identity(data).public_line)
    with pytest.raises(HostKeyRefused, match="not pinned yet"):
        list_domains(LibvirtHost(data, "127.0.0.1", port))
    # Another key pinned for the address: the host's real key is refused by ssh itself.
    other = str(tmp_path / "other_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    key_type, key_b64 = Path(other + ".pub").read_text().split()[:2]
    pin_host_key(data, "127.0.0.1", port, HostKey(key_type, key_b64))
    with pytest.raises(HostKeyRefused, match="not the one pinned") as refused:
        list_domains(LibvirtHost(data, "127.0.0.1", port))
    assert HostKey(key_type, key_b64).fingerprint in str(refused.value)


def test_a_vmdk_disk_gets_the_reason_and_the_offline_copy_only_when_allowed(
    lab: dict[str, Any],
) -> None:
    app: Appliance = lab["app"]
    host: LibvirtHost = lab["host"]
    with defined_guest(str(lab["base"] / "vmdk"), lab["image"], fmt="vmdk") as guest:
        info = {d.name: d for d in list_domains(host)}[guest.name]
        assert not info.live_backup
        assert info.reason is not None and "disk vda is in vmdk format" in info.reason
        with pytest.raises(CannotBackUpLive, match="cannot be backed up live: disk vda is in vmdk"):
            backup_domain(app, host, guest.name, "vmdk-vm")
        started = time.monotonic()
        out = backup_domain(app, host, guest.name, "vmdk-vm", allow_offline=True)
        MEASURED["offline"] = {
            "bytes_read": out.stats["bytes_read"],
            "seconds": round(time.monotonic() - started, 2),
        }
        assert out.stats["source_mode"] == "offline"
        assert [w["code"] for w in out.warnings] == ["offline_copy"]
        restored = str(lab["base"] / "vmdk-restored.raw")
        app.restore(out.point.id, restored)
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "vmdk", restored, guest.disk],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        os.unlink(restored)


def test_from_the_page_the_host_is_added_its_running_vm_protected_and_backed_up(
    lab: dict[str, Any], tmp_path: Path, browser: Any
) -> None:
    """What a new user does on the Hosts screen, against the real libvirtd over SSH: add the
    libvirt host, trust its key, list its VMs, protect the running guest, "Back up now": a job
    makes a VM point of it. (Last in the module: it adds a checkpoint of its own.)"""
    from api_support import ADMIN, bootstrapped_server, wait_job
    from web_support import expect, signed_in

    guest = lab["guest"]
    port = lab["sshd"].port
    with bootstrapped_server(tmp_path, keep_env=("APPLIANCE_TEST_WEAK_KDF",)) as server:
        with server.as_role("viewer") as viewer:
            lab["sshd"].authorize(viewer.get("/api/hosts/ssh-key").json()["public_key"])
        with signed_in(browser, server, *ADMIN, path="/#/hosts") as page:
            page.get_by_role("button", name="Add a host").first.click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_label("Name").fill("kvm1")
            dialog.get_by_label("KVM/libvirt host").check()
            dialog.get_by_label("Address").fill("127.0.0.1")
            dialog.get_by_label("Port").fill(str(port))
            dialog.get_by_label("User").fill("root")
            dialog.get_by_role("button", name="Add host").click()
            trust = page.get_by_role("dialog", name="Trust kvm1's host key")
            expect(trust.locator("[data-offered-fingerprint]")).to_have_text(
                scan_host_key("127.0.0.1", port).fingerprint
            )
            trust.get_by_role("button", name="Trust this key").click()
            row = page.locator("tr[data-host=kvm1]")
            expect(row.locator("[data-state]")).to_contain_text("Trusted")

            row.get_by_role("button", name="Virtual machines on kvm1").click()
            vms = page.get_by_role("dialog", name="Virtual machines on kvm1")
            vm = vms.locator(f"[data-vm='{guest.name}']")
            expect(vm).to_contain_text("running", timeout=30_000)
            vm.get_by_role("button", name=f"Protect {guest.name}").click()
            expect(vm).to_contain_text(f"Protected as kvm1-{guest.name}")
            vms.get_by_role("button", name="Close", exact=True).last.click()

            row.get_by_role("button", name="Back up kvm1 now").click()
            job_link = row.get_by_role("link", name="its job")
            expect(job_link).to_be_visible()
            job_id = (job_link.get_attribute("href") or "").rsplit("/", 1)[-1]
            with server.as_role("operator") as operator:
                done = wait_job(operator, job_id, timeout=300)
                assert done["state"] == "succeeded", done
                point = operator.get(f"/api/points/{done['result']['point']}").json()
            assert point["asset"] == f"kvm1-{guest.name}" and point["kind"] == "image"
            expect(row.locator(f"[data-point='{point['id']}']")).to_contain_text("last point")
