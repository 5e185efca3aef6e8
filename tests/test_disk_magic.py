"""Image format detection from magic bytes: raw disks need no plug-in and no qemu-img.

The pure classifier is tested on hand-made headers and on images qemu-img creates (its own probe
is the reference); the engine and the CLI back up a raw disk with the plug-in entry points
unavailable or qemu-img off ``PATH``.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import new_appliance, run_cli, set_engine_env

from appliance.backup import disks
from appliance.backup.disk_magic import HEAD_BYTES, TAIL_BYTES, classify_image
from appliance.engine import Appliance
from appliance.errors import InvalidInput

MiB = 1 << 20
DISK_SIZE = 4 * MiB


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``appliance.disk_formats`` entry points made unavailable; records each lookup."""
    lookups: list[str] = []

    def none() -> list[disks.DiskFormatPlugin]:
        lookups.append("disk_formats")
        return []

    monkeypatch.setattr(disks, "_plugins", none)
    return lookups


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance")
    yield appliance
    appliance.close()


def header(magic: bytes, offset: int = 0, size: int = HEAD_BYTES) -> bytes:
    data = bytearray(random.Random(1).randbytes(size))
    data[offset : offset + len(magic)] = magic
    return bytes(data)


def raw_disk(path: Path, first: bytes) -> bytes:
    """A sparse raw disk starting with ``first`` and with data at 1 MiB; returns its content."""
    data = bytearray(DISK_SIZE)
    data[: len(first)] = first
    data[MiB : MiB + 4096] = random.Random(2).randbytes(4096)
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(first)
        f.seek(MiB)
        f.write(data[MiB : MiB + 4096])
    return bytes(data)


# --- the pure classifier -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (header(b"QFI\xfb" + struct.pack(">I", 1)), "qcow"),
        (header(b"QFI\xfb" + struct.pack(">I", 2)), "qcow2"),
        (header(b"QFI\xfb" + struct.pack(">I", 3)), "qcow2"),
        (header(b"QED\x00"), "qed"),
        (header(b"KDMV"), "vmdk"),
        (header(b"# Disk DescriptorFile\nversion=1\n"), "vmdk"),
        (header(struct.pack("<I", 0xBEDA107F), offset=0x40), "vdi"),
        (header(b"vhdxfile"), "vhdx"),
        (header(b"conectix"), "vpc"),
        (header(b"LUKS\xba\xbe\x00\x01"), "luks"),
        (header(b"WithoutFreeSpace"), "parallels"),
        (header(b"WithouFreSpacExt"), "parallels"),
        (header(b""), "raw"),
        (bytes(HEAD_BYTES), "raw"),
        (b"", "raw"),
        (b"QFI\xfb", "raw"),  # too short to hold a version: not an image qemu could open
        (header(struct.pack(">I", 0xBEDA107F), offset=0x40), "raw"),  # VDI's is little-endian
        (header(b"vhdxfile", offset=1), "raw"),
    ],
)
def test_header_magic(head: bytes, expected: str) -> None:
    assert classify_image(head, b"") == expected


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (header(b"conectix", size=TAIL_BYTES), "vpc"),
        (header(b"koly", size=TAIL_BYTES), "dmg"),
        (header(b"conectix", offset=1, size=TAIL_BYTES), "raw"),
        (header(b"koly", size=TAIL_BYTES - 1), "raw"),  # a footer is exactly one sector
        (bytes(TAIL_BYTES), "raw"),
    ],
)
def test_footer_magic(tail: bytes, expected: str) -> None:
    assert classify_image(bytes(HEAD_BYTES), tail) == expected


def test_header_wins_over_footer() -> None:
    qcow2 = header(b"QFI\xfb" + struct.pack(">I", 3))
    assert classify_image(qcow2, header(b"conectix", size=TAIL_BYTES)) == "qcow2"


# --- against qemu-img ----------------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is missing: install it with `apt-get install qemu-utils`")
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def qemu_info(path: Path, *args: str) -> dict:
    info: dict = json.loads(qemu_img("info", "--output=json", *args, str(path)).stdout)
    return info


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", ()),
        ("qcow2", ("-o", "compat=0.10")),
        ("qcow", ()),
        ("qed", ()),
        ("vmdk", ()),
        ("vmdk", ("-o", "subformat=monolithicFlat")),  # a text descriptor beside a flat extent
        ("vmdk", ("-o", "subformat=streamOptimized")),
        ("vdi", ()),
        ("vhdx", ()),
        ("vpc", ()),
        ("raw", ()),
    ],
)
def test_detection_agrees_with_qemu_img(fmt: str, options: tuple[str, ...], tmp_path: Path) -> None:
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *options, str(image), "4M")
    assert disks.detect_format(str(image)) == qemu_info(image)["format"] == fmt


