"""Replication, the peer's side (docs/replication.md), against a live service on 127.0.0.1.

The replication token's store routes (byte-exact round trip, ranges, paging, the present batch,
checksums, no overwrite, hostile names, a full peer, the body cap), the token refused and audited
everywhere else and on another source's store, replication accounts kept out of the users page,
the sources listing and unpairing (pairing itself: ``test_replication_pairing.py``). The
source's side is faked here with plain HTTP calls shaped
as the contract says; the pure name rules are tested on :mod:`api.replica_store` directly.

One server serves the module; each test pairs sources of its own (fresh appliance and store
ids), so their order does not matter.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer
from replication_support import STORE_ROUTES as STORE
from replication_support import (
    audit_entries,
    forget_failed_pairings,
    pair_source,
    peer_server,
    put_object,
    random_pack,
)

from api.identity import (
    FINGERPRINT,
)
from api.limits import MAX_BODY_BYTES, MAX_REPLICA_OBJECT_BYTES
from api.replica_store import check_replica_name
from appliance import space
from appliance.errors import InvalidName


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with peer_server(tmp_path_factory.mktemp("peer")) as live:
        yield live


@pytest.fixture(autouse=True)
def fresh_pairing_throttle(server: LiveServer) -> None:
    """Every test starts with no failed pairings counted against 127.0.0.1."""
    forget_failed_pairings(server)


# --- the replica store ---------------------------------------------------------------------


def test_objects_round_trip_byte_exact(server: LiveServer, admin: httpx.Client) -> None:
    source = pair_source(server, admin)
    data_pack, data_bytes = random_pack("data", 200_000)
    meta_pack, meta_bytes = random_pack("meta")
    objects = {
        "config": secrets.token_bytes(300),
        "location.json": b'{"kind": "appliance-location"}\n',
        f"keys/{secrets.token_hex(8)}": secrets.token_bytes(200),
        data_pack: data_bytes,
        meta_pack: meta_bytes,
        f"index/{secrets.token_hex(32)}": secrets.token_bytes(500),
        f"manifests/{secrets.token_hex(8)}": secrets.token_bytes(700),
    }
    with source.client() as client:
        for name, data in objects.items():
            r = put_object(client, name, data)
            assert r.status_code == 201, (name, r.text)
            assert r.json() == {"name": name, "size": len(data), "created": True}
        for name, data in objects.items():
            got = client.get(f"{STORE}/objects/{name}")
            assert got.status_code == 200 and got.content == data, name
            head = client.head(f"{STORE}/objects/{name}")
            assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
            assert (source.replica / name).read_bytes() == data
        part = client.get(f"{STORE}/objects/{data_pack}", headers={"Range": "bytes=100-4195"})
        assert part.status_code == 206 and part.content == data_bytes[100:4196]
        assert part.headers["content-range"] == f"bytes 100-4195/{len(data_bytes)}"
        tail = client.get(f"{STORE}/objects/{data_pack}", headers={"Range": "bytes=199990-"})
        assert tail.status_code == 206 and tail.content == data_bytes[199990:]
        outside = client.get(f"{STORE}/objects/{data_pack}", headers={"Range": "bytes=300000-"})
        assert outside.status_code == 416
        missing = client.get(f"{STORE}/objects/manifests/{secrets.token_hex(8)}")
        assert missing.status_code == 404 and missing.json()["code"] == "object_missing"
        assert client.head(f"{STORE}/objects/manifests/{secrets.token_hex(8)}").status_code == 404
        # The same bytes again: a repeated upload (a retry), nothing written.
        again = put_object(client, data_pack, data_bytes)
        assert again.status_code == 201 and again.json()["created"] is False
        listed = client.get(f"{STORE}/objects").json()
        assert listed["objects"] == [{"name": n, "size": len(objects[n])} for n in sorted(objects)]
        assert listed["next_after"] is None
        unknown = [f"data/00/{'0' * 64}", f"index/{'1' * 64}"]
        present = client.post(f"{STORE}/present", json={"names": [data_pack, "config", *unknown]})
        assert present.status_code == 200
        assert present.json() == {
            "present": {data_pack: len(data_bytes), "config": len(objects["config"])}
        }
        # No route deletes.
        assert client.delete(f"{STORE}/objects/config").status_code == 405
    assert (source.replica / "config").exists()


def test_listing_pages_through_a_prefix_in_name_order(
    server: LiveServer, admin: httpx.Client
) -> None:
    source = pair_source(server, admin)
    names = []
    with source.client() as client:
        for i in range(12):
            name, data = random_pack("data" if i % 3 else "meta", 64)
            assert put_object(client, name, data).status_code == 201
            names.append(name)
        for _ in range(3):
            name = f"index/{secrets.token_hex(32)}"
            assert put_object(client, name, b"i").status_code == 201
            names.append(name)

        def walk(prefix: str, limit: int) -> list[str]:
            seen: list[str] = []
            after = ""
            while True:
                page = client.get(
                    f"{STORE}/objects", params={"prefix": prefix, "after": after, "limit": limit}
                ).json()
                seen += [o["name"] for o in page["objects"]]
                assert len(page["objects"]) <= limit
                if page["next_after"] is None:
                    return seen
                after = page["next_after"]

        assert walk("", 4) == sorted(names)
        assert walk("data/", 5) == sorted(n for n in names if n.startswith("data/"))
        first = sorted(names)[0]
        assert walk(first[:6], 1) == sorted(n for n in names if n.startswith(first[:6]))
        assert walk("manifests/", 3) == []
        for bad in ({"prefix": "../"}, {"after": "/etc"}, {"limit": 0}, {"limit": 10_001}):
            assert client.get(f"{STORE}/objects", params=bad).status_code in (400, 422), bad


def test_uploads_are_checked(server: LiveServer, admin: httpx.Client) -> None:
    source = pair_source(server, admin)
    name, data = random_pack()
    with source.client() as client:
        wrong = put_object(client, name, data, sha=hashlib.sha256(b"other").hexdigest())
        assert wrong.status_code == 400 and wrong.json()["code"] == "checksum_mismatch"
        # Anything but a pack needs its SHA-256.
        unchecked = client.put(f"{STORE}/objects/manifests/{'1' * 16}", content=b"m")
        assert unchecked.status_code == 400
        assert client.head(f"{STORE}/objects/manifests/{'1' * 16}").status_code == 404
        # A pack is named by its BLAKE3: bytes that do not hash to the name are refused, with
        # or without a SHA-256 beside.
        other = f"data/{'ab'}/ab{'0' * 62}"
        renamed = put_object(client, other, data)
        assert renamed.status_code == 400 and renamed.json()["code"] == "name_mismatch"
        bare = client.put(f"{STORE}/objects/{other}", content=data)
        assert bare.status_code == 400 and bare.json()["code"] == "name_mismatch"
        assert client.head(f"{STORE}/objects/{name}").status_code == 404
        assert client.head(f"{STORE}/objects/{other}").status_code == 404
        # A pack without a SHA-256 is taken on its name alone, and again as a repeat.
        for created in (True, False):
            no_header = client.put(f"{STORE}/objects/{name}", content=data)
            assert no_header.status_code == 201 and no_header.json()["created"] is created
        assert client.get(f"{STORE}/objects/{name}").content == data
        # An object is never overwritten with other bytes.
        manifest = f"manifests/{secrets.token_hex(8)}"
        assert put_object(client, manifest, b"first").status_code == 201
        clash = put_object(client, manifest, b"second")
        assert clash.status_code == 409 and clash.json()["code"] == "object_exists"
        assert client.get(f"{STORE}/objects/{manifest}").content == b"first"


HOSTILE = [
    "..%2Fx",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "data%2Fzz%2F..%2F..%2Fx",
    "data/zz/%2E%2E/%2E%2E/x",
    "config%00",
    "%00",
    f"bundles/{'a' * 64}",
    f"data/ab/cd{'0' * 62}",  # the folder is not the name's first two digits
    f"DATA/ab/ab{'0' * 62}",
    "keys/",
    "keys/%2E%2E",
    f"manifests/{'0' * 16}/..%2F..%2Fconfig",
    "location.json.tmp-1",
    "x" * 300,
]


def test_hostile_names_are_refused_and_nothing_lands_outside(
    server: LiveServer, admin: httpx.Client
) -> None:
    source = pair_source(server, admin)
    data_dir = Path(server.settings.data_dir)
    before = {p for p in data_dir.rglob("*") if "replicas" not in p.parts}
    with source.client() as client:
        for raw in HOSTILE:
            r = client.put(
                f"{STORE}/objects/{raw}",
                content=b"x",
                headers={"X-Content-SHA256": hashlib.sha256(b"x").hexdigest()},
            )
            assert r.status_code == 400, (raw, r.status_code, r.text)
            assert r.json()["code"] == "invalid_name", raw
            assert client.get(f"{STORE}/objects/{raw}").status_code == 400, raw
        r = client.post(f"{STORE}/present", json={"names": ["config", "../x"]})
        assert r.status_code == 400 and r.json()["code"] == "invalid_name"
    assert list(source.replica.rglob("*")) == []
    after = {p for p in data_dir.rglob("*") if "replicas" not in p.parts}
    assert not {p for p in after - before if p.name in ("x", "passwd", "config")}
    assert not (data_dir.parent / "x").exists()


@pytest.mark.parametrize(
    "name",
    [
        "config",
        "location.json",
        "keys/0123456789abcdef",
        f"data/ab/ab{'0' * 62}",
        f"meta/ff/ff{'1' * 62}",
        f"index/{'2' * 64}",
        "manifests/0123456789abcdef",
    ],
)
def test_layout_names_pass(name: str) -> None:
    assert check_replica_name(name) == name


@pytest.mark.parametrize("name", ["", "keys", "index/", "manifests/a/b", "data/ab/ab", "Config"])
def test_other_names_fail(name: str) -> None:
    with pytest.raises(InvalidName):
        check_replica_name(name)


def test_a_full_peer_answers_507_and_writes_nothing(
    server: LiveServer, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = pair_source(server, admin)
    name, data = random_pack()
    monkeypatch.setattr(space, "reserve_bytes", lambda total: total + 1)
    with source.client() as client:
        r = put_object(client, name, data)
        assert r.status_code == 507 and r.json()["code"] == "peer_full"
        assert client.head(f"{STORE}/objects/{name}").status_code == 404
        monkeypatch.undo()
        assert put_object(client, name, data).status_code == 201


def test_objects_bigger_than_the_json_cap_pass_up_to_their_own(
    server: LiveServer, admin: httpx.Client
) -> None:
    source = pair_source(server, admin)
    name, data = random_pack("data", 3 * MAX_BODY_BYTES)
    with source.client() as client:
        assert put_object(client, name, data).status_code == 201
        assert client.get(f"{STORE}/objects/{name}").content == data
    # A length over the route's own cap is refused before a byte of the body is read.
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"PUT {STORE}/objects/{name} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {source.token}\r\nX-Content-SHA256: {'0' * 64}\r\n"
            f"Content-Length: {MAX_REPLICA_OBJECT_BYTES + 1}\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = sock.recv(65536)
    assert answer.split(b" ", 2)[1] == b"413", answer[:300]
    with server.as_role("admin") as other:
        big = other.post("/api/verify", content=b"x" * (2 * MAX_BODY_BYTES))
        assert big.status_code == 413  # the cap of every other route stays


def test_point_summaries_and_the_sources_listing(
    server: LiveServer, admin: httpx.Client, viewer: httpx.Client
) -> None:
    source = pair_source(server, admin, name="Summary branch")
    created = datetime.now(UTC) - timedelta(minutes=35)
    older = created - timedelta(hours=1)
    # The newest as a source eight hours behind UTC writes it: its text sorts before the older
    # one's, its time after.
    pacific = created.astimezone(timezone(timedelta(hours=-8)))
    with source.client() as client:
        name, data = random_pack()
        assert put_object(client, name, data).status_code == 201
        for point_id, when in (("0123456789abcdef", older), ("0123456789abcdf0", pacific)):
            r = client.post(
                f"{STORE}/points/{point_id}",
                json={"asset": "web", "kind": "image", "created_at": when.isoformat(), "bytes": 5},
            )
            assert r.status_code == 200, r.text
            assert r.json()["id"] == point_id
        summary = {"asset": "web", "kind": "image", "created_at": created.isoformat(), "bytes": 5}
        bad = client.post(f"{STORE}/points/not-a-point", json=summary)
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_name"
        # A slash never reaches the route (404/405: no such path).
        assert 400 <= client.post(f"{STORE}/points/..%2Fx", json=summary).status_code < 500
        stored = sorted(
            p.name for p in (source.replica.parent / f"{source.store_id}.points").iterdir()
        )
        assert stored == ["0123456789abcdef.json", "0123456789abcdf0.json"]
    listed = viewer.get("/api/replication/sources")
    assert listed.status_code == 200, listed.text
    mine = next(s for s in listed.json() if s["appliance_id"] == source.appliance_id)
    assert mine["name"] == "Summary branch" and mine["store_id"] == source.store_id
    assert mine["points"]["count"] == 2
    assert datetime.fromisoformat(mine["points"]["newest_created_at"]) == created
    assert 35 * 60 - 5 < mine["points"]["newest_age_seconds"] < 35 * 60 + 60
    assert mine["bytes_held"] >= len(data)
    assert mine["free_bytes"] > 0 and mine["reserve_bytes"] >= 0
    assert FINGERPRINT.match(mine["fingerprint"])
    assert mine["paired_at"] and mine["last_seen"]


# --- the replication token elsewhere -------------------------------------------------------

ORDINARY = [
    ("GET", "/api/me"),
    ("GET", "/api/assets"),
    ("GET", "/api/points"),
    ("POST", "/api/verify"),
    ("DELETE", "/api/points/ffffffffffffffff"),
    ("GET", "/api/users"),
    ("POST", "/api/tokens"),
    ("GET", "/api/replication/sources"),
    ("POST", "/api/replication/pairing-codes"),
    ("DELETE", "/api/replication/sources/0123"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
]


def test_the_replication_token_is_refused_elsewhere_and_audited(
    server: LiveServer, admin: httpx.Client
) -> None:
    source = pair_source(server, admin)
    with source.client() as client:
        for method, path in ORDINARY:
            r = client.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["code"] == "forbidden"
    refused = {
        a.target
        for a in audit_entries(server, "replication.refused")
        if a.actor == f"peer-{source.appliance_id}"
    }
    assert {f"{m} {p}" for m, p in ORDINARY} <= refused
    with server.client() as anonymous:
        r = anonymous.post(
            "/api/login", json={"name": f"peer-{source.appliance_id}", "password": "x" * 12}
        )
        assert r.status_code == 401


def test_a_source_cannot_reach_another_sources_store(
    server: LiveServer, admin: httpx.Client
) -> None:
    first = pair_source(server, admin)
    second = pair_source(server, admin)
    name, data = random_pack()
    with first.client() as a, second.client() as b:
        assert put_object(a, name, data).status_code == 201
        assert b.get(f"{STORE}/objects/{name}").status_code == 404
        assert b.head(f"{STORE}/objects/{name}").status_code == 404
        assert b.get(f"{STORE}/objects").json()["objects"] == []
        assert b.post(f"{STORE}/present", json={"names": [name]}).json() == {"present": {}}
        manifest = f"manifests/{secrets.token_hex(8)}"
        assert put_object(b, manifest, b"second's").status_code == 201
        assert a.get(f"{STORE}/objects/{manifest}").status_code == 404
        assert not (first.replica / manifest).exists()
        # A token whose store scope is not its source's store is refused and audited.
        catalog = server.service.app.catalog
        document = catalog.get_settings("replication_sources")
        document["sources"][first.appliance_id]["store_id"] = second.store_id
        catalog.put_settings("replication_sources", document)
        try:
            crossed = a.get(f"{STORE}/objects")
            assert crossed.status_code == 403, crossed.text
        finally:
            document["sources"][first.appliance_id]["store_id"] = first.store_id
            catalog.put_settings("replication_sources", document)
        assert a.get(f"{STORE}/objects").status_code == 200
    assert any(
        a.actor == f"peer-{first.appliance_id}" and a.target == f"GET {STORE}/objects"
        for a in audit_entries(server, "replication.refused")
    )


def test_replication_accounts_stay_out_of_the_users_page(
    server: LiveServer, admin: httpx.Client
) -> None:
    source = pair_source(server, admin)
    user = f"peer-{source.appliance_id}"
    assert user not in {u["name"] for u in admin.get("/api/users").json()}
    assert admin.get(f"/api/users/{user}").status_code == 404
    assert admin.patch(f"/api/users/{user}", json={"role": "admin"}).status_code == 409
    assert admin.patch(f"/api/users/{user}", json={"password": "p" * 12}).status_code == 409
    assert admin.delete(f"/api/users/{user}").status_code == 409
    assert admin.post("/api/tokens", json={"user": user}).status_code == 409
    reserved = admin.post("/api/users", json={"name": "peer-mine", "password": "p" * 12})
    assert reserved.status_code == 400
    tokens = admin.get("/api/tokens", params={"user": user}).json()
    assert [t["role"] for t in tokens] == ["replication"]
    with source.client() as client:
        assert client.get(f"{STORE}/objects").status_code == 200


def test_unpairing_revokes_the_token_and_keeps_the_replica(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client
) -> None:
    source = pair_source(server, admin)
    name, data = random_pack()
    with source.client() as client:
        assert put_object(client, name, data).status_code == 201
        assert operator.delete(f"/api/replication/sources/{source.appliance_id}").status_code == 403
        r = admin.delete(f"/api/replication/sources/{source.appliance_id}")
        assert r.status_code == 204, r.text
        after = client.get(f"{STORE}/objects")
        assert after.status_code == 401 and after.json()["code"] == "unauthenticated"
    assert (source.replica / name).read_bytes() == data
    listed = {s["appliance_id"] for s in admin.get("/api/replication/sources").json()}
    assert source.appliance_id not in listed
    assert admin.delete(f"/api/replication/sources/{source.appliance_id}").status_code == 404
    unpaired = [
        a for a in audit_entries(server, "replication.unpair") if a.target == source.appliance_id
    ]
    assert unpaired and unpaired[0].details["delete_data"] is False
    # Pairing again (same appliance, same store) finds the replica as it was.
    again = pair_source(server, admin, appliance_id=source.appliance_id, store_id=source.store_id)
    with again.client() as client:
        assert client.get(f"{STORE}/objects/{name}").content == data
        assert (
            admin.delete(
                f"/api/replication/sources/{source.appliance_id}", params={"delete_data": 1}
            ).status_code
            == 204
        )
        assert client.get(f"{STORE}/objects").status_code == 401
    assert not source.replica.exists()
    assert not os.path.exists(f"{source.replica}.points")


# --- fuzzing the store routes with a replication token ---------------------------------------


@pytest.mark.slow
def test_the_store_routes_never_fail_with_5xx(server: LiveServer, admin: httpx.Client) -> None:
    """Schemathesis over the replica store routes, with a real replication token this time
    (tests/test_api_fuzz.py calls them with the three roles, which are refused before any
    input is looked at): no generated request, valid or not, makes the peer fail."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.result import Ok

    source = pair_source(server, admin)
    raw = admin.get("/api/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw).include(path_regex=r"^/api/replication/store/")
    failures: list[str] = []
    # The unpair route is left out: it takes no input, and its one valid call revokes the token
    # the fuzzing uses (the unpairing tests call it).
    operations = [
        r.ok()
        for r in schema.get_all_operations()
        if isinstance(r, Ok) and not r.ok().label.endswith("/unpair")
    ]
    assert len(operations) == 9  # the object protocol's 6, and the take-over's 3
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for operation in operations:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=25,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
            )
            def check(case: Any) -> None:
                response = case.call(
                    base_url=server.url,
                    headers={"Authorization": f"Bearer {source.token}"},
                    timeout=30,
                )
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}: "
                        f"{response.status_code} {response.text[:300]}"
                    )

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE
    assert failures == []
    # Whatever was generated stayed inside the replica.
    outside = Path(server.settings.data_dir).parent
    assert not any(p.name in ("x", "passwd") for p in outside.rglob("*") if p.is_file())
