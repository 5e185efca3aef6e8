"""Recovering a lost appliance from its tapes through the API of a fresh one (api.tape_recovery):
a wrong key changes nothing; the right one makes the tapes' store the service's own, the scan
lists its points, a tape restore and a download give the bytes back; then it is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job
from engine_support import random_bytes, text_bytes
from tape_lost import Lost, lost_appliance

from api.tape_recovery import refusal
from appliance.store.crypto import MasterKey
from hardware.tape.library import register_library

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory) -> Lost:
    files = {"a/one.bin": random_bytes(700 * KiB, 7), "notes.txt": text_bytes(30 * KiB)}
    return lost_appliance(tmp_path_factory.mktemp("lost"), files, barcodes=("RCV001", "RCV002"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("fresh"), device_monitor=False) as live:
        yield live


def _register(admin: httpx.Client, lost: Lost) -> None:
    if not admin.get("/api/tape").json()["libraries"]:
        r = admin.post("/api/tape/libraries", json={"path": str(lost.library)})
        assert r.status_code == 201, r.text


def _wait_recovery(admin: httpx.Client, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = admin.get("/api/tape/recover")
        if r.status_code == 200 and r.json()["state"] in ("done", "failed"):
            return dict(r.json())
        assert r.status_code in (200, 503), r.text  # 503: restarting on the recovered store
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def _store_id(admin: httpx.Client) -> str:
    return str(admin.get("/api/recovery-key").json()["store_id"])


def test_only_an_admin_recovers_and_only_from_a_known_drive(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, lost: Lost
) -> None:
    _register(admin, lost)
    body = {"drive": lost.drive, "recovery_key": lost.recovery_key}
    assert operator.post("/api/tape/recover", json=body).status_code == 403
    assert operator.get("/api/tape/recover").status_code == 403
    r = admin.post("/api/tape/recover", json={**body, "drive": "virtual:nowhere-drive0"})
    assert r.status_code == 404, r.text
    key = lost.recovery_key
    typo = key[:2] + ("B" if key[2] != "B" else "C") + key[3:]
    r = admin.post("/api/tape/recover", json={**body, "recovery_key": typo})
    assert r.status_code == 400 and "typo" in r.json()["message"], r.text
    idle = admin.get("/api/tape/recover").json()
    assert idle["state"] == "idle" and idle["refusal"] is None


def test_a_wrong_key_fails_and_changes_nothing(
    server: LiveServer, admin: httpx.Client, lost: Lost
) -> None:
    _register(admin, lost)
    before = _store_id(admin)
    store = Path(server.service.app.data_dir.store_path)
    config = (store / "config").read_bytes()
    wrong = MasterKey.generate().recovery_key()
    r = admin.post("/api/tape/recover", json={"drive": lost.drive, "recovery_key": wrong})
    assert r.status_code == 202, r.text
    failed = _wait_recovery(admin)
    assert failed["state"] == "failed"
    assert f"does not unlock store {lost.store_id}" in failed["message"]
    assert _store_id(admin) == before
    assert (store / "config").read_bytes() == config
    assert not Path(f"{store}.recovering").exists()
    assert failed["refusal"] is None  # it may be tried again


def test_the_right_key_recovers_scans_and_restores(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, lost: Lost
) -> None:
    _register(admin, lost)
    empty = _store_id(admin)
    r = admin.post(
        "/api/tape/recover", json={"drive": lost.drive, "recovery_key": lost.recovery_key}
    )
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "reading"
    done = _wait_recovery(admin)
    assert done["state"] == "done", done
    assert done["store_id"] == lost.store_id and done["scan_job"]
    assert wait_job(admin, done["scan_job"])["state"] == "succeeded"
    # The same accounts and tokens, a new store: the lost one's.
    assert _store_id(admin) == lost.store_id
    data = Path(server.service.app.data_dir.path)
    assert (data / "replaced-stores" / empty / "config").is_file()
    stores = {s.store_id for s in server.service.app.catalog.list_stores()}
    assert empty not in stores and lost.store_id in stores
    pool = server.service.app.catalog.get_pool("default")
    assert pool.store_id == lost.store_id
    points = {p["id"]: p for p in admin.get("/api/points").json()}
    assert lost.point in points
    # The key is not kept: not in the audit log, not in the recovery's state.
    audit = admin.get("/api/audit").json()
    assert [e for e in audit if e["action"] == "tape.recover"]
    assert lost.recovery_key not in str(audit)
    assert lost.recovery_key not in str(admin.get("/api/tape/recover").json())

    # Restored from tape into the home pool, then downloaded byte-exact.
    r = operator.post("/api/tape/restore", json={"point": lost.point, "drive": lost.drive})
    assert r.status_code == 202, r.text
    assert wait_job(operator, r.json()["id"], timeout=120)["state"] == "succeeded"
    for name, expected in lost.files.items():
        got = operator.get(f"/api/points/{lost.point}/download", params={"path": name})
        assert got.status_code == 200, got.text
        assert got.content == expected

    # The store holds a point now: a second recovery is refused, in words.
    r = admin.post(
        "/api/tape/recover", json={"drive": lost.drive, "recovery_key": lost.recovery_key}
    )
    assert r.status_code == 409
    assert "holds 1 recovery point(s)" in r.json()["message"]
    # The service still backs up into the recovered store.
    src = data.parent / "more"
    src.mkdir()
    (src / "new.txt").write_bytes(b"after the recovery\n")
    r = admin.post("/api/assets", json={"name": "more", "kind": "files", "path": str(src)})
    assert r.status_code == 201, r.text
    job = operator.post("/api/assets/more/backup", json={"mode": "full"}).json()
    assert wait_job(operator, job["id"])["state"] == "succeeded"
    assert server.service.app.verify().ok


def test_a_service_that_will_not_start_on_it_gets_its_own_store_back(
    lost: Lost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.service

    real = api.service.open_appliance
    calls: list[int] = []

    def first_restart_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the start on the recovered store (the first is the server's own)
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(api.service, "open_appliance", first_restart_fails)
    with (
        bootstrapped_server(tmp_path, device_monitor=False) as live,
        live.as_role("admin") as admin,
    ):
        register_library(live.service.app.catalog, lost.library)
        own = _store_id(admin)
        body = {"drive": lost.drive, "recovery_key": lost.recovery_key}
        assert admin.post("/api/tape/recover", json=body).status_code == 202
        failed = _wait_recovery(admin)
        assert failed["state"] == "failed" and "disk went away" in failed["message"]
        assert _store_id(admin) == own  # the service runs on its own store again
        store = Path(live.service.app.data_dir.store_path)
        assert not Path(f"{store}.recovering").exists()
        assert not (store.parent.parent.parent / "replaced-stores" / own).exists()
        # Nothing is left half-done: the same recovery now goes through.
        assert admin.post("/api/tape/recover", json=body).status_code == 202
        assert _wait_recovery(admin)["state"] == "done"
        assert _store_id(admin) == lost.store_id


@pytest.mark.parametrize(
    ("points", "jobs", "state", "words"),
    [
        (0, [], "idle", None),
        (0, [], "failed", None),
        (0, [], "done", None),
        (0, [], "reading", "under way"),
        (0, [], "scanning", "under way"),
        (2, [], "idle", "holds 2 recovery point(s)"),
        (0, ["j1"], "idle", "j1 must end first"),
    ],
)
def test_when_a_recovery_may_start(
    points: int, jobs: list[str], state: str, words: str | None
) -> None:
    why = refusal(points, jobs, state)
    assert (why is None) if words is None else (why is not None and words in why)
