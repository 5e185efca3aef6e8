"""Disk health from SMART: ``smartctl --json -a`` parsed into a frozen :class:`Health`.

:func:`parse_smartctl` is pure and tested on recorded output (``tests/fixtures/smart``);
:func:`read_health` is the adapter that runs smartctl. A device without SMART (a loop or virtio
disk, a USB bridge that hides it) or a missing smartctl is a health of ``unknown`` with the reason
in words, never an exception: health is shown, it does not stop anything.

smartctl's exit status is a bitmask (smartctl(8), "EXIT STATUS"): bits 0-1 mean the command line
did not parse or the device could not be opened or identified (``unknown``); bit 3 is the disk's
own "DISK FAILING" verdict and bit 4 a pre-failure attribute at or below its threshold now (both
``failing``); bits 2, 5, 6 and 7 (a SMART command failed, an attribute failed in the past, errors
in the error log, errors in the self-test log) leave the verdict as it is and become warnings.
A healthy verdict with reallocated, pending or uncorrectable sectors is ``ok`` with warnings:
such a disk works today and should be watched and replaced in good time.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

HealthStatus = Literal["ok", "failing", "unknown"]
#: How long one ``smartctl -a`` may take (a sleeping disk spins up first).
SMARTCTL_TIMEOUT = 60.0

# ATA attribute ids (the same on every vendor).
ATA_REALLOCATED = 5
ATA_PENDING = 197
ATA_OFFLINE_UNCORRECTABLE = 198

_EXIT_BITS_NOTED = {
    2: "a SMART command to the disk failed",
    5: "an attribute was at or below its failure threshold in the past",
    6: "the disk's error log has entries",
    7: "the disk's self-test log records failures",
}
_NVME_CRITICAL = {
    0: "spare capacity is below its threshold",
    1: "the temperature is outside its limits",
    2: "its reliability is degraded by media or internal errors",
    3: "it has become read-only",
    4: "its volatile memory backup has failed",
    5: "its persistent memory region has become read-only",
}


@dataclass(frozen=True)
class Health:
    """What SMART says about one device. Counters are None where the device does not report
    them (an NVMe disk has no reallocated-sector count, an ATA disk no percentage used)."""

    status: HealthStatus
    #: Why, in words: "the disk's SMART self-assessment passed", "smartctl is not installed".
    reason: str
    #: Things to watch on a disk that still works (reallocated sectors, errors in its logs).
    warnings: tuple[str, ...] = ()
    #: ``ATA``, ``NVMe``, ``SCSI`` (smartctl's ``device.protocol``).
    protocol: str | None = None
    model: str | None = None
    serial: str | None = None
    temperature_c: int | None = None
    power_on_hours: int | None = None
    reallocated_sectors: int | None = None
    pending_sectors: int | None = None
    offline_uncorrectable: int | None = None
    #: SCSI: the grown defect list's length (its counterpart of reallocated sectors).
    grown_defects: int | None = None
    critical_warning: int | None = None
    media_errors: int | None = None
    percentage_used: int | None = None
    #: smartctl's exit status (a bitmask, see the module doc); None when it did not run.
    exit_status: int | None = None
    #: What smartctl itself said (``smartctl.messages[].string``).
    messages: tuple[str, ...] = ()


def parse_smartctl(output: str | Mapping[str, Any], exit_status: int | None = None) -> Health:
    """The health in ``smartctl --json -a`` output (text or parsed). ``exit_status`` is the
    process's, used when the JSON lacks ``smartctl.exit_status``."""
    if isinstance(output, str):
        try:
            document = json.loads(output)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            return Health("unknown", "smartctl printed no JSON", exit_status=exit_status)
    else:
        document = output
    tool = _dict(document.get("smartctl"))
    status_bits = tool.get("exit_status", exit_status)
    bits = status_bits if isinstance(status_bits, int) else 0
    messages = tuple(str(m.get("string")) for m in tool.get("messages", []) if isinstance(m, dict))
    found = _readings(document)
    if bits & 0b11:
        # smartctl counts "Unable to detect device type" (a loop or virtio disk) as bit 0.
        if messages:
            why = f"smartctl cannot read SMART from this device: {messages[0]}"
        elif bits & 0b10:
            why = "smartctl could not open or identify the device"
        else:
            why = "smartctl did not accept its command line"
        return Health("unknown", why, exit_status=bits, messages=messages, **found)

    warnings = [text for bit, text in _EXIT_BITS_NOTED.items() if bits & (1 << bit)]
    for key, words in (
        ("reallocated_sectors", "reallocated sectors"),
        ("pending_sectors", "sectors pending reallocation"),
        ("offline_uncorrectable", "uncorrectable sectors"),
        ("grown_defects", "grown defects"),
        ("media_errors", "media and data integrity errors"),
    ):
        if found.get(key):
            warnings.append(f"{found[key]} {words}")
    if (found.get("percentage_used") or 0) >= 100:
        warnings.append(f"{found['percentage_used']}% of its rated endurance used")
    critical = found.get("critical_warning") or 0
    warnings += [
        f"NVMe critical warning: {text}"
        for bit, text in _NVME_CRITICAL.items()
        if critical & (1 << bit)
    ]
    failing_now = _failing_attributes(document)
    passed = _dict(document.get("smart_status")).get("passed")

    if bits & (1 << 3) or passed is False:
        status: HealthStatus = "failing"
        reason = "the disk's SMART self-assessment says it is failing"
    elif bits & (1 << 4) or failing_now:
        status = "failing"
        names = ", ".join(failing_now) or "a pre-failure attribute"
        reason = f"{names} at or below its failure threshold"
    elif passed is True:
        status, reason = "ok", "the disk's SMART self-assessment passed"
    else:
        status = "unknown"
        reason = f"the device reports no SMART health{': ' + messages[0] if messages else ''}"
    return Health(
        status,
        reason,
        warnings=tuple(warnings),
        exit_status=bits if status_bits is not None else None,
        messages=messages,
        **found,
    )


