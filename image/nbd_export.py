"""Serve one disk of an image recovery point, read-only, over NBD, straight from the store.

This is what makes a failover instant: QEMU boots the VM on a qcow2 overlay whose backing is this
export, so only the chunks the guest actually reads are fetched and decoded (a busybox guest on a
256 MiB disk reads about 12 MiB while it boots, and the same on a 4 GiB disk).

The server speaks the NBD protocol (``doc/proto.md`` of the NetworkBlockDevice project) on a unix
socket, in an asyncio loop on its own thread:

- handshake: fixed newstyle with ``NBD_FLAG_NO_ZEROES``; ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``
  and ``NBD_OPT_INFO`` (with ``NBD_INFO_BLOCK_SIZE``: minimum 1, preferred = the chunk size),
  ``NBD_OPT_LIST``, ``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_LIST_META_CONTEXT`` and
  ``NBD_OPT_SET_META_CONTEXT`` for ``base:allocation``; anything else is ``NBD_REP_ERR_UNSUP``.
- transmission: ``NBD_CMD_READ`` (simple or structured replies), ``NBD_CMD_BLOCK_STATUS``
  (all-zero chunks, which the store never holds, are reported ``NBD_STATE_HOLE|NBD_STATE_ZERO``,
  so ``qemu-img convert`` and ``drive-mirror`` skip them), ``NBD_CMD_CACHE`` and ``NBD_CMD_FLUSH``
  (no-ops), ``NBD_CMD_DISC``. The export is read-only (``NBD_FLAG_READ_ONLY``): writes, trims
  and write-zeroes are answered ``EPERM``. Several connections may read at once
  (``NBD_FLAG_CAN_MULTI_CONN``): QEMU, and later ``qemu-img`` reading the overlay chain.

Invariants:

- Nothing is ever written to the store; a read holds no lock on it. The caller keeps the store's
  shared lock for the export's lifetime, so GC cannot remove packs under it.
- Each request is answered exactly once, in any order (replies carry the request's cookie);
  replies are written whole under a per-connection lock.
- Chunks are decoded on a small thread pool (AES and zstd release the GIL), each thread with its
  own envelope (zstd contexts are not thread-safe); decoded chunks are kept in an LRU cache.
- A chunk that cannot be read (a corrupt or missing pack) answers ``EIO`` and is recorded in
  ``errors`` as "point X damaged: blob ... in pack ...", which the failover reports.

Boot profiles: the source records which chunks the guest read, in first-read order
(:attr:`ChunkSource.read_order`, at most :data:`PROFILE_MAX_CHUNKS`). The failover keeps that
list after a proven boot, and :meth:`NbdExport.warm` decodes the same chunks of the next point
into the cache on a thread of its own while QEMU and the firmware start, so that the boot's reads
are answered from memory instead of each waiting for a pack read and a decode.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from appliance.backup.images import read_table
from appliance.errors import ApplianceError, NotFound
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.crypto import Envelope
from appliance.store.packs import pack_object_name
from appliance.store.repository import Repository
from image import nbd_client as nbd

#: Decoded chunks kept in memory per export (64 MiB at 64 KiB chunks).
CACHE_CHUNKS = 1024
#: Threads decoding chunks per export.
READ_THREADS = 2
#: Largest read or block-status request accepted (the spec's interoperable maximum).
MAX_REQUEST = 32 * 1024 * 1024
#: Most descriptors in one block status reply.
MAX_DESCRIPTORS = 4096
#: Chunks decoded ahead of a read that missed the cache.
READAHEAD_CHUNKS = 4
#: Most chunks a boot profile records (half the cache, so warming never evicts its own work).
PROFILE_MAX_CHUNKS = CACHE_CHUNKS // 2
#: Context ID of base:allocation on every connection.
ALLOCATION_CONTEXT_ID = 1

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_OPTION_REPLY = struct.Struct(">QIII")

TRANSMISSION_FLAGS = (
    nbd.FLAG_HAS_FLAGS | nbd.FLAG_READ_ONLY | nbd.FLAG_SEND_DF | nbd.FLAG_CAN_MULTI_CONN
)


@dataclass
class ExportStats:
    """Counters of one export (bytes as the guest sees them, and as the store holds them)."""

    connections: int = 0
    reads: int = 0
    bytes_served: int = 0
    block_status: int = 0
    chunks_from_store: int = 0
    bytes_from_store: int = 0  # sealed (compressed, encrypted) bytes read from packs
    bytes_decoded: int = 0
    cache_hits: int = 0
    errors: int = 0
    chunks_warmed: int = 0  # decoded ahead from a boot profile

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# --- the chunk source ----------------------------------------------------------------------------


class ChunkSource:
    """The guest-visible bytes of one disk of a point, read chunk by chunk from the store."""

    def __init__(
        self,
        repo: Repository,
        point_id: str,
        disk: dict[str, Any],
        *,
        cache_chunks: int = CACHE_CHUNKS,
        table: list[bytes] | None = None,
    ) -> None:
        self.repo = repo
        self.point_id = point_id
        self.name = str(disk["name"])
        self.size = int(disk["size"])
        self.chunk_size = int(disk["chunk_size"])
        try:
            self.table = table if table is not None else read_table(repo, disk)
        except ApplianceError as exc:
            raise type(exc)(
                f"point {point_id} damaged: the chunk table of disk {self.name} cannot be read: "
                f"{exc.message}",
                point=point_id,
                disk=self.name,
            ) from exc
        chunks = (self.size + self.chunk_size - 1) // self.chunk_size
        if len(self.table) != chunks:
            raise NotFound(
                f"point {point_id} damaged: disk {self.name} has {len(self.table)} table "
                f"entries for {chunks} chunks",
                point=point_id,
            )
        self.runs = zero_runs(self.table)
        self.stats = ExportStats()
        self.errors: list[str] = []
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._lock = threading.Lock()
        self._local = threading.local()
        #: Data chunks the guest read, each once, in the order of first reading (a boot profile).
        self.read_order: list[int] = []
        self._read_seen: set[int] = set()

    def note_read(self, offset: int, length: int) -> None:
        """Record the data chunks a guest read touches (for the boot profile)."""
        if length <= 0 or len(self.read_order) >= PROFILE_MAX_CHUNKS:
            return
        first = offset // self.chunk_size
        last = (min(offset + length, self.size) - 1) // self.chunk_size
        with self._lock:
            for index in range(first, last + 1):
                if index not in self._read_seen and self.table[index] != fmt.ZERO_ID:
                    self._read_seen.add(index)
                    self.read_order.append(index)
                    if len(self.read_order) >= PROFILE_MAX_CHUNKS:
                        return

    def is_cached(self, index: int) -> bool:
        with self._lock:
            return index in self._cache

    def count_warmed(self) -> None:
        with self._lock:
            self.stats.chunks_warmed += 1

    def _envelope(self) -> Envelope:
        envelope: Envelope | None = getattr(self._local, "envelope", None)
        if envelope is None:
            envelope = self._local.envelope = Envelope(self.repo.key)
        return envelope

    def chunk(self, index: int, *, prefetch: bool = False) -> bytes:
        """The decoded chunk ``index`` (the last one may be short).

        A failed ``prefetch`` is not recorded: only a read the guest asked for is an error."""
        blob_id = self.table[index]
        length = min(self.chunk_size, self.size - index * self.chunk_size)
        if blob_id == fmt.ZERO_ID:
            return bytes(length)
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                self.stats.cache_hits += 1
                return cached
        try:
            entry = self.repo.locate(blob_id)
            data = self.repo.read_blob(blob_id, self._envelope())
        except ApplianceError as exc:
            if prefetch:
                raise
            message = f"point {self.point_id} damaged: {exc.message}"
            with self._lock:
                self.stats.errors += 1
                if message not in self.errors:
                    self.errors.append(message)
            raise
        if len(data) != length:
            message = (
                f"point {self.point_id} damaged: chunk {index} of disk {self.name} has "
                f"{len(data)} bytes, not {length}"
            )
            with self._lock:
                self.stats.errors += 1
                if message not in self.errors:
                    self.errors.append(message)
            raise NotFound(message, point=self.point_id)
        with self._lock:
            if index in self._cache:
                return self._cache[index]  # a prefetch got there first
            self.stats.chunks_from_store += 1
            self.stats.bytes_from_store += entry.length
            self.stats.bytes_decoded += len(data)
            self._cache[index] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def cached_pread(self, offset: int, length: int) -> bytes | None:
        """The bytes when every chunk they touch is cached or all-zero, else None (no I/O).

        Served on the event loop's thread: most of a booting guest's reads hit chunks already
        decoded, and each thread hop is latency the guest waits for."""
        end = min(offset + length, self.size)
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        pieces = []
        with self._lock:
            for index in range(first, last + 1):
                if self.table[index] == fmt.ZERO_ID:
                    size = min(self.chunk_size, self.size - index * self.chunk_size)
                    pieces.append(bytes(size))
                    continue
                data = self._cache.get(index)
                if data is None:
                    return None
                self._cache.move_to_end(index)
                pieces.append(data)
            self.stats.cache_hits += sum(
                1 for i in range(first, last + 1) if self.table[i] != fmt.ZERO_ID
            )
        joined = b"".join(pieces)
        start = offset - first * self.chunk_size
        return joined[start : start + (end - offset)]

    def missing_after(self, index: int, count: int) -> list[int]:
        """Up to ``count`` chunks after ``index`` that hold data and are not cached (readahead)."""
        out = []
        with self._lock:
            for i in range(index + 1, min(index + 1 + count, len(self.table))):
                if self.table[i] != fmt.ZERO_ID and i not in self._cache:
                    out.append(i)
        return out

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            index = pos // self.chunk_size
            data = self.chunk(index)
            start = pos - index * self.chunk_size
            piece = data[start : start + (end - pos)]
            out += piece
            pos += len(piece)
        return bytes(out)

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """Block status descriptors ``(length, NBD state flags)`` for ``[offset, offset+length)``."""
        return allocation_descriptors(self.runs, self.chunk_size, self.size, offset, length, limit)


def zero_runs(table: list[bytes]) -> list[tuple[int, bool]]:
    """Runs of the chunk table as ``(first chunk, all-zero?)``, in order, adjacent runs differ."""
    runs: list[tuple[int, bool]] = []
    for index, blob_id in enumerate(table):
        zero = blob_id == fmt.ZERO_ID
        if not runs or runs[-1][1] != zero:
            runs.append((index, zero))
    return runs


def allocation_descriptors(
    runs: list[tuple[int, bool]],
    chunk_size: int,
    size: int,
    offset: int,
    length: int,
    limit: int,
) -> list[tuple[int, int]]:
    """Descriptors for ``[offset, offset+length)`` clipped to ``size``, at most ``limit``."""
    end = min(offset + length, size)
    out: list[tuple[int, int]] = []
    if not runs or offset >= end:
        return out
    starts = [first for first, _ in runs]
    i = bisect.bisect_right(starts, offset // chunk_size) - 1
    pos = offset
    while pos < end and i < len(runs) and len(out) < limit:
        run_end = runs[i + 1][0] * chunk_size if i + 1 < len(runs) else size
        stop = min(run_end, end)
        flags = (nbd.STATE_HOLE | nbd.STATE_ZERO) if runs[i][1] else 0
        out.append((stop - pos, flags))
        pos = stop
        i += 1
    return out


def missing_blobs(repo: Repository, disks: list[dict[str, Any]]) -> dict[str, Any]:
    """What of these disks is not readable from the local store, without reading any data.

    Checks that every chunk-table blob and every data blob is in the local index
    (:func:`appliance.point_packs.point_packs`), and that every pack they live in exists.
    Returns ``{"tables": [...], "blobs": n, "packs": [...], "example": hex}`` with empty values
    when everything is present.
    """
    needs = point_packs(repo, {"kind": "image", "disks": disks})
    absent = []
    for pack, kind in needs.packs.items():
        try:
            repo.backend.stat(pack_object_name(pack, kind))
        except ApplianceError:
            absent.append(pack.hex())
    return {
        "tables": [i.hex() for i in needs.missing_metadata],
        "blobs": len(needs.missing),
        "packs": absent,
        "example": needs.missing[0].hex() if needs.missing else "",
    }


# --- the protocol ------------------------------------------------------------------------------


class _ProtocolError(Exception):
    """The client broke the protocol: drop the connection."""


def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(nbd.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return _SIMPLE_REPLY.pack(nbd.SIMPLE_REPLY_MAGIC, error, cookie) + data


def _structured(cookie: int, kind: int, payload: bytes, done: bool = True) -> bytes:
    flags = nbd.REPLY_FLAG_DONE if done else 0
    return (
        _STRUCTURED_REPLY.pack(nbd.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
        + payload
    )


def _structured_error(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(text)) + text
    return _structured(cookie, nbd.REPLY_TYPE_ERROR, payload)


class _Connection:
    def __init__(
        self,
        export: NbdExport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.export = export
        self.source = export.source
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.allocation = False
        self.no_zeroes = False
        self.write_lock = asyncio.Lock()
        self.pending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            if await self.handshake():
                await self.transmission()
        except (asyncio.IncompleteReadError, ConnectionError, _ProtocolError):
            pass
        finally:
            for task in list(self.pending):
                task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _send(self, data: bytes) -> None:
        async with self.write_lock:
            self.writer.write(data)
            await self.writer.drain()

    # --- handshake ---

    async def handshake(self) -> bool:
        """Option haggling; True when the connection entered transmission."""
        flags = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        await self._send(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", await self.reader.readexactly(4))
        if client_flags & ~(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES):
            raise _ProtocolError("unknown client flags")
        self.no_zeroes = bool(client_flags & nbd.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", await self.reader.readexactly(16))
            if magic != nbd.IHAVEOPT:
                raise _ProtocolError("bad option magic")
            if length > 65536:
                raise _ProtocolError("option too long")
            data = await self.reader.readexactly(length) if length else b""
            if option == nbd.OPT_EXPORT_NAME:
                if not self.export.name_matches(data.decode("utf-8", "replace")):
                    return False  # the only answer the protocol allows: hang up
                tail = b"" if self.no_zeroes else bytes(124)
                await self._send(struct.pack(">QH", self.source.size, TRANSMISSION_FLAGS) + tail)
                return True
            if option == nbd.OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._send(_option_reply(option, nbd.REP_ACK))
                return False
            if option in (nbd.OPT_GO, nbd.OPT_INFO):
                if await self._info(option, data) and option == nbd.OPT_GO:
                    return True
            elif option == nbd.OPT_LIST:
                name = self.export.export_name.encode()
                await self._send(
                    _option_reply(option, nbd.REP_SERVER, struct.pack(">I", len(name)) + name)
                    + _option_reply(option, nbd.REP_ACK)
                )
            elif option == nbd.OPT_STRUCTURED_REPLY:
                if data:
                    await self._send(_option_reply(option, nbd.REP_ERR_INVALID))
                else:
                    self.structured = True
                    await self._send(_option_reply(option, nbd.REP_ACK))
            elif option in (nbd.OPT_SET_META_CONTEXT, nbd.OPT_LIST_META_CONTEXT):
                await self._meta_context(option, data)
            else:
                await self._send(_option_reply(option, nbd.REP_ERR_UNSUP))

    async def _info(self, option: int, data: bytes) -> bool:
        try:
            (name_length,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + name_length].decode("utf-8", "replace")
            (count,) = struct.unpack_from(">H", data, 4 + name_length)
            if len(data) != 4 + name_length + 2 + 2 * count:
                raise struct.error("length mismatch")
            requests = struct.unpack_from(f">{count}H", data, 6 + name_length)
        except (struct.error, UnicodeError):
            await self._send(_option_reply(option, nbd.REP_ERR_INVALID))
            return False
        if not self.export.name_matches(name):
            message = f"no export named {name!r}".encode()
            await self._send(_option_reply(option, nbd.REP_ERR_UNKNOWN, message))
            return False
        replies = [
            _option_reply(
                option,
                nbd.REP_INFO,
                struct.pack(">HQH", nbd.INFO_EXPORT, self.source.size, TRANSMISSION_FLAGS),
            ),
            _option_reply(
                option,
                nbd.REP_INFO,
                struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1, self.source.chunk_size, MAX_REQUEST),
            ),
        ]
        if nbd.INFO_NAME in requests:
            raw = self.export.export_name.encode()
            replies.append(
                _option_reply(option, nbd.REP_INFO, struct.pack(">H", nbd.INFO_NAME) + raw)
            )
        if nbd.INFO_DESCRIPTION in requests:
            text = f"point {self.source.point_id} disk {self.source.name} (read-only)".encode()
            replies.append(
                _option_reply(option, nbd.REP_INFO, struct.pack(">H", nbd.INFO_DESCRIPTION) + text)
            )
        replies.append(_option_reply(option, nbd.REP_ACK))
        await self._send(b"".join(replies))
        return True

    async def _meta_context(self, option: int, data: bytes) -> None:
        try:
            (name_length,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + name_length].decode("utf-8", "replace")
            pos = 4 + name_length
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (length,) = struct.unpack_from(">I", data, pos)
                pos += 4
                queries.append(data[pos : pos + length].decode("utf-8", "replace"))
                pos += length
            if pos != len(data):
                raise struct.error("length mismatch")
        except (struct.error, UnicodeError):
            await self._send(_option_reply(option, nbd.REP_ERR_INVALID))
            return
        if option == nbd.OPT_SET_META_CONTEXT and not self.structured:
            await self._send(
                _option_reply(option, nbd.REP_ERR_INVALID, b"structured replies needed first")
            )
            return
        if not self.export.name_matches(name):
            await self._send(_option_reply(option, nbd.REP_ERR_UNKNOWN))
            return
        context = nbd.BASE_ALLOCATION
        if option == nbd.OPT_LIST_META_CONTEXT:
            matches = not queries or any(q in ("base:", context) for q in queries)
        else:
            matches = context in queries
        replies = []
        if matches:
            payload = struct.pack(">I", ALLOCATION_CONTEXT_ID) + context.encode()
            replies.append(_option_reply(option, nbd.REP_META_CONTEXT, payload))
        if option == nbd.OPT_SET_META_CONTEXT:
            self.allocation = matches
        replies.append(_option_reply(option, nbd.REP_ACK))
        await self._send(b"".join(replies))

    # --- transmission ---

    async def transmission(self) -> None:
        while True:
            header = await self.reader.readexactly(_REQUEST.size)
            magic, flags, command, cookie, offset, length = _REQUEST.unpack(header)
            if magic != nbd.REQUEST_MAGIC:
                raise _ProtocolError("bad request magic")
            if command == nbd.CMD_DISC:
                if self.pending:
                    await asyncio.gather(*self.pending, return_exceptions=True)
                return
            if command == nbd.CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _ProtocolError("write too large to skip")
                await self.reader.readexactly(length)  # the payload must be consumed
                await self._error(cookie, errno.EPERM, "the export is read-only")
                continue
            if command in (nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):
                await self._error(cookie, errno.EPERM, "the export is read-only")
                continue
            if command in (nbd.CMD_FLUSH, nbd.CMD_CACHE):
                await self._reply_ok(cookie)
                continue
            if command == nbd.CMD_READ:
                self._spawn(self._read(cookie, offset, length))
                continue
            if command == nbd.CMD_BLOCK_STATUS:
                await self._block_status(cookie, flags, offset, length)
                continue
            await self._error(cookie, errno.EINVAL, f"unsupported command {command}")

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            with contextlib.suppress(ConnectionError):
                await work

        task: asyncio.Task[None] = asyncio.ensure_future(guarded())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _reply_ok(self, cookie: int) -> None:
        if self.structured:
            await self._send(_structured(cookie, nbd.REPLY_TYPE_NONE, b""))
        else:
            await self._send(_simple_reply(cookie))

    async def _error(self, cookie: int, error: int, message: str) -> None:
        if self.structured:
            await self._send(_structured_error(cookie, error, message))
        else:
            await self._send(_simple_reply(cookie, error))

    async def _read(self, cookie: int, offset: int, length: int) -> None:
        if length > MAX_REQUEST:
            await self._error(cookie, errno.EINVAL, "read larger than 32 MiB")
            return
        if offset + length > self.source.size:
            await self._error(cookie, errno.EINVAL, "read past the end of the export")
            return
        self.source.note_read(offset, length)
        try:
            data = self.source.cached_pread(offset, length) if length else b""
            if data is None:
                data = await self.export.run_blocking(self.source.pread, offset, length)
                # Guests read on: decode the next chunks while this reply travels.
                last = (offset + length - 1) // self.source.chunk_size
                for index in self.source.missing_after(last, READAHEAD_CHUNKS):
                    self.export.prefetch(index)
        except ApplianceError as exc:
            await self._error(cookie, errno.EIO, exc.message)
            return
        except Exception as exc:  # a bug must fail this request, not the connection
            await self._error(cookie, errno.EIO, f"{type(exc).__name__}: {exc}")
            return
        self.source.stats.reads += 1
        self.source.stats.bytes_served += len(data)
        if self.structured:
            payload = struct.pack(">Q", offset) + data
            await self._send(_structured(cookie, nbd.REPLY_TYPE_OFFSET_DATA, payload))
        else:
            await self._send(_simple_reply(cookie, 0, data))

    async def _block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        if not (self.structured and self.allocation):
            await self._error(cookie, errno.EINVAL, "base:allocation was not negotiated")
            return
        if length == 0 or offset + length > self.source.size:
            await self._error(cookie, errno.EINVAL, "block status outside the export")
            return
        limit = 1 if flags & nbd.CMD_FLAG_REQ_ONE else MAX_DESCRIPTORS
        descriptors = self.source.allocation(offset, length, limit)
        self.source.stats.block_status += 1
        payload = struct.pack(">I", ALLOCATION_CONTEXT_ID) + b"".join(
            struct.pack(">II", run, state) for run, state in descriptors
        )
        await self._send(_structured(cookie, nbd.REPLY_TYPE_BLOCK_STATUS, payload))


# --- the export ----------------------------------------------------------------------------------


class NbdExport:
    """A running export (see the module docstring). Stop it with :meth:`stop`."""

    def __init__(self, source: ChunkSource, socket_path: str, export_name: str) -> None:
        self.source = source
        self.socket_path = socket_path
        self.export_name = export_name
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(
            max_workers=READ_THREADS, thread_name_prefix=f"nbd-{export_name}"
        )
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, name=f"nbd-export-{export_name}", daemon=True
        )
        self._stopped = False
        self._warmer: threading.Thread | None = None

    # --- public ---

    @property
    def point_id(self) -> str:
        return self.source.point_id

    @property
    def disk_name(self) -> str:
        return self.source.name

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def stats(self) -> ExportStats:
        return ExportStats(**self.source.stats.to_dict())

    @property
    def errors(self) -> list[str]:
        return list(self.source.errors)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def name_matches(self, name: str) -> bool:
        """The empty name (QEMU's default) and the export's own name both select the disk."""
        return name in ("", self.export_name)

    def uri(self) -> str:
        return f"nbd+unix:///{self.export_name}?socket={self.socket_path}"

    def start(self) -> NbdExport:
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def warm(self, indices: list[int]) -> None:
        """Decode chunks ``indices`` (a boot profile) into the cache, in order, on a thread of
        its own: the guest's reads keep the read pool to themselves. Indices that are out of
        range, all-zero or cached already are skipped; a chunk that cannot be read is left for
        the guest's read to report."""
        source = self.source
        wanted = [
            i for i in dict.fromkeys(indices) if isinstance(i, int) and 0 <= i < len(source.table)
        ][:PROFILE_MAX_CHUNKS]
        wanted = [i for i in wanted if source.table[i] != fmt.ZERO_ID]
        if not wanted:
            return

        def run() -> None:
            for index in wanted:
                if self._stopped:
                    return
                if source.is_cached(index):
                    continue
                try:
                    source.chunk(index, prefetch=True)
                except ApplianceError:
                    continue
                source.count_warmed()

        self._warmer = threading.Thread(
            target=run, name=f"nbd-warm-{self.export_name}", daemon=True
        )
        self._warmer.start()

    def stop(self) -> None:
        """Close the listening socket and every connection; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._warmer is not None:
            # It stops after the chunk it decodes: no store read outlives the caller's lock.
            self._warmer.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> NbdExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ---

    async def run_blocking(self, func: Callable[..., bytes], *args: Any) -> bytes:
        return await self._loop.run_in_executor(self._pool, func, *args)

    def prefetch(self, index: int) -> None:
        """Decode chunk ``index`` into the cache in the background; errors surface on reads."""

        def load() -> None:
            with contextlib.suppress(ApplianceError):
                self.source.chunk(index, prefetch=True)

        self._pool.submit(load)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self._server = self._loop.run_until_complete(
                asyncio.start_unix_server(self._accept, path=self.socket_path)
            )
            os.chmod(self.socket_path, 0o600)
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.source.stats.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await _Connection(self, reader, writer).run()
        finally:
            if task is not None:
                self._connections.discard(task)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        self._loop.stop()


def export_image_over_nbd(
    repo: Repository,
    manifest: dict[str, Any],
    disk_name: str,
    socket_path: str,
    *,
    cache_chunks: int = CACHE_CHUNKS,
) -> NbdExport:
    """Serve disk ``disk_name`` of the image point ``manifest`` on ``socket_path`` (read-only).

    Returns the running export; call ``stop()`` when done. ``stats`` and ``errors`` tell what it
    read from the store and which reads failed.
    """
    disks = {d["name"]: d for d in manifest.get("disks", [])}
    if manifest.get("kind") != "image":
        raise NotFound(f"point {manifest.get('point_id')} is not a VM image point")
    disk = disks.get(disk_name)
    if disk is None:
        raise NotFound(
            f"point {manifest['point_id']} has no disk named {disk_name!r}",
            point=manifest["point_id"],
        )
    source = ChunkSource(repo, str(manifest["point_id"]), disk, cache_chunks=cache_chunks)
    return NbdExport(source, os.path.abspath(socket_path), disk_name).start()
