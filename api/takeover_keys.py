"""The take-over grant: a store's recovery key sealed to one peer's X25519 key.

A source that lets a peer take over sends it a *grant*: the store's recovery key text, sealed so
that only the holder of the peer's private key can open it (docs/replication.md, "Take over").
The construction, frozen as version 1 (never renumber; a new one gets a new ``v``):

- the peer's key pair is X25519; the source makes an ephemeral X25519 key per grant;
- the shared secret goes through HKDF-SHA256 (no salt, 32 bytes) with
  ``info = b"appliance takeover grant v1|" + store id + b"|" + peer appliance id``;
- the recovery key text is sealed with ChaCha20-Poly1305 under that key, a random 12-byte nonce,
  and the same ``info`` string as associated data.

Binding the store id and the peer's appliance id into both the key and the associated data means
a grant for another store, or one copied to another peer, does not open. The sealed document is
``{v: 1, epk, nonce, ct}`` (base64 of the raw bytes). Pure functions only: where the peer's
private key lives is :mod:`api.takeover`'s business.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import ApplianceError, InvalidInput

#: The grant format's version and the name the peer's key route shows. Frozen: never renumber.
GRANT_VERSION = 1
ALGORITHM = "X25519-HKDF-SHA256-ChaCha20Poly1305"
INFO_PREFIX = b"appliance takeover grant v1|"
NONCE_BYTES = 12
KEY_BYTES = 32
#: A recovery key's text is short; a sealed document far larger than this is not a grant.
MAX_SEALED_BYTES = 4096


class GrantUnreadable(ApplianceError):
    """The take-over grant does not open with this appliance's key: it was sealed to another
    key, for another store, or changed since."""

    code = "takeover_grant_unreadable"
    kind = "conflict"


@dataclass(frozen=True)
class SealedGrant:
    """A sealed recovery key (version 1): the ephemeral public key, the nonce, the ciphertext."""

    epk: bytes
    nonce: bytes
    ct: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": GRANT_VERSION,
            "epk": _b64(self.epk),
            "nonce": _b64(self.nonce),
            "ct": _b64(self.ct),
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_SEALED_BYTES * 2:
        raise InvalidInput(f"the sealed grant's {what} must be base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the sealed grant's {what} is not base64") from None
    if size is not None and len(data) != size:
        raise InvalidInput(f"the sealed grant's {what} must be {size} bytes")
    return data


def parse_sealed(document: object) -> SealedGrant:
    """A sealed document as sent or stored; :class:`InvalidInput` when it is malformed."""
    if not isinstance(document, dict) or set(document) != {"v", "epk", "nonce", "ct"}:
        raise InvalidInput("a sealed grant is {v, epk, nonce, ct}")
    if document["v"] != GRANT_VERSION or isinstance(document["v"], bool):
        raise InvalidInput(f"unknown sealed grant version {document['v']!r} (this one reads 1)")
    ct = _unb64(document["ct"], "ct")
    # 16 bytes of Poly1305 tag, and at least one byte of key text.
    if not 17 <= len(ct) <= MAX_SEALED_BYTES:
        raise InvalidInput("the sealed grant's ct has an impossible length")
    return SealedGrant(
        epk=_unb64(document["epk"], "epk", KEY_BYTES),
        nonce=_unb64(document["nonce"], "nonce", NONCE_BYTES),
        ct=ct,
    )


def grant_info(store_id: str, peer_appliance_id: str) -> bytes:
    """The HKDF info and AEAD associated data: what the grant is for, and for whom."""
    return INFO_PREFIX + store_id.encode("ascii") + b"|" + peer_appliance_id.encode("ascii")


def _derive(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def public_key_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The raw 32-byte public key as base64 (what the peer's key route shows)."""
    return _b64(public_key_bytes(key))


def parse_public_key(text: object) -> X25519PublicKey:
    """A peer's public key from its base64 text; :class:`InvalidInput` when malformed."""
    return X25519PublicKey.from_public_bytes(_unb64(text, "public key", KEY_BYTES))


def seal(
    recovery_key: str, peer_public: X25519PublicKey, store_id: str, peer_id: str
) -> SealedGrant:
    """Seal ``recovery_key`` to ``peer_public`` for ``store_id`` at peer ``peer_id``."""
    ephemeral = X25519PrivateKey.generate()
    info = grant_info(store_id, peer_id)
    key = _derive(ephemeral.exchange(peer_public), info)
    nonce = os.urandom(NONCE_BYTES)
    ct = ChaCha20Poly1305(key).encrypt(nonce, recovery_key.encode("utf-8"), info)
    return SealedGrant(public_key_bytes(ephemeral), nonce, ct)


def unseal(grant: SealedGrant, private: X25519PrivateKey, store_id: str, peer_id: str) -> str:
    """The recovery key text, or :class:`GrantUnreadable` (wrong key, store, peer, or bytes)."""
    info = grant_info(store_id, peer_id)
    try:
        key = _derive(private.exchange(X25519PublicKey.from_public_bytes(grant.epk)), info)
        plain = ChaCha20Poly1305(key).decrypt(grant.nonce, grant.ct, info)
        return plain.decode("utf-8")
    except (InvalidTag, ValueError, UnicodeDecodeError):
        raise GrantUnreadable(
            f"the take-over grant of store {store_id} does not open with this appliance's key "
            "(sealed to another key or store, or changed since): ask the source to grant again",
            store_id=store_id,
        ) from None


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_key_pem(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> X25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, X25519PrivateKey):
        raise InvalidInput("the take-over key file does not hold an X25519 private key")
    return key
