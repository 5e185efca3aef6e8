"""The catalog against SQLite and a real throwaway PostgreSQL (every test runs on both)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from catalog_support import T0, FakeClock, ids, open_catalog, point
from sqlalchemy import MetaData, create_engine, inspect, text

from appliance.catalog import Catalog
from appliance.catalog.catalog import HEAD_REVISION, MIGRATIONS_DIR
from appliance.catalog.models import Base
from appliance.catalog.records import home_location_id
from appliance.errors import Conflict, InvalidInput, NotFound


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(catalog_url: str, clock: FakeClock) -> Iterator[Catalog]:
    yield from open_catalog(catalog_url, clock)


@pytest.fixture
def pool(catalog: Catalog) -> str:
    return catalog.ensure_store("pool-store", "pool", "/srv/pool1").store_id


# --- schema and connection -----------------------------------------------------------------------


def test_models_and_migrations_agree(catalog_url: str) -> None:
    Catalog.open(catalog_url).close()
    engine = create_engine(catalog_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            # The comparison does see the schema: against no models, every table is extra.
            diffs = compare_metadata(context, MetaData())
            assert {diff[1].name for diff in diffs if diff[0] == "remove_table"} == set(
                Base.metadata.tables
            )
    finally:
        engine.dispose()


def test_open_twice_keeps_data_and_stays_at_head(catalog_url: str, clock: FakeClock) -> None:
    with Catalog.open(catalog_url, clock=clock) as first:
        first.ensure_asset("docs", "files", "/srv/docs")
    with Catalog.open(catalog_url, clock=clock) as second:
        assert second.get_asset("docs").source == "/srv/docs"
    engine = create_engine(catalog_url)
    try:
        with engine.connect() as connection:
            assert (
                connection.scalar(text("SELECT version_num FROM alembic_version")) == HEAD_REVISION
            )
    finally:
        engine.dispose()


def test_concurrent_opens_of_a_fresh_database_all_succeed(catalog_url: str) -> None:
    barrier = threading.Barrier(4)

    def open_and_close() -> None:
        barrier.wait()
        Catalog.open(catalog_url).close()

    with ThreadPoolExecutor(4) as executor:
        for future in [executor.submit(open_and_close) for _ in range(4)]:
            future.result()


def test_downgrade_to_base_and_upgrade_again(catalog_url: str) -> None:
    Catalog.open(catalog_url).close()
    engine = create_engine(catalog_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    with Catalog.open(catalog_url) as catalog:
        assert catalog.list_assets() == []


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    # The engine is private; the connection settings are what this test is about.
    with (
        Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}") as catalog,
        catalog._engine.connect() as connection,
    ):
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_sqlite_catalog_in_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        Catalog.open(f"sqlite:///{tmp_path / 'missing' / 'catalog.db'}")
    assert not (tmp_path / "missing").exists()


def test_records_module_does_not_load_sqlalchemy() -> None:
    probe = (
        "import sys, appliance.catalog.records, appliance.catalog; "
        "assert not any(m.split('.')[0] in ('sqlalchemy', 'alembic') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


# --- assets and stores ---------------------------------------------------------------------------


def test_ensure_asset_creates_once_updates_source_and_keeps_kind(
    catalog: Catalog, clock: FakeClock
) -> None:
    created = catalog.ensure_asset("docs", "files", "/srv/docs")
    clock.advance(60)
    assert catalog.ensure_asset("docs", "files") == created  # no source: nothing changes
    moved = catalog.ensure_asset("docs", "files", "/srv/documents")
    assert moved.source == "/srv/documents"
    assert moved.created_at == T0
    with pytest.raises(Conflict, match="files asset"):
        catalog.ensure_asset("docs", "vm")
    with pytest.raises(InvalidInput):
        catalog.ensure_asset("db", "database")
    catalog.ensure_asset("alpha", "vm", '["disk0.qcow2"]')
    assert [a.name for a in catalog.list_assets()] == ["alpha", "docs"]
    assert catalog.get_asset("docs") == moved
    with pytest.raises(NotFound):
        catalog.get_asset("nope")


def test_ensure_store_follows_a_moved_store(catalog: Catalog) -> None:
    catalog.ensure_store("usb-1", "usb", "/media/usb-a")
    catalog.ensure_store("usb-1", "usb", "/media/usb-b")
    catalog.ensure_store("bucket-1", "bucket", "s3://cold")
    stores = catalog.list_stores()
    assert [(s.store_id, s.location) for s in stores] == [
        ("bucket-1", "s3://cold"),
        ("usb-1", "/media/usb-b"),
    ]
    assert catalog.get_store("usb-1").location_kind == "usb"
    with pytest.raises(InvalidInput, match="location kind"):
        catalog.ensure_store("x", "floppy", "/dev/fd0")


# --- recovery points -----------------------------------------------------------------------------


def test_add_point_records_a_present_copy_and_its_asset(
    catalog: Catalog, pool: str, clock: FakeClock
) -> None:
    clock.advance(30)
    catalog.add_point(point("a1b2c3d4e5f60718", source="/srv/docs"), pool)
    catalog.add_point(point("0000111122223333", "web-vm", kind="image", source="vm.json"), pool)
    assert catalog.get_asset("docs").kind == "files"
    assert catalog.get_asset("docs").source == "/srv/docs"
    assert catalog.get_asset("web-vm").kind == "vm"
    copies = catalog.point_copies("a1b2c3d4e5f60718")
    assert [(c.store_id, c.state, c.added_at) for c in copies] == [
        (pool, "present", T0 + timedelta(seconds=30))
    ]


def test_add_point_refuses_duplicates_unknown_stores_and_kind_clashes(
    catalog: Catalog, pool: str
) -> None:
    catalog.add_point(point("a1b2c3d4e5f60718"), pool)
    with pytest.raises(Conflict, match="already in the catalog"):
        catalog.add_point(point("a1b2c3d4e5f60718", minutes=5), pool)
    with pytest.raises(NotFound, match="store"):
        catalog.add_point(point("ffff000011112222"), "no-such-store")
    with pytest.raises(Conflict, match="files asset"):
        catalog.add_point(point("eeee000011112222", kind="image"), pool)
    with pytest.raises(InvalidInput, match="backup mode"):
        catalog.add_point(point("dddd000011112222", mode="sometimes"), pool)
    assert ids(catalog.list_points()) == ["a1b2c3d4e5f60718"]


def test_point_fields_round_trip_including_large_numbers(catalog: Catalog, pool: str) -> None:
    original = point(
        "a1b2c3d4e5f60718",
        mode="incremental",
        parent_id="0000000000000001",
        base_full_id="0000000000000000",
        source="/srv/docs",
        logical_bytes=5 * 2**40,
        stored_bytes=3 * 2**32,
        file_count=2**33,
        warning_count=7,
        status="partial",
        labels={"tier": "gold", "tags": ["a", "b"], "n": 1},
    )
    catalog.add_point(original, pool)
    assert catalog.get_point("a1b2c3d4e5f60718") == original


def test_get_point_by_id_or_unique_prefix(catalog: Catalog, pool: str) -> None:
    for point_id in ("0123456789abcdef", "0123456700000000", "fedcba9876543210"):
        catalog.add_point(point(point_id), pool)
    assert catalog.get_point("fedcba9876543210").id == "fedcba9876543210"
    assert catalog.get_point("fedc").id == "fedcba9876543210"
    assert catalog.get_point("012345678").id == "0123456789abcdef"
    with pytest.raises(InvalidInput) as ambiguous:
        catalog.get_point("01234567")
    assert "0123456789abcdef" in ambiguous.value.message
    assert "0123456700000000" in ambiguous.value.message
    assert ambiguous.value.details["candidates"] == ["0123456700000000", "0123456789abcdef"]
    with pytest.raises(InvalidInput, match="at least 4"):
        catalog.get_point("fed")
    with pytest.raises(NotFound):
        catalog.get_point("aaaa")
    # Exact on both backends: no case folding (SQLite's LIKE would), no wildcards.
    with pytest.raises(NotFound):
        catalog.get_point("FEDC")
    with pytest.raises(NotFound):
        catalog.get_point("0123%")
    with pytest.raises(NotFound):
        catalog.get_point("01_3")


def test_timestamps_are_stored_as_utc_instants(catalog: Catalog, pool: str) -> None:
    plus_five = timezone(timedelta(hours=5))
    # 12:00+05:00 is 07:00 UTC: earlier than 08:00 UTC although its wall-clock digits are later.
    early = point("aaaa000000000001", created_at=datetime(2026, 3, 1, 12, 0, tzinfo=plus_five))
    late = point("bbbb000000000002", created_at=datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    catalog.add_point(late, pool)
    catalog.add_point(early, pool)
    listed = catalog.list_points()
    assert ids(listed) == ["aaaa000000000001", "bbbb000000000002"]
    assert listed[0].created_at == datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    assert listed[0].created_at.utcoffset() == timedelta(0)
    assert listed[0].created_at.tzinfo == UTC
    verified = datetime(2026, 3, 2, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-3)))
    catalog.mark_verified("aaaa000000000001", verified, "ok")
    got = catalog.get_point("aaaa000000000001")
    assert got.verified_at == verified
    assert got.verified_at is not None and got.verified_at.tzinfo == UTC
    assert got.verified_at.hour == 4 and got.verified_at.microsecond == 123456
    with pytest.raises(InvalidInput, match="time zone"):
        catalog.add_point(point("cccc000000000003", created_at=datetime(2026, 3, 1)), pool)


def test_list_points_orders_by_time_and_filters_by_asset_and_store(
    catalog: Catalog, pool: str
) -> None:
    usb = catalog.ensure_store("usb-1", "usb", "/media/usb").store_id
    catalog.add_point(point("cccc000000000003", minutes=30), pool)
    catalog.add_point(point("aaaa000000000001", minutes=10), pool)
    catalog.add_point(point("bbbb000000000002", "mail", minutes=20), usb)
    catalog.add_copy("aaaa000000000001", usb, state="present")
    catalog.add_copy("cccc000000000003", usb, state="copying")
    assert ids(catalog.list_points()) == [
        "aaaa000000000001",
        "bbbb000000000002",
        "cccc000000000003",
    ]
    assert ids(catalog.list_points(asset="docs")) == ["aaaa000000000001", "cccc000000000003"]
    # A copy still being written is not yet a point of that store.
    assert ids(catalog.list_points(store_id=usb)) == ["aaaa000000000001", "bbbb000000000002"]
    assert ids(catalog.list_points(asset="docs", store_id=usb)) == ["aaaa000000000001"]
    assert catalog.list_points(asset="nobody") == []


def test_newest_points_are_limited_in_the_query_newest_first(catalog: Catalog, pool: str) -> None:
    for n in range(7):
        catalog.add_point(point(f"{n:016x}", "docs" if n % 2 else "mail", minutes=n), pool)
    assert ids(catalog.newest_points(3)) == [f"{n:016x}" for n in (6, 5, 4)]
    assert ids(catalog.newest_points(2, asset="docs")) == [f"{n:016x}" for n in (5, 3)]
    assert len(catalog.newest_points(100)) == 7
    assert catalog.newest_points(5, asset="nobody") == []


def test_latest_point_by_kind_and_mode(catalog: Catalog, pool: str) -> None:
    def latest(**filters: str) -> str | None:
        found = catalog.latest_point("docs", **filters)
        return None if found is None else found.id

    assert latest() is None
    catalog.add_point(point("aaaa000000000001", minutes=0, mode="full"), pool)
    catalog.add_point(point("bbbb000000000002", minutes=10, mode="incremental"), pool)
    catalog.add_point(point("cccc000000000003", minutes=20, mode="differential"), pool)
    catalog.add_point(point("dddd000000000004", "other", minutes=30), pool)
    assert latest() == "cccc000000000003"
    assert latest(mode="full") == "aaaa000000000001"
    assert latest(kind="files", mode="incremental") == "bbbb000000000002"
    assert latest(kind="image") is None


def test_delete_point_forgets_it_and_its_copies(catalog: Catalog, pool: str) -> None:
    usb = catalog.ensure_store("usb-1", "usb", "/media/usb").store_id
    catalog.add_point(point("aaaa000000000001"), pool)
    catalog.add_point(point("bbbb000000000002", minutes=1), pool)
    catalog.add_copy("aaaa000000000001", usb)
    catalog.delete_point("aaaa000000000001")
    with pytest.raises(NotFound):
        catalog.get_point("aaaa000000000001")
    with pytest.raises(NotFound):
        catalog.point_copies("aaaa000000000001")
    with pytest.raises(NotFound):
        catalog.delete_point("aaaa000000000001")
    assert ids(catalog.list_points(store_id=pool)) == ["bbbb000000000002"]
    # The point ID is free again: the copy rows went with the point.
    catalog.add_point(point("aaaa000000000001"), usb)


def test_copies_move_through_their_states(catalog: Catalog, pool: str, clock: FakeClock) -> None:
    tape = catalog.ensure_store("tape-1", "tape", "LTO0001").store_id
    catalog.add_point(point("aaaa000000000001"), pool)
    clock.advance(3600)
    assert catalog.add_copy("aaaa000000000001", tape).state == "copying"
    with pytest.raises(Conflict, match="already has a copy"):
        catalog.add_copy("aaaa000000000001", tape)
    catalog.set_copy_state("aaaa000000000001", tape, "present")
    catalog.set_copy_state("aaaa000000000001", pool, "deleted")
    copies = catalog.point_copies("aaaa000000000001")
    assert [(c.store_id, c.state) for c in copies] == [(pool, "deleted"), (tape, "present")]
    assert copies[1].added_at == T0 + timedelta(hours=1)
    with pytest.raises(NotFound):
        catalog.set_copy_state("aaaa000000000001", "nowhere", "present")
    with pytest.raises(InvalidInput):
        catalog.set_copy_state("aaaa000000000001", tape, "melted")


# --- locations and copies ------------------------------------------------------------------------


def test_stores_get_a_home_location_that_follows_them(catalog: Catalog) -> None:
    usb = catalog.ensure_store("usb-store", "usb", "/media/a").store_id
    (home,) = catalog.list_locations(usb)
    assert home.id == home_location_id(usb)
    assert (home.kind, home.address, home.removable, home.online) == (
        "removable",
        "/media/a",
        True,
        False,
    )
    catalog.ensure_store(usb, "usb", "/media/b")
    assert catalog.get_location(home.id).address == "/media/b"
    assert len(catalog.list_locations()) == 1


def test_locations_crud(catalog: Catalog, pool: str, clock: FakeClock) -> None:
    bucket = catalog.add_location(
        pool,
        "s3_bucket",
        "s3://cold/x",
        access="cold",
        immutable=True,
        offsite=True,
        details={"region": "eu"},
    )
    tape = catalog.add_location(pool, "tape_set", "weekly", label="weekly tapes", online=False)
    assert (tape.access, tape.removable, tape.label) == ("sequential", True, "weekly tapes")
    assert (bucket.label, bucket.immutable, bucket.offsite) == ("s3://cold/x", True, True)
    # Same creation time: then by ID.
    assert [loc.id for loc in catalog.list_locations(pool)] == sorted(
        [home_location_id(pool), bucket.id, tape.id]
    )
    clock.advance(60)
    seen = catalog.update_location(tape.id, online=True, details={"drive": "st0"})
    assert (seen.online, seen.last_seen_at, seen.details) == (True, clock.now, {"drive": "st0"})
    with pytest.raises(NotFound):
        catalog.add_location("nowhere", "peer", "https://peer")
    with pytest.raises(InvalidInput):
        catalog.add_location(pool, "floppy", "/dev/fd0")
    with pytest.raises(InvalidInput):
        catalog.add_location(pool, "peer", "https://peer", access="warm")
    with pytest.raises(Conflict):
        catalog.add_location(pool, "peer", "https://peer", location_id=tape.id)
    catalog.ensure_media("TAPE01", "tape", "weekly-1", location_id=tape.id)
    assert catalog.get_media("TAPE01").location_id == tape.id
    catalog.remove_location(tape.id)
    assert catalog.get_media("TAPE01").location_id is None
    with pytest.raises(NotFound):
        catalog.get_location(tape.id)


def test_set_copy_upserts_and_lists_by_point_and_location(
    catalog: Catalog, pool: str, clock: FakeClock
) -> None:
    catalog.add_point(point("aaaa000000000001"), pool)
    catalog.add_point(point("bbbb000000000002", minutes=1), pool)
    bucket = catalog.add_location(pool, "s3_bucket", "s3://cold/x", access="cold")
    until = T0 + timedelta(days=365)
    clock.advance(60)
    copy = catalog.set_copy("aaaa000000000001", bucket.id, "copying", retain_until=until)
    assert (copy.store_id, copy.location_id, copy.added_at) == (pool, bucket.id, clock.now)
    clock.advance(60)
    copy = catalog.set_copy("aaaa000000000001", bucket.id, "archived", "DEEP_ARCHIVE")
    assert (copy.state, copy.storage_class, copy.retain_until) == (
        "archived",
        "DEEP_ARCHIVE",
        until,
    )
    assert copy.added_at == T0 + timedelta(minutes=1)
    catalog.set_copy("bbbb000000000002", bucket.id, "lost")
    assert [c.location_id for c in catalog.copies_of("aaaa000000000001")] == [
        home_location_id(pool),
        bucket.id,
    ]
    assert [c.point_id for c in catalog.copies_at(bucket.id)] == [
        "aaaa000000000001",
        "bbbb000000000002",
    ]
    assert [c.point_id for c in catalog.copies_at(bucket.id, state="lost")] == ["bbbb000000000002"]
    verified = catalog.mark_copy_verified("aaaa000000000001", bucket.id, clock.now)
    assert verified.verified_at == clock.now
    # A copy holding data keeps its location; lost and deleted ones go with it.
    with pytest.raises(Conflict, match="still holds 1"):
        catalog.remove_location(bucket.id)
    catalog.set_copy("aaaa000000000001", bucket.id, "deleted")
    catalog.remove_location(bucket.id)
    assert [c.location_id for c in catalog.copies_of("bbbb000000000002")] == [
        home_location_id(pool)
    ]
    with pytest.raises(NotFound):
        catalog.set_copy("aaaa000000000001", "nowhere", "present")
    with pytest.raises(NotFound):
        catalog.set_copy("ffff000000000009", home_location_id(pool), "present")
    with pytest.raises(NotFound):
        catalog.mark_copy_verified("aaaa000000000001", "nowhere", clock.now)
    with pytest.raises(InvalidInput):
        catalog.copies_at(home_location_id(pool), state="melted")


def test_add_copy_refuses_a_second_copy_in_the_same_store(catalog: Catalog, pool: str) -> None:
    catalog.add_point(point("aaaa000000000001"), pool)
    bucket = catalog.add_location(pool, "s3_bucket", "s3://cold/x")
    usb = catalog.ensure_store("usb-store", "usb", "/media/a").store_id
    catalog.set_copy("aaaa000000000001", home_location_id(usb), "present")
    with pytest.raises(Conflict, match="already has a copy"):
        catalog.add_copy("aaaa000000000001", usb)
    catalog.set_copy("aaaa000000000001", bucket.id, "present")
    # The store-keyed state change acts on the store's home location only.
    catalog.set_copy_state("aaaa000000000001", pool, "deleted")
    states = {c.location_id: c.state for c in catalog.point_copies("aaaa000000000001")}
    assert states == {
        home_location_id(pool): "deleted",
        bucket.id: "present",
        home_location_id(usb): "present",
    }
    assert ids(catalog.list_points(store_id=pool)) == ["aaaa000000000001"]


def test_downgrade_to_0003_keeps_one_copy_per_store(catalog_url: str) -> None:
    with Catalog.open(catalog_url) as catalog:
        pool = catalog.ensure_store("pool-store", "pool", "/srv/pool1").store_id
        catalog.add_point(point("aaaa000000000001"), pool)
        bucket = catalog.add_location(pool, "s3_bucket", "s3://cold/x")
        catalog.set_copy("aaaa000000000001", bucket.id, "archived")
    engine = create_engine(catalog_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0003")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT point_id, store_id, state FROM point_copies"))
            assert [tuple(row) for row in rows] == [("aaaa000000000001", pool, "present")]
    finally:
        engine.dispose()
    with Catalog.open(catalog_url) as catalog:
        (copy,) = catalog.point_copies("aaaa000000000001")
        assert copy.location_id == home_location_id(pool)


# --- catalog rebuild -----------------------------------------------------------------------------


def test_replace_store_points_makes_the_store_listing_exact(catalog: Catalog, pool: str) -> None:
    usb = catalog.ensure_store("usb-1", "usb", "/media/usb").store_id
    only_pool = point("aaaa000000000001", minutes=1)
    both = point("bbbb000000000002", minutes=2, labels={"v": 1})
    only_usb = point("cccc000000000003", minutes=3)
    catalog.add_point(only_pool, pool)
    catalog.add_point(both, pool)
    catalog.add_copy(both.id, usb, state="present")
    catalog.add_point(only_usb, usb)
    catalog.mark_verified(both.id, T0 + timedelta(days=1), "ok")

    # What the USB disk holds now: `both` (its manifest says labels v=2) and a point the catalog
    # never heard of (written by another appliance, say). `only_usb` is gone from the disk.
    changed = point("bbbb000000000002", minutes=2, labels={"v": 2})
    new = point("dddd000000000004", "mail", minutes=4, kind="image")
    assert catalog.replace_store_points(usb, [changed, new]) == (1, 1)

    assert ids(catalog.list_points(store_id=usb)) == [both.id, new.id]
    assert ids(catalog.list_points(store_id=pool)) == [only_pool.id, both.id]
    assert ids(catalog.list_points()) == [only_pool.id, both.id, new.id]  # only_usb removed
    rebuilt = catalog.get_point(both.id)
    assert rebuilt.labels == {"v": 2}
    # The store's record carries no verification; the catalog's knowledge of it is kept.
    assert rebuilt.verified_at == T0 + timedelta(days=1)
    assert rebuilt.verify_status == "ok"
    assert catalog.get_asset("mail").kind == "vm"

    # Same listing again: nothing added or removed.
    assert catalog.replace_store_points(usb, [changed, new]) == (0, 0)

    # The pool lost everything: `only_pool` had no other copy and goes; `both` stays (on USB).
    assert catalog.replace_store_points(pool, []) == (0, 2)
    assert ids(catalog.list_points()) == [both.id, new.id]
    assert [c.store_id for c in catalog.point_copies(both.id)] == [usb]


def test_replace_store_points_revives_non_present_copies_and_spares_copying_ones(
    catalog: Catalog, pool: str
) -> None:
    tape = catalog.ensure_store("tape-1", "tape", "LTO0001").store_id
    catalog.add_point(point("aaaa000000000001"), pool)
    catalog.add_point(point("bbbb000000000002", minutes=1), pool)
    catalog.add_copy("aaaa000000000001", tape, state="deleted")
    catalog.add_copy("bbbb000000000002", tape, state="copying")
    # The tape turns out to hold `aaaa` after all; `bbbb` is still being written to it.
    assert catalog.replace_store_points(tape, [point("aaaa000000000001")]) == (1, 0)
    assert ids(catalog.list_points(store_id=tape)) == ["aaaa000000000001"]
    states = {c.store_id: c.state for c in catalog.point_copies("bbbb000000000002")}
    assert states == {pool: "present", tape: "copying"}


def test_replace_store_points_deletes_points_left_with_only_deleted_copies(
    catalog: Catalog, pool: str
) -> None:
    usb = catalog.ensure_store("usb-1", "usb", "/media/usb").store_id
    catalog.add_point(point("aaaa000000000001"), pool)
    catalog.add_copy("aaaa000000000001", usb, state="deleted")
    assert catalog.replace_store_points(pool, []) == (0, 1)
    assert catalog.list_points() == []


def test_replace_store_points_checks_its_input(catalog: Catalog, pool: str) -> None:
    with pytest.raises(NotFound):
        catalog.replace_store_points("no-such-store", [])
    with pytest.raises(InvalidInput, match="repeat"):
        catalog.replace_store_points(pool, [point("aaaa000000000001"), point("aaaa000000000001")])
