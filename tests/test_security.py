"""The security model's tests: restore targets, VM disk sources, first run, files at rest and
sessions. Each closes a finding of a hostile review (docs/security.md lists which test covers
which finding); they run as root, like the service, against a real service on 127.0.0.1, with
real loop devices and filesystems for the device rules.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    ADMIN,
    LiveServer,
    bootstrapped_server,
    live_server,
    login,
    service_settings,
    wait_job,
    weak_kdf_env,
)
from loop_support import attached

from appliance.errors import PathRefused
from appliance.path_rules import (
    BlockFacts,
    RestoreRules,
    check_disk_source,
    check_restore_area,
    check_restore_device,
    restore_target,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("security"), max_parallel_jobs=2) as live:
        yield live


def _client(server: LiveServer, role: str) -> httpx.Client:
    return server.as_role(role)


@pytest.fixture(scope="module")
def points(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A files asset with a point, and a VM asset (one 2 MiB raw disk) with a point."""
    root = tmp_path_factory.mktemp("sources")
    tree = root / "tree"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "report.txt").write_text("the report, as backed up\n")
    (tree / "top.txt").write_text("top\n")
    os.chmod(tree, 0o777)
    disk = root / "disk.img"
    disk.write_bytes(os.urandom(1024 * 1024) + bytes(1024 * 1024))
    with _client(server, "admin") as admin, _client(server, "operator") as operator:
        assert (
            admin.post(
                "/api/assets", json={"name": "share", "kind": "files", "path": str(tree)}
            ).status_code
            == 201
        )
        assert (
            admin.post(
                "/api/assets", json={"name": "vm", "kind": "vm", "disks": [str(disk)]}
            ).status_code
            == 201
        )
        out = {"tree": tree, "disk": disk}
        for asset in ("share", "vm"):
            job = wait_job(
                operator, operator.post(f"/api/assets/{asset}/backup", json={}).json()["id"]
            )
            assert job["state"] == "succeeded", job
            out[asset] = job["result"]["point"]
    return out


@contextlib.contextmanager
def loop_device(path: Path, size: int = 8 * 1024 * 1024) -> Iterator[str]:
    with open(path, "wb") as f:
        f.truncate(size)
    with attached(path) as device:
        yield device


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _restore(client: httpx.Client, point: str, **body: Any) -> httpx.Response:
    return client.post(f"/api/points/{point}/restore", json=body)


