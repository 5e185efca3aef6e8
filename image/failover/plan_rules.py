"""Recovery plans: what a plan may say, and whether it can run. Pure decisions, tested directly.

A plan is an ordered list of boot groups::

    [{"vms": [{"asset": "dc", "network": None, "point": None}],
      "after": "proof"},                                # wait for every VM's boot proof
     {"vms": [{"asset": "db"}, {"asset": "files"}],
      "after": "delay", "delay_seconds": 30},           # or start the next group 30 s later
     {"vms": [{"asset": "app", "network": {"mode": "isolated", "port_forwards": [[0, 80]]}}]}]

The VMs of a group start side by side; the next group starts when the group's condition holds.
A VM's ``network`` is the failover network document (:mod:`image.failover.network`; None: the
asset's configured one) and is passed through unchanged; ``point`` None means the manager's
choice (:func:`image.failover.admission.pick_point`).

- :func:`parse_plan_groups` validates and normalises a plan's groups against the catalog's
  assets (``{name: kind}``): every error names the group and the VM.
- :func:`check_plan_memory` is the admission of a whole plan: every VM's memory plus QEMU's
  overhead against what is free, before the first boot.
- :func:`network_for_test_run` is a VM's network in a test run: always isolated.
- :func:`plan_total_rto` is the plan's RTO: from the click to the last boot proof.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.errors import InvalidInput
from image.failover.admission import QEMU_OVERHEAD_MIB
from image.failover.network import network_from_dict

#: What happens after a group before the next one starts.
AFTER_CHOICES = ("proof", "delay")
#: The longest delay between two groups (a day: longer is a plan run by hand, not a delay).
MAX_DELAY_SECONDS = 86_400
MAX_GROUPS = 32
MAX_VMS = 64
POINT_ID_MAX = 64


def _vm_entry(raw: object, where: str, kinds: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where}: a VM is an object {{'asset': name, ...}}")
    unknown = set(raw) - {"asset", "network", "point"}
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    asset = raw.get("asset")
    if not isinstance(asset, str) or not asset.strip():
        raise InvalidInput(f"{where}: name the VM asset")
    if asset not in kinds:
        raise InvalidInput(f"{where}: asset {asset} does not exist", asset=asset)
    if kinds[asset] != "vm":
        raise InvalidInput(
            f"{where}: {asset} is a folder asset; only virtual machines can be in a plan",
            asset=asset,
        )
    network = raw.get("network")
    if network is not None:
        if not isinstance(network, Mapping):
            raise InvalidInput(f"{where}: the network of {asset} must be an object")
        try:
            network_from_dict(dict(network))
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: network of {asset}: {exc.message}", asset=asset) from exc
    point = raw.get("point")
    if point is not None and (
        not isinstance(point, str) or not point.strip() or len(point) > POINT_ID_MAX
    ):
        raise InvalidInput(f"{where}: the point of {asset} must be a point ID", asset=asset)
    return {
        "asset": asset,
        "network": dict(network) if network is not None else None,
        "point": point,
    }


def parse_plan_groups(groups: object, kinds: Mapping[str, str]) -> list[dict[str, Any]]:
    """The plan's groups, normalised (every field present); :class:`InvalidInput` names what
    is wrong: no group, an empty group, an unknown or non-VM asset, a VM listed twice, a bad
    network or delay."""
    if not isinstance(groups, Sequence) or isinstance(groups, str | bytes):
        raise InvalidInput("a plan's groups are a list")
    if not groups:
        raise InvalidInput("a plan needs at least one group of VMs")
    if len(groups) > MAX_GROUPS:
        raise InvalidInput(f"a plan has at most {MAX_GROUPS} groups")
    seen: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    for number, group in enumerate(groups, start=1):
        where = f"group {number}"
        if not isinstance(group, Mapping):
            raise InvalidInput(f"{where}: a group is an object {{'vms': [...], 'after': ...}}")
        unknown = set(group) - {"vms", "after", "delay_seconds"}
        if unknown:
            raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        raw_vms = group.get("vms")
        if not isinstance(raw_vms, list) or not raw_vms:
            raise InvalidInput(f"{where} has no VMs; add one or remove the group", group=number)
        vms = [_vm_entry(vm, where, kinds) for vm in raw_vms]
        for vm in vms:
            asset = vm["asset"]
            if asset in seen:
                other = seen[asset]
                raise InvalidInput(
                    f"{asset} is in group {other} and group {number}; a VM boots once per plan"
                    if other != number
                    else f"{asset} is listed twice in group {number}",
                    asset=asset,
                )
            seen[asset] = number
        after = group.get("after", "proof")
        if after not in AFTER_CHOICES:
            raise InvalidInput(f"{where}: 'after' must be proof or delay, not {after!r}")
        delay = group.get("delay_seconds", 0 if after == "proof" else None)
        if after == "delay" and (
            not isinstance(delay, int)
            or isinstance(delay, bool)
            or not 0 <= delay <= MAX_DELAY_SECONDS
        ):
            raise InvalidInput(
                f"{where}: the delay must be a whole number of seconds from 0 to "
                f"{MAX_DELAY_SECONDS}, not {delay!r}",
                group=number,
            )
        out.append({"vms": vms, "after": after, "delay_seconds": delay if after == "delay" else 0})
    if len(seen) > MAX_VMS:
        raise InvalidInput(f"a plan has at most {MAX_VMS} VMs")
    return out


def check_plan_memory(
    vms: Sequence[tuple[str, int]], available_mib: int, reserve_mib: int, committed_mib: int
) -> str | None:
    """None when every VM of the plan fits at once (``(asset, memory MiB)`` each), else the
    reason with the numbers (for an InsufficientMemory): a plan is admitted whole or not at all,
    so nothing boots that a later group would have to leave without memory."""
    need = sum(mib + QEMU_OVERHEAD_MIB for _, mib in vms)
    free = available_mib - reserve_mib - committed_mib
    if need <= free:
        return None
    each = ", ".join(f"{asset} {mib} MiB" for asset, mib in vms)
    count = len(vms)
    return (
        f"the plan needs {need} MiB for its {count} VM{'s' if count != 1 else ''} ({each}, "
        f"+{QEMU_OVERHEAD_MIB} MiB each for QEMU) but only {max(free, 0)} MiB can be given: "
        f"{available_mib} MiB available, {reserve_mib} MiB reserved for the appliance, "
        f"{committed_mib} MiB promised to running failovers"
    )


def network_for_test_run(
    network: Mapping[str, Any] | None, configured: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A VM's network in a test run: isolated whatever the plan says (a test never joins a
    production network), keeping the port forwards the plan or the asset's settings give."""
    chosen = network if network is not None else configured
    forwards = (chosen or {}).get("port_forwards") or []
    return {
        "mode": "isolated",
        "port_forwards": [dict(f) if isinstance(f, Mapping) else list(f) for f in forwards],
    }


def plan_total_rto(requested_at: float, proven_at: Sequence[float | None]) -> float | None:
    """Seconds from the click to the last boot proof; None while a VM is not proven."""
    if not proven_at or any(p is None for p in proven_at):
        return None
    return round(max(p for p in proven_at if p is not None) - requested_at, 2)
