"""The domains of a libvirt host, read in as few SSH connections as possible.

One virsh session lists the UUIDs and the host's backup capability; a second reads every
domain's state, live XML and checkpoints (commands joined by ``;``, outputs cut apart at a
marker ``echo`` prints). The decisions are :mod:`image.libvirt.domains`' pure functions.
"""

from __future__ import annotations

import re

from appliance.errors import NotFound, SourceError
from image.libvirt.domains import (
    DomainInfo,
    backup_api_offered,
    domain_identity,
    has_guest_agent,
    live_backup_reason,
    parse_disks,
    parse_libvirt_version,
)
from image.libvirt.host import LibvirtHost

_MARK = "@@appliance-domain-end@@"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def backup_api(host: LibvirtHost) -> bool:
    """Whether the host's libvirt offers the backup API."""
    out = host.virsh(["version"], ["echo", _MARK], ["domcapabilities"])
    version_text, _, caps = out.partition(_MARK)
    return backup_api_offered(caps.strip(), parse_libvirt_version(version_text))


def _uuids(host: LibvirtHost) -> list[str]:
    return [u for u in host.virsh(["list", "--all", "--uuid"]).split() if _UUID.match(u)]


def _read(host: LibvirtHost, uuids: list[str], api: bool) -> list[DomainInfo]:
    if not uuids:
        return []
    commands: list[list[str]] = []
    for uuid in uuids:
        commands += [
            ["domstate", uuid],
            ["echo", _MARK],
            ["checkpoint-list", uuid, "--name"],
            ["echo", _MARK],
            ["dumpxml", uuid],
            ["echo", _MARK],
        ]
    parts = host.virsh(*commands).split(_MARK)
    domains = []
    for i in range(len(uuids)):
        state, checkpoints, xml_text = (p.strip() for p in parts[3 * i : 3 * i + 3])
        name, uuid = domain_identity(xml_text)
        disks = parse_disks(xml_text)
        domains.append(
            DomainInfo(
                name=name,
                uuid=uuid,
                state=state,
                disks=disks,
                guest_agent=has_guest_agent(xml_text),
                checkpoints=tuple(checkpoints.split()),
                reason=live_backup_reason(state, disks, api),
            )
        )
    return domains


def list_domains(host: LibvirtHost) -> list[DomainInfo]:
    """Every domain of the host (running or not) with its disks and, when it cannot be backed up
    live, the reason; sorted by name."""
    api = backup_api(host)
    return sorted(_read(host, _uuids(host), api), key=lambda d: d.name)


def find_domain(host: LibvirtHost, domain: str) -> DomainInfo:
    """One domain by name or UUID (NotFound names the host)."""
    api = backup_api(host)
    for info in _read(host, _uuids(host), api):
        if domain in (info.name, info.uuid):
            return info
    raise NotFound(f"no domain {domain!r} on {host.label}", host=host.host)


def domain_xml(host: LibvirtHost, uuid: str, *, inactive: bool = False) -> str:
    if not _UUID.match(uuid):
        raise SourceError(f"{uuid!r} is not a domain UUID")
    return host.virsh(["dumpxml", uuid, *(["--inactive"] if inactive else [])])
