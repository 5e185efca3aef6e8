"""The Replication screen (Playwright driving Debian's Chromium, headless) on two live appliances
on 127.0.0.1: the source, a plain service (``api_support.bootstrapped_server``, its page over
HTTP), and the peer, the very configuration ``appliance serve`` runs (TLS with its generated
certificate, ``replication_support.Peer``, its page over HTTPS; the browser is told to accept that
self-signed certificate, as a person would after comparing fingerprints).

- An administrator shows a pairing code on the peer's page and types it, with the peer's address,
  on the source's page; a wrong code is refused in the appliance's words; both pages then show
  the peer's fingerprint, the same, and the peer's page shows the source's.
- A point replicated by a backup appears on the source's page with the RPO at the peer in words
  and on the peer's page in the source's card (points, their age, bytes held).
- "Replicate now" queues a ``replicate`` job; an administrator changes the bandwidth, catch-up
  and "after each backup"; viewers see no control, operators only "Replicate now".
- The fields other parts of the contract add (a time window, clock skew, take-over) are drawn
  when an answer has them (the answers are extended in the browser, ``page.route``), and opening
  a taken-over store's points puts every screen in that store's context (``store=<id>`` on every
  request, a banner with the way back).
- Unpairing from both pages, the peer's deleting the replica.

The tests run in file order and share the two appliances; each still passes alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from api_support import (
    ADMIN,
    PASSWORDS,
    LiveServer,
    bootstrapped_server,
    wait_job,
    weak_kdf_env,
)
from replication_support import Peer, pair, running_peer
from web_support import SCREENSHOTS_ENV, PageWatch, Screenshots, expect, signed_in_page

from api.identity import certificate_fingerprint

pytestmark = pytest.mark.slow

ASSET = "projects"


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp, keep=(SCREENSHOTS_ENV,))
        yield


@pytest.fixture(scope="module")
def peer(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_peer(tmp_path_factory.mktemp("peer")) as started:
        yield started


@pytest.fixture(scope="module")
def source(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("source"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        tree = tmp_path_factory.mktemp("tree") / ASSET
        tree.mkdir()
        (tree / "plan.txt").write_bytes(b"the plan " * 1000)
        (tree / "data.bin").write_bytes(os.urandom(200_000))
        with live.as_role("admin") as admin:
            r = admin.post("/api/assets", json={"name": ASSET, "kind": "files", "path": str(tree)})
            assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


def replication_page(
    browser: Any, server: LiveServer, name: str, password: str
) -> tuple[Any, PageWatch]:
    """A page of ``server`` signed in as ``name``, on the Replication screen."""
    page, watch = signed_in_page(browser, server, name, password, path="/#/replication")
    expect(page.get_by_role("heading", level=1)).to_have_text("Replication")
    return page, watch


@pytest.fixture
def pages(browser: Any, source: LiveServer, peer: Peer) -> Iterator[dict[str, Any]]:
    """Administrators' pages of both appliances."""
    assert peer.live is not None
    opened = {
        "source": replication_page(browser, source, *ADMIN),
        "peer": replication_page(browser, peer.live, *ADMIN),
    }
    yield {side: page for side, (page, _) in opened.items()}
    for page, watch in opened.values():
        page.context.close()
        watch.check()


def peers_of(source: LiveServer) -> list[dict[str, Any]]:
    with source.as_role("viewer") as viewer:
        r = viewer.get("/api/peers")
        assert r.status_code == 200, r.text
        return list(r.json())


def sources_of(peer: Peer) -> list[dict[str, Any]]:
    with peer.admin() as admin:
        r = admin.get("/api/replication/sources")
        assert r.status_code == 200, r.text
        return list(r.json())


def unpaired(source: LiveServer, peer: Peer) -> None:
    """Neither appliance knows the other (through the API), whatever ran before."""
    with source.as_role("admin") as admin:
        for p in peers_of(source):
            assert admin.delete(f"/api/peers/{p['id']}").status_code == 200
    with peer.admin() as admin:
        for s in sources_of(peer):
            r = admin.delete(f"/api/replication/sources/{s['appliance_id']}")
            assert r.status_code == 204, r.text


