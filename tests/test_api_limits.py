"""Limits of the HTTP layer against hostile input: integer ranges, body sizes, sign-in budgets.

- Every integer (and number) a request carries has a minimum and a maximum in the OpenAPI
  schema, so a value the database cannot store answers 422, never 500; the walk keeps future
  routes honest.
- Request bodies are capped at 1 MiB (``api.limits``): refused before they are read when their
  length says so, counted as they stream otherwise. These tests speak raw HTTP/1.1 on a socket
  so they control exactly what is sent (and that the answer comes without sending the body).
- Failed sign-ins are throttled per client address across all user names too.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, service_settings
from starlette.types import Message

from api.app import create_app
from api.errors import LoginThrottled
from api.limits import MAX_BODY_BYTES, BodySizeLimit
from api.schemas import SQL_INT_MAX
from api.security import LoginThrottle


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("limits"), max_parallel_jobs=0) as live:
        yield live


@pytest.fixture(scope="module")
def queued_job(server: LiveServer) -> str:
    """A job that stays queued (nothing runs in this module's server)."""
    job = server.service.app.catalog.create_job("verify", {"point": "0" * 16})
    return str(job.id)


# --- integers ----------------------------------------------------------------------------------


def _numbers(schema: dict[str, Any], components: dict[str, Any], where: str) -> Iterator[Any]:
    """(where, schema) of every integer or number in ``schema``, through references."""
    stack: list[tuple[str, dict[str, Any], frozenset[str]]] = [(where, schema, frozenset())]
    while stack:
        at, node, seen = stack.pop()
        ref = node.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                stack.append((f"{at}->{name}", components[name], seen | {name}))
            continue
        if node.get("type") in ("integer", "number"):
            yield at, node
        for key in ("anyOf", "oneOf", "allOf"):
            stack += [(at, sub, seen) for sub in node.get(key, [])]
        stack += [(f"{at}.{k}", sub, seen) for k, sub in node.get("properties", {}).items()]
        if isinstance(node.get("items"), dict):
            stack.append((f"{at}[]", node["items"], seen))
        if isinstance(node.get("additionalProperties"), dict):
            stack.append((f"{at}{{}}", node["additionalProperties"], seen))


def test_every_integer_a_request_carries_is_bounded(tmp_path: Path) -> None:
    spec = create_app(service_settings(tmp_path / "data")).openapi()
    components = spec["components"]["schemas"]
    found, unbounded = [], []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            inputs = [
                (f"{method} {path} {p['in']} {p['name']}", p["schema"])
                for p in operation.get("parameters", [])
            ]
            for media in operation.get("requestBody", {}).get("content", {}).values():
                inputs.append((f"{method} {path} body", media["schema"]))
            for where, schema in inputs:
                for at, node in _numbers(schema, components, where):
                    found.append(at)
                    has_max = "maximum" in node or "exclusiveMaximum" in node
                    has_min = "minimum" in node or "exclusiveMinimum" in node
                    if not (has_max and has_min) or node.get("maximum", 0) > SQL_INT_MAX:
                        unbounded.append(f"{at}: {node}")
    assert len(found) > 20  # the walk does reach into bodies and parameters
    assert unbounded == []


@pytest.mark.parametrize("route", ["log", "events"])
def test_a_seq_beyond_64_bits_is_a_validation_error(
    server: LiveServer, queued_job: str, route: str
) -> None:
    with server.as_role("viewer") as viewer:
        r = viewer.get(f"/api/jobs/{queued_job}/{route}", params={"after_seq": 2**63})
        assert r.status_code == 422 and r.json()["code"] == "validation_error"
        params: dict[str, Any] = {"after_seq": SQL_INT_MAX, "max_seconds": 0.2}
        assert viewer.get(f"/api/jobs/{queued_job}/{route}", params=params).status_code == 200


@pytest.mark.parametrize("last_event_id", [b"\xb2", b"9" * 30, b"-1", b"12x"])
def test_a_malformed_last_event_id_is_ignored(
    server: LiveServer, queued_job: str, last_event_id: bytes
) -> None:
    """Only a seq resumes the log: "²" (a digit to ``str.isdigit``, 0xB2 in Latin-1) or a
    number the catalog cannot hold starts from the beginning instead of failing."""
    with server.as_role("viewer") as viewer:
        r = viewer.get(
            f"/api/jobs/{queued_job}/events",
            params={"max_seconds": 0.2},
            headers={b"Last-Event-ID": last_event_id},
        )
        assert r.status_code == 200, r.text
        assert "event: job" in r.text


# --- request bodies ----------------------------------------------------------------------------


def _raw(server: LiveServer, head: str, body: Iterator[bytes] = iter(())) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers) and ``body`` on a fresh connection; return the
    status and the raw response."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body:
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1]), answer


def test_a_body_declared_over_the_cap_is_refused_before_it_is_read(server: LiveServer) -> None:
    started = time.monotonic()
    # Only the headers are sent: the answer must not wait for the 2 MiB they announce.
    status, answer = _raw(
        server,
        "POST /api/login HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {2 * MAX_BODY_BYTES}\n",
    )
    assert status == 413
    assert time.monotonic() - started < 5
    assert b'"code":"too_large"' in answer.replace(b" ", b"")
    assert b"connection: close" in answer.lower()
    assert b"x-content-type-options: nosniff" in answer.lower()


