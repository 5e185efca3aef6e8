"""API tokens that expire: the catalog's record (both backends, an explicit clock), the refusal
of an expired token (401, audited like a revoked one), renewing, the ``credentials_expiring``
alert delivered to a real aiosmtpd mailbox and a real webhook receiver on 127.0.0.1 and resolved
by a renewal or a revocation, and the Users & tokens page's expiry form (Playwright on Debian's
Chromium)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server
from catalog_support import T0, FakeClock, open_catalog
from test_alerts_delivery import SMTP_PASSWORD, Hooks, Smtp, email_channel, eventually

# The real receivers of test_alerts_delivery, as fixtures named by these aliases.
from test_alerts_delivery import hooks as hooks_fixture  # noqa: F401
from test_alerts_delivery import smtp as smtp_fixture  # noqa: F401
from web_support import expect, signed_in

from api.alerting import token_subject
from appliance.catalog import Catalog
from appliance.errors import Conflict, InvalidInput, NotFound

# --- the catalog -----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(catalog_url: str, clock: FakeClock) -> Iterator[Catalog]:
    yield from open_catalog(catalog_url, clock)


def test_a_token_stops_matching_at_its_expiry(catalog: Catalog, clock: FakeClock) -> None:
    catalog.add_user("ops", "operator", "$argon2id$y")
    never = catalog.add_token("ops", "sha256:never", ["operator"])
    soon = catalog.add_token("ops", "sha256:soon", ["operator"], T0 + timedelta(hours=1))
    assert never.expires_at is None and soon.expires_at == T0 + timedelta(hours=1)
    assert catalog.find_active_token("sha256:soon") == soon
    clock.advance(3600)  # the expiry itself: no longer valid
    with pytest.raises(NotFound):
        catalog.find_active_token("sha256:soon")
    assert catalog.find_token("sha256:soon") == soon  # still known: the refusal says why
    assert catalog.find_active_token("sha256:never") == never
    listed = {t.hashed: t.expires_at for t in catalog.list_tokens("ops")}
    assert listed == {"sha256:never": None, "sha256:soon": soon.expires_at}
    with pytest.raises(NotFound):
        catalog.find_token("sha256:nobody")


def test_an_expiry_must_be_in_the_future_and_aware(catalog: Catalog, clock: FakeClock) -> None:
    catalog.add_user("ops", "operator", "$argon2id$y")
    with pytest.raises(InvalidInput, match="has already passed"):
        catalog.add_token("ops", "sha256:a", [], T0)
    with pytest.raises(InvalidInput, match="no time zone"):
        catalog.add_token("ops", "sha256:a", [], datetime(2027, 1, 1))
    assert catalog.list_tokens() == []  # nothing was recorded


def test_renewing_changes_a_working_token_only(catalog: Catalog, clock: FakeClock) -> None:
    catalog.add_user("ops", "operator", "$argon2id$y")
    token = catalog.add_token("ops", "sha256:a", [], T0 + timedelta(days=5))
    renewed = catalog.set_token_expiry(token.id, T0 + timedelta(days=90))
    assert renewed.expires_at == T0 + timedelta(days=90)
    assert catalog.set_token_expiry(token.id, None).expires_at is None
    with pytest.raises(InvalidInput, match="has already passed"):
        catalog.set_token_expiry(token.id, T0 - timedelta(days=1))
    short = catalog.add_token("ops", "sha256:b", [], T0 + timedelta(days=1))
    clock.advance(2 * 86400)
    with pytest.raises(Conflict, match="has expired; create a new one"):
        catalog.set_token_expiry(short.id, clock.now + timedelta(days=30))
    catalog.revoke_token(token.id)
    with pytest.raises(Conflict, match="revoked"):
        catalog.set_token_expiry(token.id, None)
    with pytest.raises(NotFound):
        catalog.set_token_expiry("nope", None)


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("token-expiry")) as live:
        yield live


@pytest.fixture
def moved_clock(server: LiveServer) -> Iterator[Any]:
    """The service's clock, put back after the test (other tests of the module share it)."""
    try:
        yield server.clock
    finally:
        server.clock.offset = timedelta(0)