@pytest.fixture
def paired(source: LiveServer, peer: Peer) -> dict[str, Any]:
    """The source paired with the peer as "dr" (through the API when not yet)."""
    known = [p for p in peers_of(source) if p["address"] == peer.address]
    if known and sources_of(peer):
        return known[0]
    unpaired(source, peer)
    return pair(source, peer, label="dr")


def replicated_backup(source: LiveServer) -> str:
    """A backup of the asset and the replication it queued, both done; returns the point."""
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/assets/{ASSET}/backup", json={})
        assert r.status_code == 202, r.text
        backup = wait_job(operator, r.json()["id"])
        assert backup["state"] == "succeeded", backup
        for job_id in backup["result"].get("replication_jobs") or []:
            job = wait_job(operator, job_id)
            assert job["state"] == "succeeded", job
    return str(backup["result"]["point"])


def test_an_admin_pairs_from_the_pages_and_both_show_the_same_fingerprint(
    pages: dict[str, Any], source: LiveServer, peer: Peer, shots: Screenshots
) -> None:
    unpaired(source, peer)
    on_source, on_peer = pages["source"], pages["peer"]
    on_source.reload()
    expect(on_source.get_by_text("No peer yet")).to_be_visible()
    on_peer.reload()
    expect(on_peer.get_by_text("No appliance replicates here yet.")).to_be_visible()

    # The peer's page: a code, big, with its expiry counting down and the fingerprint.
    on_peer.get_by_role("button", name="Show a pairing code").click()
    shown = on_peer.get_by_role("region", name="Pairing code")
    code_el = shown.locator("[data-code]")
    expect(code_el).to_have_text(re.compile(r"^[A-Z2-9]{4}-[A-Z2-9]{4}$"))
    expect(shown).to_contain_text(re.compile(r"Valid for [89]:\d\d more"))
    spaced = code_el.inner_text()
    own = shown.locator("[data-fingerprint]").inner_text()
    assert own == certificate_fingerprint(peer.data_dir / "tls" / "cert.pem")
    expect(on_peer.locator("[data-fact=own-fingerprint]")).to_have_text(own)
    shots.take(on_peer, "replication-pairing-code")

    # The source's page: a wrong code is refused in the peer's words, the shown one pairs.
    on_source.get_by_role("button", name="Pair with a peer").first.click()
    dialog = on_source.get_by_role("dialog")
    dialog.get_by_label("Peer address").fill(peer.address)
    dialog.get_by_label("Pairing code").fill("WRONG234")
    dialog.get_by_label("Label").fill("dr")
    dialog.get_by_role("button", name="Pair").click()
    expect(dialog.get_by_role("alert")).to_contain_text("refused to pair")
    dialog.get_by_label("Pairing code").fill(spaced.lower())  # case and dashes do not matter
    dialog.get_by_role("button", name="Pair").click()
    expect(on_source.get_by_role("dialog")).to_have_count(0)
    expect(on_source.locator(".toast").filter(has_text="Paired with")).to_be_visible()

    (record,) = peers_of(source)
    card = on_source.locator(f"[data-peer='{record['id']}']")
    expect(card.get_by_role("heading", name="dr")).to_be_visible()
    expect(card.locator("[data-fingerprint]")).to_have_text(own)
    assert record["fingerprint"] == own
    expect(card.locator("[data-fact=rpo]")).to_have_text("The peer holds no point yet.")
    expect(card.locator("[data-fact=points]")).to_have_text("0 points at the peer, none to send")
    shots.take(on_source, "replication-paired")

    # The peer's page lists the source with the source's own fingerprint.
    on_peer.reload()
    (listed,) = sources_of(peer)
    assert listed["fingerprint"] == certificate_fingerprint(source.settings.cert_path)
    source_card = on_peer.locator(f"[data-source='{listed['appliance_id']}']")
    expect(source_card.locator("[data-fingerprint]")).to_have_text(listed["fingerprint"])
    # ... the one the source's page shows as its own, without a pairing code.
    expect(on_source.locator("[data-fact=own-fingerprint]")).to_have_text(listed["fingerprint"])
    expect(source_card.locator("[data-fact=store]")).to_have_text(listed["store_id"])
    expect(source_card.locator("[data-fact=points]")).to_have_text(
        "0 points; no point held here yet"
    )


