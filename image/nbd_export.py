"""Serve one disk of an image recovery point, read-only, over NBD, straight from the store.

This is what makes a failover instant: QEMU boots the VM on a qcow2 overlay whose backing is this
export, so only the chunks the guest actually reads are fetched and decoded (a busybox guest on a
256 MiB disk reads about 12 MiB while it boots, and the same on a 4 GiB disk).

The server speaks the NBD protocol (``doc/proto.md`` of the NetworkBlockDevice project) on a unix
socket, in an asyncio loop on its own thread; the wire format and the protocol decisions are pure
functions in :mod:`image.nbd_protocol`. What it serves:

- handshake: fixed newstyle with ``NBD_FLAG_NO_ZEROES``; ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``
  and ``NBD_OPT_INFO`` (with ``NBD_INFO_BLOCK_SIZE``: minimum 1, preferred = the chunk size,
  maximum 32 MiB; ``NBD_INFO_NAME`` and ``NBD_INFO_DESCRIPTION`` on request), ``NBD_OPT_LIST``
  (``NBD_REP_ERR_INVALID`` when sent with data), ``NBD_OPT_STRUCTURED_REPLY``,
  ``NBD_OPT_LIST_META_CONTEXT`` and ``NBD_OPT_SET_META_CONTEXT`` for ``base:allocation``,
  ``NBD_OPT_ABORT``; anything else is ``NBD_REP_ERR_UNSUP``. Option data over 64 KiB is read,
  dropped and answered ``NBD_REP_ERR_TOO_BIG``; over 16 MiB the client is hung up on.
- transmission flags: ``NBD_FLAG_READ_ONLY``, ``NBD_FLAG_SEND_FLUSH``, ``NBD_FLAG_SEND_CACHE``,
  ``NBD_FLAG_CAN_MULTI_CONN`` (QEMU, and later ``qemu-img`` reading the overlay chain, may read
  at once), and ``NBD_FLAG_SEND_DF`` once structured replies are negotiated.
- commands: ``NBD_CMD_READ`` (simple or structured replies; one data chunk, so "don't fragment"
  always holds; a zero-length read succeeds with no data), ``NBD_CMD_BLOCK_STATUS`` (all-zero
  chunks, which the store never holds, are reported ``NBD_STATE_HOLE|NBD_STATE_ZERO``, so
  ``qemu-img convert`` and ``drive-mirror`` skip them), ``NBD_CMD_CACHE`` (the range's chunks are
  decoded into the chunk cache before the reply), ``NBD_CMD_FLUSH`` (success: nothing is ever
  written), ``NBD_CMD_DISC``. Writes, trims and write-zeroes are ``EPERM``; command flags other
  than those documented for the command and advertised are ``EINVAL``.

Bounds (so that no client, slow or hostile, grows the server without limit):

- a connection has at most :data:`MAX_IN_FLIGHT` requests, and read replies of at most
  :data:`MAX_IN_FLIGHT_BYTES`, unanswered; further requests stay unread in the socket until
  earlier ones are answered (back-pressure: a client that does not read its replies stops
  being read). The highest values reached are :attr:`NbdExport.peak_in_flight` and
  :attr:`NbdExport.peak_in_flight_bytes`;
- a connection that has not finished its handshake after ``handshake_timeout`` seconds
  (:data:`HANDSHAKE_TIMEOUT` by default) is closed;
- a request is at most 32 MiB; a refused write's payload and oversized option data are read in
  64 KiB pieces and dropped, never held.

Invariants:

- Nothing is ever written to the store; a read holds no lock on it. The caller keeps the store's
  shared lock for the export's lifetime, so GC cannot remove packs under it.
- Each request is answered exactly once, in any order (replies carry the request's cookie);
  replies are written whole under a per-connection lock.
- Chunks are decoded on a small thread pool (AES and zstd release the GIL), each thread with its
  own envelope (zstd contexts are not thread-safe); decoded chunks are kept in an LRU cache.
- A chunk that cannot be read (a corrupt or missing pack) answers ``EIO`` (with structured
  replies: ``NBD_REPLY_TYPE_ERROR_OFFSET`` at the failing offset, with a message naming the
  point and the disk), is logged as a warning with the point, disk and offset, and is recorded
  in ``errors`` as "point X damaged: blob ... in pack ...", which the failover reports.

Boot profiles: the source records which chunks the guest read, in first-read order
(:attr:`ChunkSource.read_order`, at most :data:`PROFILE_MAX_CHUNKS`). The failover keeps that
list after a proven boot, and :meth:`NbdExport.warm` decodes the same chunks of the next point
into the cache on a thread of its own while QEMU and the firmware start, so that the boot's reads
are answered from memory instead of each waiting for a pack read and a decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from appliance.backup.images import read_table
from appliance.errors import ApplianceError, NotFound
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.crypto import Envelope
from appliance.store.packs import pack_object_name
from appliance.store.repository import Repository
from image import nbd_client as nbd
from image import nbd_protocol as proto
from image.nbd_protocol import ALLOCATION_CONTEXT_ID, ProtocolViolation, allocation_descriptors

logger = logging.getLogger(__name__)

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
#: Requests one connection may have unanswered; more stay unread in the socket.
MAX_IN_FLIGHT = 16
#: Bytes of read replies one connection may have unanswered (two reads of 32 MiB).
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: Seconds a connection may take to finish its handshake before it is closed.
HANDSHAKE_TIMEOUT = 10.0
#: Pieces in which a refused write's payload, or oversized option data, is read and dropped.
DISCARD_PIECE = 64 * 1024

_T = TypeVar("_T")


class UnreadableChunk(Exception):
    """A chunk of the disk cannot be read: ``offset`` is the first byte asked for in it."""

    def __init__(self, message: str, *, offset: int, index: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.index = index


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
    chunks_cached: int = 0  # decoded on a client's NBD_CMD_CACHE

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
        self._damage_logged: set[int] = set()

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

    def uncached(self, offset: int, length: int) -> list[int]:
        """The chunks of ``[offset, offset+length)`` that hold data and are not cached, at most
        half the cache (so caching a range never evicts its own start)."""
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        with self._lock:
            out = [
                i
                for i in range(first, last + 1)
                if self.table[i] != fmt.ZERO_ID and i not in self._cache
            ]
        return out[: max(1, self._cache_chunks // 2)]

    def cache_chunk(self, index: int) -> None:
        """Decode chunk ``index`` into the cache (``NBD_CMD_CACHE``); a failure is not recorded."""
        try:
            self.chunk(index, prefetch=True)
        except ApplianceError as exc:
            message = f"point {self.point_id} disk {self.name}: chunk {index}: {exc.message}"
            raise UnreadableChunk(message, offset=index * self.chunk_size, index=index) from exc

    def first_damage_report(self, index: int) -> bool:
        """True the first time a guest read fails on chunk ``index`` (it is logged once)."""
        with self._lock:
            if index in self._damage_logged:
                return False
            self._damage_logged.add(index)
            return True

    def pread(self, offset: int, length: int) -> bytes:
        """The bytes of ``[offset, offset+length)``; :class:`UnreadableChunk` names the first
        chunk that cannot be read (the point, the disk and the offset in its message)."""
        out = bytearray()
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            index = pos // self.chunk_size
            try:
                data = self.chunk(index)
            except ApplianceError as exc:
                message = (
                    f"point {self.point_id} damaged: disk {self.name} offset {pos} "
                    f"(chunk {index}): {exc.message}"
                )
                raise UnreadableChunk(message, offset=pos, index=index) from exc
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


# --- one connection ------------------------------------------------------------------------------


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
        self.in_flight = 0
        self.in_flight_bytes = 0
        self._finished = asyncio.Event()

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.export.handshake_timeout):
                entered = await self.handshake()
            if entered:
                await self.transmission()
        except TimeoutError:
            logger.debug("NBD export %s: handshake timed out", self.export.export_name)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolViolation):
            pass
        finally:
            for task in list(self.pending):
                task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _send(self, *parts: bytes) -> None:
        """Write one whole reply (its parts in order, unjoined: a read's data is not copied)."""
        async with self.write_lock:
            for part in parts:
                self.writer.write(part)
            await self.writer.drain()

    async def _discard(self, length: int) -> None:
        """Read and drop ``length`` bytes in small pieces (memory stays bounded)."""
        while length > 0:
            piece = await self.reader.readexactly(min(length, DISCARD_PIECE))
            length -= len(piece)

    # --- handshake ---

    async def handshake(self) -> bool:
        """Option haggling; True when the connection entered transmission."""
        flags = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        await self._send(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", await self.reader.readexactly(4))
        if client_flags & ~(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES):
            raise ProtocolViolation("unknown client flags")
        self.no_zeroes = bool(client_flags & nbd.FLAG_C_NO_ZEROES)
        while True:
            header = await self.reader.readexactly(proto.OPTION_HEADER.size)
            magic, option, length = proto.OPTION_HEADER.unpack(header)
            if magic != nbd.IHAVEOPT:
                raise ProtocolViolation("bad option magic")
            action = proto.option_data_action(option, length)
            if action == "disconnect":
                raise ProtocolViolation(f"option {option} with {length} bytes of data")
            data = b""
            if action == "discard":
                await self._discard(length)
                if option != nbd.OPT_ABORT:  # an abort's data is ignored, as the spec asks
                    message = f"option data of {length} bytes is over the limit of 64 KiB"
                    await self._send(
                        proto.option_reply(option, nbd.REP_ERR_TOO_BIG, message.encode())
                    )
                    continue
            elif length:
                data = await self.reader.readexactly(length)
            if option == nbd.OPT_EXPORT_NAME:
                if not self.export.name_matches(data.decode("utf-8", "replace")):
                    return False  # the only answer the protocol allows: hang up
                tail = b"" if self.no_zeroes else bytes(124)
                flags = proto.transmission_flags(self.structured)
                await self._send(struct.pack(">QH", self.source.size, flags) + tail)
                return True
            if option == nbd.OPT_ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._send(proto.option_reply(option, nbd.REP_ACK))
                return False
            facts = self.export.facts
            if option in (nbd.OPT_GO, nbd.OPT_INFO):
                reply, ok = proto.info_reply(option, data, facts, self.structured)
                await self._send(reply)
                if ok and option == nbd.OPT_GO:
                    return True
            elif option == nbd.OPT_LIST:
                await self._send(proto.list_reply(option, data, facts))
            elif option == nbd.OPT_STRUCTURED_REPLY:
                if data:
                    await self._send(proto.option_reply(option, nbd.REP_ERR_INVALID))
                else:
                    self.structured = True
                    await self._send(proto.option_reply(option, nbd.REP_ACK))
            elif option in (nbd.OPT_SET_META_CONTEXT, nbd.OPT_LIST_META_CONTEXT):
                reply, selected = proto.meta_context_reply(option, data, facts, self.structured)
                if option == nbd.OPT_SET_META_CONTEXT:
                    self.allocation = selected
                await self._send(reply)
            else:
                await self._send(proto.option_reply(option, nbd.REP_ERR_UNSUP))

    # --- transmission ---

    async def transmission(self) -> None:
        """Read requests while fewer than MAX_IN_FLIGHT requests (and MAX_IN_FLIGHT_BYTES of
        read replies) are unanswered; beyond that, requests stay unread in the socket, and a
        client that sends faster than it reads its replies is held back by TCP-style
        back-pressure instead of growing the server's memory."""
        while True:
            await self._admission(0)
            header = await self.reader.readexactly(proto.REQUEST.size)
            request = proto.decode_request(header)
            if request.command == nbd.CMD_DISC:
                if self.pending:
                    await asyncio.gather(*self.pending, return_exceptions=True)
                return
            cost = _reply_bytes(request)
            await self._admission(cost)
            self.in_flight += 1
            self.in_flight_bytes += cost
            self.export.note_in_flight(self.in_flight, self.in_flight_bytes)
            if request.command in (nbd.CMD_READ, nbd.CMD_CACHE):
                self._spawn(request, cost)
                continue
            try:
                await self._serve(request)  # cheap, and a write's payload must be read here
            finally:
                self._done(cost)

    async def _admission(self, cost: int) -> None:
        """Wait until one more request, whose reply holds ``cost`` bytes, fits the bounds."""
        while self.in_flight >= MAX_IN_FLIGHT or (
            self.in_flight and self.in_flight_bytes + cost > MAX_IN_FLIGHT_BYTES
        ):
            self._finished.clear()
            await self._finished.wait()

    def _done(self, cost: int) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= cost
        self._finished.set()

    def _spawn(self, request: proto.Request, cost: int) -> None:
        async def guarded() -> None:
            # The request's coroutine is made here, not by the caller: a task cancelled before
            # it first runs leaves no coroutine behind that was never awaited.
            try:
                with contextlib.suppress(ConnectionError):
                    await self._serve(request)
            finally:
                self._done(cost)

        task: asyncio.Task[None] = asyncio.ensure_future(guarded())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _serve(self, request: proto.Request) -> None:
        command, cookie = request.command, request.cookie
        if command == nbd.CMD_WRITE:
            if request.length > MAX_REQUEST:
                raise ProtocolViolation("write too large to skip")
            await self._discard(request.length)  # the payload must be consumed
        if command in proto.WRITE_COMMANDS:
            await self._error(cookie, errno.EPERM, "the export is read-only")
            return
        flag_error = proto.command_flags_error(command, request.flags, self.structured)
        if flag_error is not None:
            await self._error(cookie, errno.EINVAL, flag_error)
        elif command == nbd.CMD_READ:
            await self._read(cookie, request.offset, request.length)
        elif command == nbd.CMD_CACHE:
            await self._cache(cookie, request.offset, request.length)
        elif command == nbd.CMD_FLUSH:
            await self._reply_ok(cookie)  # nothing is ever written: nothing to flush
        elif command == nbd.CMD_BLOCK_STATUS:
            await self._block_status(cookie, request.flags, request.offset, request.length)
        else:
            await self._error(cookie, errno.EINVAL, f"unsupported command {command}")

    async def _reply_ok(self, cookie: int) -> None:
        if self.structured:
            await self._send(proto.structured_none(cookie))
        else:
            await self._send(proto.simple_reply(cookie))

    async def _error(
        self, cookie: int, error: int, message: str, offset: int | None = None
    ) -> None:
        if self.structured:
            await self._send(proto.structured_error(cookie, error, message, offset))
        else:
            await self._send(proto.simple_reply(cookie, error))

    def _check_range(self, offset: int, length: int) -> str | None:
        if length > MAX_REQUEST:
            return "request larger than 32 MiB"
        if offset + length > self.source.size:
            return "request past the end of the export"
        return None

    async def _read(self, cookie: int, offset: int, length: int) -> None:
        refusal = self._check_range(offset, length)
        if refusal is not None:
            await self._error(cookie, errno.EINVAL, refusal)
            return
        if length == 0:
            # The spec leaves a zero-length read unspecified (the client SHOULD NOT send one,
            # the server SHOULD NOT disconnect). Nothing is asked, so nothing fails: success,
            # with no data. With structured replies that is one NBD_REPLY_TYPE_NONE chunk with
            # NBD_REPLY_FLAG_DONE (an NBD_REPLY_TYPE_OFFSET_DATA chunk must carry at least one
            # byte); with simple replies, a reply header with no data.
            await self._reply_ok(cookie)
            return
        self.source.note_read(offset, length)
        try:
            data = self.source.cached_pread(offset, length)
            if data is None:
                data = await self.export.run_blocking(self.source.pread, offset, length)
                # Guests read on: decode the next chunks while this reply travels.
                last = (offset + length - 1) // self.source.chunk_size
                for index in self.source.missing_after(last, READAHEAD_CHUNKS):
                    self.export.prefetch(index)
        except UnreadableChunk as exc:
            self.export.report_damage(exc)
            await self._error(cookie, errno.EIO, exc.message, exc.offset)
            return
        except Exception as exc:  # a bug must fail this request, not the connection
            logger.exception("NBD export %s: read failed", self.export.export_name)
            await self._error(cookie, errno.EIO, f"{type(exc).__name__}: {exc}")
            return
        self.source.stats.reads += 1
        self.source.stats.bytes_served += len(data)
        if self.structured:
            await self._send(proto.offset_data_header(cookie, offset, len(data)), data)
        else:
            await self._send(proto.simple_reply(cookie), data)

    async def _cache(self, cookie: int, offset: int, length: int) -> None:
        """Decode the range's chunks into the cache, then answer (so a following read of the
        range is served from memory). Errors are the client's to see, not the point's record:
        only a read the guest asked for marks the point damaged."""
        refusal = self._check_range(offset, length)
        if refusal is not None:
            await self._error(cookie, errno.EINVAL, refusal)
            return
        indices = self.source.uncached(offset, length)
        try:
            await asyncio.gather(
                *(self.export.run_blocking(self.source.cache_chunk, i) for i in indices)
            )
        except UnreadableChunk as exc:
            await self._error(cookie, errno.EIO, exc.message, max(offset, exc.offset))
            return
        self.source.stats.chunks_cached += len(indices)
        await self._reply_ok(cookie)

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
        await self._send(proto.block_status_chunk(cookie, ALLOCATION_CONTEXT_ID, descriptors))


def _reply_bytes(request: proto.Request) -> int:
    """Bytes of data the reply to ``request`` will hold (what the in-flight bound counts)."""
    if request.command == nbd.CMD_READ and request.length <= MAX_REQUEST:
        return request.length
    return 0


# --- the export ----------------------------------------------------------------------------------


class NbdExport:
    """A running export (see the module docstring). Stop it with :meth:`stop`."""

    def __init__(
        self,
        source: ChunkSource,
        socket_path: str,
        export_name: str,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.source = source
        self.socket_path = socket_path
        self.export_name = export_name
        self.facts = proto.ExportFacts(
            name=export_name,
            size=source.size,
            preferred_block=source.chunk_size,
            max_block=MAX_REQUEST,
            description=f"point {source.point_id} disk {source.name} (read-only)",
        )
        #: Seconds a new connection has to finish its handshake (read when it connects).
        self.handshake_timeout = handshake_timeout
        #: The most requests, and bytes of read replies, any one connection had unanswered.
        self.peak_in_flight = 0
        self.peak_in_flight_bytes = 0
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

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (in handshake or transmission)."""
        return len(self._connections)

    def name_matches(self, name: str) -> bool:
        """The empty name (QEMU's default) and the export's own name both select the disk."""
        return self.facts.selects(name)

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

    async def run_blocking(self, func: Callable[..., _T], *args: Any) -> _T:
        return await self._loop.run_in_executor(self._pool, func, *args)

    def note_in_flight(self, requests: int, reply_bytes: int) -> None:
        self.peak_in_flight = max(self.peak_in_flight, requests)
        self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, reply_bytes)

    def report_damage(self, exc: UnreadableChunk) -> None:
        """Log a guest read that hit an unreadable chunk: a warning the first time per chunk
        (a guest retrying the same sector must not flood the log), debug after."""
        level = logging.WARNING if self.source.first_damage_report(exc.index) else logging.DEBUG
        logger.log(
            level,
            "NBD export of point %s disk %s: read at offset %d failed: %s",
            self.source.point_id,
            self.source.name,
            exc.offset,
            exc.message,
            extra={"point": self.source.point_id, "disk": self.source.name, "offset": exc.offset},
        )

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
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
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
    return NbdExport(
        source, os.path.abspath(socket_path), disk_name, handshake_timeout=handshake_timeout
    ).start()
