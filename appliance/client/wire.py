"""The backup client's wire format (docs/sources.md, "The client's protocol"). Frozen: the
client and the appliance may be of different releases, so nothing here is ever renumbered.

A chunk batch (``POST /api/client/sessions/{id}/chunks``) is a run of frames::

    chunk id (32) | compression (1: 0 none, 1 zstd) | plaintext length (u32 BE) |
    body length (u32 BE) | body

Records (``POST .../records?seq=N``) are zstd-compressed JSON lines, the store's tree records in
canonical order; batch ``N`` follows batch ``N - 1``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

PROTOCOL = 1
ID_SIZE = 32
FRAME = struct.Struct(">32sBII")
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
#: The largest chunk batch the appliance accepts in one request.
MAX_BATCH = 64 * 1024 * 1024
#: What the client aims for per batch (about one pack).
BATCH_TARGET = 16 * 1024 * 1024
#: The largest records batch (compressed).
MAX_RECORDS_BATCH = 32 * 1024 * 1024


class WireError(ValueError):
    pass


def encode_frame(chunk_id: bytes, compression: int, size: int, body: bytes) -> bytes:
    return FRAME.pack(chunk_id, compression, size, len(body)) + body


def decode_frames(data: bytes | memoryview) -> Iterator[tuple[bytes, int, int, memoryview]]:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < FRAME.size:
            raise WireError("the chunk batch ends inside a frame header")
        chunk_id, compression, size, length = FRAME.unpack_from(view, pos)
        pos += FRAME.size
        if len(view) - pos < length:
            raise WireError("the chunk batch ends inside a chunk")
        yield chunk_id, compression, size, view[pos : pos + length]
        pos += length
