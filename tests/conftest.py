"""Shared test fixtures.

The tests directory is not a package: pytest puts it on sys.path, so helper modules such as
``pg`` are imported by their plain name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg import PostgresUnavailable, ThrowawayPostgres

# --- Long boots ----------------------------------------------------------------------------------

LONG_BOOTS_ENV = "APPLIANCE_LONG_BOOTS"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long-boots",
        action="store_true",
        help="also run the tests marked long_boot (the OS installer under TCG, ~8 min)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the long_boot tests unless asked for: CI has one hour for the whole suite.

    They are deselected, not skipped, so the summary counts them ("N deselected") and no test
    pretends to have passed.
    """
    if config.getoption("--long-boots") or os.environ.get(LONG_BOOTS_ENV) == "1":
        return
    kept = [item for item in items if item.get_closest_marker("long_boot") is None]
    left_out = [item for item in items if item.get_closest_marker("long_boot") is not None]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


# --- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """A real PostgreSQL 15 started for this test session and stopped at its end.

    Missing binaries fail the tests that need it (with the install step): a silently skipped
    PostgreSQL suite would hide that the catalog was never tested against it.
    """
    try:
        server = ThrowawayPostgres()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: ThrowawayPostgres) -> str:
    """SQLAlchemy URL of a database created once for the session on the throwaway server."""
    return postgres_server.url(postgres_server.create_database())


@pytest.fixture
def fresh_postgres_url(postgres_server: ThrowawayPostgres) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database for this test alone (dropped afterwards)."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty catalog database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


# --- the service's role clients ------------------------------------------------------------------
# A test module that starts a service defines a module-scoped ``server`` fixture (usually with
# ``api_support.bootstrapped_server``); these clients then talk to it with each role's token.


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[Any]:
    with server.as_role("admin") as client:
        yield client


@pytest.fixture(scope="module")
def operator(server: Any) -> Iterator[Any]:
    with server.as_role("operator") as client:
        yield client


@pytest.fixture(scope="module")
def viewer(server: Any) -> Iterator[Any]:
    with server.as_role("viewer") as client:
        yield client


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """The session's Chromium (Playwright), shared by every browser test module."""
    from web_support import launched_browser

    with launched_browser() as launched:
        yield launched


# --- S3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3() -> Iterator[Any]:
    """A real S3 server (moto's) on 127.0.0.1 for this test session; restores take 2 s."""
    from s3_support import s3_server

    with s3_server(restore_seconds=2.0) as server:
        yield server


@pytest.fixture
def proxy(s3: Any) -> Iterator[Any]:
    """A fault proxy (``servers/s3_fault_proxy.py``) in front of the session's S3 server."""
    from servers.s3_fault_proxy import fault_proxy

    with fault_proxy(s3.endpoint) as running:
        yield running
