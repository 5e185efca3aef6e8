"""Pairing, the peer's side (docs/replication.md), against a live service on 127.0.0.1.

The identity helpers, pairing codes (short-lived, stored hashed, admin only, surviving a restart)
and pairing (the answer and a working token; wrong, expired and reused codes refused; failed
pairings throttled; what a source claims validated). The source is faked with plain HTTP calls
(``replication_support.pair_source``); the source's own side is ``test_replication.py``.

One server serves the module; each test pairs sources of its own (fresh appliance and store
ids), so their order does not matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, live_server, service_settings, weak_kdf_env
from replication_support import (
    FREE_FAILURES,
    Source,
    audit_entries,
    forget_failed_pairings,
    new_pairing_code,
    pair_source,
    peer_server,
    source_claim,
)
from replication_support import (
    STORE_ROUTES as STORE,
)

from api.identity import (
    APPLIANCE_ID,
    FINGERPRINT,
    appliance_id,
    certificate_fingerprint,
)
from api.pairing import CODE_ALPHABET, CODES_KEY
from api.tls import ensure_certificate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with peer_server(tmp_path_factory.mktemp("peer")) as live:
        yield live


@pytest.fixture(autouse=True)
def fresh_pairing_throttle(server: LiveServer) -> None:
    """Every test starts with no failed pairings counted against 127.0.0.1."""
    forget_failed_pairings(server)


def test_identity_helpers(server: LiveServer, tmp_path: Path) -> None:
    app = server.service.app
    first = appliance_id(app)
    assert APPLIANCE_ID.match(first) and appliance_id(app) == first
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert ensure_certificate(cert, key)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    fingerprint = certificate_fingerprint(cert)
    assert FINGERPRINT.match(fingerprint)
    assert fingerprint == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    (tmp_path / "cert.der").write_bytes(der)
    assert certificate_fingerprint(tmp_path / "cert.der") == fingerprint


def test_a_pairing_code_is_short_lived_and_stored_hashed(
    server: LiveServer, admin: httpx.Client
) -> None:
    r = admin.post("/api/replication/pairing-codes")
    assert r.status_code == 201, r.text
    body = r.json()
    assert len(body["code"]) == 8 and set(body["code"]) <= set(CODE_ALPHABET)
    assert body["appliance_id"] == appliance_id(server.service.app)
    assert body["name"] == "Backup appliance"
    assert body["fingerprint"] is None  # this test server speaks plain HTTP: no certificate
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10, seconds=5)
    stored = server.service.app.catalog.get_settings(CODES_KEY)
    assert body["code"] not in str(stored)
    assert hashlib.sha256(body["code"].encode()).hexdigest() in str(stored)
    assert any(a.actor == "admin" for a in audit_entries(server, "replication.pairing_code"))


def test_pairing_codes_are_admin_only(operator: httpx.Client, viewer: httpx.Client) -> None:
    for client in (operator, viewer):
        assert client.post("/api/replication/pairing-codes").status_code == 403


def test_pairing_answers_the_peer_and_a_working_token(
    server: LiveServer, admin: httpx.Client
) -> None:
    claim = source_claim(name="Head office")
    code = new_pairing_code(admin)
    with server.client() as anonymous:
        # Case, spaces and dashes as a person might type them do not matter.
        typed = f"{code[:4].lower()}-{code[4:]}"
        r = anonymous.post("/api/replication/pair", json={"code": typed, "source": claim})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["peer"] == {
        "appliance_id": appliance_id(server.service.app),
        "name": "Backup appliance",
        "fingerprint": None,
    }
    assert body["token"].startswith("apl_")
    user = f"peer-{claim['appliance_id']}"
    catalog = server.service.app.catalog
    assert catalog.get_user(user).role == "replication"
    tokens = catalog.list_tokens(user)
    assert [t.scopes for t in tokens] == [["replication", f"store:{claim['store_id']}"]]
    replica = Path(server.settings.data_dir) / "replicas" / claim["store_id"]
    assert replica.is_dir()
    source = Source(claim["appliance_id"], claim["store_id"], claim["name"], body["token"], server)
    with source.client() as client:
        listed = client.get(f"{STORE}/objects")
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"objects": [], "next_after": None}
    paired = [
        a for a in audit_entries(server, "replication.pair") if a.target == claim["appliance_id"]
    ]
    assert paired and paired[0].actor == user and paired[0].details["store_id"] == claim["store_id"]


def test_wrong_expired_and_reused_codes_are_refused(
    server: LiveServer, admin: httpx.Client
) -> None:
    with server.client() as anonymous:

        def attempt(code: str) -> httpx.Response:
            return anonymous.post(
                "/api/replication/pair", json={"code": code, "source": source_claim()}
            )

        wrong = attempt("ABCDEFGH")
        assert wrong.status_code == 403 and wrong.json()["code"] == "pairing_refused"
        code = new_pairing_code(admin)
        assert attempt(code).status_code == 200
        reused = attempt(code)
        assert reused.status_code == 403 and reused.json()["code"] == "pairing_refused"
        code = new_pairing_code(admin)
        server.clock.offset = timedelta(minutes=10, seconds=1)
        try:
            expired = attempt(code)
        finally:
            server.clock.offset = timedelta(0)
        assert expired.status_code == 403 and expired.json()["code"] == "pairing_refused"
    assert len(audit_entries(server, "replication.pair_failed")) >= 3


def test_failed_pairings_are_throttled(server: LiveServer, admin: httpx.Client) -> None:
    code = new_pairing_code(admin)
    with server.client() as anonymous:
        for _ in range(FREE_FAILURES):
            r = anonymous.post(
                "/api/replication/pair", json={"code": "WRONG234", "source": source_claim()}
            )
            assert r.status_code == 403
        r = anonymous.post(
            "/api/replication/pair", json={"code": "WRONG234", "source": source_claim()}
        )
        assert r.status_code == 429 and r.json()["code"] == "pairing_throttled"
        assert int(r.headers["retry-after"]) >= 1
        # The right code waits too: the throttle answers before the code is looked at ...
        r = anonymous.post("/api/replication/pair", json={"code": code, "source": source_claim()})
        assert r.status_code == 429
    # ... and it was not consumed.
    del server.app.state.pairing_throttle
    with server.client() as anonymous:
        r = anonymous.post("/api/replication/pair", json={"code": code, "source": source_claim()})
        assert r.status_code == 200, r.text


def test_pairing_validates_what_the_source_claims(server: LiveServer, admin: httpx.Client) -> None:
    code = new_pairing_code(admin)
    own = appliance_id(server.service.app)
    with server.client() as anonymous:
        for claim in (
            source_claim(appliance_id="not-hex"),
            source_claim(store_id="../../etc"),
            source_claim(fingerprint="AA:BB"),
            source_claim(appliance_id=own),
        ):
            r = anonymous.post("/api/replication/pair", json={"code": code, "source": claim})
            assert r.status_code == 400, r.text
        # Another appliance claiming a store that already replicates here is a conflict.
        taken = pair_source(server, admin)
        r = anonymous.post(
            "/api/replication/pair",
            json={"code": code, "source": source_claim(store_id=taken.store_id)},
        )
        assert r.status_code == 409, r.text
        # None of that used the code up.
        r = anonymous.post("/api/replication/pair", json={"code": code, "source": source_claim()})
        assert r.status_code == 200, r.text


def test_a_pairing_code_survives_a_restart(tmp_path: Path) -> None:
    with bootstrapped_server(tmp_path) as first, first.as_role("admin") as admin:
        code = new_pairing_code(admin)
        peer_id = appliance_id(first.service.app)
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        with live_server(service_settings(tmp_path / "data")) as again, again.client() as c:
            r = c.post("/api/replication/pair", json={"code": code, "source": source_claim()})
            assert r.status_code == 200, r.text
            assert r.json()["peer"]["appliance_id"] == peer_id