@pytest.mark.qemu
def test_fixed_vhd_is_vpc(tmp_path: Path) -> None:
    """qemu's probe calls a fixed VHD raw; read as raw its footer would join the guest's disk."""
    image = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(image), "4M")
    assert qemu_info(image)["format"] == "raw"
    assert disks.detect_format(str(image)) == "vpc"
    info = qemu_info(image, "-f", "vpc")  # qemu's vpc driver opens it, footer excluded
    assert info["virtual-size"] == image.stat().st_size - TAIL_BYTES
    # The flat extent of a monolithicFlat vmdk is plain raw data.
    flat = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "1M")
    assert disks.detect_format(str(tmp_path / "d-flat.vmdk")) == "raw"


@pytest.mark.qemu
def test_formats_outside_the_allow_list_are_refused_on_open(tmp_path: Path) -> None:
    qed = tmp_path / "d.qed"
    qemu_img("create", "-q", "-f", "qed", str(qed), "1M")
    assert disks.detect_format(str(qed)) == "qed"
    with pytest.raises(InvalidInput, match="unsupported disk format 'qed'"):
        disks.open_disk(str(qed))


@pytest.mark.qemu
def test_fixed_vhd_backs_up_its_guest_bytes_only(app: Appliance, tmp_path: Path) -> None:
    raw = tmp_path / "guest.img"
    content = raw_disk(raw, random.Random(5).randbytes(HEAD_BYTES))
    image = tmp_path / "fixed.vhd"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        str(raw),
        str(image),
    )
    outcome = app.backup_image([str(image)], "hyperv", threads=2)
    (entry,) = app.manifest(outcome.point.id)["disks"]
    assert entry["format"] == "vpc" and entry["size"] == DISK_SIZE
    restored = tmp_path / "restored.img"
    app.restore(outcome.point.id, str(restored))
    assert restored.read_bytes() == content


# --- raw disks without the plug-in -------------------------------------------------------------


@pytest.mark.parametrize("first", [b"", random.Random(3).randbytes(HEAD_BYTES)])
def test_raw_backup_needs_no_plugin(
    first: bytes, no_plugins: list[str], app: Appliance, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    content = raw_disk(disk, first)
    assert disks.detect_format(str(disk)) == "raw"
    outcome = app.backup_image([str(disk)], "vm", threads=2)
    (entry,) = app.manifest(outcome.point.id)["disks"]
    assert entry["format"] == "raw" and entry["size"] == DISK_SIZE
    restored = tmp_path / "restored.img"
    app.restore(outcome.point.id, str(restored))
    assert restored.read_bytes() == content
    assert no_plugins == []  # the entry points were never even looked up


def test_container_without_plugin_names_format_and_install_step(
    no_plugins: list[str], tmp_path: Path
) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(header(b"QFI\xfb" + struct.pack(">I", 3)))
    with pytest.raises(InvalidInput, match=r"'qcow2'.*apt-get install qemu-utils") as caught:
        disks.open_disk(str(image))
    assert caught.value.details["format"] == "qcow2"


def test_missing_disk_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(disks.SourceError, match="No such file"):
        disks.detect_format(str(tmp_path / "absent.img"))


# --- the CLI with qemu-img off PATH ------------------------------------------------------------


def test_cli_backs_up_raw_image_without_qemu_img(tmp_path: Path) -> None:
    data_dir = tmp_path / "appliance"
    run_cli("init", data_dir=data_dir)
    empty = tmp_path / "empty-bin"  # the CLI's own path is absolute; no tool is on PATH
    empty.mkdir()
    no_qemu = {"PATH": str(empty)}
    disk = tmp_path / "vm.img"
    raw_disk(disk, random.Random(4).randbytes(HEAD_BYTES))
    done = run_cli(
        "--json", "backup", "image", str(disk), "--asset", "vm", data_dir=data_dir, env=no_qemu
    )
    point = json.loads(done.stdout)["point"]
    assert point["kind"] == "image"

    image = tmp_path / "vm.qcow2"
    image.write_bytes(header(b"QFI\xfb" + struct.pack(">I", 3)))
    refused = run_cli(
        "backup", "image", str(image), "--asset", "vm2", data_dir=data_dir, env=no_qemu, check=False
    )
    message = refused.stderr.decode()
    assert refused.returncode != 0
    assert "qcow2" in message and "apt-get install qemu-utils" in message, message
