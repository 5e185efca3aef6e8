"""The definition of a protected VM, stored with every image point so it can boot anywhere.

Accepted inputs: a JSON or TOML spec, or a libvirt domain XML (the published schema; only the
fields below are read). The result is a normalised dict with a fixed set of keys:

    name, vcpus, memory_mib, firmware ("bios" | "uefi"), machine,
    disks: [{name, bus, format}], nics: [{model, mac, network}]
"""

from __future__ import annotations

import json
import re
import tomllib
import xml.etree.ElementTree as ET
from typing import Any

from appliance.errors import InvalidInput

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_BUSES = {"virtio", "sata", "scsi", "ide", "nvme", "usb"}
_NIC_MODELS = {"virtio", "virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"}
_MEMORY_UNITS = {  # libvirt's units (case-insensitive), in MiB
    "b": 1 / 2**20,
    "bytes": 1 / 2**20,
    "k": 1 / 1024,
    "kib": 1 / 1024,
    "m": 1,
    "mib": 1,
    "g": 1024,
    "gib": 1024,
    "t": 2**20,
    "tib": 2**20,
    "kb": 1000 / 2**20,
    "mb": 10**6 / 2**20,
    "gb": 10**9 / 2**20,
    "tb": 10**12 / 2**20,
}


def default_spec(name: str, disk_names: list[str]) -> dict[str, Any]:
    return normalise({"name": name, "disks": [{"name": d} for d in disk_names]})


def normalise(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        vcpus = int(raw.get("vcpus", 1))
        memory = int(raw.get("memory_mib", 512))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"VM spec: vcpus and memory_mib must be integers ({exc})") from exc
    if not 1 <= vcpus <= 256 or not 16 <= memory <= 4 * 1024 * 1024:
        raise InvalidInput("VM spec: vcpus must be 1-256 and memory_mib 16 MiB-4 TiB")
    firmware = str(raw.get("firmware", "bios")).lower()
    if firmware not in ("bios", "uefi"):
        raise InvalidInput(f"VM spec: firmware must be bios or uefi, not {firmware!r}")
    disks: list[dict[str, Any]] = []
    for i, disk in enumerate(raw.get("disks", [])):
        bus = str(disk.get("bus", "virtio")).lower()
        if bus not in _BUSES:
            raise InvalidInput(f"VM spec: unknown disk bus {bus!r}")
        disks.append(
            {
                "name": str(disk.get("name", f"disk{i}")),
                "bus": bus,
                "format": str(disk.get("format", "raw")),
            }
        )
    nics = []
    for nic in raw.get("nics", []):
        model = str(nic.get("model", "virtio")).lower()
        if model not in _NIC_MODELS:
            raise InvalidInput(f"VM spec: unknown NIC model {model!r}")
        mac = str(nic.get("mac") or "").lower()
        if mac and not _MAC.match(mac):
            raise InvalidInput(f"VM spec: {mac!r} is not a MAC address")
        nics.append({"model": model, "mac": mac or None, "network": nic.get("network")})
    return {
        "name": str(raw.get("name", "vm")),
        "vcpus": vcpus,
        "memory_mib": memory,
        "firmware": firmware,
        "machine": str(raw.get("machine", "q35")),
        "disks": disks,
        "nics": nics,
    }


def parse_libvirt_xml(text: str) -> dict[str, Any]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidInput(f"VM spec: invalid libvirt XML: {exc}") from exc
    if root.tag != "domain":
        raise InvalidInput("VM spec: libvirt XML must have a <domain> root")
    memory = root.find("memory")
    mib = 512
    if memory is not None and memory.text:
        unit = (memory.get("unit") or "KiB").lower()
        if unit not in _MEMORY_UNITS:
            raise InvalidInput(f"VM spec: unknown memory unit {memory.get('unit')!r}")
        try:
            mib = int(int(memory.text) * _MEMORY_UNITS[unit])
        except ValueError as exc:
            raise InvalidInput(f"VM spec: memory {memory.text!r} is not an integer") from exc
    os_el = root.find("os")
    firmware = "bios"
    machine = "q35"
    if os_el is not None:
        if os_el.get("firmware") == "efi" or os_el.find("loader") is not None:
            firmware = "uefi"
        type_el = os_el.find("type")
        if type_el is not None and type_el.get("machine"):
            machine = (
                type_el.get("machine", "q35").split("-")[1]
                if "-" in type_el.get("machine", "")
                else type_el.get("machine", "q35")
            )
    disks: list[dict[str, Any]] = []
    for disk in root.findall("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        driver = disk.find("driver")
        disks.append(
            {
                "name": target.get("dev", f"disk{len(disks)}")
                if target is not None
                else f"disk{len(disks)}",
                "bus": (target.get("bus", "virtio") if target is not None else "virtio"),
                "format": driver.get("type", "raw") if driver is not None else "raw",
            }
        )
    nics = []
    for iface in root.findall("devices/interface"):
        model = iface.find("model")
        mac = iface.find("mac")
        source = iface.find("source")
        nics.append(
            {
                "model": model.get("type", "virtio") if model is not None else "virtio",
                "mac": mac.get("address") if mac is not None else None,
                "network": (source.get("bridge") or source.get("network"))
                if source is not None
                else None,
            }
        )
    vcpu = root.find("vcpu")
    name = root.find("name")
    return normalise(
        {
            "name": name.text if name is not None and name.text else "vm",
            "vcpus": vcpu.text.strip() if vcpu is not None and vcpu.text else 1,
            "memory_mib": mib,
            "firmware": firmware,
            "machine": machine,
            "disks": disks,
            "nics": nics,
        }
    )


def load_spec(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read VM spec {path}: {exc.strerror}") from exc
    text = data.decode("utf-8", "replace").lstrip()
    if text.startswith("<"):
        return parse_libvirt_xml(text)
    try:
        raw = json.loads(text) if text.startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"VM spec {path} is neither JSON, TOML nor libvirt XML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidInput("VM spec must be an object")
    return normalise(raw)


# --- the catalog text of a VM asset -----------------------------------------------------------


def vm_source(disks: list[str], vm_spec: str | None) -> str:
    """The catalog ``source`` text of a VM asset."""
    return json.dumps({"disks": list(disks), "vm_spec": vm_spec}, sort_keys=True)


def parse_vm_source(source: str) -> tuple[list[str], str | None]:
    """(disk paths, VM definition path or None) of a VM asset's ``source``."""
    try:
        document = json.loads(source)
    except ValueError:
        document = None
    if isinstance(document, list):  # the bare disk list of assets made by `catalog rebuild`
        document = {"disks": document}
    if not isinstance(document, dict) or not isinstance(document.get("disks"), list):
        # A point recorded by the CLI names its disks separated by spaces.
        return source.split(), None
    spec = document.get("vm_spec")
    return [str(d) for d in document["disks"]], (str(spec) if spec else None)