def new_token(admin: httpx.Client, **body: Any) -> dict[str, Any]:
    r = admin.post("/api/tokens", json={"user": "operator", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def audit_of(admin: httpx.Client, action: str, target: str) -> list[dict[str, Any]]:
    return [
        e for e in admin.get("/api/audit").json() if (e["action"], e["target"]) == (action, target)
    ]


def test_a_token_is_made_with_an_expiry_in_days_or_at_a_time(
    server: LiveServer, admin: httpx.Client
) -> None:
    now = server.service.now()
    days = new_token(admin, expires_in_days=90)
    expires = datetime.fromisoformat(days["expires_at"])
    assert timedelta(days=90) <= expires - now < timedelta(days=90, minutes=1)
    at = (now + timedelta(days=200)).replace(microsecond=0)
    dated = new_token(admin, expires_at=at.isoformat())
    assert datetime.fromisoformat(dated["expires_at"]) == at
    assert new_token(admin)["expires_at"] is None  # default: never
    listed = {t["id"]: t for t in admin.get("/api/tokens").json()}
    assert listed[days["id"]]["expires_at"] == days["expires_at"]
    assert listed[dated["id"]]["expires_at"] == dated["expires_at"]
    (entry,) = audit_of(admin, "token.create", days["id"])
    assert datetime.fromisoformat(entry["details"]["expires_at"]) == expires


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"expires_in_days": 0}, 422, "greater than or equal to 1"),
        ({"expires_in_days": 3651}, 422, "less than or equal to 3650"),
        ({"expires_in_days": 5, "expires_at": "2030-01-01T00:00:00Z"}, 422, "not both"),
        ({"expires_at": "2030-01-01T00:00:00"}, 422, "timezone"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, 400, "has already passed"),
        ({"expires_at": "2999-01-01T00:00:00Z"}, 400, "at most 3650 days"),
    ],
)
def test_a_bad_expiry_is_refused_in_words_and_makes_no_token(
    admin: httpx.Client, body: dict[str, Any], status: int, words: str
) -> None:
    before = len(admin.get("/api/tokens").json())
    r = admin.post("/api/tokens", json={"user": "operator", **body})
    assert r.status_code == status, r.text
    assert words in r.text
    assert len(admin.get("/api/tokens").json()) == before


def test_an_expired_token_is_refused_like_a_revoked_one_and_audited(
    server: LiveServer, admin: httpx.Client, moved_clock: Any
) -> None:
    token = new_token(admin, expires_in_days=1)
    revoked = new_token(admin)
    assert admin.delete(f"/api/tokens/{revoked['id']}").status_code == 200
    with server.client(headers={"Authorization": f"Bearer {token['token']}"}) as script:
        assert script.get("/api/me").json()["name"] == "operator"
        moved_clock.offset = timedelta(days=1, seconds=1)
        time.sleep(2.1)  # past the credential cache of reads (AUTH_TTL)
        refused = script.get("/api/me")
        assert refused.status_code == 401
        assert "the API token expired on" in refused.json()["message"]
        assert script.post("/api/assets/none/backup", json={}).status_code == 401
    with server.client(headers={"Authorization": f"Bearer {revoked['token']}"}) as old:
        assert old.get("/api/me").status_code == 401
    expired_entries = audit_of(admin, "token.refused", token["id"])
    assert len(expired_entries) == 2
    assert {e["actor"] for e in expired_entries} == {"operator"}
    assert {e["details"]["reason"] for e in expired_entries} == {"expired"}
    (revoked_entry,) = audit_of(admin, "token.refused", revoked["id"])
    assert revoked_entry["details"]["reason"] == "revoked"
    # An unknown token has no holder to name: refused, not audited.
    with server.client(headers={"Authorization": "Bearer apl_not-a-token"}) as stranger:
        assert stranger.get("/api/me").status_code == 401


