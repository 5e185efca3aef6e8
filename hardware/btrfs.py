"""What a btrfs pool says about itself: device error counters, missing disks, chunk profiles,
scrub and replace.

btrfs is the filesystem of every pool of several disks (see ``docs/hardware.md``): it checksums
data and metadata, so a scrub knows which mirror is right and rewrites the wrong one, and a
mirror with a missing disk still mounts (``-o degraded``) and serves.

Two halves, as everywhere in ``hardware``:

- Pure functions: parsers of the ``btrfs`` tool's output (``device stats`` as JSON or text,
  ``filesystem show``, ``filesystem df -b``, ``scrub start -B`` / ``scrub status``, ``replace
  status -1``) into frozen records, and argv builders. They are tested on output recorded from
  real runs of btrfs-progs 6.2 on loop devices (``tests/fixtures/btrfs/``).
- Thin adapters that run the tool (:func:`run_btrfs`) and hand the output to the parsers. A
  failing command is :class:`~hardware.mounts.CommandFailed` with what the tool said. The long
  ones, scrub and replace, run in :mod:`hardware.pool_jobs` (polled for progress, cancellable).

A missing disk shows as ``<missing disk>`` with its device id (mounted) or as "Some devices
missing" (not mounted); device ids are what pools map to their members' identities.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hardware.mounts import CommandFailed

#: What btrfs calls a member it cannot find.
MISSING_DISK = "<missing disk>"
#: The error counters of ``btrfs device stats``, in the tool's order.
COUNTERS = ("write_io_errs", "read_io_errs", "flush_io_errs", "corruption_errs", "generation_errs")
#: Exit status of ``btrfs scrub start -B`` when it found errors it could not correct.
SCRUB_UNCORRECTABLE = 3
#: Longest one short btrfs command may take (scrub and replace are polled, not bounded).
COMMAND_TIMEOUT = 300.0

_UNITS = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "PiB": 1 << 50,
    "EiB": 1 << 60,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGTPE]iB|B)?$")


def parse_size(text: str) -> int | None:
    """Bytes of a size as btrfs prints it (``300.00MiB``, ``0.00B``, ``314572800``, ``0``)."""
    match = _SIZE.match(text.strip())
    if match is None:
        return None
    return round(float(match.group(1)) * _UNITS[match.group(2) or "B"])


def parse_duration(text: str) -> int | None:
    """Seconds of a ``H:MM:SS`` duration."""
    parts = text.strip().split(":")
    if not parts or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds


# --- device error counters ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceErrors:
    """The error counters btrfs keeps for one member (they only grow, until reset)."""

    #: The member's device node now, or :data:`MISSING_DISK`.
    device: str
    #: Its btrfs device id (the text output does not say it: None).
    devid: int | None
    write_io_errs: int = 0
    read_io_errs: int = 0
    flush_io_errs: int = 0
    corruption_errs: int = 0
    generation_errs: int = 0

    @property
    def missing(self) -> bool:
        return self.device == MISSING_DISK

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COUNTERS)

    def nonzero(self) -> dict[str, int]:
        """The counters that are not zero, by name."""
        return {name: getattr(self, name) for name in COUNTERS if getattr(self, name)}


def parse_device_stats_json(text: str) -> list[DeviceErrors]:
    """``btrfs --format json device stats MOUNT``."""
    document = json.loads(text)
    out = []
    for entry in document.get("device-stats", []):
        devid = entry.get("devid")
        out.append(
            DeviceErrors(
                device=str(entry.get("device", "")),
                devid=int(devid) if devid is not None else None,
                **{name: int(entry.get(name, 0)) for name in COUNTERS},
            )
        )
    return out


_STAT_LINE = re.compile(r"^\[(?P<device>[^\]]+)\]\.(?P<name>\w+)\s+(?P<value>\d+)\s*$")


def parse_device_stats_text(text: str) -> list[DeviceErrors]:
    """``btrfs device stats MOUNT`` (lines like ``[/dev/loop0].write_io_errs    0``)."""
    counters: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        match = _STAT_LINE.match(line.strip())
        if match and match.group("name") in COUNTERS:
            device = counters.setdefault(match.group("device"), {})
            device[match.group("name")] = int(match.group("value"))
    return [
        DeviceErrors(device=device, devid=None, **values) for device, values in counters.items()
    ]


def parse_device_stats(text: str) -> list[DeviceErrors]:
    """Either form of ``btrfs device stats`` output."""
    stripped = text.lstrip()
    return (
        parse_device_stats_json(stripped)
        if stripped.startswith("{")
        else (parse_device_stats_text(text))
    )


# --- filesystem show -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BtrfsDevice:
    devid: int
    size_bytes: int | None
    used_bytes: int | None
    #: The device node now; None for a missing one.
    path: str | None

    @property
    def missing(self) -> bool:
        return self.path is None


@dataclass(frozen=True)
class BtrfsFilesystem:
    """One filesystem of ``btrfs filesystem show``."""

    uuid: str
    label: str | None
    total_devices: int
    devices: tuple[BtrfsDevice, ...]
    #: "Some devices missing": said for a filesystem that is not mounted.
    some_missing: bool = False

    @property
    def missing_devids(self) -> list[int]:
        """Device ids of missing members: listed as missing (mounted), or not listed among
        ids 1..N (not mounted: btrfs lists only the members it found)."""
        listed = {d.devid for d in self.devices}
        missing = {d.devid for d in self.devices if d.missing}
        if self.some_missing or len(self.devices) < self.total_devices:
            top = max([self.total_devices, *listed]) if listed else self.total_devices
            missing |= set(range(1, top + 1)) - listed
        return sorted(missing)

    @property
    def present(self) -> list[BtrfsDevice]:
        return [d for d in self.devices if not d.missing]


_LABEL = re.compile(r"^Label:\s+(?:'(?P<label>.*)'|none)\s+uuid:\s+(?P<uuid>[0-9a-fA-F-]+)\s*$")
_TOTAL = re.compile(r"^Total devices\s+(?P<n>\d+)")
_DEVICE = re.compile(
    r"^devid\s+(?P<devid>\d+)\s+size\s+(?P<size>\S+)\s+used\s+(?P<used>\S+)\s+path\s+(?P<path>.+?)"
    r"(?:\s+MISSING)?\s*$"
)


def parse_filesystem_show(text: str) -> list[BtrfsFilesystem]:
    """``btrfs filesystem show [MOUNT | UUID]`` (one or more filesystems)."""
    found: list[BtrfsFilesystem] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            found.append(
                BtrfsFilesystem(
                    uuid=current["uuid"],
                    label=current["label"],
                    total_devices=current["total"],
                    devices=tuple(current["devices"]),
                    some_missing=current["some_missing"],
                )
            )

    for raw in text.splitlines():
        line = raw.strip()
        label = _LABEL.match(line)
        if label:
            close()
            current = {
                "uuid": label.group("uuid"),
                "label": label.group("label"),
                "total": 0,
                "devices": [],
                "some_missing": False,
            }
            continue
        if current is None:
            continue
        total = _TOTAL.match(line)
        if total:
            current["total"] = int(total.group("n"))
            continue
        device = _DEVICE.match(line)
        if device:
            path = device.group("path")
            missing = path == MISSING_DISK or line.endswith("MISSING")
            current["devices"].append(
                BtrfsDevice(
                    devid=int(device.group("devid")),
                    size_bytes=parse_size(device.group("size")),
                    used_bytes=parse_size(device.group("used")),
                    path=None if missing else path,
                )
            )
            continue
        if "Some devices missing" in line:
            current["some_missing"] = True
    close()
    return found


# --- chunk profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkProfile:
    """One line of ``btrfs filesystem df``: a kind of chunk and how it is laid out."""

    #: ``Data``, ``Metadata``, ``System`` or ``GlobalReserve``.
    kind: str
    #: ``single``, ``dup``, ``raid1``, ``raid10``, ... (lower case).
    profile: str
    total_bytes: int | None
    used_bytes: int | None


_DF = re.compile(
    r"^(?P<kind>\w+),\s*(?P<profile>[\w]+):\s*total=(?P<total>[^,]+),\s*used=(?P<used>\S+)\s*$"
)


def parse_filesystem_df(text: str) -> list[ChunkProfile]:
    """``btrfs filesystem df [-b] MOUNT``."""
    out = []
    for line in text.splitlines():
        match = _DF.match(line.strip())
        if match:
            out.append(
                ChunkProfile(
                    kind=match.group("kind"),
                    profile=match.group("profile").lower(),
                    total_bytes=parse_size(match.group("total")),
                    used_bytes=parse_size(match.group("used")),
                )
            )
    return out


def unredundant_chunks(chunks: Sequence[ChunkProfile], profile: str) -> list[ChunkProfile]:
    """Chunks holding something that are not laid out as the pool's ``profile`` (a mirror
    written to while degraded stores new chunks ``single``: they have no second copy until a
    balance converts them). A pool without redundancy has none."""
    if profile not in ("raid1", "raid10"):
        return []
    return [
        c
        for c in chunks
        if c.kind in ("Data", "Metadata", "System")
        and c.profile != profile
        and (c.used_bytes is None or c.used_bytes > 0)
    ]


# --- scrub -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrubResult:
    """What a scrub found: ``btrfs scrub start -B`` when it ends, or ``btrfs scrub status``."""

    #: ``finished``, ``running``, ``aborted`` (cancelled), ``interrupted`` or ``never``.
    status: str
    started: str | None = None
    duration_seconds: int | None = None
    total_bytes: int | None = None
    #: While running: how far it is.
    scrubbed_bytes: int | None = None
    percent: float | None = None
    #: The error summary's counts by kind (``csum``, ``read``, ``verify``, ``super`` ...).
    errors: dict[str, int] = field(default_factory=dict)
    corrected: int = 0
    uncorrectable: int = 0
    unverified: int = 0

    @property
    def clean(self) -> bool:
        """Finished without finding anything wrong."""
        return self.status == "finished" and not self.errors and not self.uncorrectable

    @property
    def repaired(self) -> bool:
        """Everything it found wrong was rewritten from a good copy."""
        return self.status == "finished" and self.uncorrectable == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean, "repaired": self.repaired}


def parse_scrub(text: str) -> ScrubResult:
    """``btrfs scrub start -B`` or ``btrfs scrub status [-R]`` output."""
    fields: dict[str, str] = {}
    raw: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key.islower() and "_" in key and value.isdigit():
            raw[key] = int(value)  # -R counters: ``csum_errors: 20``
        elif key not in fields:
            fields[key] = value
    if "no stats available" in text:
        return ScrubResult(status="never")
    errors: dict[str, int] = {}
    summary = fields.get("Error summary", "")
    if summary and summary != "no errors found":
        for item in summary.split():
            name, _, count = item.partition("=")
            if count.isdigit():
                errors[name] = int(count)
    if raw:
        for name in ("read", "csum", "verify", "super", "malloc"):
            if raw.get(f"{name}_errors"):
                errors.setdefault(name, raw[f"{name}_errors"])
    scrubbed, percent = None, None
    progress = re.match(r"^(\S+)\s*\((\d+(?:\.\d+)?)%\)", fields.get("Bytes scrubbed", ""))
    if progress:
        scrubbed, percent = parse_size(progress.group(1)), float(progress.group(2))
    elif "data_bytes_scrubbed" in raw:
        scrubbed = raw["data_bytes_scrubbed"] + raw.get("tree_bytes_scrubbed", 0)
    return ScrubResult(
        status=fields.get("Status", "finished" if "scrub done" in text else "unknown").lower(),
        started=fields.get("Scrub started"),
        duration_seconds=parse_duration(fields.get("Duration", "")),
        total_bytes=parse_size(fields.get("Total to scrub", "")),
        scrubbed_bytes=scrubbed,
        percent=percent,
        errors=errors,
        corrected=_count(fields.get("Corrected"), raw.get("corrected_errors")),
        uncorrectable=_count(fields.get("Uncorrectable"), raw.get("uncorrectable_errors")),
        unverified=_count(fields.get("Unverified"), raw.get("unverified_errors")),
    )


def _count(text: str | None, raw: int | None) -> int:
    if text is not None and text.isdigit():
        return int(text)
    return raw or 0


# --- replace -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaceStatus:
    """``btrfs replace status -1``: ``never``, ``running``, ``finished`` or ``canceled``."""

    state: str
    percent: float | None = None
    write_errors: int = 0
    read_errors: int = 0


_ERRS = re.compile(r"(\d+) write errs, (\d+) uncorr\. read errs")


def parse_replace_status(text: str) -> ReplaceStatus:
    line = text.strip().splitlines()[-1] if text.strip() else ""
    errs = _ERRS.search(line)
    writes, reads = (int(errs.group(1)), int(errs.group(2))) if errs else (0, 0)
    if line.startswith("Never started"):
        return ReplaceStatus("never")
    running = re.match(r"^(\d+(?:\.\d+)?)% done", line)
    if running:
        return ReplaceStatus("running", float(running.group(1)), writes, reads)
    if "finished on" in line:
        return ReplaceStatus("finished", 100.0, writes, reads)
    canceled = re.search(r"canceled on .* at (\d+(?:\.\d+)?)%", line)
    if canceled:
        return ReplaceStatus("canceled", float(canceled.group(1)), writes, reads)
    return ReplaceStatus("unknown", None, writes, reads)


# --- argv builders -------------------------------------------------------------------------------


def device_stats_argv(mountpoint: str, *, as_json: bool = True) -> list[str]:
    return ["btrfs", *(["--format", "json"] if as_json else []), "device", "stats", mountpoint]


def filesystem_show_argv(target: str) -> list[str]:
    """``target``: a mountpoint, a device or a filesystem UUID."""
    return ["btrfs", "filesystem", "show", "--raw", target]


def filesystem_df_argv(mountpoint: str) -> list[str]:
    return ["btrfs", "filesystem", "df", "-b", mountpoint]


def scrub_start_argv(mountpoint: str) -> list[str]:
    return ["btrfs", "scrub", "start", "-B", mountpoint]


def scrub_status_argv(mountpoint: str) -> list[str]:
    return ["btrfs", "scrub", "status", mountpoint]


def scrub_cancel_argv(mountpoint: str) -> list[str]:
    return ["btrfs", "scrub", "cancel", mountpoint]


def replace_start_argv(devid: int, new_devnode: str, mountpoint: str) -> list[str]:
    """Replace member ``devid`` (missing or failing) by ``new_devnode``; ``-f``: the new disk
    may hold an old filesystem (the pool rules chose it; it is overwritten)."""
    return ["btrfs", "replace", "start", "-B", "-f", str(devid), new_devnode, mountpoint]


def replace_status_argv(mountpoint: str) -> list[str]:
    return ["btrfs", "replace", "status", "-1", mountpoint]


def convert_argv(profile: str, mountpoint: str) -> list[str]:
    """Rewrite the chunks not laid out as ``profile`` (``soft``: only those)."""
    return [
        "btrfs",
        "balance",
        "start",
        f"-dconvert={profile},soft",
        f"-mconvert={profile},soft",
        mountpoint,
    ]


def device_scan_argv(devnodes: Sequence[str]) -> list[str]:
    """Tell the kernel which disks belong to which btrfs (before mounting a pool of several)."""
    return ["btrfs", "device", "scan", *devnodes]


# --- adapters ------------------------------------------------------------------------------------


def run_btrfs(
    argv: Sequence[str], what: str, *, ok: Sequence[int] = (0,), timeout: float = COMMAND_TIMEOUT
) -> tuple[int, str]:
    """Run a btrfs command; (exit status, stdout). A status outside ``ok`` is
    :class:`CommandFailed` carrying the tool's last line."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise CommandFailed(f"{what}: btrfs-progs is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{what}: {argv[0]} did not finish in {timeout:.0f} s") from exc
    if done.returncode not in ok:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise CommandFailed(f"{what}: {said[-1] if said else f'exit status {done.returncode}'}")
    return done.returncode, done.stdout


