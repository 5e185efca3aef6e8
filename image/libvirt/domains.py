"""What the appliance learns about a libvirt host's domains, and the XML it hands back to libvirt.

Pure functions only (no virsh, no ssh): parsers of the domain XML libvirt prints, the decision
whether a domain can be backed up live (and, if not, the reason a person can act on), and the
builders of the ``<domainbackup>`` and ``<domaincheckpoint>`` documents of a pull-mode backup.
The adapter that runs virsh is :mod:`image.libvirt.host`; tests feed these functions canned XML.

Live backup rules (libvirt's pull-mode backup API, ``virDomainBackupBegin``):

- the domain must be running or paused (a shut-off domain has no QEMU to export a
  point-in-time view);
- every disk to back up must be a ``file`` or ``block`` disk in ``qcow2`` or ``raw`` format:
  those are the formats whose point-in-time view QEMU exports; any other (vmdk, vdi, network
  disks) gets a reason, and the offline path (shut down, copy, start) only when allowed;
- checkpoints (the dirty bitmaps incrementals read) exist only for qcow2 disks (persistent
  bitmaps are a qcow2 feature); a domain with a raw disk is backed up live, but every backup of
  it reads all allocated blocks;
- the host's libvirt must offer the backup API (``<backup supported='yes'/>`` in its domain
  capabilities, or libvirt 7.2 or later, where it became usable with QEMU by default).

CD-ROMs, floppies, read-only and transient disks hold nothing the guest wrote: they are left out.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from appliance.errors import InvalidInput, SourceError
from appliance.vmspec import parse_libvirt_xml

#: Disk formats whose point-in-time view libvirt's backup API exports.
LIVE_FORMATS = ("qcow2", "raw")
#: Disk source kinds the backup API handles.
LIVE_DISK_TYPES = ("file", "block")
#: Prefix of the checkpoints the appliance creates (it deletes only its own).
CHECKPOINT_PREFIX = "appliance-"
#: The guest agent's virtio-serial channel name.
AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: The first libvirt version whose backup API QEMU domains can use without extra settings.
BACKUP_API_VERSION = (7, 2, 0)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TARGET = re.compile(r"^[a-z][a-z0-9]{1,15}$")


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a domain as libvirt describes it."""

    target: str
    #: libvirt's disk type: file, block, network, volume, ...
    type: str
    #: the driver's format: qcow2, raw, vmdk, ...
    format: str
    #: path of the file or device (empty for network disks)
    source: str
    bus: str

    @property
    def live_reason(self) -> str | None:
        """Why this disk cannot be backed up live, or None."""
        if self.type not in LIVE_DISK_TYPES:
            return (
                f"disk {self.target} is a {self.type} disk; libvirt's backup API reads only "
                "file and block disks"
            )
        if self.format not in LIVE_FORMATS:
            return (
                f"disk {self.target} is in {self.format} format; libvirt's backup API exports "
                "only qcow2 and raw disks (convert it, or allow the offline copy)"
            )
        return None


@dataclass(frozen=True)
class DomainInfo:
    """A domain of a libvirt host, as the page lists it."""

    name: str
    uuid: str
    #: virsh's words: running, paused, shut off, ...
    state: str
    disks: tuple[DiskInfo, ...]
    #: the domain has a guest-agent channel (whether the agent answers is learnt at backup time)
    guest_agent: bool
    #: names of the checkpoints it has (the appliance's and any other's)
    checkpoints: tuple[str, ...] = ()
    #: why it cannot be backed up live, or None when it can
    reason: str | None = None
    vm: dict[str, Any] = field(default_factory=dict)

    @property
    def live_backup(self) -> bool:
        return self.reason is None

    @property
    def incremental(self) -> bool:
        """Checkpoints (changed blocks) work only when every disk is qcow2."""
        return bool(self.disks) and all(d.format == "qcow2" for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "state": self.state,
            "disks": [vars(d) for d in self.disks],
            "guest_agent": self.guest_agent,
            "checkpoints": list(self.checkpoints),
            "live_backup": self.live_backup,
            "incremental": self.incremental,
            "reason": self.reason,
        }


def _root(xml_text: str) -> ET.Element:
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise SourceError(f"libvirt printed domain XML that does not parse: {exc}") from exc
    if root.tag != "domain":
        raise SourceError(f"libvirt printed a <{root.tag}> where a <domain> was expected")
    return root


def parse_disks(xml_text: str) -> tuple[DiskInfo, ...]:
    """The disks of a domain XML that hold guest data (see the module docstring)."""
    disks = []
    for disk in _root(xml_text).findall("devices/disk"):
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue
        if disk.find("readonly") is not None or disk.find("transient") is not None:
            continue
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        dev = target.get("dev", "") if target is not None else ""
        if not _TARGET.match(dev):
            raise SourceError(f"a disk of the domain has an unusable target name {dev!r}")
        path = ""
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name") or ""
        if disk.get("type", "file") in LIVE_DISK_TYPES and not path:
            continue  # an empty drive
        disks.append(
            DiskInfo(
                target=dev,
                type=disk.get("type", "file"),
                format=(driver.get("type") if driver is not None else None) or "raw",
                source=path,
                bus=(target.get("bus") if target is not None else None) or "virtio",
            )
        )
    return tuple(disks)


