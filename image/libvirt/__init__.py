"""VMs of a KVM/libvirt host, backed up into the appliance's store as ordinary VM points.

The host is reached over SSH with the appliance's own identity and pinned host keys
(:mod:`image.libvirt.host`); its domains are listed with the reason any of them cannot be backed
up live (:mod:`image.libvirt.inventory`, decisions in :mod:`image.libvirt.domains`); a domain is
backed up through libvirt's pull-mode backup API, its NBD export tunnelled over SSH and read by
the project's NBD client, with checkpoints for changed-block incrementals
(:mod:`image.libvirt.backup`), or, only when allowed, by the offline copy
(:mod:`image.libvirt.offline`). All virsh and ssh subprocess calls of the package live here.
See docs/libvirt.md.
"""

from image.libvirt.backup import CannotBackUpLive, backup_domain
from image.libvirt.domains import DiskInfo, DomainInfo
from image.libvirt.host import HostKeyRefused, LibvirtHost
from image.libvirt.inventory import list_domains

__all__ = [
    "CannotBackUpLive",
    "DiskInfo",
    "DomainInfo",
    "HostKeyRefused",
    "LibvirtHost",
    "backup_domain",
    "list_domains",
]
