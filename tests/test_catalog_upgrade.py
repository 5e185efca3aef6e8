"""A catalog written by revision 0003 opens with today's code and keeps everything.

``tests/fixtures/catalog-0003.sqlite`` was made once with the catalog code of revision 0003
(before locations existed) through its public API: two stores (a pool and a USB disk), a pool
row, a medium, two assets, four points with copies in every old state, jobs with log lines
(succeeded, interrupted, and one created by a fired schedule), three users (one disabled), two
API tokens (one revoked), a browser session, audit lines, a policy with schedule state, a
settings document and a proven boot test. The file is frozen: never regenerate it with newer
code. Opening a copy migrates it to the head revision (0004: locations), which must attach
every old copy to its store's home location.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.catalog import Catalog
from appliance.catalog.catalog import HEAD_REVISION
from appliance.catalog.records import home_location_id
from appliance.errors import Conflict

FIXTURE = Path(__file__).parent / "fixtures" / "catalog-0003.sqlite"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POOL = "0123456789abcdef" * 4
USB = "fedcba9876543210" * 4


def revision(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return str(connection.execute("SELECT version_num FROM alembic_version").fetchone()[0])


@pytest.fixture
def upgraded(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.db"
    shutil.copyfile(FIXTURE, path)
    assert revision(path) == "0003"
    catalog = Catalog.open(f"sqlite:///{path}", clock=lambda: T0 + timedelta(days=1))
    assert revision(path) == HEAD_REVISION
    return catalog


def test_the_fixture_is_frozen_at_0003() -> None:
    assert revision(FIXTURE) == "0003"


def test_points_assets_stores_pools_and_media_survive(upgraded: Catalog) -> None:
    with upgraded as catalog:
        assert [a.name for a in catalog.list_assets()] == ["docs", "web"]
        assert catalog.get_asset("docs").description == "the shared documents"
        assert [s.store_id for s in catalog.list_stores()] == [POOL, USB]
        assert catalog.get_pool("pool1").store_id == POOL
        medium = catalog.get_media("WD-WX12345678")
        assert (medium.kind, medium.label, medium.location_id) == ("usb", "offsite-1", None)
        points = {p.id: p for p in catalog.list_points()}
        assert list(points) == [
            "aaaa000000000001",
            "bbbb000000000002",
            "cccc000000000003",
            "dddd000000000004",
        ]
        first = points["aaaa000000000001"]
        assert (first.verify_status, first.labels, first.file_count) == (
            "ok",
            {"reason": "first"},
            12,
        )
        assert points["bbbb000000000002"].parent_id == "aaaa000000000001"
        assert points["cccc000000000003"].logical_bytes == 2**33
        assert catalog.get_point("dddd").base_full_id == "aaaa000000000001"
        assert [p.id for p in catalog.list_points(store_id=POOL)] == [
            "aaaa000000000001",
            "bbbb000000000002",
            "cccc000000000003",
        ]
        assert [p.id for p in catalog.list_points(store_id=USB)] == [
            "aaaa000000000001",
            "dddd000000000004",
        ]


def test_every_old_copy_is_attached_to_its_stores_home_location(upgraded: Catalog) -> None:
    with upgraded as catalog:
        pool, usb = catalog.list_locations()
        assert pool.id == home_location_id(POOL) and usb.id == home_location_id(USB)
        assert (pool.kind, pool.address, pool.label, pool.access) == (
            "pool_dir",
            "/srv/pool1",
            "pool1",
            "random",
        )
        assert (pool.online, pool.removable, pool.immutable, pool.offsite) == (
            True,
            False,
            False,
            False,
        )
        assert (usb.kind, usb.address, usb.online, usb.removable) == (
            "removable",
            "/media/usb-backup",
            False,
            True,
        )
        assert usb.created_at == catalog.get_store(USB).created_at
        copies = {
            (c.point_id, c.store_id): c
            for point in catalog.list_points()
            for c in catalog.point_copies(point.id)
        }
        assert {key: c.state for key, c in copies.items()} == {
            ("aaaa000000000001", POOL): "present",
            ("aaaa000000000001", USB): "present",
            ("bbbb000000000002", POOL): "present",
            ("bbbb000000000002", USB): "copying",
            ("cccc000000000003", POOL): "present",
            ("dddd000000000004", POOL): "deleted",
            ("dddd000000000004", USB): "present",
        }
        for (_point, store), copy in copies.items():
            assert copy.location_id == home_location_id(store)
            assert (copy.storage_class, copy.retain_until, copy.verified_at) == (None, None, None)
        assert copies[("aaaa000000000001", USB)].added_at == T0 + timedelta(minutes=2)
        assert [c.point_id for c in catalog.copies_at(usb.id, state="present")] == [
            "aaaa000000000001",
            "dddd000000000004",
        ]


def test_old_copies_work_with_old_and_new_methods(upgraded: Catalog) -> None:
    with upgraded as catalog:
        catalog.set_copy_state("bbbb000000000002", USB, "present")
        bucket = catalog.add_location(POOL, "s3_bucket", "s3://cold/appliance", access="cold")
        copy = catalog.set_copy("aaaa000000000001", bucket.id, "archived", "DEEP_ARCHIVE")
        assert copy.store_id == POOL
        assert [c.location_id for c in catalog.copies_of("aaaa000000000001")] == [
            home_location_id(POOL),
            home_location_id(USB),
            bucket.id,
        ]
        with pytest.raises(Conflict):
            catalog.remove_location(home_location_id(POOL))


def test_jobs_and_their_logs_survive(upgraded: Catalog) -> None:
    with upgraded as catalog:
        jobs = {job.kind + "/" + job.state: job for job in catalog.list_jobs()}
        assert set(jobs) == {"backup/succeeded", "verify/interrupted", "backup/queued"}
        done = jobs["backup/succeeded"]
        assert (done.result, done.progress, done.resource) == (
            {"point": "bbbb000000000002"},
            {"files": 13},
            "pool1",
        )
        assert [(line.seq, line.level) for line in catalog.job_log(done.id)] == [
            (1, "info"),
            (2, "warning"),
        ]
        interrupted = catalog.job_log(jobs["verify/interrupted"].id)
        assert [line.message for line in interrupted][-1].startswith("interrupted:")
        scheduled = jobs["backup/queued"]
        assert scheduled.params == {"asset": "docs", "policy": "docs-nightly"}
        assert [line.message for line in catalog.job_log(scheduled.id)] == [
            "scheduled by docs-nightly"
        ]
        # The log counters survived too: the next line gets the next seq.
        catalog.append_job_log(done.id, "info", "after the upgrade")
        assert catalog.job_log(done.id, after_seq=2)[0].seq == 3
        assert catalog.count_jobs() == {"succeeded": 1, "interrupted": 1, "queued": 1}


def test_accounts_survive(upgraded: Catalog) -> None:
    with upgraded as catalog:
        users = {user.name: user for user in catalog.list_users()}
        assert {name: user.role for name, user in users.items()} == {
            "admin": "admin",
            "olga": "operator",
            "vic": "viewer",
        }
        assert users["vic"].disabled_at is not None and users["olga"].disabled_at is None
        assert catalog.find_active_token("a" * 64).scopes == ["points:read", "jobs:write"]
        assert [t.revoked_at is not None for t in catalog.list_tokens("admin")] == [True]
        assert catalog.get_session("c" * 64).user == "admin"
        assert [(line.action, line.target) for line in catalog.list_audit()] == [
            ("user.disable", "user/vic"),
            ("user.add", "user/olga"),
        ]


def test_policies_schedules_settings_and_failovers_survive(upgraded: Catalog) -> None:
    with upgraded as catalog:
        policy = catalog.get_policy("docs-nightly")
        assert (policy.asset, policy.mode, policy.rpo_seconds) == ("docs", "incremental", 86400)
        assert policy.retention == {"daily": 7, "weekly": 4}
        state = catalog.schedule_state("docs-nightly")
        assert list(state["docs-nightly"]) == ["0 2 * * *|incremental"]
        assert catalog.get_settings("appliance")["hostname"] == "backup-1"
        session = catalog.get_failover_session("f0f0f0f0f0f0")
        assert (session.asset, session.point_id, session.state) == (
            "web",
            "cccc000000000003",
            "stopped",
        )
        assert session.details["rto_seconds"] == 42
        assert list(catalog.last_boot_tests(proven_only=True)) == ["web"]


def test_the_catalogs_repositories_share_no_method_name() -> None:
    """``Catalog`` inherits every repository: a method name in two of them would silently hide
    one behind the other."""
    from appliance.catalog.catalog import Catalog

    seen: dict[str, str] = {}
    for base in Catalog.__mro__[1:]:
        if base is object:
            continue
        for name, value in vars(base).items():
            if callable(value) and not name.startswith("__"):
                assert name not in seen, f"{name} is in {seen.get(name)} and {base.__name__}"
                seen[name] = base.__name__
    assert "add_point" in seen and "list_locations" in seen and "create_job" in seen