def _refused(response: httpx.Response, rule: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["code"] == "path_refused", body
    assert body["details"]["rule"] == rule, body


# --- restore targets over the API -------------------------------------------------------------


def test_viewer_cannot_restore_anywhere(server: LiveServer, points: dict[str, Any]) -> None:
    area = server.settings.data_dir / "restores" / "viewer"
    with _client(server, "viewer") as viewer:
        r = _restore(viewer, points["share"], target=str(area))
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        assert viewer.get(f"/api/points/{points['share']}/restore-targets").status_code == 403


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_restore_outside_the_areas_is_refused_for_every_role(
    server: LiveServer, points: dict[str, Any], tmp_path: Path, role: str
) -> None:
    etc_dir = Path("/etc") / f"appliance-test-{os.getpid()}"
    with _client(server, role) as client:
        for target in (etc_dir, tmp_path / "anywhere", Path("/"), server.settings.data_dir):
            _refused(_restore(client, points["share"], target=str(target)), "outside_restore_areas")
        _refused(_restore(client, points["vm"], target="/etc/shadow"), "outside_restore_areas")
        _refused(
            _restore(client, points["vm"], target=str(tmp_path / "x.img")), "outside_restore_areas"
        )
    assert not etc_dir.exists() and not (tmp_path / "anywhere").exists()


def test_a_link_inside_an_area_cannot_lead_out_of_it(
    server: LiveServer, points: dict[str, Any], tmp_path: Path
) -> None:
    area = server.settings.data_dir / "restores"
    outside = tmp_path / "outside"
    outside.mkdir()
    link = area / "sneaky"
    link.symlink_to(outside)
    try:
        with _client(server, "operator") as operator:
            _refused(
                _restore(operator, points["share"], target=str(link / "x")),
                "outside_restore_areas",
            )
        assert list(outside.iterdir()) == []
    finally:
        link.unlink()


def test_restore_into_an_area_keeps_an_existing_top_folder(
    server: LiveServer, points: dict[str, Any]
) -> None:
    """The point's root is 0777; an existing target folder keeps its own owner and mode."""
    target = server.settings.data_dir / "restores" / "existing"
    target.mkdir()
    os.chmod(target, 0o755)
    with _client(server, "operator") as operator:
        r = _restore(operator, points["share"], target=str(target))
        assert r.status_code == 202, r.text
        assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
    st = os.stat(target)
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert (target / "docs" / "report.txt").read_text() == "the report, as backed up\n"


def test_restore_in_place_needs_an_explicit_choice(
    server: LiveServer, points: dict[str, Any]
) -> None:
    tree: Path = points["tree"]
    report = tree / "docs" / "report.txt"
    with _client(server, "operator") as operator:
        choices = operator.get(f"/api/points/{points['share']}/restore-targets").json()
        assert choices["source"] == str(tree) and choices["download"] is True
        assert choices["areas"] == [str(server.settings.data_dir / "restores")]
        _refused(_restore(operator, points["share"], destination="source"), "confirmation_missing")
        _refused(
            _restore(
                operator,
                points["share"],
                destination="source",
                on_conflict="overwrite",
                target="/etc",
            ),
            "target_not_allowed",
        )
        report.write_text("changed since the backup\n")
        r = _restore(operator, points["share"], destination="source", on_conflict="keep_both")
        assert r.status_code == 202, r.text
        job = wait_job(operator, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert report.read_text() == "the report, as backed up\n"
        kept = [
            p for p in report.parent.iterdir() if p.name.startswith("report.txt.before-restore-")
        ]
        assert [p.read_text() for p in kept] == ["changed since the backup\n"]
        report.write_text("changed again\n")
        r = _restore(operator, points["share"], destination="source", on_conflict="overwrite")
        assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
        assert report.read_text() == "the report, as backed up\n"


def test_restore_devices_are_registered_by_an_admin_and_checked(
    server: LiveServer, points: dict[str, Any], tmp_path: Path
) -> None:
    with (
        loop_device(tmp_path / "target.raw") as device,
        loop_device(tmp_path / "other.raw") as other,
        loop_device(tmp_path / "busy.raw") as busy,
        mounted(busy, tmp_path / "mnt"),
        _client(server, "admin") as admin,
        _client(server, "operator") as operator,
    ):
        # Only VM points go to a device, and only to a registered one.
        _refused(
            _restore(operator, points["vm"], destination="device", target=device),
            "device_not_registered",
        )
        _refused(
            _restore(operator, points["share"], destination="device", target=device),
            "device_for_files",
        )
        # The operator cannot register devices; the admin cannot register unsafe ones.
        assert operator.put("/api/settings/restore", json={"devices": [device]}).status_code == 403
        for bad, rule in (
            (busy, "device_in_use"),
            ("/dev/null", "not_a_disk"),
            ("/etc/shadow", "system_folder"),
            (str(server.settings.data_dir / "catalog.sqlite"), "data_directory"),
        ):
            _refused(admin.put("/api/settings/restore", json={"devices": [bad]}), rule)
        image = tmp_path / "restored-vm.img"
        r = admin.put("/api/settings/restore", json={"devices": [device, str(image)]})
        assert r.status_code == 200, r.text
        assert [d["path"] for d in r.json()["devices"]] == [device, str(image)]
        choices = operator.get(f"/api/points/{points['vm']}/restore-targets").json()
        assert [d["unavailable"] for d in choices["devices"]] == [None, None]

        r = _restore(operator, points["vm"], destination="device", target=device)
        assert r.status_code == 202, r.text
        assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
        with open(device, "rb") as f:
            assert f.read(2 * 1024 * 1024) == points["disk"].read_bytes()
        r = _restore(operator, points["vm"], destination="device", target=str(image))
        assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
        assert image.read_bytes() == points["disk"].read_bytes()
        # An unregistered device and an area target that is a device are both refused.
        _refused(
            _restore(operator, points["vm"], destination="device", target=other),
            "device_not_registered",
        )
        _refused(_restore(operator, points["vm"], target=other), "outside_restore_areas")
        assert admin.put("/api/settings/restore", json={}).status_code == 200


def test_restore_areas_an_admin_lists(
    server: LiveServer, points: dict[str, Any], tmp_path: Path
) -> None:
    area = tmp_path / "area"
    area.mkdir()
    with _client(server, "admin") as admin, _client(server, "operator") as operator:
        for bad, rule in (
            ("/", "root_folder"),
            ("/etc", "system_folder"),
            ("/proc/self", "system_folder"),
            (str(server.settings.data_dir), "data_directory"),
            (str(server.settings.data_dir / "pools"), "data_directory"),
        ):
            _refused(admin.put("/api/settings/restore", json={"areas": [bad]}), rule)
        assert operator.put("/api/settings/restore", json={"areas": [str(area)]}).status_code == 403
        r = admin.put("/api/settings/restore", json={"areas": [str(area)]})
        assert r.status_code == 200, r.text
        assert r.json()["areas"] == [str(server.settings.data_dir / "restores"), str(area)]
        r = _restore(operator, points["share"], target=str(area / "out"))
        assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
        assert (area / "out" / "top.txt").read_text() == "top\n"
        # Taking the area away refuses the next restore there, also one queued before.
        assert admin.put("/api/settings/restore", json={"areas": []}).status_code == 200
        _refused(
            _restore(operator, points["share"], target=str(area / "again")), "outside_restore_areas"
        )


def test_a_queued_restore_is_checked_again_when_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the request and the job, the area's folder is swapped for a link to /etc."""
    from appliance.engine import Appliance

    weak_kdf_env(monkeypatch)
    app, _ = Appliance.init(str(tmp_path / "data"), "pw")
    with app:
        source = tmp_path / "src"
        source.mkdir()
        (source / "passwd").write_text("not the real one\n")
        point = app.backup_files(str(source), "share").point.id
        area = Path(app.restore_rules().areas[0])
        area.mkdir()
        checked = app.check_restore_target(point, "area", target=str(area / "out"))
        assert checked.path == str(area / "out")
        (area / "out").symlink_to("/etc")
        with pytest.raises(PathRefused) as refused:
            app.check_restore_target(point, "area", target=str(area / "out"))
        assert refused.value.details["rule"] == "outside_restore_areas"


# --- the pure rules ---------------------------------------------------------------------------


def test_pure_restore_rules(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    rules = RestoreRules(
        data_dir=data, areas=(f"{data}/restores", "/srv/r"), devices=("/dev/loop9",)
    )
    facts = BlockFacts()

    def rule_of(**kwargs: Any) -> str:
        with pytest.raises(PathRefused) as err:
            restore_target(rules=rules, facts=facts, **kwargs)
        return str(err.value.details["rule"])

    ok = restore_target("area", point_kind="files", rules=rules, facts=facts, target="/srv/r/a/b")
    assert (ok.path, ok.on_conflict, ok.block_device) == ("/srv/r/a/b", "overwrite", False)
    assert rule_of(kind="area", point_kind="files", target="/srv/rr") == "outside_restore_areas"
    assert rule_of(kind="area", point_kind="files", target="/srv") == "outside_restore_areas"
    assert rule_of(kind="area", point_kind="files") == "target_missing"
    assert rule_of(kind="area", point_kind="files", target="rel") == "not_absolute"
    assert rule_of(kind="source", point_kind="files", source="/srv/x") == "confirmation_missing"
    assert rule_of(kind="source", point_kind="files", on_conflict="overwrite") == "no_source"
    assert (
        rule_of(kind="source", point_kind="files", on_conflict="overwrite", source=data)
        == "data_directory"
    )
    assert rule_of(kind="device", point_kind="files", target="/dev/loop9") == "device_for_files"
    assert (
        rule_of(kind="device", point_kind="image", target="/dev/loop8") == "device_not_registered"
    )


def test_pure_device_facts() -> None:
    disk, part1, part2, other = (os.makedev(8, n) for n in (0, 1, 2, 16))
    facts = BlockFacts(
        mounted=frozenset({part2}), system=frozenset(), parent={part1: disk, part2: disk}
    )
    assert facts.in_use(disk) == "mounted (or a partition of it is)"
    assert facts.in_use(part1) == "mounted (or a partition of it is)"
    assert facts.in_use(other) is None
    system = BlockFacts(system=frozenset({disk}), parent={part1: disk})
    assert system.in_use(part1) == "the system disk"


def test_restore_area_and_device_checks(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    assert check_restore_area(f"{data}/restores", data_dir=data) == f"{data}/restores"
    with pytest.raises(PathRefused):
        check_restore_area("/usr/local", data_dir=data)
    assert check_restore_device(str(tmp_path / "new.img"), data_dir=data, facts=BlockFacts())
    with pytest.raises(PathRefused):
        check_restore_device(str(tmp_path / "no" / "such.img"), data_dir=data, facts=BlockFacts())


# --- VM disk sources --------------------------------------------------------------------------


def test_vm_disk_sources_follow_the_rules(server: LiveServer, tmp_path: Path) -> None:
    inside_data = server.settings.data_dir / "restores" / "disk.img"
    inside_data.write_bytes(bytes(4096))
    with (
        loop_device(tmp_path / "free.raw") as free,
        loop_device(tmp_path / "busy.raw") as busy,
        mounted(busy, tmp_path / "mnt"),
    ):
        for role in ("admin", "operator", "viewer"):
            with _client(server, role) as client:
                for bad, rule in (
                    ("/etc/shadow", "system_folder"),
                    ("/proc/self/environ", "system_folder"),
                    ("/dev/null", "not_a_disk"),
                    ("/dev/zero", "not_a_disk"),
                    (str(inside_data), "data_directory"),
                    (busy, "device_in_use"),
                ):
                    r = client.post(
                        "/api/assets", json={"name": "bad-vm", "kind": "vm", "disks": [bad]}
                    )
                    if role == "admin":
                        _refused(r, rule)
                    else:
                        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        root_dev = os.stat("/").st_dev
        facts = BlockFacts(system=frozenset({root_dev}))
        with pytest.raises(PathRefused):
            check_disk_source("/etc/passwd", data_dir=str(server.settings.data_dir), facts=facts)
        with _client(server, "admin") as admin:
            r = admin.post("/api/assets", json={"name": "loop-vm", "kind": "vm", "disks": [free]})
            assert r.status_code == 201, r.text
            assert admin.delete("/api/assets/loop-vm").status_code == 204


def test_a_disk_swapped_for_a_link_is_refused_at_backup(server: LiveServer, tmp_path: Path) -> None:
    disk = tmp_path / "vm.img"
    disk.write_bytes(bytes(65536))
    with _client(server, "admin") as admin, _client(server, "operator") as operator:
        r = admin.post("/api/assets", json={"name": "swap-vm", "kind": "vm", "disks": [str(disk)]})
        assert r.status_code == 201, r.text
        disk.unlink()
        disk.symlink_to("/etc/shadow")
        job = wait_job(operator, operator.post("/api/assets/swap-vm/backup", json={}).json()["id"])
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "path_refused", job
        assert operator.get("/api/points", params={"asset": "swap-vm"}).json() == []


# --- first run --------------------------------------------------------------------------------


def test_first_run_needs_the_setup_code_from_loopback_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weak_kdf_env(monkeypatch)
    with live_server(service_settings(tmp_path / "data")) as fresh, fresh.client() as c:
        code_file = tmp_path / "data" / "secrets" / "setup-code"
        assert c.get("/api/setup").json() == {
            "admin_exists": False,
            "setup_code_required": True,
            "setup_code_file": str(code_file),
        }
        assert stat.S_IMODE(code_file.stat().st_mode) == 0o600
        body = {"name": "intruder", "password": "password-123"}
        for code in (None, "", "00000000"):
            r = c.post("/api/setup", json=body if code is None else {**body, "setup_code": code})
            assert r.status_code == 403, r.text
            assert "set-up code" in r.json()["message"]
        assert fresh.service.app.catalog.list_users() == []
        r = c.post("/api/setup", json=fresh.setup_body("root", "password-123"))
        assert r.status_code == 201
        assert not code_file.exists()


# --- files at rest ----------------------------------------------------------------------------


def _too_open(root: Path) -> list[str]:
    loose = []
    for directory, dirs, files in os.walk(root):
        if Path(directory) == root / "restores":
            dirs[:] = []
            continue
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            st = os.lstat(name)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                loose.append(f"{name} {stat.filemode(st.st_mode)}")
    return loose


def test_data_directory_is_private_and_older_installs_are_tightened(tmp_path: Path) -> None:
    """A real `appliance serve` under umask 022 over a data directory an older version left
    0755 with a world-readable catalog: after start, nothing in it is open to other users."""
    data = tmp_path / "data"
    code = (
        "import os, sys; os.umask(0o022);"
        "from appliance.engine import Appliance;"
        f"a, _ = Appliance.init({str(data)!r}, 'pw'); a.close()"
    )
    env = {**os.environ, "APPLIANCE_TEST_WEAK_KDF": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    os.chmod(data, 0o755)
    os.chmod(data / "catalog.sqlite", 0o644)
    assert _too_open(data)  # the old install really was open

    from test_service_restart import Service

    (data / "secrets").mkdir(mode=0o700, exist_ok=True)
    (data / "secrets" / "passphrase").write_text("pw\n")
    service = Service(data, tmp_path / "serve.log")
    try:
        service.wait_ready()
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "catalog.sqlite").stat().st_mode) == 0o600
        assert _too_open(data) == []
        with httpx.Client(base_url=service.url) as c:
            c.post(
                "/api/setup",
                json={
                    "name": "x",
                    "password": "password-123",
                    "setup_code": (data / "secrets" / "setup-code").read_text().strip(),
                },
            )
            csrf = login(c, "x", "password-123")
            src = tmp_path / "src"
            src.mkdir()
            (src / "f").write_text("data")
            headers = {"X-CSRF-Token": csrf}
            c.post(
                "/api/assets",
                json={"name": "s", "kind": "files", "path": str(src)},
                headers=headers,
            )
            job = wait_job(c, c.post("/api/assets/s/backup", json={}, headers=headers).json()["id"])
            assert job["state"] == "succeeded", job
        assert _too_open(data) == []
    finally:
        service.stop()


# --- sessions ---------------------------------------------------------------------------------


@pytest.fixture
def account(server: LiveServer) -> Iterator[str]:
    """A fresh operator account for one test; removed afterwards."""
    name = f"user{os.urandom(3).hex()}"
    with _client(server, "admin") as admin:
        r = admin.post(
            "/api/users", json={"name": name, "role": "operator", "password": "old-password-1"}
        )
        assert r.status_code == 201
        yield name
        admin.delete(f"/api/users/{name}")


def _sessions_and_token(
    server: LiveServer, name: str, password: str
) -> tuple[list[httpx.Client], str]:
    sessions = []
    for _ in range(2):
        c = server.client()
        c.headers["X-CSRF-Token"] = login(c, name, password)
        sessions.append(c)
    with _client(server, "admin") as admin:
        token = admin.post("/api/tokens", json={"user": name}).json()["token"]
    return sessions, token


def _works(
    server: LiveServer, client: httpx.Client | None = None, token: str | None = None
) -> bool:
    if token is not None:
        with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
            return c.get("/api/me").status_code == 200
    assert client is not None
    return client.get("/api/me").status_code == 200


def test_own_password_change_ends_other_sessions_and_tokens(
    server: LiveServer, account: str
) -> None:
    (mine, other), token = _sessions_and_token(server, account, "old-password-1")
    r = mine.post(
        "/api/me/password",
        json={"current_password": "old-password-1", "new_password": "new-password-1"},
    )
    assert r.status_code == 204, r.text
    assert _works(server, mine) and not _works(server, other)
    assert not _works(server, token=token)
    # Keeping the tokens is an explicit choice.
    (_, other), token = _sessions_and_token(server, account, "new-password-1")
    r = mine.post(
        "/api/me/password",
        json={
            "current_password": "new-password-1",
            "new_password": "new-password-2",
            "revoke_tokens": False,
        },
    )
    assert r.status_code == 204
    assert not _works(server, other) and _works(server, token=token)
    for c in (mine, other):
        c.close()


def test_admin_reset_and_disable_end_everything(server: LiveServer, account: str) -> None:
    sessions, token = _sessions_and_token(server, account, "old-password-1")
    with _client(server, "admin") as admin:
        assert (
            admin.patch(f"/api/users/{account}", json={"password": "reset-password-1"}).status_code
            == 200
        )
        assert not any(_works(server, c) for c in sessions) and not _works(server, token=token)
        sessions, token = _sessions_and_token(server, account, "reset-password-1")
        r = admin.patch(f"/api/users/{account}", json={"disabled": True})
        assert r.status_code == 200 and r.json()["disabled"] is True
        assert not any(_works(server, c) for c in sessions) and not _works(server, token=token)
        with server.client() as c:
            r = c.post("/api/login", json={"name": account, "password": "reset-password-1"})
            assert r.status_code == 403 and "disabled" in r.json()["message"]
        # An admin cannot disable themselves (nor the last admin).
        assert admin.patch(f"/api/users/{ADMIN[0]}", json={"disabled": True}).status_code == 409
        assert (
            admin.patch(f"/api/users/{account}", json={"disabled": False}).json()["disabled"]
            is False
        )
    with server.client() as c:
        login(c, account, "reset-password-1")
    for c in sessions:
        c.close()
