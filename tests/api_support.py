"""Helpers of the service tests: a live uvicorn on 127.0.0.1, a movable clock, API clients.

The app runs in-process under a real uvicorn (on a free loopback port, in a thread), so tests
exercise real HTTP (cookies, streaming, server-sent events) and can still reach into the app
(its clock, its job kinds).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.settings import Settings

ADMIN = ("admin", "admin-password-1")
PASSWORDS = {"admin": ADMIN[1], "operator": "operator-password-1", "viewer": "viewer-password-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MovableClock:
    """Wall-clock time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class LiveServer:
    app: FastAPI
    url: str
    clock: MovableClock
    settings: Settings
    thread: threading.Thread
    server: uvicorn.Server
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def as_role(self, role: str) -> httpx.Client:
        """A client authenticated with an API token of the user named like ``role``."""
        return self.client(headers={"Authorization": f"Bearer {self.tokens[role]}"})

    @property
    def service(self) -> Any:
        return self.app.state.service

    def setup_body(self, name: str, password: str) -> dict[str, str]:
        """The first-run request, with the set-up code the service printed (every client must
        present it, loopback included)."""
        return setup_body(self.settings.data_dir, name, password)


def setup_body(data_dir: Path, name: str, password: str) -> dict[str, str]:
    """A first-run request carrying the set-up code from ``<data>/secrets/setup-code``."""
    code = (Path(data_dir) / "secrets" / "setup-code").read_text().strip()
    return {"name": name, "password": password, "setup_code": code}


@contextlib.contextmanager
def live_server(settings: Settings, clock: MovableClock | None = None) -> Iterator[LiveServer]:
    clock = clock or MovableClock()
    app = create_app(settings, clock=clock)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(app, f"http://127.0.0.1:{port}", clock, settings, thread, server)
    finally:
        server.should_exit = True
        thread.join(60)


def service_settings(data_dir: os.PathLike[str] | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "tls": False,
        "host": "127.0.0.1",
        "scheduler_enabled": False,
        "passphrase": "correct horse battery staple",
    }
    values.update(overrides)
    return Settings(**values)


def weak_kdf_env(monkeypatch: pytest.MonkeyPatch, keep: tuple[str, ...] = ()) -> None:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    for name in list(os.environ):
        if name.startswith("APPLIANCE_") and name not in ("APPLIANCE_TEST_WEAK_KDF", *keep):
            monkeypatch.delenv(name)


@contextlib.contextmanager
def bootstrapped_server(
    root: Path, *, keep_env: tuple[str, ...] = (), **overrides: Any
) -> Iterator[LiveServer]:
    """A live service on ``root/data`` with an admin, an operator and a viewer (and a token
    each), the environment cleared of ``APPLIANCE_*`` settings but ``keep_env``; the tests'
    modules wrap it in their module-scoped ``server`` fixture (role clients: conftest.py)."""
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp, keep=keep_env)
        with live_server(service_settings(root / "data", **overrides)) as live:
            bootstrap_accounts(live)
            yield live


def bootstrap_accounts(server: LiveServer) -> None:
    """Create the first admin, an operator and a viewer, and an API token for each."""
    with server.client() as c:
        r = c.post("/api/setup", json=server.setup_body(*ADMIN))
        assert r.status_code == 201, r.text
        admin = c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
        csrf = admin.json()["csrf_token"]
        headers = {"X-CSRF-Token": csrf}
        for role in ("operator", "viewer"):
            r = c.post(
                "/api/users",
                json={"name": role, "role": role, "password": PASSWORDS[role]},
                headers=headers,
            )
            assert r.status_code == 201, r.text
        for role in ("admin", "operator", "viewer"):
            r = c.post("/api/tokens", json={"user": role}, headers=headers)
            assert r.status_code == 201, r.text
            server.tokens[role] = r.json()["token"]


def login(client: httpx.Client, name: str, password: str) -> str:
    """Sign ``client`` in (cookies kept by the client); returns the CSRF token."""
    r = client.post("/api/login", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf_token"])


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']}: {job}")
        time.sleep(0.05)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream."""
    kind, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
