"""Catalog methods of the service (revision 0002 and account management), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from appliance.catalog import Catalog, PointRecord, PolicyRecord
from appliance.errors import Conflict, InvalidInput, NotFound

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def catalog(catalog_url: str, clock: Clock) -> Iterator[Catalog]:
    with Catalog.open(catalog_url, clock=clock) as opened:
        yield opened


def _policy(name: str = "p", asset: str = "docs") -> PolicyRecord:
    return PolicyRecord(name, asset, {"entries": []}, "incremental", {}, 0)


def test_assets_add_update_delete(catalog: Catalog) -> None:
    asset = catalog.add_asset("docs", "files", "/srv/docs", "shared documents")
    assert (asset.source, asset.description, asset.created_at) == (
        "/srv/docs",
        "shared documents",
        T0,
    )
    with pytest.raises(Conflict):
        catalog.add_asset("docs", "files", "/elsewhere")
    with pytest.raises(InvalidInput):
        catalog.add_asset("x", "tape", "/x")
    updated = catalog.update_asset("docs", "/srv/docs2", None)
    assert (updated.source, updated.description, updated.kind) == ("/srv/docs2", None, "files")
    with pytest.raises(NotFound):
        catalog.update_asset("nope", "/x", None)
    catalog.add_policy(_policy())
    with pytest.raises(Conflict, match="policy"):
        catalog.delete_asset("docs")
    catalog.delete_policy("p")
    store = catalog.ensure_store("s1", "pool", "/pool").store_id
    catalog.add_point(PointRecord("a" * 16, "docs", "files", "full", T0), store)
    with pytest.raises(Conflict, match="recovery point"):
        catalog.delete_asset("docs")
    catalog.delete_point("a" * 16)
    catalog.delete_asset("docs")
    with pytest.raises(NotFound):
        catalog.get_asset("docs")
    with pytest.raises(NotFound):
        catalog.delete_asset("docs")


def test_first_admin_only_once(catalog: Catalog) -> None:
    catalog.add_user("viewer", "viewer", "hash")
    admin = catalog.add_first_admin("root", "hash")
    assert admin.role == "admin"
    with pytest.raises(Conflict, match="admin already exists"):
        catalog.add_first_admin("second", "hash")
    assert [u.name for u in catalog.list_users()] == ["root", "viewer"]


def test_last_admin_cannot_be_demoted_or_deleted(catalog: Catalog) -> None:
    catalog.add_user("root", "admin", "hash")
    catalog.add_user("ops", "operator", "hash")
    with pytest.raises(Conflict, match="last admin"):
        catalog.update_user("root", role="viewer")
    with pytest.raises(Conflict, match="last admin"):
        catalog.delete_user("root")
    assert catalog.update_user("ops", role="admin").role == "admin"
    assert catalog.update_user("root", role="viewer", password_hash="new").password_hash == "new"
    with pytest.raises(InvalidInput):
        catalog.update_user("ops", role="god")
    with pytest.raises(NotFound):
        catalog.update_user("nobody", role="viewer")


def test_deleting_a_user_removes_their_tokens_and_sessions(catalog: Catalog) -> None:
    catalog.add_user("root", "admin", "hash")
    catalog.add_user("bob", "viewer", "hash")
    catalog.add_token("bob", "t-hash", ["viewer"])
    catalog.add_session("s-hash", "bob", "c-hash", T0 + timedelta(hours=1))
    catalog.delete_user("bob")
    assert catalog.list_tokens("bob") == []
    with pytest.raises(NotFound):
        catalog.find_active_token("t-hash")
    with pytest.raises(NotFound):
        catalog.get_session("s-hash")


def test_sessions_expire_slide_and_end(catalog: Catalog, clock: Clock) -> None:
    catalog.add_user("bob", "viewer", "hash")
    session = catalog.add_session("s1", "bob", "c1", T0 + timedelta(minutes=10))
    assert (session.user, session.csrf_hashed, session.last_seen_at) == ("bob", "c1", T0)
    with pytest.raises(Conflict):
        catalog.add_session("s1", "bob", "c2", T0 + timedelta(minutes=10))
    with pytest.raises(NotFound):
        catalog.add_session("s2", "nobody", "c", T0 + timedelta(minutes=10))
    clock.now = T0 + timedelta(minutes=9)
    catalog.touch_session("s1", clock.now + timedelta(minutes=10))
    clock.now = T0 + timedelta(minutes=15)
    assert catalog.get_session("s1").last_seen_at == T0 + timedelta(minutes=9)
    clock.now = T0 + timedelta(minutes=19, seconds=1)
    with pytest.raises(NotFound):
        catalog.get_session("s1")
    catalog.add_session("s3", "bob", "c3", clock.now + timedelta(minutes=1))
    assert catalog.purge_sessions() == 1
    catalog.get_session("s3")
    catalog.delete_session("s3")
    catalog.delete_session("s3")  # a no-op the second time
    with pytest.raises(NotFound):
        catalog.get_session("s3")
    with pytest.raises(InvalidInput):
        catalog.add_session("s4", "bob", "c4", datetime(2026, 3, 1, 13, 0))


def test_schedule_state_and_atomic_fire(catalog: Catalog) -> None:
    catalog.ensure_asset("docs", "files", "/srv/docs")
    catalog.add_policy(_policy())
    catalog.reset_schedule_state("p", ["incremental 0 * * * *", "full 0 3 * * 0"], T0)
    assert catalog.schedule_state() == {"p": {"incremental 0 * * * *": T0, "full 0 3 * * 0": T0}}
    later = T0 + timedelta(hours=1)
    job = catalog.fire_schedule(
        "p",
        {"incremental 0 * * * *": later},
        job_kind="policy_backup",
        job_params={"policy": "p", "asset": "docs"},
        job_resource="asset:docs,store",
        log=[("info", "scheduled"), ("warning", "2 missed")],
    )
    assert job is not None and job.state == "queued" and job.params["policy"] == "p"
    assert [(line.seq, line.message) for line in catalog.job_log(job.id)] == [
        (1, "scheduled"),
        (2, "2 missed"),
    ]
    assert catalog.schedule_state("p")["p"]["incremental 0 * * * *"] == later
    assert catalog.fire_schedule("p", {"new entry": later}) is None
    # Changing the schedule keeps known entries, starts new ones now and drops the rest.
    catalog.reset_schedule_state("p", ["incremental 0 * * * *", "full 0 4 * * 0"], later)
    assert catalog.schedule_state("p") == {
        "p": {"incremental 0 * * * *": later, "full 0 4 * * 0": later}
    }
    # A bad log level fails the whole fire: neither state nor job is written.
    jobs_before = len(catalog.list_jobs())
    with pytest.raises(InvalidInput):
        catalog.fire_schedule(
            "p",
            {"incremental 0 * * * *": later + timedelta(hours=1)},
            job_kind="policy_backup",
            log=[("loud", "x")],
        )
    assert len(catalog.list_jobs()) == jobs_before
    assert catalog.schedule_state("p")["p"]["incremental 0 * * * *"] == later
    with pytest.raises(NotFound):
        catalog.fire_schedule("nope", {"x": later})
    catalog.delete_policy("p")
    assert catalog.schedule_state() == {}


def test_settings_documents(catalog: Catalog) -> None:
    assert catalog.get_settings("appliance") == {}
    assert catalog.put_settings("appliance", {"timezone": "UTC"}) == {"timezone": "UTC"}
    catalog.put_settings("appliance", {"timezone": "Europe/Berlin", "paused": True})
    assert catalog.get_settings("appliance") == {"timezone": "Europe/Berlin", "paused": True}
    with pytest.raises(InvalidInput):
        catalog.put_settings("appliance", {"bad": float("nan")})


def test_count_jobs_by_state(catalog: Catalog) -> None:
    assert catalog.count_jobs() == {}
    first = catalog.create_job("verify", {})
    catalog.create_job("verify", {})
    catalog.update_job(first.id, state="running")
    assert catalog.count_jobs() == {"queued": 1, "running": 1}
