"""Upgrades for real: bundles built from this checkout, releases in real virtual environments,
the real service started from ``<root>/opt/appliance/current`` and restarted by the upgrade.

Dependency wheels are built once into ``/tmp/appliance-test-wheelhouse-<pyproject hash>`` (kept
across runs; the first build reaches the package index); each version's project wheel is built
again. Three bundles: ``0.1.0+t1`` (installed first), ``0.1.0+t2``, and ``0.1.0+broken``, whose
``/api/health`` answers 503, so its upgrade must roll back by itself.

The health check is the one the box uses (:func:`image.appliance_os.upgrade.https_health`):
HTTPS to 127.0.0.1, verified against the certificate the service generated in its data dir.
The upgrade and rollback times are printed (``-s``) for docs/appliance-os.md.

The fast tests (not ``slow``) drive :func:`apply_update` with tiny hand-made bundles (real venvs,
a one-module wheel) and a restart/health pair the test controls, for the paths the real service
cannot be made to take on demand: a restart that fails, a catalog the new release changed, a
second upgrade at once, a rollback by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_support import ADMIN, free_port, setup_body
from test_os_releases import make_bundle

from api.tls import ensure_certificate
from appliance.errors import Conflict
from image.appliance_os import upgrade
from image.appliance_os.bundle import IGNORED, build_bundle
from image.appliance_os.layout import Layout
from image.appliance_os.releases import install_release, switch_to
from image.appliance_os.upgrade import (
    FAILED,
    ROLLED_BACK,
    UPGRADED,
    apply_update,
    https_health,
    read_state,
    roll_back_by_hand,
    upgrade_lock,
)

REPO = Path(__file__).resolve().parent.parent
V1, V2, BROKEN = "0.1.0+t1", "0.1.0+t2", "0.1.0+broken"
HEALTH_LINE = 'return HealthPublic(status="ok", version=_version())'


def wheelhouse(source: Path) -> Path:
    """Dependency wheels kept across runs, for as long as the dependencies stay the same."""
    digest = hashlib.sha256((source / "pyproject.toml").read_bytes()).hexdigest()[:12]
    return Path(f"/tmp/appliance-test-wheelhouse-{digest}")


def _source_copy(target: Path) -> Path:
    # A copy without .git: the bundle takes the tree as it is, uncommitted changes included.
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*IGNORED))
    return target


@dataclass
class Bundles:
    v1: Path
    v2: Path
    broken: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    work = tmp_path_factory.mktemp("bundles")
    good = _source_copy(work / "src")
    broken = _source_copy(work / "src-broken")
    auth = broken / "api" / "routers" / "auth.py"
    text = auth.read_text()
    assert HEALTH_LINE in text, "the health route changed; update the broken build's patch"
    text = text.replace(HEALTH_LINE, 'raise HTTPException(503, "broken on purpose")')
    text = text.replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nfrom fastapi import HTTPException\n",
        1,
    )
    auth.write_text(text)
    python = Path(sys.executable)
    made = {}
    for name, source, version in (("v1", good, V1), ("v2", good, V2), ("broken", broken, BROKEN)):
        start = time.monotonic()
        made[name] = build_bundle(
            source,
            work / f"{name}.tar",
            version=version,
            python=python,
            wheelhouse=wheelhouse(source),
        )
        print(f"bundle {version}: {time.monotonic() - start:.1f} s")
    return Bundles(**made)


class ServiceProcess:
    """``<root>/opt/appliance/current/venv/bin/appliance serve``, as the unit runs it."""

    def __init__(self, layout: Layout, log: Path) -> None:
        self.layout = layout
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def cert(self) -> Path:
        return self.layout.data / "tls" / "cert.pem"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            APPLIANCE_DATA_DIR=str(self.layout.data),
            APPLIANCE_HOST="127.0.0.1",
            APPLIANCE_PORT=str(self.port),
            APPLIANCE_SCHEDULER_ENABLED="0",
            APPLIANCE_DEVICE_MONITOR="0",
            APPLIANCE_TEST_WEAK_KDF="1",
        )
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self) -> None:
        program = self.layout.current / "venv" / "bin" / "appliance"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(program), "serve"],
                env=self.env(),
                cwd=self.layout.root,  # not the checkout: its metadata would shadow the release's
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Workers of the group must not outlive it (the port, the catalog).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.port}",
            verify=ssl.create_default_context(cafile=str(self.cert)),
        )

    def wait_version(self, version: str, timeout: float = 120) -> None:
        check = https_health(self.port, self.cert)
        deadline = time.monotonic() + timeout
        while not check(version):
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no {version} in time:\n{self.log.read_text()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def box(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("box")
    layout = Layout(root)
    layout.data.mkdir(parents=True)
    switch_to(layout, install_release(layout, bundles.v1, python=Path(sys.executable)))
    service = ServiceProcess(layout, root / "service.log")
    service.start()
    try:
        service.wait_version(V1)
        with service.client() as c:
            r = c.post("/api/setup", json=setup_body(layout.data, *ADMIN))
            assert r.status_code == 201, r.text
        yield service
    finally:
        service.stop()


def _signs_in(service: ServiceProcess) -> bool:
    with service.client() as c:
        r = c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
        return r.status_code == 200


@pytest.mark.slow
def test_a_broken_release_rolls_back_by_itself(box: ServiceProcess, bundles: Bundles) -> None:
    layout = box.layout
    result = apply_update(
        layout,
        bundles.broken,
        restart=box.restart,
        health=https_health(box.port, box.cert),
        health_timeout=20,
        python=Path(sys.executable),
    )
    print(
        f"\nbroken upgrade: {result.seconds:.1f} s in all (20 s of it waiting for health), "
        f"rollback {result.rollback_seconds:.1f} s"
    )
    assert result.outcome == ROLLED_BACK, result
    assert "did not answer /api/health" in (result.reason or "")
    assert layout.current_version() == V1
    box.wait_version(V1, timeout=5)
    assert _signs_in(box)
    last = read_state(layout.data)["history"][0]
    assert last["outcome"] == "rolled back" and last["to_version"] == BROKEN
    names = [s["name"] for s in last["steps"]]
    assert names[-4:] == [
        "switch back",
        "restore the catalog",
        "restart the previous release",
        "health check of the previous release",
    ]
    assert all(s["state"] == "done" for s in last["steps"][-4:])


@pytest.mark.slow
def test_upgrade_keeps_data_and_settings(
    box: ServiceProcess, bundles: Bundles, tmp_path: Path
) -> None:
    layout = box.layout
    with box.client() as c:
        c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
    result = apply_update(
        layout,
        bundles.v2,
        restart=box.restart,
        health=https_health(box.port, box.cert),
        health_timeout=120,
        python=Path(sys.executable),
    )
    state = read_state(layout.data)["history"][0]
    steps = {s["name"]: s["seconds"] for s in state["steps"]}
    print(f"\nupgrade {V1} -> {V2}: {result.seconds:.1f} s; steps: {steps}")
    assert result.outcome == UPGRADED, result
    assert layout.current_version() == V2
    assert layout.previous_version() == V1
    box.wait_version(V2, timeout=5)
    other = tmp_path / "other"
    other.mkdir()
    ensure_certificate(other / "cert.pem", other / "key.pem")
    assert not https_health(box.port, other / "cert.pem")(V2)  # the check pins the certificate
    assert _signs_in(box)  # the admin made under v1
    assert result.catalog_backup is not None and result.catalog_backup.is_file()
    assert result.catalog_backup.name.startswith(f"catalog-{V1}-")
    with sqlite3.connect(result.catalog_backup) as copy:
        users = [row[0] for row in copy.execute("SELECT name FROM users")]
    assert ADMIN[0] in users
    assert state["outcome"] == "upgraded" and all(s["state"] == "done" for s in state["steps"])


# --- fast: the upgrade's steps with a restart and health the test controls -------------------


class FakeService:
    """Records restarts; answers health with the version ``current`` points to, unless broken."""

    def __init__(self, layout: Layout, broken: frozenset[str] = frozenset()) -> None:
        self.layout = layout
        self.broken = broken
        self.restarts: list[str | None] = []

    def restart(self) -> None:
        running = self.layout.current_version()
        self.restarts.append(running)
        if running in self.broken:
            # What a new release may do before it fails: migrate the catalog.
            with sqlite3.connect(self.layout.data / "catalog.sqlite") as db:
                db.execute("UPDATE notes SET text = 'migrated by the new release'")
            raise RuntimeError(f"{running} failed to start")

    def health(self, version: str) -> bool:
        return self.layout.current_version() == version and version not in self.broken


@pytest.fixture
def small_box(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "root")
    layout.data.mkdir(parents=True)
    with sqlite3.connect(layout.data / "catalog.sqlite") as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('made by 1.0')")
    switch_to(
        layout,
        install_release(
            layout, make_bundle(tmp_path / "1.tar", "1.0"), python=Path(sys.executable)
        ),
    )
    return layout


def _notes(layout: Layout) -> list[str]:
    with sqlite3.connect(layout.data / "catalog.sqlite") as db:
        return [row[0] for row in db.execute("SELECT text FROM notes")]


def test_a_failed_restart_rolls_back_and_restores_the_catalog(
    small_box: Layout, tmp_path: Path
) -> None:
    fake = FakeService(small_box, broken=frozenset({"2.0"}))
    result = apply_update(
        small_box,
        make_bundle(tmp_path / "2.tar", "2.0"),
        restart=fake.restart,
        health=fake.health,
        health_timeout=1,
        sleep=lambda s: None,
        python=Path(sys.executable),
    )
    assert result.outcome == ROLLED_BACK
    assert result.reason is not None and "2.0 failed to start" in result.reason
    assert fake.restarts == ["2.0", "1.0"]
    assert small_box.current_version() == "1.0"
    assert _notes(small_box) == ["made by 1.0"]  # the new release's migration was undone
    assert result.catalog_backup is not None and result.catalog_backup.parent == (
        small_box.data / "upgrades"
    )
    state = read_state(small_box.data)
    assert state["running"] is False and state["current"] is None
    assert state["history"][0]["outcome"] == "rolled back"


def test_a_bad_bundle_fails_before_anything_changes(small_box: Layout, tmp_path: Path) -> None:
    fake = FakeService(small_box)
    bad = make_bundle(tmp_path / "bad.tar", "2.0", extra={"wheels/../../x.whl": b"x"})
    result = apply_update(small_box, bad, restart=fake.restart, health=fake.health)
    assert result.outcome == FAILED
    assert "without '..'" in (result.reason or "")
    assert fake.restarts == [] and small_box.current_version() == "1.0"
    steps = read_state(small_box.data)["history"][0]["steps"]
    assert [(s["name"], s["state"]) for s in steps] == [("validate", "failed")]
    same = apply_update(small_box, tmp_path / "1.tar", restart=fake.restart, health=fake.health)
    assert same.outcome == FAILED and "is the one running already" in (same.reason or "")


def test_one_upgrade_at_a_time(small_box: Layout, tmp_path: Path) -> None:
    fake = FakeService(small_box)
    with upgrade_lock(small_box.data), pytest.raises(Conflict, match="already running"):
        apply_update(small_box, tmp_path / "1.tar", restart=fake.restart, health=fake.health)


def test_an_interrupted_upgrade_reads_as_interrupted(small_box: Layout) -> None:
    state = upgrade.empty_state()
    state["current"] = {"outcome": "running", "steps": []}
    upgrade.write_state(small_box.data, state)
    seen = read_state(small_box.data)
    assert seen["running"] is False
    assert seen["current"]["outcome"] == "interrupted"


def test_upgrade_then_roll_back_by_hand(small_box: Layout, tmp_path: Path) -> None:
    fake = FakeService(small_box)
    python = Path(sys.executable)
    result = apply_update(
        small_box,
        make_bundle(tmp_path / "2.tar", "2.0"),
        restart=fake.restart,
        health=fake.health,
        python=python,
    )
    assert result.outcome == UPGRADED
    assert (small_box.current_version(), small_box.previous_version()) == ("2.0", "1.0")
    with sqlite3.connect(small_box.data / "catalog.sqlite") as db:
        db.execute("UPDATE notes SET text = 'migrated by 2.0'")
    back = roll_back_by_hand(small_box, restart=fake.restart, health=fake.health)
    assert back.outcome == ROLLED_BACK, back
    assert small_box.current_version() == "1.0"
    assert _notes(small_box) == ["made by 1.0"]
    assert [a["outcome"] for a in read_state(small_box.data)["history"]] == [
        "rolled back",
        "upgraded",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "image.appliance_os.upgrade",
            "--root",
            str(small_box.root),
            "status",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    status = json.loads(out.stdout)
    assert status["current_release"] == "1.0" and status["previous_release"] == "2.0"
    assert status["history"][0]["outcome"] == "rolled back"
