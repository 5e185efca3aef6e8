"""The catalog's jobs and their logs, policies, pools, media, users, tokens and the audit log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from catalog_support import T0, FakeClock, open_catalog

from appliance.catalog import Catalog, PolicyRecord
from appliance.errors import Conflict, InvalidInput, NotFound


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(catalog_url: str, clock: FakeClock) -> Iterator[Catalog]:
    yield from open_catalog(catalog_url, clock)


# --- jobs ----------------------------------------------------------------------------------------


def test_job_lifecycle_stamps_start_and_finish(catalog: Catalog, clock: FakeClock) -> None:
    job = catalog.create_job("backup", {"asset": "docs"}, resource="pool:pool1")
    assert (job.state, job.created_at, job.started_at, job.finished_at) == (
        "queued",
        T0,
        None,
        None,
    )
    assert (job.progress, job.result, job.error) == ({}, None, None)
    assert len(job.id) == 32 and int(job.id, 16) >= 0

    clock.advance(5)
    running = catalog.update_job(job.id, state="running")
    assert (running.state, running.started_at, running.finished_at) == (
        "running",
        T0 + timedelta(seconds=5),
        None,
    )
    clock.advance(1)
    # Same state again is a no-op for the timestamps; progress is replaced, not merged.
    catalog.update_job(job.id, state="running", progress={"files": 10, "bytes": 100})
    assert catalog.update_job(job.id, progress={"files": 20}).progress == {"files": 20}
    assert catalog.get_job(job.id).started_at == T0 + timedelta(seconds=5)

    clock.advance(10)
    done = catalog.update_job(job.id, state="succeeded", result={"point": "aaaa000000000001"})
    assert done.finished_at == T0 + timedelta(seconds=16)
    assert done.result == {"point": "aaaa000000000001"}
    assert done.params == {"asset": "docs"} and done.resource == "pool:pool1"

    with pytest.raises(Conflict, match="succeeded; it cannot become running"):
        catalog.update_job(job.id, state="running")
    assert catalog.get_job(job.id) == done


def test_job_state_machine_refuses_bad_moves(catalog: Catalog, clock: FakeClock) -> None:
    job = catalog.create_job("verify", {})
    with pytest.raises(Conflict):
        catalog.update_job(job.id, state="succeeded")  # never ran
    with pytest.raises(InvalidInput, match="job state"):
        catalog.update_job(job.id, state="paused")
    with pytest.raises(NotFound):
        catalog.update_job("0" * 32, state="running")
    with pytest.raises(NotFound):
        catalog.get_job("0" * 32)
    cancelled = catalog.update_job(job.id, state="cancelled")
    assert cancelled.finished_at == T0 and cancelled.started_at is None
    failed = catalog.create_job("prune", {})
    catalog.update_job(failed.id, state="running")
    clock.advance(2)
    outcome = catalog.update_job(failed.id, state="failed", error={"code": "store_full"})
    assert outcome.error == {"code": "store_full"} and outcome.finished_at == clock.now


def test_interrupted_job_resumes_with_fresh_start_time(catalog: Catalog, clock: FakeClock) -> None:
    job = catalog.create_job("restore", {})
    catalog.update_job(job.id, state="running")
    clock.advance(60)
    stopped = catalog.update_job(job.id, state="interrupted")
    assert stopped.finished_at == T0 + timedelta(seconds=60)
    clock.advance(60)
    resumed = catalog.update_job(job.id, state="running")
    assert resumed.started_at == T0 + timedelta(seconds=120)
    assert resumed.finished_at is None


def test_list_jobs_newest_first_with_state_filter_and_limit(
    catalog: Catalog, clock: FakeClock
) -> None:
    made = []
    for kind in ("backup", "verify", "prune", "gc"):
        made.append(catalog.create_job(kind, {}).id)
        clock.advance(1)
    catalog.update_job(made[1], state="running")
    assert [j.id for j in catalog.list_jobs()] == made[::-1]
    assert [j.id for j in catalog.list_jobs(limit=2)] == made[:1:-1]
    assert [j.id for j in catalog.list_jobs(state="running")] == [made[1]]
    assert [j.id for j in catalog.list_jobs(state="queued")] == [made[3], made[2], made[0]]
    with pytest.raises(InvalidInput):
        catalog.list_jobs(limit=0)


def test_job_log_keeps_order_and_follows_from_a_seq(catalog: Catalog, clock: FakeClock) -> None:
    job = catalog.create_job("backup", {})
    other = catalog.create_job("backup", {})
    for n in range(5):
        clock.advance(1)
        catalog.append_job_log(job.id, "info", f"line {n}")
        catalog.append_job_log(other.id, "debug", f"other {n}")
    lines = catalog.job_log(job.id)
    assert [(line.seq, line.message) for line in lines] == [(n + 1, f"line {n}") for n in range(5)]
    assert [line.at for line in lines] == [T0 + timedelta(seconds=n + 1) for n in range(5)]
    assert [line.seq for line in catalog.job_log(job.id, after_seq=3)] == [4, 5]
    assert catalog.job_log(job.id, after_seq=5) == []
    assert {line.job_id for line in catalog.job_log(other.id)} == {other.id}
    with pytest.raises(NotFound):
        catalog.append_job_log("0" * 32, "info", "lost")
    with pytest.raises(NotFound):
        catalog.job_log("0" * 32)
    with pytest.raises(InvalidInput, match="log level"):
        catalog.append_job_log(job.id, "loud", "?")


def test_concurrent_log_writers_get_distinct_consecutive_seqs(catalog: Catalog) -> None:
    job = catalog.create_job("backup", {})
    barrier = threading.Barrier(4)

    def write(worker: int) -> None:
        barrier.wait()
        for n in range(15):
            catalog.append_job_log(job.id, "info", f"{worker}:{n}")

    with ThreadPoolExecutor(4) as executor:
        for future in [executor.submit(write, worker) for worker in range(4)]:
            future.result()
    lines = catalog.job_log(job.id)
    assert [line.seq for line in lines] == list(range(1, 61))
    for worker in range(4):
        # Each writer's own lines appear in the order it wrote them.
        mine = [line.message for line in lines if line.message.startswith(f"{worker}:")]
        assert mine == [f"{worker}:{n}" for n in range(15)]


def test_mark_running_jobs_interrupted(catalog: Catalog, clock: FakeClock) -> None:
    queued = catalog.create_job("backup", {})
    running = [catalog.create_job("backup", {}) for _ in range(2)]
    done = catalog.create_job("verify", {})
    for job in [*running, done]:
        catalog.update_job(job.id, state="running")
    catalog.append_job_log(running[0].id, "info", "reading")
    catalog.update_job(done.id, state="succeeded")
    clock.advance(30)

    assert catalog.mark_running_jobs_interrupted() == 2
    for job in running:
        after = catalog.get_job(job.id)
        assert after.state == "interrupted"
        assert after.finished_at == T0 + timedelta(seconds=30)
    assert catalog.get_job(queued.id).state == "queued"
    assert catalog.get_job(done.id).finished_at == T0
    log = catalog.job_log(running[0].id)
    assert [(line.seq, line.level) for line in log] == [(1, "info"), (2, "warning")]
    assert "interrupted" in log[1].message
    assert catalog.mark_running_jobs_interrupted() == 0


def test_values_the_database_cannot_store_are_invalid_input(catalog: Catalog) -> None:
    with pytest.raises(InvalidInput, match="not storable"):
        catalog.create_job("backup", {"when": object()})
    with pytest.raises(InvalidInput, match="not storable"):
        catalog.audit("admin", "x", "y", {"ratio": float("nan")})
    with pytest.raises(InvalidInput, match="longer than 255"):
        catalog.ensure_asset("x" * 256, "files")
    with pytest.raises(InvalidInput, match="longer than 255"):
        catalog.mark_verified("aaaa000000000001", T0, "damaged: " * 30)
    with pytest.raises(InvalidInput, match="longer than 255"):
        catalog.create_job("backup", {}, resource="pool:" + "p" * 255)
    assert catalog.list_jobs() == []
    assert catalog.list_audit() == []


# --- policies, pools, media, users, tokens, audit ------------------------------------------------


def test_policies_crud(catalog: Catalog) -> None:
    nightly = PolicyRecord(
        name="nightly",
        assets=["docs"],
        schedule={"cron": "0 2 * * *"},
        mode="incremental",
        retention={"daily": 7, "weekly": 4},
        rpo_seconds=86_400,
    )
    with pytest.raises(NotFound, match="asset"):
        catalog.add_policy(nightly)
    catalog.ensure_asset("docs", "files", "/srv/docs")
    assert catalog.add_policy(nightly) == nightly
    with pytest.raises(Conflict):
        catalog.add_policy(nightly)
    hourly = PolicyRecord("hourly", "docs", {"every": 3600}, "full", {"hourly": 24}, 3600)
    catalog.add_policy(hourly)
    changed = PolicyRecord("nightly", "docs", {"cron": "0 3 * * *"}, "full", {}, 7200)
    assert catalog.update_policy(changed) == changed
    assert catalog.get_policy("nightly") == changed
    assert [p.name for p in catalog.list_policies(asset="docs")] == ["hourly", "nightly"]
    assert catalog.list_policies(asset="other") == []
    catalog.delete_policy("hourly")
    with pytest.raises(NotFound):
        catalog.get_policy("hourly")
    with pytest.raises(InvalidInput):
        catalog.add_policy(PolicyRecord("bad", "docs", {}, "sometimes", {}, 0))


def test_pools_crud(catalog: Catalog) -> None:
    pool = catalog.add_pool("pool1", "/srv/pool1", "store-1")
    assert pool.created_at == T0
    with pytest.raises(Conflict, match="pool1 already exists"):
        catalog.add_pool("pool1", "/elsewhere", "store-2")
    catalog.add_pool("pool0", "/srv/pool0", "store-0")
    assert [p.name for p in catalog.list_pools()] == ["pool0", "pool1"]
    assert catalog.get_pool("pool1") == pool
    catalog.delete_pool("pool0")
    with pytest.raises(NotFound):
        catalog.get_pool("pool0")


def test_media_are_recognised_again(catalog: Catalog, clock: FakeClock) -> None:
    first = catalog.ensure_media("WD-123", "usb", "offsite-a")
    clock.advance(86_400)
    again = catalog.ensure_media("WD-123", "usb", "offsite-A")
    assert (again.label, again.last_seen) == ("offsite-A", first.last_seen + timedelta(days=1))
    catalog.ensure_media("LTO0001", "tape", "weekly")
    assert [m.identity for m in catalog.list_media()] == ["LTO0001", "WD-123"]
    assert [m.identity for m in catalog.list_media(kind="tape")] == ["LTO0001"]
    assert catalog.get_media("WD-123") == again
    with pytest.raises(Conflict):
        catalog.ensure_media("WD-123", "tape", "?")


def test_users_and_tokens(catalog: Catalog, clock: FakeClock) -> None:
    catalog.add_user("admin", "admin", "$argon2id$v=19$m=65536,t=3,p=4$abc$def")
    with pytest.raises(Conflict, match="user admin already exists"):
        catalog.add_user("admin", "viewer", "$argon2id$other")
    with pytest.raises(InvalidInput, match="role"):
        catalog.add_user("root", "god", "$argon2id$x")
    catalog.add_user("ops", "operator", "$argon2id$y")
    assert [(u.name, u.role) for u in catalog.list_users()] == [
        ("admin", "admin"),
        ("ops", "operator"),
    ]
    token = catalog.add_token("ops", "sha256:aa", ["jobs:read", "backup:run"])
    assert token.scopes == ["jobs:read", "backup:run"] and token.revoked_at is None
    with pytest.raises(Conflict):
        catalog.add_token("admin", "sha256:aa", [])
    with pytest.raises(NotFound):
        catalog.add_token("nobody", "sha256:bb", [])
    assert catalog.find_active_token("sha256:aa") == token
    clock.advance(10)
    revoked = catalog.revoke_token(token.id)
    assert revoked.revoked_at == T0 + timedelta(seconds=10)
    with pytest.raises(NotFound):
        catalog.find_active_token("sha256:aa")
    assert catalog.list_tokens(user="ops") == [revoked]
    assert catalog.list_tokens(user="admin") == []


def test_audit_log_newest_first(catalog: Catalog, clock: FakeClock) -> None:
    for n in range(5):
        catalog.audit("admin", "policy.update", f"policy/{n}", {"n": n})
        clock.advance(1)
    catalog.audit("system", "startup", "appliance")
    newest = catalog.list_audit(limit=3)
    assert [(a.action, a.target) for a in newest] == [
        ("startup", "appliance"),
        ("policy.update", "policy/4"),
        ("policy.update", "policy/3"),
    ]
    assert newest[0].details == {} and newest[1].details == {"n": 4}
    assert newest[1].at == T0 + timedelta(seconds=4)
    assert len(catalog.list_audit()) == 6


def test_head_revision_constant_matches_migrations():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from appliance.catalog import catalog as catalog_module

    config = Config()
    config.set_main_option("script_location", str(catalog_module.MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == catalog_module.HEAD_REVISION
