"""`appliance serve` as a real process: crash and stop it mid-backup, start it again.

The service runs as the user would start it (the console script, plain HTTP on 127.0.0.1 and a
free port, no passphrase configured so it generates one). A backup of a 1 GiB incompressible
tree takes a few seconds, long enough to stop the service in the middle of it:

- SIGKILL (a crash; the whole process group, as systemd or a power cut would): the job is left
  ``running`` in the catalog; the next start marks it ``interrupted`` and re-queues it, it
  resumes, and the point it makes restores byte-exact.
- SIGTERM (a graceful stop): the service exits by itself, the job ends ``interrupted``, and the
  next start resumes it.

Plus TLS: the certificate generated on first start serves HTTPS, and plain HTTP on a
non-loopback address is refused.
"""

from __future__ import annotations

import hashlib
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import free_port, setup_body

from appliance.catalog import Catalog

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / ".venv" / "bin" / "appliance")
TREE_FILES = 128
FILE_SIZE = 8 * 1024 * 1024  # 1 GiB in all
TOTAL = TREE_FILES * FILE_SIZE


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_TEST_WEAK_KDF"] = "1"
    return env


class Service:
    """One `appliance serve` process (its own process group)."""

    def __init__(self, data_dir: Path, log: Path, *extra: str, tls: bool = False) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        args = [CLI, "--data-dir", str(data_dir), "serve", "--port", str(self.port)]
        args += ["--no-scheduler", *(() if tls else ("--no-tls",)), *extra]
        self.log = log
        self.out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=_env(), stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, verify: Any = False, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/health", verify=verify, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service not ready:\n{self.log.read_text()}")

    def kill(self) -> None:
        """A crash: SIGKILL to the service's process group (the service and its workers)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.out.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.out.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
        deadline = time.monotonic() + 30
        while True:  # wait until no process of the group is left
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError("processes of the service outlived it")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 1 GiB incompressible tree; returns {relative path: sha256}."""
    root = tmp_path_factory.mktemp("big") / "src"
    digests = {}
    for i in range(TREE_FILES):
        folder = root / f"d{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        data = os.urandom(FILE_SIZE)
        (folder / f"f{i:03d}.bin").write_bytes(data)
        digests[f"d{i % 8}/f{i:03d}.bin"] = hashlib.sha256(data).hexdigest()
    digests["__root__"] = str(root)
    return digests


def _client(service: Service, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=service.url, headers=headers, timeout=60)


def _bootstrap(service: Service, source: str) -> str:
    """First admin, an API token, and the asset; returns the token."""
    with _client(service) as c:
        assert (
            c.post(
                "/api/setup", json=setup_body(service.data_dir, "admin", "password-123")
            ).status_code
            == 201
        )
        csrf = c.post("/api/login", json={"name": "admin", "password": "password-123"}).json()[
            "csrf_token"
        ]
        token = c.post("/api/tokens", json={}, headers={"X-CSRF-Token": csrf}).json()["token"]
    with _client(service, token) as c:
        r = c.post("/api/assets", json={"name": "big", "kind": "files", "path": source})
        assert r.status_code == 201, r.text
    return str(token)


def _start_backup_and_wait_midway(service: Service, token: str) -> str:
    with _client(service, token) as c:
        job_id = str(c.post("/api/assets/big/backup", json={"mode": "full"}).json()["id"])
        deadline = time.monotonic() + 120
        while True:
            job = c.get(f"/api/jobs/{job_id}").json()
            done = job["progress"].get("bytes_done", 0)
            assert job["state"] in ("queued", "running"), job
            if job["state"] == "running" and done >= TOTAL // 8:
                assert done < TOTAL * 3 // 4, f"the backup ran too fast to stop midway: {job}"
                return job_id
            assert time.monotonic() < deadline, job
            time.sleep(0.05)