def test_renewing_a_token_keeps_it_working(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, moved_clock: Any
) -> None:
    token = new_token(admin, expires_in_days=2)
    r = admin.patch(f"/api/tokens/{token['id']}", json={"expires_in_days": 30})
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] > token["expires_at"]
    (entry,) = audit_of(admin, "token.renew", token["id"])
    assert entry["details"]["user"] == "operator"
    assert datetime.fromisoformat(entry["details"]["expires_at"]) == datetime.fromisoformat(
        r.json()["expires_at"]
    )
    moved_clock.offset = timedelta(days=3)  # past the first expiry, before the new one
    with server.client(headers={"Authorization": f"Bearer {token['token']}"}) as script:
        assert script.get("/api/me").status_code == 200
    never = admin.patch(f"/api/tokens/{token['id']}", json={"never": True})
    assert never.status_code == 200 and never.json()["expires_at"] is None
    assert admin.patch(f"/api/tokens/{token['id']}", json={}).status_code == 422
    assert (
        admin.patch(
            f"/api/tokens/{token['id']}", json={"never": True, "expires_in_days": 3}
        ).status_code
        == 422
    )
    assert operator.patch(f"/api/tokens/{token['id']}", json={"never": True}).status_code == 403
    short = new_token(admin, expires_in_days=1)
    moved_clock.offset += timedelta(days=2)
    late = admin.patch(f"/api/tokens/{short['id']}", json={"expires_in_days": 30})
    assert late.status_code == 409 and "create a new one" in late.json()["message"]
    assert admin.patch("/api/tokens/nope", json={"never": True}).status_code == 404


# --- the alert ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receivers(request: pytest.FixtureRequest) -> tuple[Smtp, Hooks]:
    """The aiosmtpd mailbox and the webhook receiver of test_alerts_delivery."""
    return request.getfixturevalue("smtp_fixture"), request.getfixturevalue("hooks_fixture")


def credential_alerts(admin: httpx.Client, token_id: str, state: str) -> list[dict[str, Any]]:
    r = admin.get("/api/alerts", params={"state": state})
    assert r.status_code == 200, r.text
    return [
        a
        for a in r.json()
        if a["kind"] == "credentials_expiring" and a["subject"] == token_subject(token_id)
    ]


def test_an_expiring_token_reaches_the_mailbox_and_the_webhook_until_renewed_or_revoked(
    server: LiveServer, admin: httpx.Client, receivers: tuple[Smtp, Hooks]
) -> None:
    smtp, hooks = receivers
    email_channel(admin, smtp, "mail", SMTP_PASSWORD)
    r = admin.post(
        "/api/alert-channels",
        json={
            "name": "hook",
            "kind": "webhook",
            "webhook": {"preset": "generic"},
            "url": hooks.url,
        },
    )
    assert r.status_code == 201, r.text
    alerts = server.service.alerts
    soon = new_token(admin, expires_in_days=10)
    later = new_token(admin, expires_in_days=45)
    doomed = new_token(admin, expires_in_days=3)
    mails, posts = len(smtp.mailbox.messages), len(hooks.received)
    now = server.service.now()
    events = [e for e in alerts.evaluate(now) if e.kind == "credentials_expiring"]
    subjects = {e.subject for e in events}
    assert {token_subject(soon["id"]), token_subject(doomed["id"])} <= subjects
    assert token_subject(later["id"]) not in subjects  # beyond the 30-day window
    (alert,) = credential_alerts(admin, soon["id"], "open")
    assert alert["severity"] == "warning"
    assert alert["message"].startswith(f"The API token {soon['id'][:8]} of operator (operator)")
    assert re.search(r"expires on \d{4}-\d\d-\d\d, in (9|10) days\.$", alert["message"])
    assert eventually(
        lambda: len(smtp.mailbox.messages) >= mails + 2 and len(hooks.received) >= posts + 2
    )
    mail_text = "\n".join(m[3] for m in smtp.mailbox.messages[mails:])
    assert f"The API token {soon['id'][:8]} of operator" in mail_text
    documents = [json.loads(body) for _path, _headers, body in hooks.received[posts:]]
    assert {(d["kind"], d["subject"]) for d in documents} >= {
        ("credentials_expiring", token_subject(soon["id"])),
        ("credentials_expiring", token_subject(doomed["id"])),
    }
    # The window moves with time: 20 days on, the 45-day token is announced too.
    alerts.evaluate(now + timedelta(days=20))
    assert credential_alerts(admin, later["id"], "open")

    # Renewed beyond the window: resolved at once. Revoked: resolved at once.
    assert (
        admin.patch(f"/api/tokens/{soon['id']}", json={"expires_in_days": 365}).status_code == 200
    )
    assert not credential_alerts(admin, soon["id"], "open")
    assert credential_alerts(admin, soon["id"], "resolved")
    assert admin.delete(f"/api/tokens/{doomed['id']}").status_code == 200
    assert not credential_alerts(admin, doomed["id"], "open")
    # Renewed but still inside the window: the alert stays, and the evaluation keeps it.
    inside = admin.patch(f"/api/tokens/{later['id']}", json={"expires_in_days": 15})
    assert inside.status_code == 200
    assert credential_alerts(admin, later["id"], "open")
    raised = {e.subject for e in alerts.evaluate(server.service.now())}
    assert token_subject(later["id"]) in raised and token_subject(soon["id"]) not in raised
    assert admin.patch(f"/api/tokens/{later['id']}", json={"never": True}).status_code == 200
    alerts.evaluate(server.service.now())
    assert not credential_alerts(admin, later["id"], "open")


