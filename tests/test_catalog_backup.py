"""A SQLite catalog is copied before Alembic migrates it (``<catalog>.before-<head>``).

The catalog is made at an older revision with Alembic itself (``upgrade 0011``), so opening it
runs a real migration.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from appliance.catalog.database import (
    HEAD_REVISION,
    MIGRATIONS_DIR,
    SCHEMA_BACKUPS_KEEP,
    Database,
    backup_before_migration,
    create_catalog_engine,
)

OLDER = "0011"


def _catalog_at(path: Path, revision: str) -> str:
    url = f"sqlite:///{path}"
    engine = create_catalog_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.exec_driver_sql("CREATE TABLE test_marker (note TEXT)")
        connection.exec_driver_sql("INSERT INTO test_marker VALUES ('made at the old revision')")
    engine.dispose()
    return url


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_an_older_catalog_is_copied_before_its_migration(tmp_path: Path) -> None:
    assert OLDER != HEAD_REVISION
    path = tmp_path / "catalog.sqlite"
    url = _catalog_at(path, OLDER)
    Database.open(url).close()
    assert _revision(path) == HEAD_REVISION
    copy = tmp_path / f"catalog.sqlite.before-{HEAD_REVISION}"
    assert copy.is_file()
    assert _revision(copy) == OLDER
    with sqlite3.connect(copy) as db:
        assert db.execute("SELECT note FROM test_marker").fetchall() == [
            ("made at the old revision",)
        ]
    made = copy.stat().st_mtime_ns
    Database.open(url).close()  # at head now: nothing to migrate, nothing copied again
    assert copy.stat().st_mtime_ns == made


def test_a_new_catalog_is_not_copied(tmp_path: Path) -> None:
    Database.open(f"sqlite:///{tmp_path / 'catalog.sqlite'}").close()
    assert list(tmp_path.glob("*.before-*")) == []


def test_only_the_newest_copies_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    url = _catalog_at(path, OLDER)
    for i, revision in enumerate(("0005", "0006", "0007", "0008")):
        old = tmp_path / f"catalog.sqlite.before-{revision}"
        old.write_bytes(b"an old copy")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    Database.open(url).close()
    kept = sorted(p.name for p in tmp_path.glob("catalog.sqlite.before-*"))
    assert len(kept) == SCHEMA_BACKUPS_KEEP
    assert kept == [
        "catalog.sqlite.before-0007",
        "catalog.sqlite.before-0008",
        f"catalog.sqlite.before-{HEAD_REVISION}",
    ]


def test_postgresql_is_not_copied_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with caplog.at_level(logging.INFO, logger="appliance.catalog.database"):
        assert backup_before_migration(engine) is None
    assert "no copy is made" in caplog.text