def has_guest_agent(xml_text: str) -> bool:
    return any(
        target.get("name") == AGENT_CHANNEL
        for target in _root(xml_text).findall("devices/channel/target")
    )


def domain_identity(xml_text: str) -> tuple[str, str]:
    """(name, uuid) of a domain XML."""
    root = _root(xml_text)
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not _UUID.match(uuid):
        raise SourceError("libvirt printed a domain without a name or UUID")
    return name, uuid


def live_backup_reason(state: str, disks: tuple[DiskInfo, ...], backup_api: bool) -> str | None:
    """Why a domain cannot be backed up live, or None (the module docstring has the rules)."""
    if not backup_api:
        return (
            "the host's libvirt has no backup API (libvirt 7.2 or later with QEMU is needed); "
            "upgrade it, or allow the offline copy"
        )
    if not disks:
        return "the domain has no disk to back up"
    for disk in disks:
        reason = disk.live_reason
        if reason is not None:
            return reason
    if state not in ("running", "paused"):
        return f"the domain is {state}, not running; only the offline copy can read it"
    return None


def backup_api_offered(capabilities_xml: str, version: tuple[int, int, int] | None) -> bool:
    """Whether ``virsh domcapabilities`` (or, failing that, the version) offers the backup API."""
    try:
        root = ET.fromstring(capabilities_xml)
    except ET.ParseError:
        root = None
    if root is not None:
        backup = root.find("features/backup")
        if backup is not None:
            return backup.get("supported") == "yes"
    return version is not None and version >= BACKUP_API_VERSION


def parse_libvirt_version(text: str) -> tuple[int, int, int] | None:
    """The daemon's version from ``virsh version`` output ("Running against daemon: 9.0.0")."""
    match = re.search(r"daemon:\s*(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        match = re.search(r"library:\s*libvirt\s+(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def vm_definition(inactive_xml: str) -> dict[str, Any]:
    """The appliance's VM definition (``appliance.vmspec``) of a domain's persistent XML.

    libvirt expands ``machine='pc'`` to a versioned type such as ``pc-i440fx-7.2``; the VM
    definition keeps the family QEMU knows everywhere (``pc`` or ``q35``), so a failover on the
    appliance's own QEMU version boots it.
    """
    try:
        spec = parse_libvirt_xml(inactive_xml)
    except InvalidInput as exc:
        raise SourceError(f"the domain's XML cannot be turned into a VM definition: {exc}") from exc
    type_el = _root(inactive_xml).find("os/type")
    machine = type_el.get("machine", "") if type_el is not None else ""
    spec["machine"] = "q35" if "q35" in machine else "pc"
    # Disks are named by their target (vda, sdb), as their images are in the point.
    wanted = {d.target for d in parse_disks(inactive_xml)}
    spec["disks"] = [d for d in spec["disks"] if d["name"] in wanted]
    return spec


def checkpoint_xml(name: str, targets: list[str]) -> str:
    """A ``<domaincheckpoint>`` with a bitmap on each of ``targets``."""
    disks = "".join(f"<disk name={quoteattr(t)} checkpoint='bitmap'/>" for t in targets)
    return f"<domaincheckpoint><name>{escape(name)}</name><disks>{disks}</disks></domaincheckpoint>"


def backup_xml(socket_path: str, scratch: dict[str, str], incremental: str | None) -> str:
    """A pull-mode ``<domainbackup>``: an NBD server on ``socket_path`` exporting the disks of
    ``scratch`` (target -> scratch file on the host, which libvirt creates, fills with the
    blocks the guest overwrites during the job, and deletes when the job ends); with
    ``incremental`` (a checkpoint name) each export also carries the dirty bitmap of the blocks
    written since that checkpoint."""
    since = f"<incremental>{escape(incremental)}</incremental>" if incremental else ""
    disks = "".join(
        f"<disk name={quoteattr(t)} backup='yes' type='file'><scratch file={quoteattr(f)}/></disk>"
        for t, f in scratch.items()
    )
    return (
        f"<domainbackup mode='pull'>{since}"
        f"<server transport='unix' socket={quoteattr(socket_path)}/>"
        f"<disks>{disks}</disks></domainbackup>"
    )


@dataclass(frozen=True)
class BackupExport:
    """One disk of a running pull-mode backup job: its NBD export and dirty-bitmap context."""

    target: str
    export: str
    bitmap: str | None


def parse_backup_job(xml_text: str) -> list[BackupExport]:
    """The exports of ``virsh backup-dumpxml`` (export names and bitmaps libvirt chose)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise SourceError(f"libvirt printed backup XML that does not parse: {exc}") from exc
    exports = []
    for disk in root.findall("disks/disk"):
        if disk.get("backup", "yes") != "yes":
            continue
        target = disk.get("name", "")
        bitmap = disk.get("exportbitmap")
        exports.append(BackupExport(target, disk.get("exportname") or target, bitmap))
    return exports