# --- the page ----------------------------------------------------------------------------------------


def test_the_token_form_sets_shows_and_changes_an_expiry(
    browser: Any, server: LiveServer, admin: httpx.Client
) -> None:
    with signed_in(browser, server, *ADMIN, path="/#/users") as page:
        page.get_by_role("button", name="Create token").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("For user").select_option("viewer")
        expires_on = dialog.get_by_label("Expires on")
        expect(expires_on).to_be_disabled()  # applies only to "On a date…"
        dialog.get_by_label("Expires", exact=True).select_option("date")
        expect(expires_on).to_be_enabled()
        dialog.get_by_role("button", name="Create token").click()
        expect(dialog).to_contain_text("Pick the day the token expires")
        day = (datetime.now() + timedelta(days=10)).strftime("%Y-%m-%d")  # the browser's day
        expires_on.fill(day)
        dialog.get_by_role("button", name="Create token").click()
        reveal = page.get_by_role("dialog").filter(has_text="Your new API token")
        secret = reveal.get_by_label(re.compile("^API token for viewer")).input_value()
        reveal.get_by_role("button", name="Done").click()
        created = next(
            t for t in admin.get("/api/tokens").json() if t["user"] == "viewer" and t["expires_at"]
        )
        # The end of the chosen day in the browser's zone (the test runs in the same zone).
        local_end = datetime.fromisoformat(created["expires_at"]).astimezone()
        assert local_end.strftime("%H:%M") == "00:00"
        assert (local_end - timedelta(days=1)).strftime("%Y-%m-%d") == day
        with server.client(headers={"Authorization": f"Bearer {secret}"}) as script:
            assert script.get("/api/me").json()["name"] == "viewer"
        row = page.locator(f'tr[data-token="{created["id"]}"]')
        expect(row).to_contain_text(re.compile(r"In 1[01] days"))  # inside the warning window
        expect(row).to_contain_text("Active")

        # Change the expiry: never.
        row.get_by_role("button", name=f"Change expiry of token {created['id'][:8]}").click()
        renew = page.get_by_role("dialog")
        renew.get_by_label("Expires", exact=True).select_option("never")
        renew.get_by_role("button", name="Set expiry").click()
        expect(page.locator(".toast").last).to_contain_text("never expires now")
        expect(row).to_contain_text("Never")
        listed = {t["id"]: t for t in admin.get("/api/tokens").json()}
        assert listed[created["id"]]["expires_at"] is None

        # A token past its expiry: shown as expired, with nothing left to change but revoking.
        service = server.service
        catalog = service.app.catalog
        gone = catalog.add_token(
            "viewer", "sha256:" + "e" * 64, ["viewer"], service.now() + timedelta(seconds=1)
        )
        time.sleep(1.2)
        page.reload()
        gone_row = page.locator(f'tr[data-token="{gone.id}"]')
        expect(gone_row).to_contain_text("Expired")
        expect(gone_row.get_by_role("button", name=re.compile("^Change expiry"))).to_have_count(0)
        expect(gone_row.get_by_role("button", name=re.compile("^Revoke"))).to_have_count(1)
