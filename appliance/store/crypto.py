"""Keys and the blob envelope.

Key hierarchy
    A random 64-byte master key per store: the first half is the AES-256-GCM key, the second half
    the BLAKE3 key of chunk IDs (so IDs are a keyed hash of plaintext and leak nothing about
    content to whoever holds the medium). The master key is stored only wrapped: by a key derived
    from the passphrase with Argon2id, in ``keys/<name>`` of the store (JSON). The printable
    recovery key is the master key itself in base32 with a checksum, for the drawer or the safe;
    with it a new passphrase can be set even if every key file is lost.

Envelope (one blob)
    ``version | cipher | compression | nonce(12) | AES-256-GCM(compress(plaintext))``; the
    associated data binds ``AAD_PREFIX``, the three header bytes, the blob type and the blob ID, so
    a blob cannot be moved under another ID, replayed as another type or have its header changed
    without failing authentication. Random 96-bit nonces: the store must write fewer than 2**32
    blobs under one key (16 PiB at 4 MiB chunks; about 256 TiB at 64 KiB), which bounds it far
    beyond a pool's life.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from appliance.errors import IntegrityError, InvalidInput, UnsupportedFormat, WrongPassphrase
from appliance.store import format as fmt

#: Argon2id cost for new keys (RFC 9106's second recommended option, 64 MiB). Tests lower it
#: through APPLIANCE_TEST_WEAK_KDF so that tiny stores stay fast; production never sets it.
DEFAULT_KDF = {"iterations": 3, "memory_kib": 64 * 1024, "lanes": 4}
WEAK_KDF = {"iterations": 1, "memory_kib": 8, "lanes": 1}

#: Compared against with memcmp; allocated once (a cache per chunk size grew without bound).
_ZERO_BLOCK = bytes(4 * 1024 * 1024)


def kdf_parameters() -> dict[str, int]:
    return dict(WEAK_KDF if os.environ.get("APPLIANCE_TEST_WEAK_KDF") == "1" else DEFAULT_KDF)


@dataclass(frozen=True)
class MasterKey:
    material: bytes

    def __post_init__(self) -> None:
        if len(self.material) != fmt.MASTER_KEY_SIZE:
            raise InvalidInput("a master key is 64 bytes")

    @property
    def encryption_key(self) -> bytes:
        return self.material[:32]

    @property
    def id_key(self) -> bytes:
        return self.material[32:]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(fmt.MASTER_KEY_SIZE))

    # --- the printable recovery key ----------------------------------------------------------

    def recovery_key(self) -> str:
        """Base32 of master key + 4-byte checksum, in groups of 6 for reading aloud or typing."""
        payload = self.material + blake3.blake3(self.material).digest()[:4]
        text = base64.b32encode(payload).decode().rstrip("=")
        return "-".join(text[i : i + 6] for i in range(0, len(text), 6))

    @classmethod
    def from_recovery_key(cls, text: str) -> MasterKey:
        cleaned = "".join(ch for ch in text.upper() if ch.isalnum())
        cleaned = cleaned.replace("0", "O").replace("1", "I").replace("8", "B")
        try:
            payload = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
        except ValueError:
            raise WrongPassphrase("the recovery key is not valid base32") from None
        material, check = payload[: fmt.MASTER_KEY_SIZE], payload[fmt.MASTER_KEY_SIZE :]
        if len(material) != fmt.MASTER_KEY_SIZE or blake3.blake3(material).digest()[:4] != check:
            raise WrongPassphrase("the recovery key has a typo (its checksum does not match)")
        return cls(material)


def _derive(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_kib"],
    ).derive(passphrase.encode("utf-8"))


def wrap_key(master: MasterKey, passphrase: str, store_id: str) -> bytes:
    """Return the JSON key file that holds ``master`` wrapped by ``passphrase``."""
    if not passphrase:
        raise InvalidInput("the passphrase must not be empty")
    params = kdf_parameters()
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(fmt.NONCE_SIZE)
    aad = fmt.KEY_WRAP_AAD + store_id.encode()
    wrapped = AESGCM(_derive(passphrase, salt, params)).encrypt(nonce, master.material, aad)
    document = {
        "version": fmt.KEY_FILE_VERSION,
        "store_id": store_id,
        "kdf": fmt.KDF_ARGON2ID,
        **params,
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped": base64.b64encode(wrapped).decode(),
        "created": datetime.now(UTC).isoformat(),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def unwrap_key(key_file: bytes, passphrase: str, store_id: str) -> MasterKey:
    try:
        document = json.loads(key_file)
        if document["version"] != fmt.KEY_FILE_VERSION or document["kdf"] != fmt.KDF_ARGON2ID:
            raise UnsupportedFormat(f"key file version {document['version']} is not supported")
        params = {k: int(document[k]) for k in ("iterations", "memory_kib", "lanes")}
        salt = base64.b64decode(document["salt"])
        nonce = base64.b64decode(document["nonce"])
        wrapped = base64.b64decode(document["wrapped"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the key file is damaged: {exc}") from exc
    aad = fmt.KEY_WRAP_AAD + store_id.encode()
    try:
        material = AESGCM(_derive(passphrase, salt, params)).decrypt(nonce, wrapped, aad)
    except InvalidTag:
        raise WrongPassphrase() from None
    return MasterKey(material)


class _ZstdContexts(threading.local):
    """One set of zstd contexts per thread: a context used by two threads at once returns wrong
    bytes without an error (measured: a manifest opened by six API threads came back garbled)."""

    def __init__(self, level: int) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level)
        self.fast = zstandard.ZstdCompressor(level=1)
        self.decompressor = zstandard.ZstdDecompressor()


class Envelope:
    """Seals and opens blobs with one store's master key. Safe to share between threads (the API
    serves one repository to many); hot loops still make their own to skip the per-thread lookup."""

    def __init__(self, key: MasterKey, *, level: int = 3) -> None:
        self._aead = AESGCM(key.encryption_key)
        self._id_key = key.id_key
        self._zstd = _ZstdContexts(level)

    def chunk_id(self, plaintext: bytes | memoryview) -> bytes:
        return blake3.blake3(plaintext, key=self._id_key).digest()

    def named_id(self, label: str) -> bytes:
        """The ID of an object that is named rather than content-addressed (a manifest)."""
        return blake3.blake3(label.encode(), key=self._id_key).digest()

    @staticmethod
    def is_zero(data: bytes | memoryview) -> bool:
        size = len(data)
        if size == 0:
            return True
        if data[0] or data[-1]:  # almost every data chunk is rejected here
            return False
        if isinstance(data, memoryview):
            data = data.tobytes()  # bytes == bytes is a memcmp; memoryview == is element-wise
        for start in range(0, size, len(_ZERO_BLOCK)):
            piece = data[start : start + len(_ZERO_BLOCK)]
            if piece != _ZERO_BLOCK[: len(piece)]:
                return False
        return True

    def _compress(
        self, blob_type: int, plaintext: bytes | memoryview
    ) -> tuple[int, bytes | memoryview]:
        size = len(plaintext)
        if blob_type == fmt.BLOB_DISK:
            # Disk chunks are small (64 KiB): zstd level 1 measured 45 % faster than level 3 at
            # the same ratio on them, and probing first would cost more than it saves.
            packed = self._zstd.fast.compress(plaintext)
        else:
            if size >= 65536:
                # Media files and encrypted data do not compress: probe a slice at a fast level
                # and skip the full pass, which would cost about half of all CPU for nothing.
                sample = plaintext[:16384]
                if len(self._zstd.fast.compress(sample)) > len(sample) * 0.97:
                    return fmt.COMPRESSION_NONE, plaintext
            packed = self._zstd.compressor.compress(plaintext)
        if len(packed) >= size:
            return fmt.COMPRESSION_NONE, plaintext
        return fmt.COMPRESSION_ZSTD, packed

    def seal(self, blob_type: int, blob_id: bytes, plaintext: bytes | memoryview) -> bytes:
        compression, body = self._compress(blob_type, plaintext)
        return self.seal_body(blob_type, blob_id, compression, body)

    def seal_body(
        self, blob_type: int, blob_id: bytes, compression: int, body: bytes | memoryview
    ) -> bytes:
        """Seal a body already compressed as ``compression`` says (the backup client's chunks,
        whose plaintext the caller has checked against ``blob_id``)."""
        if compression not in (fmt.COMPRESSION_NONE, fmt.COMPRESSION_ZSTD):
            raise UnsupportedFormat(f"unknown compression {compression}")
        header = bytes((fmt.ENVELOPE_VERSION, fmt.CIPHER_AES_256_GCM, compression))
        nonce = secrets.token_bytes(fmt.NONCE_SIZE)
        aad = fmt.AAD_PREFIX + header + bytes((blob_type,)) + blob_id
        return header + nonce + self._aead.encrypt(nonce, body, aad)

    def open(self, blob_type: int, blob_id: bytes, envelope: bytes | memoryview) -> bytes:
        """Decrypt and decompress; raise IntegrityError naming what is wrong."""
        if len(envelope) < fmt.ENVELOPE_HEADER_SIZE + fmt.TAG_SIZE:
            raise IntegrityError("blob is truncated", blob=blob_id.hex())
        version, cipher, compression = envelope[0], envelope[1], envelope[2]
        if version != fmt.ENVELOPE_VERSION or cipher != fmt.CIPHER_AES_256_GCM:
            raise UnsupportedFormat(
                f"blob {blob_id.hex()[:16]} has envelope version {version}, cipher {cipher}"
            )
        header = bytes(envelope[:3])
        nonce = bytes(envelope[3 : fmt.ENVELOPE_HEADER_SIZE])
        aad = fmt.AAD_PREFIX + header + bytes((blob_type,)) + blob_id
        try:
            body = self._aead.decrypt(nonce, bytes(envelope[fmt.ENVELOPE_HEADER_SIZE :]), aad)
        except InvalidTag:
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} failed authentication (corrupt or tampered)",
                blob=blob_id.hex(),
            ) from None
        if compression == fmt.COMPRESSION_NONE:
            return body
        if compression == fmt.COMPRESSION_ZSTD:
            try:
                return self._zstd.decompressor.decompress(body)
            except zstandard.ZstdError as exc:
                raise IntegrityError(
                    f"blob {blob_id.hex()[:16]} does not decompress: {exc}"
                ) from exc
        raise UnsupportedFormat(f"blob {blob_id.hex()[:16]} uses unknown compression {compression}")

    def open_content(self, blob_type: int, blob_id: bytes, envelope: bytes | memoryview) -> bytes:
        """Open a content-addressed blob and check that its plaintext hashes to its ID."""
        plaintext = self.open(blob_type, blob_id, envelope)
        if self.chunk_id(plaintext) != blob_id:
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} does not match its ID", blob=blob_id.hex()
            )
        return plaintext
