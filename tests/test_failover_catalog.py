"""The catalog's failover sessions table, as the failover code uses it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from appliance.catalog import Catalog
from appliance.catalog.records import ACTIVE_FAILOVER_STATES, PointRecord
from appliance.errors import Conflict, InvalidInput, NotFound


@pytest.fixture
def catalog(catalog_url):
    with Catalog.open(catalog_url) as opened:
        opened.ensure_store("s1", "pool", "/p")
        opened.add_point(
            PointRecord(
                id="p1",
                asset="web",
                kind="image",
                mode="full",
                created_at=datetime(2024, 1, 1, tzinfo=UTC),
                parent_id=None,
                base_full_id=None,
                source="/d/web.raw",
                logical_bytes=1,
                stored_bytes=1,
                file_count=0,
                warning_count=0,
                status="complete",
                verified_at=None,
                verify_status=None,
                labels={},
            ),
            "s1",
        )
        yield opened


def test_a_vm_has_at_most_one_active_session(catalog):
    first = catalog.add_failover_session("web", "p1", {"purpose": "failover"})
    assert first.state == "starting" and first.details == {"purpose": "failover"}
    with pytest.raises(Conflict, match=f"session {first.id}"):
        catalog.add_failover_session("web", "p1", {})
    updated = catalog.update_failover_session(first.id, state="running", details={"rto": 8.5})
    assert updated.details == {"purpose": "failover", "rto": 8.5}
    catalog.update_failover_session(first.id, state="stopped")
    second = catalog.add_failover_session("web", "p1", {}, session_id="abc")
    assert second.id == "abc"
    assert [s.id for s in catalog.list_failover_sessions("web")] == ["abc", first.id]
    active = catalog.list_failover_sessions(states=ACTIVE_FAILOVER_STATES)
    assert [s.id for s in active] == ["abc"]
    assert catalog.get_failover_session(first.id).state == "stopped"


def test_failover_session_errors(catalog):
    with pytest.raises(NotFound):
        catalog.add_failover_session("nope", "p1", {})
    with pytest.raises(NotFound):
        catalog.get_failover_session("missing")
    with pytest.raises(NotFound):
        catalog.update_failover_session("missing", state="failed")
    session = catalog.add_failover_session("web", "p1", {})
    with pytest.raises(InvalidInput):
        catalog.update_failover_session(session.id, state="flying")
    with pytest.raises(InvalidInput):
        catalog.list_failover_sessions(limit=0)