def test_a_replicated_point_shows_its_rpo_on_both_pages(
    pages: dict[str, Any],
    source: LiveServer,
    peer: Peer,
    paired: dict[str, Any],
    shots: Screenshots,
) -> None:
    replicated_backup(source)
    (record,) = peers_of(source)
    assert record["rpo"].startswith("newest point at the peer is "), record
    on_source, on_peer = pages["source"], pages["peer"]
    on_source.reload()
    card = on_source.locator(f"[data-peer='{record['id']}']")
    expect(card.locator("[data-fact=rpo]")).to_have_text(
        re.compile(r"^Newest point at the peer is \d+ min old\.$")
    )
    expect(card.locator("[data-fact=points]")).to_have_text(
        f"{record['points_at_peer']} point{'s' if record['points_at_peer'] != 1 else ''} "
        "at the peer, none to send"
    )
    expect(card.locator("[data-fact=answered]")).to_contain_text("Answered")
    last = card.locator("[data-fact=last]")
    expect(last).to_contain_text("Succeeded")
    expect(last).to_contain_text("sent")
    expect(card.locator("[data-fact=job]")).to_have_text("Nothing under way")
    shots.take(on_source, "replication-peers")

    on_peer.reload()
    (listed,) = sources_of(peer)
    assert listed["points"]["count"] == record["points_at_peer"] and listed["bytes_held"] > 0
    source_card = on_peer.locator(f"[data-source='{listed['appliance_id']}']")
    expect(source_card.locator("[data-fact=points]")).to_have_text(
        re.compile(rf"^{listed['points']['count']} points?; newest point here is \d+ min old$")
    )
    expect(source_card.locator("[data-fact=held]")).not_to_have_text("0 bytes")
    expect(source_card.locator("[data-fact=space]")).to_contain_text("free")
    shots.take(on_peer, "replication-sources")


def test_replicate_now_queues_a_job_and_an_admin_changes_the_settings(
    pages: dict[str, Any], source: LiveServer, paired: dict[str, Any]
) -> None:
    page = pages["source"]
    page.reload()
    card = page.locator(f"[data-peer='{paired['id']}']")
    card.get_by_role("button", name="Replicate to dr now").click()
    link = page.locator(".toast").get_by_role("link", name="Watch progress")
    expect(link).to_have_attribute("href", re.compile(r"^#/jobs/\w+"))
    job_id = (link.get_attribute("href") or "").removeprefix("#/jobs/")
    with source.as_role("viewer") as viewer:
        job = wait_job(viewer, job_id)
    assert job["kind"] == "replicate" and job["params"]["trigger"] == "manual", job
    assert job["state"] == "succeeded", job

    card.get_by_role("button", name="Edit replication to dr").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Bandwidth limit (MiB/s)").fill("-1")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog.get_by_role("alert")).to_contain_text("Please check the form")
    dialog.get_by_label("Bandwidth limit (MiB/s)").fill("5")
    dialog.get_by_label("Catch-up every (minutes)").fill("30")
    dialog.get_by_label("Replicate after each backup").uncheck()
    dialog.get_by_role("button", name="Save").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
    expect(card.locator("[data-fact=settings]")).to_have_text(
        "Not after each backup; catch-up every 30 minutes; at most 5 MiB/s."
    )
    (record,) = peers_of(source)
    assert (record["bandwidth_mib_s"], record["catch_up_minutes"], record["replicate_new"]) == (
        5,
        30,
        False,
    )
    card.get_by_role("button", name="Edit replication to dr").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Bandwidth limit (MiB/s)").fill("")
    dialog.get_by_label("Catch-up every (minutes)").fill("15")
    dialog.get_by_label("Replicate after each backup").check()
    dialog.get_by_role("button", name="Save").click()
    expect(card.locator("[data-fact=settings]")).to_have_text(
        "After each backup; catch-up every 15 minutes; no bandwidth limit."
    )
    (record,) = peers_of(source)
    assert (record["bandwidth_mib_s"], record["catch_up_minutes"], record["replicate_new"]) == (
        None,
        15,
        True,
    )


