"""The service's JSON API against a live uvicorn on 127.0.0.1: who may call what (every route,
every role), sessions, CSRF, tokens, login throttling, users, and how errors are answered.

One server (and data directory) serves the whole module; tests use names of their own so that
their order does not matter. The other routes are tested in tests/test_api.py.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN, PASSWORDS, LiveServer, bootstrapped_server, login, service_settings
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.errors import STATUS_BY_KIND, install_error_handlers
from appliance.errors import (
    ApplianceError,
    Conflict,
    InvalidInput,
    LockHeld,
    NotFound,
    StoreFull,
    WrongPassphrase,
)

MISSING_POINT = "ffffffffffffffff"
LOGIN_FREE_FAILURES = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("service"), login_throttle=LOGIN_FREE_FAILURES
    ) as live:
        yield live


# --- the role matrix ----------------------------------------------------------------------------------------

# (method, path template, least role or None for public, JSON body). Bodies are valid but name
# things that do not exist where possible, so an allowed call changes nothing.
ROUTES: list[tuple[str, str, str | None, Any]] = [
    ("GET", "/api/health", None, None),
    ("GET", "/api/setup", None, None),
    ("POST", "/api/setup", None, {"name": "second", "password": "password-123"}),
    ("POST", "/api/login", None, {"name": "nobody", "password": "x"}),
    ("POST", "/api/logout", "viewer", None),
    ("GET", "/api/me", "viewer", None),
    ("POST", "/api/me/password", "viewer", {"current_password": "wrong", "new_password": "p" * 9}),
    ("GET", "/api/assets", "viewer", None),
    ("POST", "/api/assets", "admin", {"name": "m", "kind": "files", "path": "/nonexistent-dir"}),
    ("GET", "/api/assets/{name}", "viewer", None),
    ("PUT", "/api/assets/{name}", "admin", {}),
    ("DELETE", "/api/assets/{name}", "admin", None),
    ("POST", "/api/assets/{name}/backup", "operator", {}),
    ("POST", "/api/assets/{name}/failover", "operator", {}),
    ("POST", "/api/assets/{name}/boot-test", "operator", {}),
    ("GET", "/api/assets/{name}/failover-settings", "viewer", None),
    ("PUT", "/api/assets/{name}/failover-settings", "admin", {}),
    ("GET", "/api/network/bridges", "operator", None),
    ("GET", "/api/failover", "viewer", None),
    ("GET", "/api/failover/{session_id}", "viewer", None),
    ("GET", "/api/failover/{session_id}/screenshot", "viewer", None),
    ("GET", "/api/failover/{session_id}/serial", "viewer", None),
    ("GET", "/api/failover/{session_id}/console", "viewer", None),
    ("POST", "/api/failover/{session_id}/console/keys", "operator", {"text": "x"}),
    ("GET", "/api/console/novnc/{path}", "viewer", None),
    ("GET", "/api/assets/{name}/failover-points", "viewer", None),
    ("GET", "/api/plans", "viewer", None),
    ("POST", "/api/plans", "operator", {}),
    ("GET", "/api/plans/{plan_id}", "viewer", None),
    ("PUT", "/api/plans/{plan_id}", "operator", {}),
    ("DELETE", "/api/plans/{plan_id}", "operator", None),
    ("POST", "/api/plans/{plan_id}/failover", "operator", None),
    ("POST", "/api/plans/{plan_id}/test", "operator", None),
    ("GET", "/api/plans/{plan_id}/runs", "viewer", None),
    ("GET", "/api/plan-runs/{run_id}", "viewer", None),
    ("POST", "/api/failover/{session_id}/stop", "operator", {}),
    ("POST", "/api/failover/{session_id}/migrate", "operator", {}),
    ("POST", "/api/failover/{session_id}/failback", "operator", {}),
    ("GET", "/api/policies", "viewer", None),
    ("POST", "/api/policies", "admin", {"name": "m", "asset": "missing"}),
    ("GET", "/api/policies/{name}", "viewer", None),
    ("PUT", "/api/policies/{name}", "admin", {"asset": "missing"}),
    ("DELETE", "/api/policies/{name}", "admin", None),
    ("POST", "/api/policies/{name}/run", "operator", {}),
    ("GET", "/api/points", "viewer", None),
    ("GET", "/api/points/{point_id}", "viewer", None),
    ("GET", "/api/points/{point_id}/files", "viewer", None),
    ("GET", "/api/points/{point_id}/download", "operator", None),
    ("POST", "/api/points/{point_id}/restore", "operator", {"target": "/tmp/matrix-restore"}),
    ("GET", "/api/points/{point_id}/restore-targets", "operator", None),
    ("POST", "/api/points/{point_id}/copy", "operator", {"location": "missing"}),
    ("GET", "/api/locations", "viewer", None),
    ("POST", "/api/locations", "admin", {"path": "/nonexistent-location"}),
    ("DELETE", "/api/locations/{location_id}", "admin", None),
    ("POST", "/api/locations/{location_id}/check", "operator", None),
    ("GET", "/api/peers", "viewer", None),
    ("POST", "/api/peers", "admin", {"address": "https://127.0.0.1:1", "code": "ABCD2345"}),
    ("PATCH", "/api/peers/{peer_id}", "admin", {}),
    ("DELETE", "/api/peers/{peer_id}", "admin", None),
    ("POST", "/api/peers/{peer_id}/replicate", "operator", None),
    ("POST", "/api/peers/{peer_id}/pull", "operator", None),
    ("GET", "/api/tiering", "viewer", None),
    ("PUT", "/api/tiering", "admin", {"rules": []}),
    ("POST", "/api/tiering/run", "operator", None),
    ("GET", "/api/tiering/prices", "viewer", None),
    ("PUT", "/api/tiering/prices", "admin", {"as_of": "2026-12-01"}),
    ("GET", "/api/points/{point_id}/recall", "viewer", None),
    ("POST", "/api/points/{point_id}/recall", "operator", None),
    ("GET", "/api/settings/restore", "admin", None),
    ("PUT", "/api/settings/restore", "admin", {"areas": [], "devices": []}),
    ("POST", "/api/points/{point_id}/verify", "operator", None),
    ("DELETE", "/api/points/{point_id}", "admin", None),
    ("POST", "/api/verify", "operator", {"max_bytes": 1}),
    ("POST", "/api/retention/preview", "viewer", {"asset": "missing", "rules": {"keep_last": 1}}),
    ("POST", "/api/retention/prune", "admin", {"asset": "missing", "rules": {"keep_last": 1}}),
    ("POST", "/api/gc", "admin", {"grace_seconds": 86400}),
    ("POST", "/api/catalog/rebuild", "admin", None),
    ("GET", "/api/recovery-key", "admin", None),
    ("GET", "/api/system", "viewer", None),
    ("GET", "/api/system/recovery-key", "admin", None),
    ("POST", "/api/system/recovery-key/confirm", "admin", None),
    ("GET", "/api/system/network", "viewer", None),
    ("PUT", "/api/system/network", "admin", {"mode": "dhcp"}),
    ("GET", "/api/system/time", "viewer", None),
    ("PUT", "/api/system/time", "admin", {"timezone": "UTC"}),
    ("GET", "/api/system/security-updates", "viewer", None),
    ("PUT", "/api/system/security-updates", "admin", {"enabled": False}),
    ("GET", "/api/system/release", "viewer", None),
    ("POST", "/api/system/update", "admin", None),
    ("GET", "/api/jobs", "viewer", None),
    ("GET", "/api/jobs/{job_id}", "viewer", None),
    ("GET", "/api/jobs/{job_id}/log", "viewer", None),
    ("POST", "/api/jobs/{job_id}/cancel", "operator", None),
    ("POST", "/api/jobs/{job_id}/retry", "operator", None),
    ("GET", "/api/jobs/{job_id}/events", "viewer", None),
    ("GET", "/api/events", "viewer", None),
    ("GET", "/api/dashboard", "viewer", None),
    ("GET", "/api/assets/{name}/trends", "viewer", None),
    ("GET", "/api/protection/report", "viewer", None),
    ("GET", "/api/alerts", "viewer", None),
    ("GET", "/api/alerts/counts", "viewer", None),
    ("POST", "/api/alerts/{alert_id}/acknowledge", "operator", None),
    ("POST", "/api/alerts/{alert_id}/resolve", "operator", None),
    ("GET", "/api/alert-channels", "admin", None),
    ("POST", "/api/alert-channels", "admin", {}),
    ("PATCH", "/api/alert-channels/{channel_id}", "admin", {}),
    ("DELETE", "/api/alert-channels/{channel_id}", "admin", None),
    ("POST", "/api/alert-channels/{channel_id}/test", "admin", None),
    ("GET", "/api/alert-rules", "admin", None),
    ("PUT", "/api/alert-rules", "admin", []),
    ("GET", "/api/alert-summary", "admin", None),
    ("PUT", "/api/alert-summary", "admin", {}),
    ("GET", "/api/pools", "viewer", None),
    ("POST", "/api/pools", "admin", {"name": "m", "disks": ["loop:/missing.img"]}),
    ("POST", "/api/pools/{name}/scrub", "operator", None),
    ("POST", "/api/pools/{name}/replace", "admin", {"member": "x", "disk": "loop:/missing"}),
    ("GET", "/api/pools/importable", "admin", None),
    ("POST", "/api/pools/import", "admin", {"fs_uuid": "0000"}),
    ("GET", "/api/disks", "viewer", None),
    ("POST", "/api/disks/rescan", "operator", None),
    ("GET", "/api/media", "viewer", None),
    ("POST", "/api/media", "admin", {"disk": "loop:/missing.img"}),
    ("POST", "/api/media/{name}/export", "operator", None),
    ("POST", "/api/media/{name}/eject", "operator", None),
    ("GET", "/api/media/offered", "viewer", None),
    ("GET", "/api/rotation", "viewer", None),
    ("PUT", "/api/rotation", "admin", {"sets": []}),
    ("GET", "/api/tape", "viewer", None),
    ("POST", "/api/tape/libraries", "admin", {"path": "/nonexistent-library"}),
    ("POST", "/api/tape/libraries/virtual", "admin", {"name": "m", "slots": 0}),
    ("DELETE", "/api/tape/libraries/{name}", "admin", None),
    ("POST", "/api/tape/libraries/{identity}/load", "operator", {"slot": 1, "drive": 0}),
    ("POST", "/api/tape/libraries/{identity}/unload", "operator", {"drive": 0}),
    (
        "POST",
        "/api/tape/libraries/{identity}/transfer",
        "operator",
        {"source": 1, "destination": 2},
    ),
    ("POST", "/api/tape/libraries/{identity}/export", "operator", {"barcode": "MISSING1"}),
    ("POST", "/api/tape/libraries/{identity}/inventory", "operator", None),
    ("PUT", "/api/tape/media/{barcode}/place", "operator", {"place": "shelf"}),
    ("GET", "/api/tape/jobs", "viewer", None),
    ("POST", "/api/tape/backup", "operator", {"pool": "missing", "drive": "virtual:missing"}),
    ("POST", "/api/tape/restore", "operator", {"point": "missing", "drive": "virtual:missing"}),
    ("POST", "/api/tape/scan", "operator", {"drive": "virtual:missing"}),
    ("POST", "/api/tape/erase", "admin", {"barcode": "MISSING1", "drive": "virtual:missing"}),
    ("GET", "/api/tape/pools", "viewer", None),
    ("PUT", "/api/tape/pools/{name}", "operator", {"schedule": "0 3 * * *"}),
    ("DELETE", "/api/tape/pools/{name}", "operator", None),
    ("GET", "/api/tape/recover", "admin", None),
    ("POST", "/api/tape/recover", "admin", {"drive": "virtual:missing", "recovery_key": "A" * 30}),
    ("GET", "/api/settings", "viewer", None),
    ("PUT", "/api/settings", "admin", {}),
    ("GET", "/api/audit", "admin", None),
    ("GET", "/api/users", "admin", None),
    ("POST", "/api/users", "admin", {"name": "admin", "password": "password-123"}),
    ("GET", "/api/users/{name}", "admin", None),
    ("PATCH", "/api/users/{name}", "admin", {}),
    ("DELETE", "/api/users/{name}", "admin", None),
    ("GET", "/api/tokens", "admin", None),
    ("POST", "/api/tokens", "admin", {"user": "missing"}),
    ("PATCH", "/api/tokens/{token_id}", "admin", {"never": True}),
    ("DELETE", "/api/tokens/{token_id}", "admin", None),
    ("GET", "/api/replication/identity", "viewer", None),
    ("GET", "/api/settings/verify", "viewer", None),
    ("PUT", "/api/settings/verify", "admin", {}),
    ("POST", "/api/points/{point_id}/review", "operator", {"verdict": "expected"}),
    ("POST", "/api/replication/pairing-codes", "admin", None),
    ("POST", "/api/replication/pair", None, {}),
    ("GET", "/api/replication/sources", "viewer", None),
    ("DELETE", "/api/replication/sources/{source_id}", "admin", None),
    ("POST", "/api/replication/sources/{source_id}/takeover", "admin", None),
    ("DELETE", "/api/replication/sources/{source_id}/takeover", "admin", None),
    ("PUT", "/api/peers/{peer_id}/takeover", "admin", {"allow": False}),
    ("GET", "/api/replication/store/takeover-key", "replication", None),
    ("PUT", "/api/replication/store/takeover-grant", "replication", None),
    ("DELETE", "/api/replication/store/takeover-grant", "replication", None),
    # Only a paired source's replication token (tests/test_replication_peer.py): the three roles
    # are all refused.
    ("GET", "/api/replication/store/objects", "replication", None),
    ("POST", "/api/replication/store/present", "replication", {"names": []}),
    ("POST", "/api/replication/store/unpair", "replication", None),
    ("HEAD", "/api/replication/store/objects/{name}", "replication", None),
    ("GET", "/api/replication/store/objects/{name}", "replication", None),
    ("PUT", "/api/replication/store/objects/{name}", "replication", None),
    (
        "POST",
        "/api/replication/store/points/{point_id}",
        "replication",
        {"asset": "a", "kind": "files", "created_at": "2026-01-01T00:00:00Z", "bytes": 1},
    ),
    ("GET", "/metrics", "viewer", None),
    ("GET", "/api/openapi.json", "viewer", None),
    # Hosts (docs/sources.md); adding one with a bad name answers 400 before any connection.
    ("GET", "/api/hosts", "viewer", None),
    ("GET", "/api/hosts/ssh-key", "viewer", None),
    ("POST", "/api/hosts", "admin", {"name": "Bad Name", "kind": "client"}),
    ("POST", "/api/hosts/{name}/trust", "admin", {"fingerprint": "SHA256:" + "A" * 43}),
    ("DELETE", "/api/hosts/{name}", "admin", None),
    ("POST", "/api/hosts/{name}/backup", "operator", None),
    ("GET", "/api/hosts/{name}/vms", "viewer", None),
    ("POST", "/api/hosts/{name}/vms", "admin", {"domain": "x"}),
    ("POST", "/api/hosts/{name}/restores", "operator", {"point": "x", "target": "/x"}),
    ("GET", "/api/client/appliance-client.pyz", "viewer", None),
    # Only a host's client token (tests/test_client.py): the three roles are all refused.
    ("GET", "/api/client/hello", "client", None),
    ("POST", "/api/client/sessions", "client", {"asset": "a", "source": "client://x/"}),
    ("GET", "/api/client/sessions/{session_id}/known", "client", None),
    ("GET", "/api/client/sessions/{session_id}/base", "client", None),
    ("POST", "/api/client/sessions/{session_id}/chunks", "client", None),
    ("POST", "/api/client/sessions/{session_id}/records", "client", None),
    ("POST", "/api/client/sessions/{session_id}/finish", "client", {"batches": 1}),
    ("DELETE", "/api/client/sessions/{session_id}", "client", None),
    ("GET", "/api/client/restores", "client", None),
    ("GET", "/api/client/restores/{restore_id}/archive", "client", None),
    ("POST", "/api/client/restores/{restore_id}/done", "client", {"ok": True, "entries": 0}),
]
FILL = {
    "name": "missing",
    "point_id": MISSING_POINT,
    "job_id": "missing",
    "token_id": "missing",
    "session_id": "missing",
    "location_id": "missing",
    "peer_id": "missing",
    "source_id": "missing",
    "alert_id": "999999",
    "channel_id": "missing",
    "plan_id": "missing",
    "run_id": "missing",
    "path": "core/rfb.js",
    "identity": "virtual:missing",
    "barcode": "MISSING1",
    "restore_id": "missing",
}
QUERY = {
    "/api/events": {"max_seconds": 0.2},
    "/api/client/sessions/{session_id}/records": {"seq": 0},
    "/api/client/sessions/{session_id}/base": {"disk": "sda"},
}


def _error_code(response: httpx.Response) -> str | None:
    if "json" not in response.headers.get("content-type", "") or not response.content:
        return None
    body = response.json()
    return body.get("code") if isinstance(body, dict) else None


def _call(client: httpx.Client, method: str, template: str, body: Any) -> httpx.Response:
    path = template.format(**FILL)
    return client.request(method, path, json=body, params=QUERY.get(template))


def test_role_matrix_covers_every_route(server: LiveServer) -> None:
    routes = {
        (method.upper(), path)
        for path, operations in server.app.openapi()["paths"].items()
        for method in operations
    }
    routes.add(("GET", "/api/openapi.json"))  # served outside the schema it serves
    assert routes == {(method, path) for method, path, _, _ in ROUTES}


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_role_matrix(server: LiveServer, role: str) -> None:
    # ``replication`` is outside the order: none of the three roles may use its routes.
    rank = {"viewer": 0, "operator": 1, "admin": 2, "replication": 3, "client": 3}
    failures = []
    with server.as_role(role) as client:
        for method, template, needed, body in ROUTES:
            response = _call(client, method, template, body)
            code = _error_code(response)
            allowed = needed is None or rank[role] >= rank[needed]
            if allowed:
                ok = response.status_code < 500 and code not in ("forbidden", "unauthenticated")
            else:
                # A HEAD answer has no body to carry the code.
                ok = response.status_code == 403 and (code == "forbidden" or method == "HEAD")
            if not ok:
                failures.append((method, template, response.status_code, response.text[:200]))
    assert failures == []


def test_unauthenticated_is_401_everywhere_but_health_setup_login(server: LiveServer) -> None:
    with server.client() as client:
        for method, template, needed, body in ROUTES:
            response = _call(client, method, template, body)
            if needed is None:
                assert response.status_code != 401 or template == "/api/login", template
            else:
                assert response.status_code == 401, (method, template, response.text)
                if method != "HEAD":  # a HEAD answer has no body
                    assert response.json()["code"] == "unauthenticated"
        assert client.get("/api/health").json()["status"] == "ok"
        assert client.get("/api/setup").json() == {
            "admin_exists": True,
            "setup_code_required": False,
            "setup_code_file": None,
        }


def test_static_shell_is_public_but_holds_no_data(server: LiveServer) -> None:
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["x-frame-options"] == "DENY"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        # The page's files are revalidated on every load (an update shows at once); answers of
        # the API are never stored.
        assert page.headers["cache-control"] == "no-cache" and page.headers.get("etag")
        script = client.get("/js/main.js")
        assert script.headers["cache-control"] == "no-cache"
        again = client.get("/js/main.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304
        assert client.get("/api/health").headers["cache-control"] == "no-store"
        assert client.get("/no-such-page").json()["code"] == "not_found"


def test_openapi_schema_is_served_to_signed_in_callers(viewer: httpx.Client) -> None:
    schema = viewer.get("/api/openapi.json").json()
    assert "/api/points/{point_id}/files" in schema["paths"]
    assert "AssetCreate" in schema["components"]["schemas"]
    assert "AssetPublic" in schema["components"]["schemas"]


# --- sessions, CSRF, tokens, throttling -----------------------------------------------------------------


def test_setup_is_refused_once_an_admin_exists(server: LiveServer) -> None:
    with server.client() as client:
        r = client.post("/api/setup", json={"name": "intruder", "password": "password-123"})
    assert r.status_code == 409 and r.json()["code"] == "conflict"


def test_login_sets_hardened_cookies_and_logout_ends_the_session(server: LiveServer) -> None:
    with server.client() as client:
        r = client.post("/api/login", json={"name": "viewer", "password": PASSWORDS["viewer"]})
        assert r.status_code == 200
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("appliance_session="))
        csrf = next(c for c in cookies if c.startswith("appliance_csrf="))
        assert "HttpOnly" in session and "SameSite=strict" in session
        assert "HttpOnly" not in csrf and "SameSite=strict" in csrf
        assert "Secure" not in session  # plain HTTP on loopback; TLS adds Secure (test below)
        assert client.get("/api/me").json() == {
            "name": "viewer",
            "role": "viewer",
            "via": "session",
        }
        token = r.json()["csrf_token"]
        assert client.post("/api/logout", headers={"X-CSRF-Token": token}).status_code == 204
        stale = httpx.Client(
            base_url=server.url, cookies={"appliance_session": r.cookies["appliance_session"]}
        )
        with stale:
            assert stale.get("/api/me").status_code == 401


def test_session_cookie_is_secure_with_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api_support import weak_kdf_env

    from api.app import create_app

    weak_kdf_env(monkeypatch)
    settings = service_settings(tmp_path / "data", tls=True)
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        code = (tmp_path / "data" / "secrets" / "setup-code").read_text().strip()
        created = client.post(
            "/api/setup", json={"name": "root", "password": "password-123", "setup_code": code}
        )
        assert created.status_code == 201, created.text
        r = client.post("/api/login", json={"name": "root", "password": "password-123"})
        assert all("Secure" in c for c in r.headers.get_list("set-cookie"))


def test_cookie_writes_need_the_csrf_header(server: LiveServer, tmp_path: Path) -> None:
    with server.client() as client:
        token = login(client, *ADMIN)
        body = {"name": "csrf-asset", "kind": "files", "path": str(tmp_path)}
        missing = client.post("/api/assets", json=body)
        assert missing.status_code == 403 and missing.json()["code"] == "csrf_failed"
        wrong = client.post("/api/assets", json=body, headers={"X-CSRF-Token": "forged"})
        assert wrong.status_code == 403 and wrong.json()["code"] == "csrf_failed"
        # A header copied from another session's cookie does not match this session.
        with server.client() as other:
            other_token = login(other, "viewer", PASSWORDS["viewer"])
        client.cookies.set("appliance_csrf", other_token)
        crossed = client.post("/api/assets", json=body, headers={"X-CSRF-Token": other_token})
        assert crossed.status_code == 403
        client.cookies.set("appliance_csrf", token)
        ok = client.post("/api/assets", json=body, headers={"X-CSRF-Token": token})
        assert ok.status_code == 201, ok.text
        assert client.get("/api/assets/csrf-asset").status_code == 200  # reads need no header
        gone = client.delete("/api/assets/csrf-asset", headers={"X-CSRF-Token": token})
        assert gone.status_code == 204


def test_tokens_are_scoped_hashed_and_revocable(server: LiveServer, admin: httpx.Client) -> None:
    r = admin.post("/api/tokens", json={"user": "operator", "role": "viewer"})
    assert r.status_code == 201
    created = r.json()
    assert created["role"] == "viewer" and created["token"].startswith("apl_")
    listed = {t["id"]: t for t in admin.get("/api/tokens", params={"user": "operator"}).json()}
    assert created["id"] in listed and "token" not in listed[created["id"]]
    catalog = server.service.app.catalog
    stored = next(t for t in catalog.list_tokens("operator") if t.id == created["id"])
    assert stored.hashed == hashlib.sha256(created["token"].encode()).hexdigest()
    headers = {"Authorization": f"Bearer {created['token']}"}
    with server.client(headers=headers) as client:
        assert client.get("/api/me").json()["role"] == "viewer"
        assert client.post("/api/verify", json={}).status_code == 403  # scoped below operator
        revoked = admin.delete(f"/api/tokens/{created['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        after = client.get("/api/me")
        assert after.status_code == 401 and after.json()["code"] == "unauthenticated"
    too_high = admin.post("/api/tokens", json={"user": "viewer", "role": "admin"})
    assert too_high.status_code == 400
    with server.client(headers={"Authorization": "Basic abc"}) as client:
        assert client.get("/api/me").status_code == 401


def test_demoting_a_user_demotes_their_tokens(server: LiveServer, admin: httpx.Client) -> None:
    assert (
        admin.post(
            "/api/users", json={"name": "shifty", "role": "operator", "password": "password-123"}
        ).status_code
        == 201
    )
    token = admin.post("/api/tokens", json={"user": "shifty"}).json()["token"]
    with server.client(headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/api/me").json()["role"] == "operator"
        assert admin.patch("/api/users/shifty", json={"role": "viewer"}).json()["role"] == "viewer"
        assert client.get("/api/me").json()["role"] == "viewer"
        assert admin.delete("/api/users/shifty").status_code == 204
        assert client.get("/api/me").status_code == 401


def test_login_throttling(server: LiveServer, admin: httpx.Client) -> None:
    assert (
        admin.post(
            "/api/users", json={"name": "victim", "role": "viewer", "password": "right-password"}
        ).status_code
        == 201
    )
    with server.client() as client:
        for _ in range(LOGIN_FREE_FAILURES):
            r = client.post("/api/login", json={"name": "victim", "password": "wrong"})
            assert r.status_code == 401 and r.json()["code"] == "invalid_credentials"
        r = client.post("/api/login", json={"name": "victim", "password": "wrong"})
        assert r.status_code == 429 and r.json()["code"] == "login_throttled"
        assert int(r.headers["retry-after"]) >= 1
        # Even the right password waits: the throttle answers before the password is checked.
        r = client.post("/api/login", json={"name": "victim", "password": "right-password"})
        assert r.status_code == 429
        # Another user on the same client is not affected.
        assert (
            client.post(
                "/api/login", json={"name": "viewer", "password": PASSWORDS["viewer"]}
            ).status_code
            == 200
        )
        time.sleep(float(r.headers["retry-after"]) + 0.1)
        r = client.post("/api/login", json={"name": "victim", "password": "right-password"})
        assert r.status_code == 200, r.text
    failed = [a for a in admin.get("/api/audit").json() if a["action"] == "login.failed"]
    assert any(a["actor"] == "victim" for a in failed)


def test_change_own_password(server: LiveServer, admin: httpx.Client) -> None:
    admin.post(
        "/api/users", json={"name": "pw-user", "role": "viewer", "password": "first-password"}
    )
    with server.client() as client:
        token = login(client, "pw-user", "first-password")
        wrong = client.post(
            "/api/me/password",
            json={"current_password": "nope", "new_password": "second-password"},
            headers={"X-CSRF-Token": token},
        )
        assert wrong.status_code == 401
        r = client.post(
            "/api/me/password",
            json={"current_password": "first-password", "new_password": "second-password"},
            headers={"X-CSRF-Token": token},
        )
        assert r.status_code == 204
    with server.client() as client:
        login(client, "pw-user", "second-password")


# --- users ----------------------------------------------------------------------------------------------------


def test_users_crud_and_last_admin_protection(admin: httpx.Client) -> None:
    r = admin.post(
        "/api/users", json={"name": "alice", "role": "viewer", "password": "password-123"}
    )
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    assert "password" not in r.json() and "password_hash" not in r.json()
    assert (
        admin.post("/api/users", json={"name": "alice", "password": "password-123"}).json()["code"]
        == "conflict"
    )
    assert admin.get("/api/users/alice").json()["name"] == "alice"
    assert admin.patch("/api/users/alice", json={"role": "operator"}).json()["role"] == "operator"
    assert "alice" in {u["name"] for u in admin.get("/api/users").json()}
    assert admin.delete("/api/users/alice").status_code == 204
    assert admin.get("/api/users/alice").status_code == 404
    demote = admin.patch(f"/api/users/{ADMIN[0]}", json={"role": "viewer"})
    assert demote.status_code == 409
    assert admin.delete(f"/api/users/{ADMIN[0]}").status_code == 409
    short = admin.post("/api/users", json={"name": "bob", "password": "short"})
    assert short.status_code == 422 and short.json()["code"] == "validation_error"


# --- error mapping ------------------------------------------------------------------------------------------


def test_error_bodies_carry_stable_codes(admin: httpx.Client, tmp_path: Path) -> None:
    missing = admin.get("/api/assets/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "code": "not_found",
        "message": "asset nope is not in the catalog",
        "details": {"asset": "nope"},
    }
    bad_path = admin.post("/api/assets", json={"name": "e1", "kind": "files", "path": "/nope/x"})
    assert bad_path.status_code == 400 and bad_path.json()["code"] == "invalid_input"
    malformed = admin.post("/api/assets", json={"name": "bad name!", "kind": "files"})
    assert malformed.status_code == 422
    body = malformed.json()
    assert body["code"] == "validation_error" and body["details"]["errors"][0]["loc"][-1] == "name"
    not_json = admin.post("/api/assets", content=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["code"] == "validation_error"
    assert (
        admin.post(
            "/api/assets", json={"name": "e2", "kind": "files", "path": str(tmp_path)}
        ).status_code
        == 201
    )
    dup = admin.post("/api/assets", json={"name": "e2", "kind": "files", "path": str(tmp_path)})
    assert dup.status_code == 409 and dup.json()["code"] == "conflict"
    assert admin.delete("/api/assets/e2").status_code == 204
    method = admin.put("/api/points")
    assert method.status_code == 405 and method.json()["code"] == "method_not_allowed"
    prefix = admin.get("/api/points/ab")
    assert prefix.status_code == 400 and prefix.json()["code"] == "invalid_input"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFound(), 404),
        (InvalidInput(), 400),
        (Conflict(), 409),
        (LockHeld(), 409),
        (WrongPassphrase(), 401),
        (StoreFull(), 507),
        (ApplianceError(), 500),
    ],
)
def test_domain_errors_map_to_statuses_in_one_place(error: ApplianceError, status: int) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == status == STATUS_BY_KIND[error.kind]
    assert r.json() == {"code": error.code, "message": error.message, "details": {}}


def test_unexpected_errors_become_a_generic_500() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/bug")
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert "secret" not in r.text
