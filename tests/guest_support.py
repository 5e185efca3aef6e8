"""The busybox test guest for tests that boot a VM under real QEMU (TCG here).

Shared by the failover tests and the scheduled boot verification tests: the guest image (built
once and cached by content hash, :func:`image.testguest.build_test_guest`), its VM definition and
the boot proof that fits it. Missing QEMU tools FAIL (never skip) with the install step.
The USB probe guest (:func:`usb_probe_guest`) is the same kernel with udev and the USB disk
drivers, for the tests of what udev says about a USB disk.
"""

from __future__ import annotations

import contextlib
import shutil
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JobRunner
from image.failover import FailoverManager, register_failover_jobs
from image.probe_guest import PACKAGES as PROBE_PACKAGES
from image.probe_guest import QEMU, ProbeGuest, build_probe_guest
from image.testguest import MARKER, build_test_guest

#: The guest's VM definition, as recorded with its backups.
VM: dict[str, Any] = {
    "name": "web",
    "memory_mib": 256,
    "vcpus": 1,
    "disks": [{"name": "web", "bus": "virtio"}],
}
#: Its boot proof: the serial marker and the health page on guest port 80.
PROOF: dict[str, Any] = {"serial": MARKER, "http_port": 80, "http_expect": "OK", "timeout": 120}


def guest_image_path() -> str:
    """The cached guest disk image (raw); fails the test when QEMU's tools are missing."""
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "qemu-nbd") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run scripts/setup "
            "(apt-get install -y qemu-system-x86 qemu-utils)",
            pytrace=False,
        )
    return build_test_guest()


@contextlib.contextmanager
def failover_jobs(app: Appliance) -> Iterator[tuple[FailoverManager, JobRunner]]:
    """A failover manager under TCG with its job kinds and a running job runner for ``app``;
    both stopped on leaving (``app`` is the caller's to close)."""
    manager = FailoverManager(app, accel="tcg")
    runner = JobRunner(app)
    register_failover_jobs(manager)
    runner.start()
    try:
        yield manager, runner
    finally:
        runner.shutdown()
        manager.shutdown(grace=2)


def fetch(port: int) -> str:
    """The page a guest serves on ``port`` of 127.0.0.1 (a forward)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return str(response.read().decode())


def usb_probe_guest() -> ProbeGuest:
    """The USB probe guest (:mod:`image.probe_guest`: the Debian kernel, busybox, udev), built
    once and cached; fails the test, with the install step, when QEMU or a package it is built
    from is missing."""
    if not shutil.which(QEMU):
        pytest.fail(
            f"{QEMU} missing: run scripts/setup (apt-get install -y qemu-system-x86)",
            pytrace=False,
        )
    try:
        return build_probe_guest()
    except InvalidInput as exc:
        pytest.fail(
            f"cannot build the USB probe guest: {exc.message} "
            f"(scripts/setup installs {PROBE_PACKAGES})",
            pytrace=False,
        )