def test_a_chunked_body_over_the_cap_is_refused(server: LiveServer) -> None:
    chunk = b"x" * 65536
    chunks = MAX_BODY_BYTES // len(chunk) + 1  # one chunk past the cap, no final chunk
    status, answer = _raw(
        server,
        "POST /api/login HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        "Transfer-Encoding: chunked\n",
        (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(chunks)),
    )
    assert status == 413, answer[:500]
    assert b"too_large" in answer


def test_bodies_within_the_cap_pass(server: LiveServer) -> None:
    with server.client() as client:
        # A body just under the cap reaches the route (and fails its validation there).
        big = {"name": "x", "password": "y" * (MAX_BODY_BYTES - 100)}
        assert client.post("/api/login", json=big).status_code == 422
        ok = client.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
        assert ok.status_code == 200


def _run_asgi(app: Any, messages: list[Message], headers: list[tuple[bytes, bytes]]) -> list[Any]:
    sent: list[Message] = []
    incoming = iter(messages)

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(BodySizeLimit(app, max_bytes=10)(scope, receive, send))
    return sent


def test_the_middleware_refuses_a_declared_length_without_calling_the_app() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    sent = _run_asgi(app, [], [(b"content-length", b"11")])
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["code"] == "too_large"


def test_a_body_growing_past_the_cap_after_the_response_started_reads_as_a_disconnect() -> None:
    """An event stream listens for the client leaving; a client that keeps sending instead is
    treated as gone (no 413 can be sent once the response started)."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                return

    body = {"type": "http.request", "body": b"x" * 6, "more_body": True}
    _run_asgi(app, [body, body], [])
    assert seen == ["http.request", "http.disconnect"]


# --- sign-in budget per client address ---------------------------------------------------------


def test_many_names_from_one_address_are_throttled(tmp_path: Path) -> None:
    """One wrong password for each of 30 names from 127.0.0.1: the address runs out of its
    budget before the 30th, whatever the names."""
    with bootstrapped_server(tmp_path) as live, live.client() as client:
        codes = []
        for i in range(30):
            r = client.post("/api/login", json={"name": f"user{i}", "password": "wrong-1234"})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["code"] == "login_throttled"
                assert int(r.headers["retry-after"]) >= 1
                break
        assert codes[-1] == 429 and len(codes) < 30, codes
        assert set(codes[:-1]) == {401}
        # Even the right password of a real user from this address waits now.
        r = client.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
        assert r.status_code == 429


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_per_address_budget_spares_other_addresses() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(5, clock, client_free_failures=20)
    attacker, admin = "203.0.113.9", "198.51.100.7"
    for i in range(20):
        throttle.check(f"name{i}", attacker)
        throttle.failure(f"name{i}", attacker)
    with pytest.raises(LoginThrottled) as caught:
        throttle.check("name-never-tried", attacker)
    assert "from this address" in caught.value.message
    assert caught.value.details["retry_after"] == 1.0
    throttle.check("admin", admin)  # another address signs in as if nothing happened
    throttle.success("admin", admin)
    # The delay doubles with each further failure, up to the cap.
    clock.now += 1.0
    throttle.failure("name20", attacker)
    with pytest.raises(LoginThrottled) as caught:
        throttle.check("x", attacker)
    assert caught.value.details["retry_after"] == 2.0


def test_a_success_does_not_refill_the_address_budget_but_time_does() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(5, clock, client_free_failures=3)
    for name in ("a", "b", "c"):
        throttle.failure(name, "10.0.0.1")
    throttle.success("d", "10.0.0.1")  # one known password must not launder the budget
    with pytest.raises(LoginThrottled):
        throttle.check("e", "10.0.0.1")
    clock.now += LoginThrottle.CLIENT_MEMORY + 1
    throttle.check("e", "10.0.0.1")


def test_the_per_user_rule_still_applies_and_zero_turns_throttling_off() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(2, clock, client_free_failures=20)
    throttle.failure("admin", "10.0.0.1")
    throttle.failure("admin", "10.0.0.1")
    with pytest.raises(LoginThrottled) as caught:
        throttle.check("admin", "10.0.0.1")
    assert "for admin" in caught.value.message
    throttle.check("admin", "10.0.0.2")
    off = LoginThrottle(0, clock)
    for i in range(100):
        off.failure(f"n{i}", "10.0.0.1")
    off.check("n0", "10.0.0.1")
    no_address_budget = LoginThrottle(5, clock, client_free_failures=0)
    for i in range(100):
        no_address_budget.failure(f"n{i}", "10.0.0.1")
    no_address_budget.check("n100", "10.0.0.1")


def test_a_throttled_address_answers_429_with_retry_after(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is wired into the live service (its default, until a setting names it)."""
    throttle = server.service.throttle
    monkeypatch.setattr(throttle, "client_free_failures", 1)
    monkeypatch.setattr(throttle, "_client_failures", {})
    with server.client() as client:
        first = client.post("/api/login", json={"name": "nobody-1", "password": "wrong-1234"})
        assert first.status_code == 401
        r = client.post("/api/login", json={"name": "nobody-2", "password": "wrong-1234"})
        assert r.status_code == 429 and "retry-after" in r.headers
