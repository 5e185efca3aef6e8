"""Failover: boot a protected VM straight from a recovery point, prove it, migrate off, fail back.

A failover runs a VM from its backup in about the time the VM takes to boot: each disk of the
point is exported read-only over NBD from the store, a qcow2 overlay takes the guest's writes,
QEMU boots the chain and boot proofs show the VM is up. The running VM can then be moved onto
local disks (no longer needing the backup), and its disks brought back as a new recovery point
or written to where they were.

The package, by responsibility (each module's docstring states its design and invariants):

- :mod:`~image.failover.session`: one live failover, :class:`FailoverSession`, and its state
  machine (``starting -> booting -> running -> stopping -> stopped``, ``migrating``, ``failed``);
- :mod:`~image.failover.process`: the QEMU process of a session (start, pid and control socket,
  ownership-checked stop), usable on its own;
- :mod:`~image.failover.proof`: polling the boot proofs, the RTO;
- :mod:`~image.failover.migrate`: moving a running VM to local disks (``blockdev-mirror``);
- :mod:`~image.failover.failback`: the disks back as a recovery point, or written out;
- :mod:`~image.failover.manager`: :class:`FailoverManager`, all sessions of one process,
  admission checks, restart reconciliation;
- :mod:`~image.failover.admission`: pure decisions (which point, does the memory fit);
- :mod:`~image.failover.network`, :mod:`~image.failover.settings`: per-asset proof and network;
- :mod:`~image.failover.boot_profile`: what the last boot read, to warm the next one;
- :mod:`~image.failover.jobs`: the job kinds and :func:`register_failover_jobs`;
- :mod:`~image.failover.errors`, :mod:`~image.failover.records`: domain errors, record helpers.

Import from ``image.failover``; the names below are its interface.
"""

from image.failover.admission import (
    MEMORY_RESERVE_MIB,
    QEMU_OVERHEAD_MIB,
    PointChoice,
    check_memory,
    choice_reason,
    choose_point,
    pick_point,
)
from image.failover.errors import (
    BootProofFailed,
    FailoverFailed,
    InsufficientMemory,
    PointNotLocal,
)
from image.failover.failback import changed_ranges_from_map, write_disk_image
from image.failover.jobs import (
    bind_failover_manager,
    boot_test_resources,
    register_failover_jobs,
    unbind_failover_manager,
)
from image.failover.manager import FailoverManager
from image.failover.network import network_from_dict, network_to_dict, resolve_forwards
from image.failover.plan_rules import check_plan_memory, parse_plan_groups
from image.failover.plans import run_plan
from image.failover.process import STOP_GRACE, QemuProcess
from image.failover.session import FailoverSession, ProgressCallback
from image.failover.settings import (
    SETTINGS_KEY,
    asset_failover_settings,
    failover_settings,
    put_asset_failover_settings,
)

__all__ = [
    "MEMORY_RESERVE_MIB",
    "QEMU_OVERHEAD_MIB",
    "SETTINGS_KEY",
    "STOP_GRACE",
    "BootProofFailed",
    "FailoverFailed",
    "FailoverManager",
    "FailoverSession",
    "InsufficientMemory",
    "PointChoice",
    "PointNotLocal",
    "ProgressCallback",
    "QemuProcess",
    "asset_failover_settings",
    "bind_failover_manager",
    "boot_test_resources",
    "changed_ranges_from_map",
    "check_memory",
    "check_plan_memory",
    "choice_reason",
    "choose_point",
    "failover_settings",
    "network_from_dict",
    "network_to_dict",
    "parse_plan_groups",
    "pick_point",
    "put_asset_failover_settings",
    "register_failover_jobs",
    "resolve_forwards",
    "run_plan",
    "unbind_failover_manager",
    "write_disk_image",
]
