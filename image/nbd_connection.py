"""One NBD client connection of an export: the handshake and the transmission phase.

The protocol (``doc/proto.md`` of the NetworkBlockDevice project) as this server speaks it; the
wire format and the decisions are pure functions in :mod:`image.nbd_protocol`, the chunks come
from the export's :class:`~image.nbd_loader.ChunkLoader`. What it serves:

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
  ``qemu-img convert`` and ``drive-mirror`` skip them; descriptors come from the table's zero
  runs, no loop per chunk), ``NBD_CMD_CACHE`` (the range's chunks are decoded into the chunk
  cache before the reply), ``NBD_CMD_FLUSH`` (success: nothing is ever written),
  ``NBD_CMD_DISC``. Writes, trims and write-zeroes are ``EPERM``; command flags other than those
  documented for the command and advertised are ``EINVAL``.

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

Each request is answered exactly once, in any order (replies carry the request's cookie);
replies are written whole under a per-connection lock. Reads and cache requests run as tasks of
their own, so a read that waits for a decode holds up no other request of the connection. A
read's data goes from the cache's slots to the socket without a copy in Python (the slots stay
pinned until the transport has taken them); on Python 3.12 and later, whose transport keeps the
views it could not send at once, the reply is joined into one copy first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from image import nbd_client as nbd
from image import nbd_protocol as proto
from image.nbd_chunks import UnreadableChunk
from image.nbd_protocol import ALLOCATION_CONTEXT_ID, ProtocolViolation

if TYPE_CHECKING:
    from image.nbd_export import NbdExport

logger = logging.getLogger("image.nbd_export")  # one logger for the export and its connections

#: Largest read or block-status request accepted (the spec's interoperable maximum).
MAX_REQUEST = 32 * 1024 * 1024
#: Most descriptors in one block status reply.
MAX_DESCRIPTORS = 4096
#: Requests one connection may have unanswered; more stay unread in the socket.
MAX_IN_FLIGHT = 16
#: Bytes of read replies one connection may have unanswered (two reads of 32 MiB).
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: Seconds a connection may take to finish its handshake before it is closed.
HANDSHAKE_TIMEOUT = 10.0
#: Pieces in which a refused write's payload, or oversized option data, is read and dropped.
DISCARD_PIECE = 64 * 1024
#: Whether the socket transport copies what it cannot send at once (until Python 3.11 it does;
#: later ones keep a view): then a reply is written straight from the cache's slots.
_TRANSPORT_COPIES = sys.version_info < (3, 12)


class NbdConnection:
    """One client of ``export``, from its handshake to its disconnect (see the module doc)."""

    def __init__(
        self,
        export: NbdExport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.export = export
        self.source = export.source
        assert export.loader is not None  # a connection exists only once the export started
        self.loader = export.loader
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

    async def _send(
        self, *parts: bytes | memoryview, written: Callable[[], None] | None = None
    ) -> None:
        """Write one whole reply (its parts in order, unjoined: a read's data is not copied);
        ``written`` is called once the transport has taken the parts."""
        async with self.write_lock:
            for part in parts:
                self.writer.write(part)
            if written is not None:
                written()
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
        loader = self.loader
        try:
            pieces, held = await loader.read_pinned(self, offset, length)
        except UnreadableChunk as exc:
            self.export.report_damage(exc)
            await self._error(cookie, errno.EIO, exc.message, exc.offset)
            return
        except Exception as exc:  # a bug must fail this request, not the connection
            logger.exception("NBD export %s: read failed", self.export.export_name)
            await self._error(cookie, errno.EIO, f"{type(exc).__name__}: {exc}")
            return
        size = sum(len(piece) for piece in pieces)
        self.source.stats.reads += 1
        self.source.stats.bytes_served += size
        if self.structured:
            header = proto.offset_data_header(cookie, offset, size)
        else:
            header = proto.simple_reply(cookie)
        if not _TRANSPORT_COPIES:
            # One copy while the slots are pinned: this transport may keep what it is given.
            try:
                data = b"".join(pieces)
            finally:
                loader.release(held)
            await self._send(header, data)
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                loader.release(held)

        try:
            await self._send(header, *pieces, written=release)
        finally:
            release()

    async def _cache(self, cookie: int, offset: int, length: int) -> None:
        """Decode the range's chunks into the cache, then answer (so a following read of the
        range is served from memory). Errors are the client's to see, not the point's record:
        only a read the guest asked for marks the point damaged."""
        refusal = self._check_range(offset, length)
        if refusal is not None:
            await self._error(cookie, errno.EINVAL, refusal)
            return
        try:
            count = await self.loader.cache_range(self, offset, length)
        except UnreadableChunk as exc:
            await self._error(cookie, errno.EIO, exc.message, max(offset, exc.offset))
            return
        self.source.stats.chunks_cached += count
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
