"""Deleting a media pool through the API against a live uvicorn: operators only, 404 for an
unknown pool, 409 in words while a tape belongs to it or a set of it still holds a copy, 204
and audited otherwise (its schedule and emptied sets go with it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server
from catalog_support import point

from hardware.tape.library import create_virtual_library, register_library


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("tape-pools-api")
    with bootstrapped_server(root, device_monitor=False, max_parallel_jobs=0) as live:
        library = create_virtual_library(root / "lib", slots=2, name="pools")
        register_library(live.service.app.catalog, library.root)
        yield live


def _audit(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    return [a for a in admin.get("/api/audit").json() if a["action"] == action]


def test_an_unknown_pool_is_404_and_viewers_may_not_delete(
    operator: httpx.Client, viewer: httpx.Client
) -> None:
    r = operator.delete("/api/tape/pools/nowhere")
    assert r.status_code == 404 and "tape pool 'nowhere' does not exist" in r.json()["message"]
    assert operator.put("/api/tape/pools/kept", json={}).status_code == 200
    assert viewer.delete("/api/tape/pools/kept").status_code == 403
    assert [p["name"] for p in viewer.get("/api/tape/pools").json()] == ["kept"]


def test_a_pool_with_a_tape_or_a_held_set_is_refused_then_deleted(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client
) -> None:
    body = {"schedule": "0 3 * * *", "drive": "virtual:pools-drive0", "retention_days": 30}
    r = operator.put("/api/tape/pools/weekly", json=body)
    assert r.status_code == 200, r.text
    catalog = server.service.app.catalog
    store = server.service.app.repo.store_id
    catalog.put_tape_set("set-w1", pool="weekly", store_id=store)
    catalog.add_location(store, "tape_set", "set-w1", location_id="set-w1")
    catalog.add_point(point("00000000000000b1"), store)
    catalog.set_copy("00000000000000b1", "set-w1", "present")
    catalog.put_tape_medium("W00001", pool="weekly", media_set_id="set-w1", sequence=1)

    r = operator.delete("/api/tape/pools/weekly")
    assert r.status_code == 409, r.text
    assert r.json()["message"] == (
        "pool weekly still has 1 tape(s): erase them or move them to another pool first"
    )
    catalog.put_tape_medium("W00001", pool=None, media_set_id=None, sequence=None)
    r = operator.delete("/api/tape/pools/weekly")
    assert r.status_code == 409 and "1 media set(s) holding copies" in r.json()["message"]
    assert _audit(admin, "tape.pool.delete") == []  # a refusal is not audited

    catalog.set_copy("00000000000000b1", "set-w1", "lost")
    r = operator.delete("/api/tape/pools/weekly")
    assert r.status_code == 204 and r.content == b""
    assert "weekly" not in [p["name"] for p in viewer.get("/api/tape/pools").json()]
    (action,) = _audit(admin, "tape.pool.delete")
    assert action["actor"] == "operator" and action["target"] == "weekly"
    assert operator.delete("/api/tape/pools/weekly").status_code == 404

    # A new pool of the name starts without the old schedule or sets.
    again = operator.put("/api/tape/pools/weekly", json={}).json()
    assert again["schedule"] is None and again["sets"] == 0 and again["tapes"] == 0