def _wait_done(c: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        job = c.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _restored_digests(c: httpx.Client, point: str, target: Path) -> dict[str, str]:
    """Restore ``point`` into the restore area as ``target``'s name; digests of its files."""
    area = Path(c.get(f"/api/points/{point}/restore-targets").json()["areas"][0])
    target = area / target.name
    r = c.post(f"/api/points/{point}/restore", json={"target": str(target)})
    assert r.status_code == 202, r.text
    assert _wait_done(c, r.json()["id"])["state"] == "succeeded"
    out = {}
    for path in sorted(target.rglob("*.bin")):
        out[str(path.relative_to(target))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _expected(tree: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tree.items() if k != "__root__"}


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


def test_crash_mid_backup_then_the_job_resumes(
    tree: dict[str, str], tmp_path: Path, services: list[Service]
) -> None:
    data, log = tmp_path / "data", tmp_path / "service.log"
    first = Service(data, log)
    services.append(first)
    first.wait_ready()
    assert (data / "secrets" / "passphrase").stat().st_mode & 0o777 == 0o600
    token = _bootstrap(first, tree["__root__"])
    job_id = _start_backup_and_wait_midway(first, token)
    first.kill()

    with Catalog.open(f"sqlite:///{data / 'catalog.sqlite'}") as catalog:
        assert catalog.get_job(job_id).state == "running"  # as the crash left it
        assert catalog.list_points(asset="big") == []

    second = Service(data, log)
    services.append(second)
    second.wait_ready()
    with _client(second, token) as c:
        job = _wait_done(c, job_id)
        assert job["state"] == "succeeded", job
        messages = [line["message"] for line in c.get(f"/api/jobs/{job_id}/log").json()]
        interrupted = next(i for i, m in enumerate(messages) if m.startswith("interrupted"))
        resumed = messages.index("re-queued after the interruption")
        assert interrupted < resumed < len(messages) - 1
        points = c.get("/api/points", params={"asset": "big"}).json()
        assert [p["id"] for p in points] == [job["result"]["point"]]
        assert _restored_digests(c, job["result"]["point"], tmp_path / "restored") == _expected(
            tree
        )
    assert "resuming 1 interrupted job(s)" in log.read_text()


def test_graceful_stop_mid_backup_interrupts_and_resumes(
    tree: dict[str, str], tmp_path: Path, services: list[Service]
) -> None:
    data, log = tmp_path / "data", tmp_path / "service.log"
    first = Service(data, log)
    services.append(first)
    first.wait_ready()
    token = _bootstrap(first, tree["__root__"])
    job_id = _start_backup_and_wait_midway(first, token)
    started = time.monotonic()
    # uvicorn shuts down gracefully, then re-raises the signal (systemd counts that as clean).
    assert first.terminate() in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 30
    with Catalog.open(f"sqlite:///{data / 'catalog.sqlite'}") as catalog:
        assert catalog.get_job(job_id).state == "interrupted"
        log_lines = [line.message for line in catalog.job_log(job_id)]
        assert any("resumes on the next start" in m for m in log_lines), log_lines

    second = Service(data, log)
    services.append(second)
    second.wait_ready()
    with _client(second, token) as c:
        job = _wait_done(c, job_id)
        assert job["state"] == "succeeded", job
        assert _restored_digests(c, job["result"]["point"], tmp_path / "restored") == _expected(
            tree
        )


def test_tls_with_a_generated_certificate(tmp_path: Path, services: list[Service]) -> None:
    data = tmp_path / "data"
    service = Service(data, tmp_path / "service.log", tls=True)
    services.append(service)
    cert, key = data / "tls" / "cert.pem", data / "tls" / "key.pem"
    deadline = time.monotonic() + 60
    while not cert.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    context = ssl.create_default_context(cafile=str(cert))
    service.wait_ready(verify=context)
    assert key.stat().st_mode & 0o777 == 0o600
    with httpx.Client(base_url=service.url, verify=context) as c:
        assert c.get("/api/health").json()["status"] == "ok"
        c.post("/api/setup", json=setup_body(service.data_dir, "admin", "password-123"))
        r = c.post("/api/login", json={"name": "admin", "password": "password-123"})
        assert r.status_code == 200
        assert all("Secure" in cookie for cookie in r.headers.get_list("set-cookie"))
    # The certificate names localhost as well as 127.0.0.1.
    context.check_hostname = True
    with httpx.Client(verify=context) as c:
        assert c.get(f"https://localhost:{service.port}/api/health").status_code == 200


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    result = subprocess.run(
        [CLI, "--data-dir", str(tmp_path / "d"), "serve", "--no-tls", "--host", "0.0.0.0"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "plain HTTP is allowed only on a loopback address" in result.stderr
    assert not (tmp_path / "d").exists()


def test_admin_create_from_the_command_line(tmp_path: Path) -> None:
    env = {**_env(), "APPLIANCE_ADMIN_PASSWORD": "from-the-cli-1"}
    data = tmp_path / "data"
    created = subprocess.run(
        [CLI, "--data-dir", str(data), "admin", "create", "--name", "root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    again = subprocess.run(
        [CLI, "--data-dir", str(data), "admin", "create", "--name", "root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    with Catalog.open(f"sqlite:///{data / 'catalog.sqlite'}") as catalog:
        user = catalog.get_user("root")
    assert user.role == "admin" and user.password_hash.startswith("$argon2id$")
    helped = subprocess.run([CLI, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert "serve" in helped.stdout and "admin" in helped.stdout
