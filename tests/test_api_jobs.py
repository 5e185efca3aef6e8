"""Jobs through the service's JSON API against a live uvicorn on 127.0.0.1: the lifecycle (cancel,
retry), a queued job saying why it waits, and the event streams. The jobs that must stay running
for a while use a test job kind registered in-process, so their timing never depends on disk speed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import (
    LiveServer,
    bootstrapped_server,
    sse_events,
)

from api.service import JOB_ANSWER_TTL
from appliance.errors import (
    BackupCancelled,
)
from appliance.jobs import JobKind, register_job_kind


def _sleeper(app: Any, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A job that runs until cancelled (or ``steps`` ticks), reporting progress and logging."""
    steps = int(p.get("steps", 2000))
    for i in range(steps):
        if ctx.cancel.is_set():
            raise BackupCancelled("the test job was cancelled")
        ctx.progress({"bytes_done": i, "bytes_total": steps})
        if i % 4 == 0:
            ctx.log("info", f"tick {i}")
        time.sleep(0.05)
    return {"steps": steps}


register_job_kind(
    "test_sleep",
    JobKind(_sleeper, lambda p: [(f"test:{p.get('lane', 'a')}", False)], False, lambda p: "sleep"),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("jobs-service"), max_parallel_jobs=3) as live:
        yield live


# --- jobs ------------------------------------------------------------------------------------------------------


def _sleep_job(server: LiveServer, **params: Any) -> str:
    return str(server.service.jobs.submit("test_sleep", params).id)


def _wait_state(
    client: httpx.Client, job_id: str, state: str, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] == state:
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_job_lifecycle_cancel_and_retry(
    server: LiveServer, operator: httpx.Client, viewer: httpx.Client
) -> None:
    job_id = _sleep_job(server, lane="lifecycle")
    running = _wait_state(viewer, job_id, "running")
    assert running["description"] == "sleep" and running["started_at"] is not None
    time.sleep(JOB_ANSWER_TTL + 0.3)  # answers are shared for up to that long
    live = viewer.get(f"/api/jobs/{job_id}").json()
    assert live["progress"]["bytes_total"] == 2000 and live["progress"]["bytes_done"] > 0
    assert viewer.post(f"/api/jobs/{job_id}/cancel").status_code == 403
    assert operator.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    cancelled = _wait_state(viewer, job_id, "cancelled")
    assert cancelled["finished_at"] is not None
    log = viewer.get(f"/api/jobs/{job_id}/log").json()
    assert log[0]["seq"] == 1 and log[-1]["message"] == "cancelled"
    tail = viewer.get(f"/api/jobs/{job_id}/log", params={"after_seq": log[-2]["seq"]}).json()
    assert [line["seq"] for line in tail] == [log[-1]["seq"]]
    retried = operator.post(f"/api/jobs/{job_id}/retry")
    assert retried.status_code == 202 and retried.json()["id"] != job_id
    assert retried.headers["location"] == f"/api/jobs/{retried.json()['id']}"
    _wait_state(viewer, retried.json()["id"], "running")
    operator.post(f"/api/jobs/{retried.json()['id']}/cancel")
    _wait_state(viewer, retried.json()["id"], "cancelled")
    listed = viewer.get("/api/jobs", params={"kind": "test_sleep", "state": "cancelled"}).json()
    assert {job_id, retried.json()["id"]} <= {j["id"] for j in listed}


def test_queued_job_shows_why_it_waits_and_cancels_before_running(
    server: LiveServer, operator: httpx.Client, viewer: httpx.Client
) -> None:
    first = _sleep_job(server, lane="busy", steps=200)
    _wait_state(viewer, first, "running")
    # The server runs at most three jobs at once: the fourth waits for a slot.
    others = [_sleep_job(server, lane=f"slot{i}", steps=200) for i in range(3)]
    waiting = others[-1]
    job = _wait_state(viewer, waiting, "queued")
    deadline = time.monotonic() + 10
    while "waiting" not in job["progress"] and time.monotonic() < deadline:
        time.sleep(0.05)
        job = viewer.get(f"/api/jobs/{waiting}").json()
    assert job["state"] == "queued" and "free job slot" in job["progress"]["waiting"]
    assert operator.post(f"/api/jobs/{waiting}/cancel").json()["state"] == "cancelled"
    for job_id in [first, *others[:-1]]:
        operator.post(f"/api/jobs/{job_id}/cancel")
        _wait_state(viewer, job_id, "cancelled")


def test_job_event_stream(server: LiveServer, operator: httpx.Client) -> None:
    job_id = _sleep_job(server, lane="sse")
    seen: list[tuple[str, dict[str, Any]]] = []
    with (
        server.as_role("viewer") as client,
        client.stream("GET", f"/api/jobs/{job_id}/events") as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for kind, data in sse_events(r):
            seen.append((kind, json.loads(data)))
            logs = [d for k, d in seen if k == "log"]
            if len(logs) == 3:
                operator.post(f"/api/jobs/{job_id}/cancel")
            if kind == "end":
                break
    kinds = [k for k, _ in seen]
    assert kinds[0] == "job" and kinds[-1] == "end"
    assert seen[-1][1] == {"id": job_id, "state": "cancelled"}
    assert any(k == "job" and d["state"] == "running" for k, d in seen)
    progress = [d["progress"].get("bytes_done", 0) for k, d in seen if k == "job"]
    assert max(progress) > 0
    seqs = [d["seq"] for k, d in seen if k == "log"]
    assert seqs == list(range(1, len(seqs) + 1))
    # Resuming after the last seen log line replays nothing already seen.
    with (
        server.as_role("viewer") as client,
        client.stream(
            "GET", f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": str(seqs[-1])}
        ) as r,
    ):
        rest = [k for k, _ in sse_events(r)]
    assert rest == ["job", "end"]
    missing = operator.get("/api/jobs/nope/events")
    assert missing.status_code == 404


def test_global_event_stream_reports_job_changes(
    server: LiveServer, operator: httpx.Client
) -> None:
    events: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with (
            server.as_role("viewer") as client,
            client.stream("GET", "/api/events", params={"max_seconds": 20}) as r,
        ):
            for kind, data in sse_events_with_ready(r, ready):
                if kind == "job":
                    events.append(json.loads(data))
                    if any(e["state"] == "cancelled" for e in events if e["kind"] == "test_sleep"):
                        return

    listener = threading.Thread(target=listen)
    listener.start()
    assert ready.wait(10)
    time.sleep(0.6)  # one poll: the stream's baseline is taken before the job exists
    job_id = _sleep_job(server, lane="global")
    deadline = time.monotonic() + 10
    while not any(e["id"] == job_id and e["state"] == "running" for e in list(events)):
        assert time.monotonic() < deadline, events
        time.sleep(0.05)
    operator.post(f"/api/jobs/{job_id}/cancel")
    listener.join(30)
    states = [e["state"] for e in events if e["id"] == job_id]
    assert "cancelled" in states and states[0] in ("queued", "running")


def sse_events_with_ready(r: httpx.Response, ready: threading.Event) -> Iterator[tuple[str, str]]:
    ready.set()
    yield from sse_events(r)
