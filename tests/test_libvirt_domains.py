"""The pure side of the libvirt source: domain XML parsing, the live-backup decision, the XML
the appliance hands to libvirt, virsh output parsers and the error texts (no daemon needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from appliance.errors import SourceError
from image.libvirt.domains import (
    DiskInfo,
    backup_api_offered,
    backup_xml,
    checkpoint_xml,
    has_guest_agent,
    live_backup_reason,
    parse_backup_job,
    parse_disks,
    parse_libvirt_version,
    vm_definition,
)
from image.libvirt.host import HostKeyRefused, explain_failure, libvirt_uri
from image.libvirt.offline import qemu_nbd_line

DOMAIN = """<domain type='kvm'>
  <name>db</name><uuid>0f8fad5b-d9cb-469f-a165-70867728950e</uuid>
  <memory unit='KiB'>2097152</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/db.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/db-data'/><target dev='sdb' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/><target dev='sdc' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:12:34:56'/><source bridge='br0'/>
      <model type='virtio'/></interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


def test_disks_agent_and_vm_definition_of_a_domain() -> None:
    disks = parse_disks(DOMAIN)
    assert [(d.target, d.type, d.format, d.source, d.bus) for d in disks] == [
        ("vda", "file", "qcow2", "/var/lib/libvirt/images/db.qcow2", "virtio"),
        ("sdb", "block", "raw", "/dev/vg/db-data", "scsi"),
    ]
    assert has_guest_agent(DOMAIN)
    spec = vm_definition(DOMAIN)
    assert spec["vcpus"] == 2 and spec["memory_mib"] == 2048 and spec["machine"] == "q35"
    assert [d["name"] for d in spec["disks"]] == ["vda", "sdb"]
    assert spec["nics"] == [{"model": "virtio", "mac": "52:54:00:12:34:56", "network": "br0"}]


def test_the_live_backup_decision_names_the_reason() -> None:
    qcow2 = DiskInfo("vda", "file", "qcow2", "/a.qcow2", "virtio")
    assert live_backup_reason("running", (qcow2,), True) is None
    assert live_backup_reason("paused", (qcow2,), True) is None
    vmdk = DiskInfo("vdb", "file", "vmdk", "/b.vmdk", "virtio")
    assert "disk vdb is in vmdk format" in str(live_backup_reason("running", (qcow2, vmdk), True))
    rbd = DiskInfo("vdc", "network", "raw", "pool/img", "virtio")
    assert "vdc is a network disk" in str(live_backup_reason("running", (rbd,), True))
    assert "no backup API" in str(live_backup_reason("running", (qcow2,), False))
    assert "shut off, not running" in str(live_backup_reason("shut off", (qcow2,), True))


def test_backup_api_from_capabilities_or_version() -> None:
    caps = "<domainCapabilities><features><backup supported='yes'/></features></domainCapabilities>"
    assert backup_api_offered(caps, None)
    assert not backup_api_offered(caps.replace("yes", "no"), (9, 0, 0))
    assert backup_api_offered("<domainCapabilities/>", (9, 0, 0))
    assert not backup_api_offered("", (6, 0, 0))
    text = "Compiled against library: libvirt 9.0.0\nRunning against daemon: 8.0.1\n"
    assert parse_libvirt_version(text) == (8, 0, 1)


def test_backup_and_checkpoint_documents() -> None:
    doc = ET.fromstring(backup_xml("/run/s.sock", {"vda": "/tmp/x.qcow2"}, "appliance-1"))
    assert doc.get("mode") == "pull" and doc.findtext("incremental") == "appliance-1"
    assert doc.find("server").attrib == {"transport": "unix", "socket": "/run/s.sock"}  # type: ignore[union-attr]
    disk = doc.find("disks/disk")
    assert disk is not None and disk.get("name") == "vda"
    assert doc.find("disks/disk/scratch").get("file") == "/tmp/x.qcow2"  # type: ignore[union-attr]
    assert ET.fromstring(backup_xml("/s", {"vda": "/x"}, None)).find("incremental") is None
    cp = ET.fromstring(checkpoint_xml("appliance-2", ["vda", "sdb"]))
    assert cp.findtext("name") == "appliance-2"
    assert [d.get("name") for d in cp.findall("disks/disk")] == ["vda", "sdb"]
    job = parse_backup_job(
        "<domainbackup mode='pull'><disks><disk name='vda' backup='yes' exportname='vda' "
        "exportbitmap='backup-vda'/><disk name='sdc' backup='no'/></disks></domainbackup>"
    )
    assert [(e.target, e.export, e.bitmap) for e in job] == [("vda", "vda", "backup-vda")]


def test_connection_strings_and_error_texts() -> None:
    uri = libvirt_uri("kvm1.lan", 2222, "backup", "/data/secrets/ssh/libvirt-ssh")
    assert uri == (
        "qemu+ssh://backup@kvm1.lan:2222/system?command=/data/secrets/ssh/libvirt-ssh&no_tty=1"
    )
    assert "no_verify" not in uri
    changed = explain_failure("h", 22, "Host key verification failed.", "ssh-ed25519 K", "SHA256:x")
    assert isinstance(changed, HostKeyRefused) and "SHA256:x" in changed.message
    denied = explain_failure("h", 22, "Permission denied (publickey).", "ssh-ed25519 K a", "f")
    assert "authorized_keys" in denied.message and "ssh-ed25519 K a" in denied.message
    line = qemu_nbd_line("/var/lib/x y.vmdk", "vmdk", "/run/s.sock")
    assert "'/var/lib/x y.vmdk'" in line and line.startswith("qemu-nbd --read-only")
    assert "cat >/dev/null; kill $pid" in line


def test_a_disk_with_a_strange_target_is_refused() -> None:
    bad = DOMAIN.replace("dev='vda'", "dev='vda;rm'")
    with pytest.raises(SourceError, match="unusable target"):
        parse_disks(bad)
