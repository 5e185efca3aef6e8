"""The take-over grant's sealing (api.takeover_keys): what opens, and what must not."""

from __future__ import annotations

import base64
import os
import stat
from datetime import UTC, datetime

import pytest

from api.pairing import SourceRecord
from api.takeover import (
    TakeoverNotGranted,
    private_key,
    read_grant,
    recovery_key_of,
    store_grant,
)
from api.takeover_keys import (
    GrantUnreadable,
    new_private_key,
    parse_public_key,
    parse_sealed,
    public_key_text,
    seal,
    unseal,
)
from appliance.errors import Conflict, InvalidInput

STORE = "ab" * 16
PEER = "cd" * 16
KEY = "ABCDEF-GHIJKL-MNOPQR-STUVWX-234567"


def test_round_trip_through_the_document() -> None:
    peer = new_private_key()
    sealed = seal(KEY, parse_public_key(public_key_text(peer)), STORE, PEER)
    document = sealed.to_dict()
    assert document["v"] == 1 and set(document) == {"v", "epk", "nonce", "ct"}
    assert KEY.encode() not in base64.b64decode(document["ct"])
    assert unseal(parse_sealed(document), peer, STORE, PEER) == KEY


def test_another_peer_key_does_not_open() -> None:
    sealed = seal(KEY, new_private_key().public_key(), STORE, PEER)
    with pytest.raises(GrantUnreadable):
        unseal(sealed, new_private_key(), STORE, PEER)


@pytest.mark.parametrize("field", ["ct", "nonce", "epk"])
def test_a_changed_byte_does_not_open(field: str) -> None:
    peer = new_private_key()
    document = seal(KEY, peer.public_key(), STORE, PEER).to_dict()
    raw = bytearray(base64.b64decode(document[field]))
    raw[len(raw) // 2] ^= 1
    document[field] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(GrantUnreadable):
        unseal(parse_sealed(document), peer, STORE, PEER)


def test_another_store_or_peer_id_does_not_open() -> None:
    peer = new_private_key()
    sealed = seal(KEY, peer.public_key(), STORE, PEER)
    with pytest.raises(GrantUnreadable):
        unseal(sealed, peer, "ef" * 16, PEER)
    with pytest.raises(GrantUnreadable):
        unseal(sealed, peer, STORE, "01" * 16)


@pytest.mark.parametrize(
    "document",
    [
        None,
        {},
        {"v": 2, "epk": "", "nonce": "", "ct": ""},
        {"v": True, "epk": "", "nonce": "", "ct": ""},
        {"v": 1, "epk": "!!", "nonce": "AAAA", "ct": "AAAA"},
        {"v": 1, "epk": base64.b64encode(b"x" * 31).decode(), "nonce": "", "ct": ""},
        {"v": 1, "epk": "A" * 44, "nonce": "A" * 16, "ct": "AAAA", "extra": 1},
    ],
)
def test_malformed_documents_are_invalid_input(document: object) -> None:
    with pytest.raises(InvalidInput):
        parse_sealed(document)


def test_the_peer_key_file_is_private_and_stable(tmp_path) -> None:
    data = str(tmp_path)
    first = private_key(data)
    path = tmp_path / "secrets" / "takeover-x25519.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(private_key(data)) == public_key_text(first)
    assert not [n for n in os.listdir(path.parent) if ".tmp-" in n]


def test_a_stored_grant_opens_only_as_stored(tmp_path) -> None:
    data = str(tmp_path)
    (tmp_path / "replicas").mkdir()
    key = private_key(data)
    source = SourceRecord(PEER, "src", STORE, "AB:CD", "token", "2026-01-01T00:00:00+00:00")
    sealed = seal(KEY, key.public_key(), STORE, PEER).to_dict()
    now = datetime.now(UTC)
    with pytest.raises(InvalidInput):  # sealed to a key that is not this appliance's
        store_grant(data, source, sealed, public_key_text(new_private_key()), now)
    store_grant(data, source, sealed, public_key_text(key), now)
    grant_file = tmp_path / "replicas" / f"{STORE}.grant.json"
    assert stat.S_IMODE(grant_file.stat().st_mode) == 0o600
    assert read_grant(data, STORE)["granted_at"] == now.isoformat()


def test_recovery_key_of_names_each_failure(tmp_path) -> None:
    data = str(tmp_path)
    (tmp_path / "replicas").mkdir()
    with pytest.raises(TakeoverNotGranted):
        recovery_key_of(data, STORE, PEER)
    key = private_key(data)
    source = SourceRecord(PEER, "src", STORE, "AB:CD", "token", "2026-01-01T00:00:00+00:00")
    sealed = seal(KEY, key.public_key(), STORE, PEER).to_dict()
    store_grant(data, source, sealed, public_key_text(key), datetime.now(UTC))
    assert recovery_key_of(data, STORE, PEER) == KEY
    with pytest.raises(GrantUnreadable):  # granted to this store at another peer
        recovery_key_of(data, STORE, "01" * 16)
    (tmp_path / "replicas" / f"{STORE}.grant.json").write_text("{not json")
    with pytest.raises(Conflict, match="damaged"):
        recovery_key_of(data, STORE, PEER)
