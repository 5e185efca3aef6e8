"""The service's short-lived caches: polling is cheap, and no change is hidden by them.

What must hold: a change made through the service (revoking a token, signing out, cancelling a
job) shows on the very next request; a change made behind the service's back (another process
writing the catalog) shows once the cache's time is up; cached answers are the same bytes the
uncached route would give.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from api_support import (
    ADMIN,
    LiveServer,
    bootstrapped_server,
    login,
)

from api.cache import TtlCache
from api.service import AUTH_TTL, JOB_ANSWER_TTL, POINTS_ANSWER_TTL
from api.views import job_public
from appliance.catalog.records import PointRecord
from appliance.errors import BackupCancelled
from appliance.jobs import JobKind, register_job_kind


def _ticker(app: Any, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    steps = int(p.get("steps", 4000))
    for i in range(steps):
        if ctx.cancel.is_set():
            raise BackupCancelled("cancelled by the test")
        ctx.progress({"bytes_done": i, "bytes_total": steps})
        time.sleep(0.02)
    return {"ticks": steps}


register_job_kind(
    "test_cache_ticker",
    # Exclusive on one resource: a second ticker waits queued behind the first.
    JobKind(_ticker, lambda p: [("test:cache", True)], False, lambda p: "ticker"),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("cache")) as live:
        yield live


def _new_token(server: LiveServer, user: str = "viewer") -> tuple[str, str]:
    """(token, id) of a fresh API token of ``user``."""
    with server.as_role("admin") as admin:
        r = admin.post("/api/tokens", json={"user": user})
        assert r.status_code == 201, r.text
        return str(r.json()["token"]), str(r.json()["id"])


def _get(server: LiveServer, token: str, path: str = "/api/me") -> httpx.Response:
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        return c.get(path)


def test_ttl_cache_expires_and_evicts_the_oldest() -> None:
    now = [100.0]
    cache: TtlCache[str] = TtlCache(1.0, max_entries=2, clock=lambda: now[0])
    cache.put("a", "1")
    cache.put("b", "2")
    assert cache.get("a") == "1"
    now[0] += 0.99
    assert cache.get("b") == "2"
    now[0] += 0.02
    assert cache.get("a") is None and cache.get("b") is None
    cache.put("a", "1")
    cache.put("b", "2")
    cache.put("c", "3")  # beyond max_entries: "a", put first, goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, "2", "3")
    cache.clear()
    assert len(cache) == 0


def test_clients_missing_together_wait_for_one_computation() -> None:
    cache: TtlCache[int] = TtlCache(10.0)
    calls: list[int] = []

    def slow() -> int:
        calls.append(1)
        time.sleep(0.2)
        return len(calls)

    def failing() -> int:
        calls.append(1)
        time.sleep(0.1)
        raise ValueError("the catalog is unreachable")

    async def main() -> tuple[list[int], list[BaseException | int]]:
        values = await asyncio.gather(*(cache.get_or_compute("k", slow) for _ in range(20)))
        errors = await asyncio.gather(
            *(cache.get_or_compute("bad", failing) for _ in range(5)), return_exceptions=True
        )
        return list(values), list(errors)

    values, errors = asyncio.run(main())
    assert values == [1] * 20 and len(calls) == 2  # one for "k", one for "bad"
    assert all(isinstance(e, ValueError) for e in errors)
    assert cache.get("bad") is None  # a failure is not cached: the next caller tries again


def test_a_token_revoked_through_the_api_is_refused_by_the_next_request(
    server: LiveServer,
) -> None:
    token, token_id = _new_token(server)
    assert _get(server, token).status_code == 200  # now cached
    with server.as_role("admin") as admin:
        assert admin.delete(f"/api/tokens/{token_id}").status_code == 200
    r = _get(server, token)
    assert r.status_code == 401, r.text


def test_a_token_revoked_behind_the_services_back_is_refused_within_the_cache_time(
    server: LiveServer,
) -> None:
    token, token_id = _new_token(server)
    assert _get(server, token).status_code == 200
    server.service.app.catalog.revoke_token(token_id)  # as the CLI would: not through the API
    revoked_at = time.monotonic()
    deadline = revoked_at + AUTH_TTL + 1.0
    while _get(server, token).status_code == 200:
        assert time.monotonic() < deadline, "a revoked token still works after the cache time"
        time.sleep(0.1)
    assert time.monotonic() - revoked_at <= AUTH_TTL + 1.0


def test_a_signed_out_session_is_refused_at_once(server: LiveServer) -> None:
    with server.client() as browser:
        csrf = login(browser, *ADMIN)
        assert browser.get("/api/me").status_code == 200
        cookies = dict(browser.cookies)
        assert browser.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code in (
            200,
            204,
        )
    with server.client(cookies=cookies) as stale:
        assert stale.get("/api/me").status_code == 401


def test_job_answers_are_shared_briefly_and_a_cancel_shows_at_once(server: LiveServer) -> None:
    job = server.service.jobs.submit("test_cache_ticker", {})
    with server.as_role("operator") as operator:
        deadline = time.monotonic() + 30
        while operator.get(f"/api/jobs/{job.id}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = operator.get(f"/api/jobs/{job.id}")
        assert first.headers["content-type"] == "application/json"
        # The same answer for every caller within the cache time, and it is what the route's
        # model says (the cached bytes skip FastAPI's serialisation).
        asked = time.monotonic()
        again = operator.get(f"/api/jobs/{job.id}")
        if time.monotonic() - asked < JOB_ANSWER_TTL / 2:
            assert again.content == first.content
        body = first.json()
        record = server.service.app.catalog.get_job(job.id)
        expected = job_public(record).model_dump(mode="json")
        assert set(body) == set(expected)
        assert body["id"] == job.id and body["kind"] == "test_cache_ticker"
        # Progress moves on: a later answer shows more done.
        time.sleep(JOB_ANSWER_TTL + 0.6)
        later = operator.get(f"/api/jobs/{job.id}").json()
        assert later["progress"]["bytes_done"] > body["progress"]["bytes_done"]
        # A queued job behind it: cancelling a queued job is immediate, so the answer right
        # after the cancel must say so, though "queued" was cached a moment before.
        waiting = server.service.jobs.submit("test_cache_ticker", {})
        assert operator.get(f"/api/jobs/{waiting.id}").json()["state"] == "queued"
        assert operator.post(f"/api/jobs/{waiting.id}/cancel").status_code == 200
        assert operator.get(f"/api/jobs/{waiting.id}").json()["state"] == "cancelled"
        assert operator.post(f"/api/jobs/{job.id}/cancel").status_code == 200
        deadline = time.monotonic() + 30
        while operator.get(f"/api/jobs/{job.id}").json()["state"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_job_that_ends_shows_as_ended_at_once(server: LiveServer) -> None:
    job = server.service.jobs.submit("test_cache_ticker", {"steps": 25})
    with server.as_role("viewer") as viewer:
        seen = viewer.get(f"/api/jobs/{job.id}").json()["state"]
        assert seen in ("queued", "running")  # cached for the next half second...
        ended = server.service.jobs.wait(job.id, timeout=30)
        assert ended.state == "succeeded"
        # ...yet the answer right after the end is the end, not the cached "running".
        body = viewer.get(f"/api/jobs/{job.id}").json()
        assert body["state"] == "succeeded" and body["result"] == {"ticks": 25}


def test_a_point_made_behind_the_services_back_is_listed_within_the_cache_time(
    server: LiveServer,
) -> None:
    catalog = server.service.app.catalog
    store = catalog.ensure_store("cache-test", "pool", "/srv/cache-test").store_id
    with server.as_role("viewer") as viewer:
        before = viewer.get("/api/points", params={"limit": 5}).json()
        made = PointRecord(
            id="cafe0000cafe0000",
            asset="cache-test-asset",
            kind="files",
            mode="full",
            created_at=datetime.now(UTC),
        )
        catalog.add_point(made, store)
        deadline = time.monotonic() + POINTS_ANSWER_TTL + 1.0
        while True:
            listed = viewer.get("/api/points", params={"limit": 5}).json()
            if listed and listed[0]["id"] == made.id:
                break
            assert listed == before, "a stale answer must still be the whole earlier answer"
            assert time.monotonic() < deadline, "the new point never showed"
            time.sleep(0.1)
        assert listed[0]["asset"] == "cache-test-asset"


def test_an_unknown_job_is_still_a_404_with_its_code(server: LiveServer) -> None:
    r = _get(server, server.tokens["viewer"], "/api/jobs/no-such-job")
    assert r.status_code == 404
    assert r.json()["code"]
