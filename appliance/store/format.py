"""Frozen on-disk format constants of the store.

Everything a reader needs to parse a store is fixed here, in one module, and described in
``docs/format.md``. NEVER renumber or reuse a value: stores written years ago (on a USB disk in a
drawer, on a tape, in a cold bucket) must stay readable. New algorithms get new IDs; a change of
layout gets a new version number and the reader keeps understanding the old one.
"""

from __future__ import annotations

from typing import Final

#: Version of the store layout written into ``config``.
STORE_FORMAT_VERSION: Final = 1

# --- envelope (one encrypted blob) ---------------------------------------------------------------
#: envelope = version(1) | cipher(1) | compression(1) | nonce(12) | ciphertext || tag(16)
ENVELOPE_VERSION: Final = 1
ENVELOPE_HEADER_SIZE: Final = 15
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
#: Prefix of the associated data; the full AAD is AAD_PREFIX | header[0:3] | blob type | blob id.
AAD_PREFIX: Final = b"APLB"

CIPHER_AES_256_GCM: Final = 1

COMPRESSION_NONE: Final = 0
COMPRESSION_ZSTD: Final = 1

# --- blob types (bound into the AAD, so a blob cannot be replayed as another type) ---------------
BLOB_DATA: Final = 1  # a chunk of a file's contents
BLOB_DISK: Final = 2  # a fixed-size chunk of a disk image
BLOB_TREE: Final = 3  # a slice of a file-tree manifest (JSON lines)
BLOB_TABLE: Final = 4  # a slice of a disk's chunk table (32-byte IDs)
BLOB_MANIFEST: Final = 5  # a recovery point's manifest (stored as its own object)
BLOB_INDEX: Final = 6  # an index file (stored as its own object)

#: Blob types that live in data packs (may go to archive storage classes) vs metadata packs.
DATA_BLOB_TYPES: Final = frozenset({BLOB_DATA, BLOB_DISK})
META_BLOB_TYPES: Final = frozenset({BLOB_TREE, BLOB_TABLE})

# --- packs -----------------------------------------------------------------------------------------
#: pack = PACK_MAGIC(8) | kind(1) | reserved(7) | entries...
#: entry = type(1) | id(32) | length(4, big endian) | envelope(length)
PACK_MAGIC: Final = b"APLPACK\x01"
PACK_HEADER_SIZE: Final = 16
PACK_ENTRY_HEADER_SIZE: Final = 37
PACK_KIND_DATA: Final = ord("d")
PACK_KIND_META: Final = ord("m")

# --- index files -----------------------------------------------------------------------------------
#: plaintext = INDEX_MAGIC(8) | records; record = pack name(32) | pack kind(1) | count(4) |
#: count x (id(32) | type(1) | offset(4) | length(4)); all integers big endian.
INDEX_MAGIC: Final = b"APLIDX\x00\x01"

# --- chunk IDs --------------------------------------------------------------------------------------
ID_SIZE: Final = 32
#: The ID of an all-zero chunk: such chunks are never stored, only referenced.
ZERO_ID: Final = bytes(ID_SIZE)

# --- keys ---------------------------------------------------------------------------------------------
KEY_FILE_VERSION: Final = 1
MASTER_KEY_SIZE: Final = 64  # 32 bytes AES-256-GCM key | 32 bytes BLAKE3 chunk-ID key
KDF_ARGON2ID: Final = "argon2id"
KEY_WRAP_AAD: Final = b"APLKEY\x01"

# --- manifests ----------------------------------------------------------------------------------------
MANIFEST_VERSION: Final = 1

# --- chunking defaults (recorded in each store's config, so a store keeps its own) ----------------------
FILE_CHUNK_MIN: Final = 256 * 1024
FILE_CHUNK_AVG: Final = 1024 * 1024
FILE_CHUNK_MAX: Final = 4 * 1024 * 1024
DISK_CHUNK_SIZE: Final = 64 * 1024
#: Disk chunk tables are cut every TABLE_SLICE_ENTRIES entries (256 MiB of a disk at 64 KiB chunks).
TABLE_SLICE_ENTRIES: Final = 4096
PACK_TARGET_SIZE: Final = 16 * 1024 * 1024
