"""What must be true before a failover runs anything: pure decisions, tested directly.

- Which point: the one asked for, else the asset's newest *verified* image point, else its
  newest image point (:func:`pick_point`).
- Memory: the VM's RAM plus QEMU's own overhead must fit in ``MemAvailable`` minus a reserve for
  the appliance minus what running failovers were promised and have not yet touched
  (:func:`check_memory`); otherwise the failover is refused with the numbers, before QEMU runs.
"""

from __future__ import annotations

from appliance.catalog.records import PointRecord

#: Memory kept free for the appliance itself, by default.
MEMORY_RESERVE_MIB = 512
#: What QEMU needs beyond the guest's RAM (device models, TCG translation cache, buffers).
QEMU_OVERHEAD_MIB = 160


def check_memory(
    requested_mib: int, available_mib: int, reserve_mib: int, committed_mib: int
) -> str | None:
    """None when a VM of ``requested_mib`` fits, else the reason (for an InsufficientMemory)."""
    need = requested_mib + QEMU_OVERHEAD_MIB
    free = available_mib - reserve_mib - committed_mib
    if need <= free:
        return None
    return (
        f"the VM needs {requested_mib} MiB (+{QEMU_OVERHEAD_MIB} MiB for QEMU) but only "
        f"{max(free, 0)} MiB can be given: {available_mib} MiB available, {reserve_mib} MiB "
        f"reserved for the appliance, {committed_mib} MiB promised to running failovers"
    )


def pick_point(points: list[PointRecord]) -> PointRecord | None:
    """The newest verified image point, else the newest image point."""
    images = sorted((p for p in points if p.kind == "image"), key=lambda p: p.created_at)
    verified = [p for p in images if p.verify_status == "ok"]
    if verified:
        return verified[-1]
    return images[-1] if images else None
