"""A failed-over test guest for the console tests, and a minimal RFB (VNC) client.

The guest is registered as a VM asset through the API, backed up and failed over isolated; the
tests then reach its console through the service's WebSocket relay. :class:`RfbClient` speaks
just enough RFB 3.8 over that WebSocket (version, security "None", init, key events) to prove
that a key reaches the guest, which echoes it on its serial console (``key: k``).
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from api_support import LiveServer, bootstrapped_server, wait_job
from guest_support import guest_image_path
from websockets.sync.client import ClientConnection

from image.testguest import MARKER, copy_sparse

ASSET = "web"
VM = {"name": "web", "memory_mib": 256, "vcpus": 1, "disks": [{"name": "web", "bus": "virtio"}]}
PROOF = {"serial": MARKER, "timeout": 150}
#: Generous: a TCG boot takes ~6 s on a quiet machine and several times that on a loaded one.
BOOT_TIMEOUT = 240.0


def register_guest(
    admin: httpx.Client,
    operator: httpx.Client,
    guest_image: str,
    root: Path,
    *,
    proof: dict[str, Any] | None = None,
) -> str:
    """The test guest as VM asset ``web`` with one full backup; returns the point's id."""
    disk = root / "web.raw"
    copy_sparse(guest_image, str(disk))
    spec = root / "web.json"
    spec.write_text(json.dumps(VM))
    r = admin.post(
        "/api/assets",
        json={"name": ASSET, "kind": "vm", "disks": [str(disk)], "vm_spec": str(spec)},
    )
    assert r.status_code == 201, r.text
    r = admin.put(
        f"/api/assets/{ASSET}/failover-settings",
        json={"proof": proof or PROOF, "network": {"mode": "isolated"}},
    )
    assert r.status_code == 200, r.text
    r = operator.post(f"/api/assets/{ASSET}/backup", json={"mode": "full"})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"], timeout=300)
    assert job["state"] == "succeeded", job
    return str(job["result"]["point"])


def fail_over(operator: httpx.Client) -> dict[str, Any]:
    """Fail the guest over and wait until its boot is proven; the running session."""
    r = operator.post(f"/api/assets/{ASSET}/failover", json={})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"], timeout=BOOT_TIMEOUT)
    assert job["state"] == "succeeded", job
    session = operator.get(f"/api/failover/{job['result']['session']}").json()
    assert session["state"] == "running" and session["live"], session
    return dict(session)


def stop(operator: httpx.Client, session_id: str) -> None:
    r = operator.post(f"/api/failover/{session_id}/stop", json={"discard": True})
    assert r.status_code == 202, r.text
    assert wait_job(operator, r.json()["id"], timeout=120)["state"] == "succeeded"


@contextlib.contextmanager
def console_server(root: Path) -> Iterator[LiveServer]:
    """A service for the console tests (the test guest's cache is kept from the environment)."""
    with bootstrapped_server(root, keep_env=("APPLIANCE_TEST_GUEST_CACHE",)) as live:
        yield live


@contextlib.contextmanager
def running_guest(
    admin: httpx.Client, operator: httpx.Client, root: Path
) -> Iterator[dict[str, Any]]:
    """The test guest registered, backed up and failed over; stopped on leaving if it runs."""
    register_guest(admin, operator, guest_image_path(), root)
    running = fail_over(operator)
    yield running
    if operator.get(f"/api/failover/{running['id']}").json()["state"] == "running":
        stop(operator, running["id"])


def wait_serial(client: httpx.Client, session_id: str, text: str, timeout: float = 60.0) -> str:
    """The serial console once it shows ``text`` (fails with its tail otherwise)."""
    deadline = time.monotonic() + timeout
    serial = ""
    while time.monotonic() < deadline:
        serial = client.get(f"/api/failover/{session_id}/serial").text
        if text in serial:
            return serial
        time.sleep(0.3)
    raise AssertionError(f"the serial console never showed {text!r}: ...{serial[-400:]!r}")


class RfbClient:
    """The client side of RFB 3.8 over a WebSocket of binary frames (no authentication)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    def read(self, n: int, timeout: float = 30.0) -> bytes:
        while len(self.buffer) < n:
            frame = self.ws.recv(timeout=timeout)
            assert isinstance(frame, bytes), f"a text frame on a binary console: {frame!r}"
            self.buffer += frame
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def handshake(self) -> tuple[int, int]:
        """Version, security None, shared init; returns the screen's width and height."""
        version = self.read(12)
        assert version.startswith(b"RFB 003."), version
        self.ws.send(b"RFB 003.008\n")
        (count,) = struct.unpack("B", self.read(1))
        types = self.read(count)
        assert 1 in types, f"QEMU's VNC asks for authentication: {types!r}"
        self.ws.send(b"\x01")
        assert self.read(4) == b"\0\0\0\0", "security handshake failed"
        self.ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", self.read(4))
        self.read(16)  # pixel format
        (name_length,) = struct.unpack(">I", self.read(4))
        self.read(name_length)
        return width, height

    def key(self, keysym: int) -> None:
        """Press and release one key (an X11 keysym: ASCII letters are their code)."""
        for down in (1, 0):
            self.ws.send(struct.pack(">BBxxI", 4, down, keysym))
