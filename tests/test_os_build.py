"""The image build's decisions that need no mmdebstrap run: the packages lock, what
mmdebstrap is asked for, the file names. The build itself runs in test_os_image.py."""

from __future__ import annotations

import pytest

from image.appliance_os import build
from image.appliance_os.install import PACKAGES


def test_a_lock_round_trips_and_names_bad_lines() -> None:
    pins = build.parse_lock("# a comment\nzstd=1.5.4+dfsg2-5\n\npython3=3.11.2-1+b1  # inline\n")
    assert pins == {"zstd": "1.5.4+dfsg2-5", "python3": "3.11.2-1+b1"}
    assert build.parse_lock(build.render_lock(pins)) == pins
    assert build.render_lock(pins).splitlines()[0].startswith("python3=")  # sorted
    for bad in ("zstd", "=1.0", "zstd=", "zstd = 1.0"):
        with pytest.raises(build.BuildError, match="line 2"):
            build.parse_lock(f"a=1\n{bad}\n")


def test_differences_between_a_lock_and_a_build_are_named() -> None:
    wanted = {"a": "1", "b": "2", "c": "3"}
    got = {"a": "1", "b": "2.1", "d": "4"}
    assert build.lock_differences(wanted, got) == [
        "b: locked 2, built 2.1",
        "c: locked 3, built -",
        "d: locked -, built 4",
    ]
    assert build.lock_differences(wanted, dict(wanted)) == []


def test_mmdebstrap_gets_the_appliance_packages_or_exactly_the_locked_versions() -> None:
    unpinned = build.includes(None)
    assert set(PACKAGES) <= set(unpinned) and "linux-image-amd64" in unpinned
    assert "systemd-boot-efi" in unpinned  # disk.py takes the UEFI loader from the tree
    assert build.includes({"zstd": "1.5", "bash": "5.2"}) == ["bash=5.2", "zstd=1.5"]


def test_the_installer_esp_label_differs_from_the_system_one() -> None:
    # An installed box mounts LABEL=APPLIANCE as /boot/efi: the stick must not match it.
    assert build.INSTALLER_ESP_LABEL != build.ESP_LABEL
    assert len(build.INSTALLER_ESP_LABEL) <= 11  # FAT's limit
    assert "x-systemd.growfs" in build.SYSTEM_FSTAB
    assert build.disk_names("1.2.3") == {
        "raw": "appliance-1.2.3.img",
        "qcow2": "appliance-1.2.3.qcow2",
        "installer": "appliance-installer-1.2.3.img",
    }