def test_viewers_read_both_pages_without_controls(
    browser: Any, source: LiveServer, peer: Peer, paired: dict[str, Any]
) -> None:
    assert peer.live is not None
    opened = []
    try:
        for server in (source, peer.live):
            for role in ("viewer", "operator"):
                page, watch = replication_page(browser, server, role, PASSWORDS[role])
                opened.append((page, watch))
                expect(page.locator("[data-fingerprint]").first).to_be_visible()
                for name in ("Pair with a peer", "Show a pairing code", "Unpair", "Edit"):
                    expect(page.get_by_role("button", name=name)).to_have_count(0)
                expect(page.locator("input, select, textarea")).to_have_count(0)
                replicate = page.get_by_role("button", name=re.compile("^Replicate to"))
                if server is source:
                    expect(page.locator(f"[data-peer='{paired['id']}']")).to_contain_text(
                        "RPO at the peer"
                    )
                    expect(replicate).to_have_count(1 if role == "operator" else 0)
                else:
                    expect(page.locator("[data-source]")).to_have_count(1)
                    # A viewer sees the appliance's own fingerprint too, to compare.
                    own = certificate_fingerprint(peer.data_dir / "tls" / "cert.pem")
                    expect(page.locator("[data-fact=own-fingerprint]")).to_have_text(own)
    finally:
        for page, watch in opened:
            page.context.close()
            watch.check()


def _extend(page: Any, path: str, extend: Any) -> None:
    """Answer GETs of ``path`` with the real answer, each item extended by ``extend(item)``."""

    def handle(route: Any) -> None:
        if route.request.method != "GET":
            route.fallback()
            return
        response = route.fetch()
        items = response.json()
        route.fulfill(response=response, body=json.dumps([{**i, **extend(i)} for i in items]))

    page.route(re.compile(rf"{re.escape(path)}(\?.*)?$"), handle)


