"""The console relay with real QEMU (TCG here): a failed-over test guest's VNC through the
service's WebSocket, keys typed through QMP, refusals and the audit log.

One boot for the module (~6-30 s under TCG). A plain WebSocket client (``websockets``) talks to
the live service on 127.0.0.1: it receives QEMU's RFB greeting, and a key event sent through
the relay makes the guest print ``key: k`` on its serial console.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, login
from console_support import (
    RfbClient,
    console_server,
    running_guest,
    stop,
    wait_serial,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from api import console as console_module

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with console_server(tmp_path_factory.mktemp("console")) as live:
        yield live


@pytest.fixture(scope="module")
def session(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    with running_guest(admin, operator, tmp_path_factory.mktemp("console-vm")) as running:
        yield running


def ws_url(server: LiveServer, session_id: str) -> str:
    return server.url.replace("http://", "ws://") + f"/api/failover/{session_id}/console"


def open_console(
    server: LiveServer, session_id: str, role: str = "operator", **kwargs: Any
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {server.tokens[role]}"} if role else {}
    headers.update(kwargs.pop("additional_headers", {}))
    return connect(
        ws_url(server, session_id),
        subprotocols=["binary"],  # type: ignore[list-item]
        additional_headers=headers,
        open_timeout=30,
        **kwargs,
    )


def refusal(server: LiveServer, session_id: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as caught, open_console(server, session_id, **kwargs):
        pass
    response = caught.value.response
    return response.status_code, json.loads(response.body or b"{}")


def audit(server: LiveServer, action: str) -> list[Any]:
    return [a for a in server.service.app.catalog.list_audit(200) if a.action == action]


def wait_audit(server: LiveServer, action: str, count: int, timeout: float = 15.0) -> list[Any]:
    """The ``action`` entries once there are ``count`` (a relay audits its end as it ends)."""
    deadline = time.monotonic() + timeout
    while len(entries := audit(server, action)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(entries) >= count, entries
    return entries


def wait_released(server: LiveServer, session_id: str) -> None:
    """Every console of the session has ended (a relay releases its place as it ends)."""
    deadline = time.monotonic() + 10
    while server.app.state.open_consoles.count(session_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.app.state.open_consoles.count(session_id) == 0


def test_the_session_records_its_vnc_socket(session: dict[str, Any]) -> None:
    socket = session["details"]["vnc_socket"]
    assert socket.endswith("/vnc.sock")
    argv = session["details"]["argv"]
    assert argv[argv.index("-vnc") + 1] == f"unix:{socket}"
    # one VNC server, on the unix socket: no TCP display, no QEMU websocket
    assert argv.count("-vnc") == 1 and not any("websocket" in a for a in argv)


def test_an_operator_gets_qemus_rfb_greeting_and_a_key_reaches_the_guest(
    server: LiveServer, viewer: httpx.Client, session: dict[str, Any]
) -> None:
    with open_console(server, session["id"]) as ws:
        assert ws.subprotocol == "binary"
        rfb = RfbClient(ws)
        width, height = rfb.handshake()
        assert width >= 640 and height >= 400
        rfb.key(ord("k"))
        wait_serial(viewer, session["id"], "key: k")
    opened = audit(server, "failover.console_opened")
    closed = wait_audit(server, "failover.console_closed", 1)
    assert opened and opened[0].actor == "operator"
    assert opened[0].details["session"] == session["id"] and opened[0].details["asset"] == "web"
    assert closed and closed[0].details["seconds"] >= 0
    assert closed[0].details["reason"] == "the browser closed the console"
    assert closed[0].details["bytes_from_browser"] > 0 and closed[0].details["bytes_to_browser"] > 0


def test_without_sign_in_or_as_a_viewer_the_console_is_refused(
    server: LiveServer, session: dict[str, Any]
) -> None:
    before = len(audit(server, "failover.console_opened"))
    status, body = refusal(server, session["id"], role="")
    assert status == 401, body
    status, body = refusal(server, session["id"], role="viewer")
    assert status == 403 and body["details"]["needed"] == "operator", body
    status, body = refusal(server, "0123456789abcdef")
    assert status == 404, body
    assert len(audit(server, "failover.console_opened")) == before


def test_the_pages_cookie_works_only_from_the_pages_own_origin(
    server: LiveServer, session: dict[str, Any]
) -> None:
    with server.client() as c:
        login(c, *ADMIN)
        cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
    host = server.url.removeprefix("http://")
    status, body = refusal(
        server,
        session["id"],
        role="",
        additional_headers={"Cookie": cookie},
        origin="http://evil.example",  # type: ignore[arg-type]
    )
    assert status == 403 and "own page" in body["message"], body
    with connect(
        ws_url(server, session["id"]),
        subprotocols=["binary"],  # type: ignore[list-item]
        additional_headers={"Cookie": cookie},
        origin=f"http://{host}",  # type: ignore[arg-type]
        open_timeout=30,
    ) as ws:
        assert RfbClient(ws).read(12).startswith(b"RFB 003.")
    assert audit(server, "failover.console_opened")[0].actor == ADMIN[0]


def test_consoles_per_vm_are_bounded(server: LiveServer, session: dict[str, Any]) -> None:
    limit = 4
    with contextlib.ExitStack() as stack:
        consoles = [stack.enter_context(open_console(server, session["id"])) for _ in range(limit)]
        for ws in consoles:
            assert RfbClient(ws).read(12).startswith(b"RFB")
        status, body = refusal(server, session["id"])
        assert status == 409 and body["code"] == "console_limit", body
    # a closed console frees its place (the relay notices the close at once)
    wait_released(server, session["id"])
    with open_console(server, session["id"]) as ws:
        assert RfbClient(ws).read(12).startswith(b"RFB")


def test_paste_as_keystrokes_and_ctrl_alt_del_go_through_qmp(
    server: LiveServer,
    operator: httpx.Client,
    viewer: httpx.Client,
    session: dict[str, Any],
) -> None:
    base = f"/api/failover/{session['id']}/console/keys"
    r = operator.post(base, json={"text": "Hi?"})
    assert r.status_code == 200 and r.json()["keys"] == 3, r.text
    serial = wait_serial(viewer, session["id"], "key: ?")
    tail = serial[serial.rindex("key: H") :]
    assert [line for line in tail.splitlines() if line.startswith("key: ")][:3] == [
        "key: H",
        "key: i",
        "key: ?",
    ]
    entry = audit(server, "failover.console_keys")[0]
    assert entry.details["characters"] == 3 and "Hi?" not in str(entry.details)

    assert viewer.post(base, json={"text": "x"}).status_code == 403
    r = operator.post(base, json={"text": "naïve"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_input", r.text
    r = operator.post(base, json={"text": "a", "combo": "ctrl-alt-delete"})
    assert r.status_code == 400, r.text
    r = operator.post(base, json={"combo": "alt-f4"})
    assert r.status_code == 422, r.text
    r = operator.post(base, json={"combo": "ctrl-alt-delete"})
    assert r.status_code == 200 and r.json()["keys"] == 1, r.text
    assert audit(server, "failover.console_keys")[0].details["combo"] == "ctrl-alt-delete"


def test_console_status_and_novnc_files(
    server: LiveServer,
    viewer: httpx.Client,
    session: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = viewer.get(f"/api/failover/{session['id']}/console").json()
    assert status["available"] and status["novnc"], status
    r = viewer.get("/api/console/novnc/core/rfb.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "export default class RFB" in r.text
    assert viewer.get("/api/console/novnc/vendor/pako/lib/zlib/inflate.js").status_code == 200
    assert viewer.get("/api/console/novnc/app/ui.js").status_code == 400
    assert viewer.get("/api/console/novnc/core/%2e%2e/app/ui.js").status_code in (400, 404)
    with server.client() as anonymous:
        assert anonymous.get("/api/console/novnc/core/rfb.js").status_code == 401
    monkeypatch.setattr(console_module, "NOVNC_DIR", console_module.Path("/nonexistent/novnc"))
    r = viewer.get("/api/console/novnc/core/rfb.js")
    assert r.status_code == 404 and r.json()["code"] == "novnc_missing", r.text
    assert viewer.get(f"/api/failover/{session['id']}/console").json()["novnc"] is False


def test_an_idle_console_is_closed(
    server: LiveServer, session: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_module, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(console_module, "STATE_POLL_SECONDS", 0.2)
    ends = len(audit(server, "failover.console_closed"))
    started = time.monotonic()
    with open_console(server, session["id"]) as ws:
        assert RfbClient(ws).read(12).startswith(b"RFB")  # then QEMU waits for our version
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=30)
    assert time.monotonic() - started < 15
    closed = wait_audit(server, "failover.console_closed", ends + 1)[0]
    assert closed.details["reason"] == "nothing was sent either way for 1 second", closed.details
    wait_released(server, session["id"])


def test_the_relay_ends_when_the_vm_stops(
    server: LiveServer, operator: httpx.Client, session: dict[str, Any]
) -> None:
    ends = len(audit(server, "failover.console_closed"))
    with open_console(server, session["id"]) as ws:
        RfbClient(ws).handshake()
        stop(operator, session["id"])
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=30)
    closed = wait_audit(server, "failover.console_closed", ends + 1)[0]
    assert closed.details["reason"] == "the VM stopped", closed.details
    status, body = refusal(server, session["id"])
    assert status == 409 and body["code"] == "console_unavailable", body
    r = operator.post(f"/api/failover/{session['id']}/console/keys", json={"text": "a"})
    assert r.status_code == 409 and r.json()["code"] == "console_unavailable"