def device_errors(mountpoint: str) -> list[DeviceErrors]:
    _, out = run_btrfs(device_stats_argv(mountpoint), f"reading error counters of {mountpoint}")
    return parse_device_stats(out)


def filesystem(target: str) -> BtrfsFilesystem | None:
    """The filesystem at a mountpoint (or of a device or UUID); None if btrfs knows none."""
    try:
        _, out = run_btrfs(filesystem_show_argv(target), f"reading btrfs {target}")
    except CommandFailed:
        return None
    found = parse_filesystem_show(out)
    return found[0] if found else None


def chunk_profiles(mountpoint: str) -> list[ChunkProfile]:
    _, out = run_btrfs(filesystem_df_argv(mountpoint), f"reading chunk profiles of {mountpoint}")
    return parse_filesystem_df(out)


def last_scrub(mountpoint: str) -> ScrubResult:
    _, out = run_btrfs(scrub_status_argv(mountpoint), f"reading the scrub status of {mountpoint}")
    return parse_scrub(out)


def scan_devices(devnodes: Sequence[str]) -> None:
    """Register the disks with the kernel's btrfs (harmless when they are already)."""
    if devnodes:
        run_btrfs(device_scan_argv(devnodes), "scanning for btrfs disks", ok=(0, 1))


def convert_profiles(mountpoint: str, profile: str) -> str:
    """Give every chunk the pool's ``profile`` again (after a degraded spell); the tool's
    summary line."""
    _, out = run_btrfs(
        convert_argv(profile, mountpoint), f"restoring {profile} on {mountpoint}", timeout=86400
    )
    return out.strip().splitlines()[-1] if out.strip() else ""


def replace_status(mountpoint: str) -> ReplaceStatus:
    _, out = run_btrfs(replace_status_argv(mountpoint), f"reading replace status of {mountpoint}")
    return parse_replace_status(out)