def test_fields_being_added_are_drawn_and_a_taken_over_store_is_worked_on(
    pages: dict[str, Any],
    source: LiveServer,
    peer: Peer,
    paired: dict[str, Any],
    shots: Screenshots,
) -> None:
    on_source, on_peer = pages["source"], pages["peer"]
    _extend(
        on_source,
        "/api/peers",
        lambda p: {
            "window": {"start": "22:00", "end": "06:00"},
            "clock_skew_seconds": 720,
            "clock_skew": "the peer's clock is 12 min ahead of this appliance's",
            "takeover": {"allowed": True, "granted_at": "2026-12-01T10:00:00+00:00"},
        },
    )
    on_source.reload()
    card = on_source.locator(f"[data-peer='{paired['id']}']")
    # The served window_open (a word after the span) follows the real clock: only the span is fixed.
    expect(card.locator("[data-fact=window]")).to_contain_text(
        "From 22:00 to 06:00 (this appliance's time)"
    )
    expect(card.locator("[data-fact=skew]")).to_contain_text("12 min ahead of this appliance")
    expect(card.locator("[data-fact=skew]").get_by_role("note")).to_be_visible()
    takeover = card.locator("[data-fact=takeover]")
    expect(takeover).to_contain_text("Allowed")
    expect(takeover.get_by_role("checkbox")).to_be_checked()
    expect(
        card.get_by_role("button", name="Fetch points made on the peer (failback)")
    ).to_be_visible()
    card.get_by_role("button", name="Edit replication to dr").click()
    dialog = on_source.get_by_role("dialog")
    expect(dialog.get_by_label("From (HH:MM)")).to_have_value("22:00")
    expect(dialog.get_by_label("Until (HH:MM)")).to_have_value("06:00")
    dialog.get_by_role("button", name="Cancel").click()

    (listed,) = sources_of(peer)
    store = listed["store_id"]
    _extend(
        on_peer,
        "/api/replication/sources",
        lambda s: {
            "clock_skew_seconds": -2,
            "takeover": {
                "granted": True,
                "granted_at": "2026-12-01T10:00:00+00:00",
                "open": True,
                "opened_at": "2026-12-02T10:00:00+00:00",
            },
        },
    )
    scoped: list[str] = []
    on_peer.on(
        "request",
        lambda r: scoped.append(r.url) if urlparse(r.url).path.startswith("/api/") else None,
    )
    on_peer.reload()
    source_card = on_peer.locator(f"[data-source='{listed['appliance_id']}']")
    expect(source_card.locator("[data-fact=takeover]")).to_contain_text("Taken over")
    expect(source_card.locator("[data-fact=skew]")).to_contain_text(
        "2 seconds behind this appliance"
    )
    expect(
        source_card.get_by_role("button", name=re.compile("^Close the take-over"))
    ).to_be_visible()
    expect(source_card.get_by_role("heading", name=f"{listed['name']}'s points")).to_be_visible()
    shots.take(on_peer, "replication-taken-over")

    scoped.clear()
    source_card.get_by_role("link", name=f"Open {listed['name']}'s points").click()
    expect(on_peer.get_by_role("heading", level=1)).to_have_text("Recovery points")
    banner = on_peer.locator(".store-banner")
    expect(banner).to_contain_text(f"Working on {listed['name']}'s store (taken over)")
    on_peer.get_by_role("navigation", name="Main").get_by_role("link", name="Failover").click()
    expect(banner).to_be_visible()  # the context stays from screen to screen
    expect(on_peer.get_by_role("heading", level=1)).to_have_text("Failover")
    stores = {
        u: parse_qs(urlparse(u).query).get("store")
        for u in scoped
        if urlparse(u).path.startswith(("/api/points", "/api/failover", "/api/assets"))
    }
    assert stores and all(v == [store] for v in stores.values()), stores

    banner.get_by_role("link", name="back to this appliance").click()
    expect(on_peer.get_by_role("heading", level=1)).to_have_text("Replication")
    expect(on_peer.locator(".store-banner")).to_have_count(0)
    expect(source_card.locator(".repl-points")).to_be_visible()  # its own read, store named
    scoped.clear()
    on_peer.goto(peer.address + "/#/points")
    expect(on_peer.get_by_role("heading", level=1)).to_have_text("Recovery points")
    expect(on_peer.locator(".store-banner")).to_have_count(0)
    assert scoped and not [u for u in scoped if "store=" in u], scoped


