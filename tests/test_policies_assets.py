"""One policy for several assets: the catalog, the migration, the scheduler and the API.

- The catalog keeps a policy's assets in the order given, finds a policy by any of them, and
  refuses to forget an asset a policy still names; revision 0009 moves each existing policy's
  single asset into ``policy_assets`` (schedule state kept) and back on a downgrade.
- A due policy backs up each of its assets (one job each, in the tick's transaction), and a
  boot-test entry boots only the policy's virtual machines; an asset whose run is still queued
  gets no second one.
- The API takes ``assets`` (and ``asset`` alone, as before), answers both, runs a job per
  asset, and names what is wrong in a 422.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from api_support import LiveServer, bootstrapped_server, wait_job
from sqlalchemy import create_engine, text

from appliance.catalog import Catalog
from appliance.catalog.database import MIGRATIONS_DIR
from appliance.catalog.records import PolicyRecord
from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput
from appliance.jobs import JobRunner
from appliance.schedule import Scheduler, parse_schedule
from appliance.vmspec import vm_source

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
NIGHTLY = {"entries": [{"cron": "0 22 * * *", "mode": "incremental"}], "catch_up": "once"}


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def record(name: str, assets: list[str], schedule: dict[str, object] = NIGHTLY) -> PolicyRecord:
    return PolicyRecord(name, assets, dict(schedule), "incremental", {"keep_last": 3}, 86400)


# --- the catalog -------------------------------------------------------------------------------------


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with Catalog.open(catalog_url, clock=lambda: T0) as opened:
        for name in ("docs", "mail", "web"):
            opened.ensure_asset(name, "files", f"/srv/{name}")
        yield opened


def test_a_policy_keeps_its_assets_in_order(catalog: Catalog) -> None:
    added = catalog.add_policy(record("nightly", ["web", "docs"]))
    assert added.assets == ["web", "docs"] and added.asset == "web"
    assert catalog.get_policy("nightly").assets == ["web", "docs"]
    assert [p.name for p in catalog.list_policies(asset="docs")] == ["nightly"]
    assert catalog.list_policies(asset="mail") == []
    changed = catalog.update_policy(record("nightly", ["mail", "web"]))
    assert changed.assets == ["mail", "web"]
    assert catalog.list_policies(asset="docs") == []
    assert catalog.list_policies()[0].assets == ["mail", "web"]


def test_a_single_name_is_a_list_of_one() -> None:
    assert PolicyRecord("p", "docs", {}, "full", {}, 0).assets == ["docs"]


def test_an_asset_a_policy_names_cannot_be_deleted(catalog: Catalog) -> None:
    catalog.add_policy(record("nightly", ["docs", "mail"]))
    with pytest.raises(Conflict, match="policy"):
        catalog.delete_asset("mail")
    catalog.delete_policy("nightly")
    catalog.delete_asset("mail")
    assert [a.name for a in catalog.list_assets()] == ["docs", "web"]


@pytest.mark.parametrize("assets", [[], ["docs", "docs"], ["docs", ""]])
def test_bad_asset_lists_are_refused(catalog: Catalog, assets: list[str]) -> None:
    with pytest.raises(InvalidInput):
        catalog.add_policy(record("bad", assets))
    assert catalog.list_policies() == []


def _migrate(url: str, revision: str, *, down: bool) -> None:
    engine = create_engine(url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_0009_moves_each_policys_asset_and_back(catalog_url: str) -> None:
    with Catalog.open(catalog_url, clock=lambda: T0) as catalog:
        for name in ("docs", "mail"):
            catalog.ensure_asset(name, "files", f"/srv/{name}")
        catalog.add_policy(record("two", ["mail", "docs"]))
        catalog.add_policy(record("one", ["docs"]))
        catalog.reset_schedule_state("two", ["incremental 0 22 * * *"], T0)
    _migrate(catalog_url, "0008", down=True)
    engine = create_engine(catalog_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT name, asset FROM policies ORDER BY name"))
            assert [tuple(r) for r in rows] == [("one", "docs"), ("two", "mail")]
            state = connection.execute(text("SELECT policy, entry FROM schedule_state"))
            assert [tuple(r) for r in state] == [("two", "incremental 0 22 * * *")]
    finally:
        engine.dispose()
    _migrate(catalog_url, "head", down=False)
    with Catalog.open(catalog_url, clock=lambda: T0) as catalog:
        assert [(p.name, p.assets) for p in catalog.list_policies()] == [
            ("one", ["docs"]),
            ("two", ["mail"]),
        ]
        assert catalog.get_policy("two").schedule == NIGHTLY
        assert list(catalog.schedule_state("two")["two"]) == ["incremental 0 22 * * *"]


# --- the scheduler -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def appliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    app, _ = Appliance.init(str(tmp_path / "data"), "passphrase", clock=Clock(at(2, 12)))
    for name in ("docs", "mail"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(name)
        app.catalog.ensure_asset(name, "files", str(tmp_path / name))
    disk = tmp_path / "web.raw"
    disk.write_bytes(b"\0" * 4096)
    app.catalog.ensure_asset("web", "vm", vm_source([str(disk)], None))
    yield app
    app.close()


def _add(app: Appliance, policy: PolicyRecord, since: datetime) -> None:
    app.catalog.add_policy(policy)
    keys = [e.key for e in parse_schedule(policy.schedule).entries]
    app.catalog.reset_schedule_state(policy.name, keys, since)


def test_a_due_policy_backs_up_each_of_its_assets(appliance: Appliance) -> None:
    _add(appliance, record("nightly", ["mail", "docs"]), at(2, 12))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    assert scheduler.tick(at(2, 21, 59)) == []
    created = scheduler.tick(at(2, 22, 0))
    jobs = [appliance.catalog.get_job(job_id) for job_id in created]
    assert [(j.kind, j.params["asset"], j.params["policy"]) for j in jobs] == [
        ("policy_backup", "mail", "nightly"),
        ("policy_backup", "docs", "nightly"),
    ]
    assert all(j.resource and f"asset:{j.params['asset']}" in j.resource for j in jobs)
    # The next night: mail's job is still queued, so only docs gets a new one, and mail's log
    # says its queued run covers the slot.
    appliance.catalog.update_job(jobs[1].id, state="cancelled")
    [again] = scheduler.tick(at(3, 22, 0))
    assert appliance.catalog.get_job(again).params["asset"] == "docs"
    log = [line.message for line in appliance.catalog.job_log(jobs[0].id)]
    assert any("also covers" in line for line in log)


def test_a_boot_test_entry_boots_only_the_policys_virtual_machines(appliance: Appliance) -> None:
    schedule = {"entries": [{"cron": "0 5 * * *", "mode": "boot_test"}], "catch_up": "once"}
    _add(appliance, record("proof", ["docs", "web"], schedule), at(2, 12))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    from image.failover import FailoverManager, register_failover_jobs

    register_failover_jobs(FailoverManager(appliance))
    created = scheduler.tick(at(3, 5, 0))
    jobs = [appliance.catalog.get_job(job_id) for job_id in created]
    assert [(j.kind, j.params["asset"]) for j in jobs] == [("boot_test", "web")]


# --- the API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("policies"), max_parallel_jobs=2) as live:
        yield live


@pytest.fixture(scope="module")
def folders(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("policy-folders")
    names = ["alpha", "beta"]
    with server.as_role("admin") as admin:
        for name in names:
            (root / name).mkdir()
            (root / name / "f.txt").write_text(name)
            r = admin.post(
                "/api/assets", json={"name": name, "kind": "files", "path": str(root / name)}
            )
            assert r.status_code == 201, r.text
    return names


def test_the_api_takes_several_assets_and_one(
    admin: httpx.Client, operator: httpx.Client, folders: list[str]
) -> None:
    r = admin.post("/api/policies", json={"name": "both", "assets": ["beta", "alpha"]})
    assert r.status_code == 201, r.text
    assert (r.json()["assets"], r.json()["asset"]) == (["beta", "alpha"], "beta")
    r = admin.post("/api/policies", json={"name": "single", "asset": "alpha"})
    assert r.status_code == 201 and r.json()["assets"] == ["alpha"]
    assert admin.get("/api/assets/beta").json()["policies"] == ["both"]
    assert admin.get("/api/assets/alpha").json()["policies"] == ["both", "single"]
    r = admin.put("/api/policies/single", json={"assets": ["alpha", "beta"]})
    assert r.status_code == 200 and r.json()["assets"] == ["alpha", "beta"]
    r = operator.post("/api/policies/both/run", json={})
    assert r.status_code == 202
    ids = r.headers["X-Job-Ids"].split(",")
    assert len(ids) == 2 and ids[0] == r.json()["id"]
    done = [wait_job(operator, job_id) for job_id in ids]
    assert [(j["state"], j["params"]["asset"]) for j in done] == [
        ("succeeded", "beta"),
        ("succeeded", "alpha"),
    ]
    for name in ("both", "single"):
        assert admin.delete(f"/api/policies/{name}").status_code == 204


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": "none"}, 422, "one or more assets"),
        ({"name": "twice", "assets": ["alpha", "alpha"]}, 422, "each once"),
        ({"name": "bad", "assets": ["alpha", "../x"]}, 422, "pattern"),
        ({"name": "ghost", "assets": ["alpha", "ghost"]}, 404, "ghost"),
        (
            {
                "name": "boots",
                "assets": ["alpha", "beta"],
                "schedule": {"entries": [{"cron": "0 5 * * *", "mode": "boot_test"}]},
            },
            422,
            "only virtual machines",
        ),
    ],
)
def test_the_api_refuses_bad_asset_lists_in_words(
    admin: httpx.Client, folders: list[str], body: dict[str, object], status: int, words: str
) -> None:
    r = admin.post("/api/policies", json=body)
    assert r.status_code == status, r.text
    assert words in r.text
    assert admin.get(f"/api/policies/{body['name']}").status_code == 404