def _readings(document: Mapping[str, Any]) -> dict[str, Any]:
    device = _dict(document.get("device"))
    nvme = _dict(document.get("nvme_smart_health_information_log"))
    attributes = {
        row.get("id"): _int(_dict(row.get("raw")).get("value"))
        for row in _dict(document.get("ata_smart_attributes")).get("table", [])
        if isinstance(row, dict)
    }
    temperature = _int(_dict(document.get("temperature")).get("current"))
    return {
        "protocol": device.get("protocol"),
        "model": document.get("model_name") or document.get("scsi_model_name"),
        "serial": document.get("serial_number"),
        "temperature_c": temperature if temperature is not None else _int(nvme.get("temperature")),
        "power_on_hours": _int(_dict(document.get("power_on_time")).get("hours")),
        "reallocated_sectors": attributes.get(ATA_REALLOCATED),
        "pending_sectors": attributes.get(ATA_PENDING),
        "offline_uncorrectable": attributes.get(ATA_OFFLINE_UNCORRECTABLE),
        "grown_defects": _int(document.get("scsi_grown_defect_list")),
        "critical_warning": _int(nvme.get("critical_warning")),
        "media_errors": _int(nvme.get("media_errors")),
        "percentage_used": _int(nvme.get("percentage_used")),
    }


def _failing_attributes(document: Mapping[str, Any]) -> list[str]:
    """Pre-failure ATA attributes at or below their threshold now (``when_failed: now``)."""
    return [
        str(row.get("name") or row.get("id"))
        for row in _dict(document.get("ata_smart_attributes")).get("table", [])
        if isinstance(row, dict)
        and row.get("when_failed") == "now"
        and _dict(row.get("flags")).get("prefailure")
    ]


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the adapter ---------------------------------------------------------------------------------


def smartctl_argv(devnode: str, device_type: str | None = None) -> list[str]:
    """The smartctl command line reading everything about ``devnode`` as JSON; ``device_type``
    is smartctl's ``-d`` (``sat`` for many USB bridges, ``nvme``, ``scsi``), else it guesses."""
    argv = ["smartctl", "--json", "-a"]
    if device_type:
        argv += ["-d", device_type]
    return [*argv, devnode]


def read_health(
    devnode: str, *, device_type: str | None = None, timeout: float = SMARTCTL_TIMEOUT
) -> Health:
    """Run smartctl on ``devnode`` and parse what it said; ``unknown`` (with the reason) when
    smartctl is missing, hangs or the device has no SMART."""
    try:
        done = subprocess.run(
            smartctl_argv(devnode, device_type),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return Health("unknown", "smartctl is not installed (package smartmontools)")
    except subprocess.TimeoutExpired:
        return Health("unknown", f"smartctl did not answer within {timeout:.0f} s")
    return parse_smartctl(done.stdout, exit_status=done.returncode)