def test_the_peer_takes_over_from_the_pages_and_works_on_that_store(
    pages: dict[str, Any], source: LiveServer, peer: Peer, paired: dict[str, Any]
) -> None:
    with source.as_role("admin") as admin:
        probe = admin.put(f"/api/peers/{paired['id']}/takeover", json={"allow": False})
    if probe.status_code in (404, 405):
        pytest.skip("this build has no take-over routes yet")
    assert probe.status_code == 200, probe.text
    point = replicated_backup(source)
    on_source, on_peer = pages["source"], pages["peer"]

    on_source.reload()
    card = on_source.locator(f"[data-peer='{paired['id']}']")
    toggle = card.get_by_label("Let dr take over (fail over with this appliance's key)")
    expect(toggle).not_to_be_checked()
    toggle.check()
    expect(on_source.locator(".toast").filter(has_text="dr may now take over.")).to_be_visible()
    expect(card.locator("[data-fact=takeover]")).to_contain_text("Allowed")
    (record,) = peers_of(source)
    assert record["takeover"]["allowed"] is True, record["takeover"]

    (listed,) = sources_of(peer)
    assert listed["takeover"]["granted"] is True, listed["takeover"]
    name, store = listed["name"], listed["store_id"]
    on_peer.reload()
    source_card = on_peer.locator(f"[data-source='{listed['appliance_id']}']")
    expect(source_card.locator("[data-fact=takeover]")).to_contain_text("Allowed")
    source_card.get_by_role("button", name=f"Take over {name}'s store").click()
    on_peer.get_by_role("dialog").get_by_role("button", name="Take over").click()
    expect(
        on_peer.get_by_role("status").filter(has_text=f"{name}'s store is open here")
    ).to_be_visible()
    expect(source_card.locator("[data-fact=takeover]")).to_contain_text("Taken over")
    expect(source_card.locator(f"tr[data-point='{point}']")).to_be_visible()

    source_card.get_by_role("link", name=f"Open {name}'s points").click()
    expect(on_peer.locator(".store-banner")).to_contain_text(f"Working on {name}'s store")
    expect(on_peer.locator(f"tr[data-point='{point}']")).to_contain_text(ASSET)
    on_peer.locator(".store-banner").get_by_role("link", name="back to this appliance").click()
    expect(on_peer.get_by_role("heading", level=1)).to_have_text("Replication")

    source_card.get_by_role("button", name=f"Close the take-over of {name}'s store").click()
    expect(on_peer.locator(".toast").filter(has_text="is closed")).to_be_visible()
    expect(source_card.locator("[data-fact=takeover]")).to_contain_text("Allowed")
    (listed,) = sources_of(peer)
    assert listed["takeover"]["open"] is False and listed["store_id"] == store

    on_source.reload()
    toggle.uncheck()
    expect(on_source.locator(".toast").filter(has_text="may no longer take over")).to_be_visible()
    (record,) = peers_of(source)
    assert record["takeover"]["allowed"] is False, record["takeover"]

    # Failback: the points made on the peer are fetched by a job (none here: it finds nothing).
    card.get_by_role("button", name="Fetch points made on the peer (failback)").click()
    link = on_source.locator(".toast").filter(has_text="Fetching the points made on dr")
    href = link.get_by_role("link", name="Watch progress").get_attribute("href") or ""
    with source.as_role("viewer") as viewer:
        job = wait_job(viewer, href.removeprefix("#/jobs/"))
    assert job["kind"] == "pull_back" and job["params"]["location"] == paired["id"], job


def test_unpairing_from_both_pages(
    pages: dict[str, Any], source: LiveServer, peer: Peer, paired: dict[str, Any]
) -> None:
    on_source, on_peer = pages["source"], pages["peer"]
    on_source.reload()
    on_source.get_by_role("button", name="Unpair dr").click()
    dialog = on_source.get_by_role("dialog")
    expect(dialog).to_contain_text("unpair this appliance on the peer's page too")
    dialog.get_by_role("button", name="Unpair").click()
    expect(on_source.get_by_role("dialog")).to_have_count(0)
    done = on_source.get_by_role("status").filter(has_text="Unpaired from dr")
    # the peer revoked the token itself, or the answer says to unpair on its page too
    expect(done).to_contain_text(
        re.compile(r"[Tt]he peer revoked the token|[Uu]npair this appliance on the peer's page too")
    )
    expect(on_source.get_by_text("No peer yet")).to_be_visible()
    assert peers_of(source) == []

    (listed,) = sources_of(peer)
    replica: Path = peer.replica(listed["store_id"])
    assert replica.is_dir()
    on_peer.reload()
    on_peer.get_by_role("button", name=f"Unpair {listed['name']}").click()
    dialog = on_peer.get_by_role("dialog")
    dialog.get_by_label(re.compile("^Also delete the replica")).check()
    dialog.get_by_role("button", name="Unpair").click()
    expect(
        on_peer.get_by_role("status").filter(has_text=f"Unpaired {listed['name']}")
    ).to_contain_text("Its replica was deleted.")
    expect(on_peer.get_by_text("No appliance replicates here yet.")).to_be_visible()
    assert sources_of(peer) == [] and not replica.exists()
