"""The store's envelopes (seal/open, compression, threads) and its keys (wrapping, passphrases,
recovery keys)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_support import (
    random_bytes,
    set_engine_env,
    text_bytes,
)

from appliance.errors import (
    IntegrityError,
    InvalidInput,
    UnsupportedFormat,
    WrongPassphrase,
)
from appliance.store import format as fmt
from appliance.store.crypto import (
    WEAK_KDF,
    Envelope,
    MasterKey,
    kdf_parameters,
    unwrap_key,
    wrap_key,
)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture(scope="module")
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def envelope(key: MasterKey) -> Envelope:
    return Envelope(key)


# --- envelope ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", text_bytes(100_000), random_bytes(70_000, 1), bytes(4096)],
    ids=["empty", "one-byte", "text", "random", "zeros"],
)
@pytest.mark.parametrize("blob_type", [fmt.BLOB_DATA, fmt.BLOB_DISK, fmt.BLOB_TREE])
def test_envelope_round_trip(envelope: Envelope, plaintext: bytes, blob_type: int) -> None:
    blob_id = envelope.chunk_id(plaintext)
    sealed = envelope.seal(blob_type, blob_id, plaintext)
    assert sealed[0] == fmt.ENVELOPE_VERSION and sealed[1] == fmt.CIPHER_AES_256_GCM
    assert envelope.open(blob_type, blob_id, sealed) == plaintext
    assert envelope.open_content(blob_type, blob_id, memoryview(sealed)) == plaintext
    # Nonces are random: sealing twice never gives the same bytes.
    assert envelope.seal(blob_type, blob_id, plaintext) != sealed


def test_envelope_opens_with_another_instance_of_the_same_key(key: MasterKey) -> None:
    data = text_bytes(5000)
    one, two = Envelope(key), Envelope(MasterKey(key.material))
    blob_id = one.chunk_id(data)
    assert two.chunk_id(data) == blob_id
    assert two.open_content(fmt.BLOB_DATA, blob_id, one.seal(fmt.BLOB_DATA, blob_id, data)) == data


def test_envelope_fails_with_another_key(key: MasterKey) -> None:
    data = b"secret payload"
    one, other = Envelope(key), Envelope(MasterKey.generate())
    blob_id = one.chunk_id(data)
    assert other.chunk_id(data) != blob_id  # chunk IDs are keyed
    with pytest.raises(IntegrityError):
        other.open(fmt.BLOB_DATA, blob_id, one.seal(fmt.BLOB_DATA, blob_id, data))


def test_aad_binds_the_blob_id(envelope: Envelope) -> None:
    data = b"chunk contents"
    blob_id = envelope.chunk_id(data)
    sealed = envelope.seal(fmt.BLOB_DATA, blob_id, data)
    other_id = envelope.chunk_id(b"another chunk")
    with pytest.raises(IntegrityError):
        envelope.open(fmt.BLOB_DATA, other_id, sealed)
    flipped = bytes([blob_id[0] ^ 1]) + blob_id[1:]
    with pytest.raises(IntegrityError):
        envelope.open(fmt.BLOB_DATA, flipped, sealed)


def test_aad_binds_the_blob_type(envelope: Envelope) -> None:
    data = b'{"path":"a"}\n'
    blob_id = envelope.chunk_id(data)
    sealed = envelope.seal(fmt.BLOB_TREE, blob_id, data)
    for other_type in (fmt.BLOB_DATA, fmt.BLOB_DISK, fmt.BLOB_TABLE, fmt.BLOB_MANIFEST):
        with pytest.raises(IntegrityError):
            envelope.open(other_type, blob_id, sealed)
    assert envelope.open(fmt.BLOB_TREE, blob_id, sealed) == data


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


@pytest.mark.parametrize(
    "position",
    [2, 3, 9, 14, 15, 40, -17, -1],
    ids=[
        "header-compression",
        "nonce-first",
        "nonce-middle",
        "nonce-last",
        "ciphertext-first",
        "ciphertext-middle",
        "ciphertext-last",
        "tag-last",
    ],
)
def test_tampering_fails_authentication(envelope: Envelope, position: int) -> None:
    data = text_bytes(3000)
    blob_id = envelope.chunk_id(data)
    sealed = envelope.seal(fmt.BLOB_DATA, blob_id, data)
    with pytest.raises(IntegrityError):
        envelope.open(fmt.BLOB_DATA, blob_id, _flip(sealed, position % len(sealed)))


def test_tampered_version_or_cipher_is_refused(envelope: Envelope) -> None:
    data = b"payload"
    blob_id = envelope.chunk_id(data)
    sealed = envelope.seal(fmt.BLOB_DATA, blob_id, data)
    with pytest.raises(UnsupportedFormat):
        envelope.open(fmt.BLOB_DATA, blob_id, _flip(sealed, 0))
    with pytest.raises(UnsupportedFormat):
        envelope.open(fmt.BLOB_DATA, blob_id, _flip(sealed, 1))


@pytest.mark.parametrize("keep", [0, 10, fmt.ENVELOPE_HEADER_SIZE + fmt.TAG_SIZE - 1, -1])
def test_truncated_envelope_fails(envelope: Envelope, keep: int) -> None:
    data = text_bytes(1000)
    blob_id = envelope.chunk_id(data)
    sealed = envelope.seal(fmt.BLOB_DATA, blob_id, data)
    with pytest.raises(IntegrityError):
        envelope.open(fmt.BLOB_DATA, blob_id, sealed[:keep])


def test_open_content_checks_the_id(envelope: Envelope) -> None:
    data = b"what the blob really holds"
    claimed = envelope.chunk_id(b"what the manifest expects")
    sealed = envelope.seal(fmt.BLOB_DATA, claimed, data)  # authentic, but under the wrong ID
    assert envelope.open(fmt.BLOB_DATA, claimed, sealed) == data
    with pytest.raises(IntegrityError, match="does not match its ID"):
        envelope.open_content(fmt.BLOB_DATA, claimed, sealed)


def test_compression_is_skipped_for_random_data(envelope: Envelope) -> None:
    for size in (100, 20_000, 1 << 20):
        data = os.urandom(size)
        sealed = envelope.seal(fmt.BLOB_DATA, envelope.chunk_id(data), data)
        assert sealed[2] == fmt.COMPRESSION_NONE
        assert len(sealed) == fmt.ENVELOPE_HEADER_SIZE + size + fmt.TAG_SIZE


def test_compression_is_used_for_text(envelope: Envelope) -> None:
    for size in (2000, 20_000, 1 << 20):
        data = text_bytes(size)
        sealed = envelope.seal(fmt.BLOB_DATA, envelope.chunk_id(data), data)
        assert sealed[2] == fmt.COMPRESSION_ZSTD
        assert len(sealed) < size // 4
        assert envelope.open_content(fmt.BLOB_DATA, envelope.chunk_id(data), sealed) == data


def test_compression_is_skipped_when_only_the_head_is_random(envelope: Envelope) -> None:
    # The probe looks at the first 16 KiB: a random head means "do not compress".
    data = os.urandom(16384) + text_bytes(100_000)
    sealed = envelope.seal(fmt.BLOB_DATA, envelope.chunk_id(data), data)
    assert sealed[2] == fmt.COMPRESSION_NONE
    assert envelope.open_content(fmt.BLOB_DATA, envelope.chunk_id(data), sealed) == data


def test_one_envelope_serves_many_threads_at_once(envelope: Envelope) -> None:
    # The API opens manifests of one repository from many request threads: a zstd context shared
    # between them returned other blobs' bytes (the page showed "manifest ... is damaged").
    blobs = []
    for n in range(6):
        data = text_bytes(150_000 + n * 7919)
        blob_id = envelope.named_id(f"manifest:{n}")
        blobs.append((blob_id, envelope.seal(fmt.BLOB_MANIFEST, blob_id, data), data))
    wrong: list[int] = []

    def open_all(_: int) -> None:
        for _round in range(60):
            for n, (blob_id, sealed, data) in enumerate(blobs):
                if envelope.open(fmt.BLOB_MANIFEST, blob_id, sealed) != data:
                    wrong.append(n)
                fresh = text_bytes(20_000 + n)
                again = envelope.seal(fmt.BLOB_DATA, envelope.chunk_id(fresh), fresh)
                assert (
                    envelope.open_content(fmt.BLOB_DATA, envelope.chunk_id(fresh), again) == fresh
                )

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(open_all, range(6)))
    assert wrong == []


@pytest.mark.parametrize("size", [1, 4096, 65536, 1 << 20, (1 << 23) + 1])
def test_zero_detection(size: int) -> None:
    zeros = bytes(size)
    assert Envelope.is_zero(zeros)
    assert Envelope.is_zero(memoryview(zeros))
    assert Envelope.is_zero(bytearray(size))
    for position in {0, size // 2, size - 1}:
        data = bytearray(size)
        data[position] = 1
        assert not Envelope.is_zero(bytes(data))
    assert Envelope.is_zero(b"")


def test_named_ids_are_keyed_and_distinct(key: MasterKey) -> None:
    one = Envelope(key)
    assert one.named_id("manifest:a") == Envelope(key).named_id("manifest:a")
    assert one.named_id("manifest:a") != one.named_id("manifest:b")
    assert one.named_id("manifest:a") != Envelope(MasterKey.generate()).named_id("manifest:a")


# --- keys ----------------------------------------------------------------------------------------


def test_weak_kdf_is_used_in_tests() -> None:
    assert kdf_parameters() == WEAK_KDF


def test_wrap_and_unwrap(key: MasterKey) -> None:
    document = wrap_key(key, "pass phrase", "store-1")
    parsed = json.loads(document)
    assert parsed["kdf"] == fmt.KDF_ARGON2ID and parsed["store_id"] == "store-1"
    assert key.material.hex() not in document.decode()
    assert unwrap_key(document, "pass phrase", "store-1") == key
    # Wrapping is randomised: two key files of the same key differ.
    assert wrap_key(key, "pass phrase", "store-1") != document


def test_wrong_passphrase(key: MasterKey) -> None:
    document = wrap_key(key, "right", "store-1")
    with pytest.raises(WrongPassphrase) as info:
        unwrap_key(document, "wrong", "store-1")
    assert info.value.code == "wrong_passphrase"
    with pytest.raises(WrongPassphrase):
        unwrap_key(document, "Right", "store-1")


def test_key_file_is_bound_to_its_store(key: MasterKey) -> None:
    document = wrap_key(key, "right", "store-1")
    with pytest.raises(WrongPassphrase):
        unwrap_key(document, "right", "store-2")


def test_empty_passphrase_is_refused(key: MasterKey) -> None:
    with pytest.raises(InvalidInput):
        wrap_key(key, "", "store-1")


def test_damaged_key_file(key: MasterKey) -> None:
    document = json.loads(wrap_key(key, "right", "s"))
    del document["salt"]
    with pytest.raises(IntegrityError):
        unwrap_key(json.dumps(document).encode(), "right", "s")
    with pytest.raises(IntegrityError):
        unwrap_key(b"not json at all", "right", "s")
    document = json.loads(wrap_key(key, "right", "s"))
    document["version"] = 99
    with pytest.raises(UnsupportedFormat):
        unwrap_key(json.dumps(document).encode(), "right", "s")


def test_master_key_must_be_64_bytes() -> None:
    with pytest.raises(InvalidInput):
        MasterKey(bytes(32))


def test_recovery_key_round_trip(key: MasterKey) -> None:
    text = key.recovery_key()
    groups = text.split("-")
    assert all(len(g) == 6 for g in groups[:-1]) and 0 < len(groups[-1]) <= 6
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567-")
    assert MasterKey.from_recovery_key(text) == key


def test_recovery_key_accepts_lowercase_dashes_and_spaces(key: MasterKey) -> None:
    text = key.recovery_key()
    variants = [
        text.lower(),
        text.replace("-", " "),
        text.replace("-", ""),
        "  " + text.replace("-", " - ").lower() + "\n",
        # Digits a reader may type for look-alike letters (base32 has no 0, 1 or 8).
        text.replace("O", "0").replace("I", "1").replace("B", "8"),
    ]
    for variant in variants:
        assert MasterKey.from_recovery_key(variant) == key, variant


def test_recovery_key_typos_are_detected(key: MasterKey) -> None:
    text = key.recovery_key()
    letters = [i for i, ch in enumerate(text) if ch != "-"]
    # Every position but the last carries only key or checksum bits (the last one has padding).
    for position in letters[:-1]:
        wrong = "A" if text[position] != "A" else "C"
        typo = text[:position] + wrong + text[position + 1 :]
        with pytest.raises(WrongPassphrase, match="checksum"):
            MasterKey.from_recovery_key(typo)
    # Swapping two different neighbouring characters (a common typo) is caught too.
    i = next(i for i in letters[:-2] if text[i] != text[i + 1] and text[i + 1] != "-")
    swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    with pytest.raises(WrongPassphrase):
        MasterKey.from_recovery_key(swapped)


@pytest.mark.parametrize("text", ["", "ABCDEF", "not a key!", "AAAAAA-" * 30])
def test_recovery_key_garbage_is_refused(text: str) -> None:
    with pytest.raises(WrongPassphrase):
        MasterKey.from_recovery_key(text)


def test_recovery_key_missing_a_group_is_refused(key: MasterKey) -> None:
    groups = key.recovery_key().split("-")
    with pytest.raises(WrongPassphrase):
        MasterKey.from_recovery_key("-".join(groups[:5] + groups[6:]))
