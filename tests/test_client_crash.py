"""kill -9 of the appliance while a backup client uploads: the client keeps retrying, the
restarted service reloads the upload session from its folder, the point is whole and the store
verifies. The service runs as the user starts it (`appliance serve --tls`, its own process
group); the client runs in this process as a host would run it."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import free_port
from test_service_restart import Service

from api.identity import certificate_fingerprint
from appliance.client import cli, wire
from appliance.client.backup import BackupRequest, run_backup
from appliance.client.blockdev import ImageRequest, run_image_backup

pytestmark = pytest.mark.slow


def _start(data: Path, log: Path, port: int) -> Service:
    """The service on ``port`` (a restart must answer where the client is pinned to)."""
    import test_service_restart as restart

    chosen = restart.free_port
    restart.free_port = lambda: port  # type: ignore[assignment]
    try:
        service = Service(data, log, tls=True)
    finally:
        restart.free_port = chosen
    return service


@pytest.mark.parametrize("kind", ["files", "image"])
def test_the_service_killed_mid_upload_resumes_the_session(tmp_path: Path, kind: str) -> None:
    """Folders, and a disk sent as a block device (``--image``: a raw file here)."""
    tree = tmp_path / "src"
    tree.mkdir()
    digests = {}
    for n in range(24):
        data = os.urandom(8 * 1024 * 1024)
        (tree / f"f{n:02d}.bin").write_bytes(data)
        digests[f"f{n:02d}.bin"] = hashlib.sha256(data).hexdigest()
    disk = tmp_path / "disk.raw"
    if kind == "image":
        with open(disk, "wb") as f:
            for n in range(24):
                f.write((tree / f"f{n:02d}.bin").read_bytes())
    data_dir, log = tmp_path / "data", tmp_path / "service.log"
    port = free_port()
    first = _start(data_dir, log, port)
    services = [first]
    try:
        first.wait_ready()
        # _bootstrap speaks plain HTTP; this service is HTTPS with its own certificate.
        cert = (data_dir / "tls" / "cert.pem").read_text()
        first.url = f"https://127.0.0.1:{port}"
        token = _admin_token(first.url, data_dir, cert)
        with httpx.Client(base_url=first.url, verify=False, timeout=60) as c:
            r = c.post(
                "/api/hosts",
                json={"name": "web9", "kind": "client", "disks": kind == "image"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
            host_token = r.json()["token"]
        config = tmp_path / "client.json"
        fingerprint = certificate_fingerprint(data_dir / "tls" / "cert.pem")
        assert (
            cli.main(
                [
                    *("--config", str(config), "enroll", "--server", first.url),
                    *("--fingerprint", fingerprint, "--token", host_token),
                ]
            )
            == 0
        )
        outcome: dict[str, Any] = {}

        def backup() -> None:
            conn = cli.connect(cli.load_config(str(config)), retry_for=180)
            try:
                state = str(tmp_path / "s")
                if kind == "image":
                    image = ImageRequest(
                        [str(disk)], "web9-disks", "web9", image_files=True, state_dir=state
                    )
                    outcome["result"] = run_image_backup(conn, image)
                else:
                    request = BackupRequest([str(tree)], "web9", "web9", state_dir=state)
                    outcome["result"] = run_backup(conn, request)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                conn.close()

        thread = threading.Thread(target=backup)
        thread.start()
        uploaded = _wait_uploaded(data_dir, 40)
        first.kill()
        acknowledged = uploaded.stat().st_size // wire.ID_SIZE
        second = _start(data_dir, log, port)
        services.append(second)
        thread.join(300)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome
        result = outcome["result"]
        assert result["retries"] >= 1
        # The files: about 8 FastCDC chunks per 8 MiB file. The disk: 128 disk chunks per 8 MiB,
        # each read and handed to the senders once (the batch cut off is sent again as a whole).
        total = 24 * 8 if kind == "files" else 24 * 128
        if kind == "files":
            assert result["chunks_new"] < total, "chunks acknowledged before the crash were resent"
        assert acknowledged > 0
        with httpx.Client(
            base_url=second.url,
            verify=False,
            timeout=60,
            headers={"Authorization": f"Bearer {token}"},
        ) as c:
            verify = c.post("/api/verify", json={})
            assert verify.status_code == 202, verify.text
            job = _wait(c, verify.json()["id"])
            assert job["state"] == "succeeded", job
            point = c.get(f"/api/points/{result['point']}").json()
            if kind == "image":
                assert point["kind"] == "image" and point["asset"] == "web9-disks"
                assert result["chunks_new"] + result["chunks_known"] == total
                return
            r = c.get(f"/api/points/{result['point']}/download", params={"path": "f07.bin"})
            assert hashlib.sha256(r.content).hexdigest() == digests["f07.bin"]
            files = c.get(f"/api/points/{result['point']}/files").json()
            assert len(files["entries"]) == 24
    finally:
        for service in services:
            service.stop()


def _admin_token(url: str, data_dir: Path, cert: str) -> str:
    from api_support import setup_body

    with httpx.Client(base_url=url, verify=False, timeout=60) as c:
        assert (
            c.post("/api/setup", json=setup_body(data_dir, "admin", "password-123")).status_code
            == 201
        )
        csrf = c.post("/api/login", json={"name": "admin", "password": "password-123"}).json()[
            "csrf_token"
        ]
        return str(c.post("/api/tokens", json={}, headers={"X-CSRF-Token": csrf}).json()["token"])


def _wait_uploaded(data_dir: Path, ids: int) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in (data_dir / "ingest").glob("*/uploaded"):
            if path.stat().st_size >= ids * wire.ID_SIZE:
                return path
        time.sleep(0.02)
    raise AssertionError("the client uploaded nothing within 120 s")


def _wait(c: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        job: dict[str, Any] = c.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
