"""A small synchronous NBD client over a unix socket (fixed newstyle handshake).

Speaks the NBD protocol as published by the NetworkBlockDevice project (``doc/proto.md``):

- handshake: fixed newstyle; ``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE``, falling back to
  ``NBD_OPT_EXPORT_NAME`` when the server answers ``NBD_REP_ERR_UNSUP`` or is not fixed newstyle;
- transmission: ``NBD_CMD_READ``, ``NBD_CMD_DISC`` and, when asked for with ``allocation=True``,
  ``NBD_CMD_BLOCK_STATUS`` on the ``base:allocation`` metadata context (which needs structured
  replies, so reads then arrive as structured chunks and are reassembled here).

Invariants:

- One request is in flight at a time on a connection; a client object is *not* thread-safe.
  Callers that read from several threads use one client per thread (or a pool) or a lock.
- Once the client asked for block size constraints it honours them: every request's offset and
  length are multiples of the advertised minimum (reads are widened and trimmed here) and no
  request exceeds the maximum (capped at 32 MiB to bound memory). Without advertised constraints
  the spec's interoperable defaults (512 bytes, 32 MiB) apply.
- Giving up during option haggling (an error reply, a missing feature) is a soft disconnect
  (``NBD_OPT_ABORT``). A protocol violation by the server (bad magic, wrong cookie, malformed
  chunk) makes the client drop the connection (a hard disconnect, as the spec allows); later
  calls fail at once. An error *reply* (the server's errno) leaves the connection usable, except
  ``ESHUTDOWN``, after which the spec requires a soft disconnect.
- Errors are ``NbdError`` (an ``OSError`` carrying the server's errno, or ``EPROTO`` for protocol
  violations); a connection closed under us is a ``ConnectionError``. Callers convert both into
  their domain errors.

The numeric constants are the protocol's and must never be renumbered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

# --- protocol constants (from the NBD specification; never renumber) ---------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle server magic and option magic
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# information types of NBD_OPT_GO
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"

#: Largest request this client sends: the spec's interoperable maximum, and a bound on memory.
MAX_REQUEST = 32 * 1024 * 1024
#: Minimum block size assumed when the server advertises none (the spec's interoperable value).
DEFAULT_MIN_BLOCK = 512
#: Option replies carry strings of at most 4096 bytes; anything far larger is a broken server.
MAX_OPTION_REPLY = 64 * 1024

_REP_ERRORS = {
    REP_ERR_UNSUP: "option not supported",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on this platform",
    REP_ERR_TLS_REQD: "server requires TLS",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "server requires block size negotiation",
    REP_ERR_TOO_BIG: "request too big",
}

_OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_STRUCTURED_TAIL = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)


class NbdError(OSError):
    """An NBD request failed: ``errno`` is the server's error, or EPROTO for a protocol fault."""


def _protocol_error(message: str) -> NbdError:
    return NbdError(errno.EPROTO, f"NBD protocol violation: {message}")


@dataclass(frozen=True)
class ExportInfo:
    """What the server told us about the export during the handshake."""

    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & FLAG_CAN_MULTI_CONN)


@dataclass(frozen=True)
class BlockStatus:
    """One ``base:allocation`` descriptor: ``hole`` = not allocated, ``zero`` = reads as zeros."""

    offset: int
    length: int
    flags: int

    @property
    def hole(self) -> bool:
        return bool(self.flags & STATE_HOLE)

    @property
    def zero(self) -> bool:
        return bool(self.flags & STATE_ZERO)


# --- pure encoders and decoders ----------------------------------------------------------------


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_go(export_name: str, info_requests: tuple[int, ...]) -> bytes:
    """Data of NBD_OPT_GO: name length, name, number of info requests, the requests."""
    name = export_name.encode()
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(f">H{len(info_requests)}H", len(info_requests), *info_requests)
    )


def encode_meta_context(export_name: str, queries: tuple[str, ...]) -> bytes:
    """Data of NBD_OPT_SET_META_CONTEXT: export name, then the counted list of queries."""
    name = export_name.encode()
    parts = [struct.pack(">I", len(name)), name, struct.pack(">I", len(queries))]
    for query in queries:
        raw = query.encode()
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


def encode_request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def option_error_message(reply_type: int, data: bytes) -> str:
    """Human message for an error reply to an option; the server's own text wins if it sent one."""
    text = data.decode("utf-8", "replace").strip()
    known = _REP_ERRORS.get(reply_type, f"error reply 0x{reply_type:08x}")
    return f"{known}: {text}" if text else known


def decode_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Payload of NBD_REPLY_TYPE_BLOCK_STATUS -> (context id, [(length, flags), ...])."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise _protocol_error(f"block status payload of {len(payload)} bytes")
    (context_id,) = struct.unpack_from(">I", payload)
    descriptors = list(struct.iter_unpack(">II", payload[4:]))
    if any(length == 0 for length, _ in descriptors):
        raise _protocol_error("block status descriptor of length 0")
    return context_id, descriptors


def aligned_span(offset: int, length: int, minimum: int, size: int) -> tuple[int, int]:
    """Widen ``[offset, offset+length)`` to multiples of ``minimum``, never past ``size``.

    The end is clamped to the export size, which the spec lets servers leave unaligned; a
    request touching the unaligned tail is then the only kind that ends off the grid.
    """
    start = offset - offset % minimum
    end = offset + length
    end = min(size, end + (-end) % minimum)
    return start, end


# --- the client --------------------------------------------------------------------------------


class NbdClient:
    """One NBD connection in transmission phase (see the module docstring for the contract)."""

    def __init__(self, sock: socket.socket, export_name: str = "", *, allocation: bool = False):
        self._sock: socket.socket | None = sock
        self._cookie = 0
        self._structured = False
        self._allocation_id: int | None = None
        self._haggling = False
        try:
            self.info = self._handshake(export_name, allocation)
        except BaseException:
            if self._haggling and self._sock is not None:
                # Giving up during option haggling is a soft disconnect: NBD_OPT_ABORT, and no
                # need to wait for its reply.
                with contextlib.suppress(OSError):
                    self._send(encode_option(OPT_ABORT))
            self._drop()
            raise
        self._haggling = False
        self.size = self.info.size
        minimum = max(1, self.info.min_block)
        self._min_block = minimum
        # The largest request: within the server's maximum and ours, and a multiple of the minimum.
        limit = min(self.info.max_block, MAX_REQUEST)
        self._max_request = max(minimum, limit - limit % minimum)

    @classmethod
    def connect_unix(
        cls,
        path: str,
        export_name: str = "",
        *,
        allocation: bool = False,
        timeout: float | None = None,
    ) -> NbdClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, export_name, allocation=allocation)

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def allocation(self) -> bool:
        """True when ``block_status`` is available (base:allocation was negotiated)."""
        return self._allocation_id is not None

    # --- handshake -----------------------------------------------------------------------------

    def _handshake(self, export_name: str, allocation: bool) -> ExportInfo:
        magic, second = struct.unpack(">QQ", self._recv(16))
        if magic != NBDMAGIC:
            raise _protocol_error("not an NBD server (bad initial magic)")
        if second == OLDSTYLE_MAGIC:
            raise _protocol_error("oldstyle negotiation is not supported")
        if second != IHAVEOPT:
            raise _protocol_error("bad newstyle magic")
        (server_flags,) = struct.unpack(">H", self._recv(2))
        client_flags = 0
        if server_flags & FLAG_FIXED_NEWSTYLE:
            client_flags |= FLAG_C_FIXED_NEWSTYLE
        no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
        if no_zeroes:
            client_flags |= FLAG_C_NO_ZEROES
        self._send(struct.pack(">I", client_flags))
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            if allocation:
                raise NbdError(errno.EOPNOTSUPP, "NBD server cannot report allocation (old)")
            # A plain newstyle server knows only NBD_OPT_EXPORT_NAME.
            return self._export_name(export_name, no_zeroes)
        self._haggling = True
        if allocation:
            self._negotiate_allocation(export_name)
        return self._go(export_name, no_zeroes)

    def _negotiate_allocation(self, export_name: str) -> None:
        reply, data = self._option(OPT_STRUCTURED_REPLY)
        if reply != REP_ACK:
            raise NbdError(
                errno.EOPNOTSUPP,
                "NBD server cannot report allocation (structured replies: "
                f"{option_error_message(reply, data)})",
            )
        self._structured = True
        self._send(
            encode_option(
                OPT_SET_META_CONTEXT, encode_meta_context(export_name, (BASE_ALLOCATION,))
            )
        )
        while True:
            reply, data = self._option_reply(OPT_SET_META_CONTEXT)
            if reply == REP_META_CONTEXT:
                if len(data) < 4:
                    raise _protocol_error("short meta context reply")
                (context_id,) = struct.unpack_from(">I", data)
                if data[4:].decode("utf-8", "replace") == BASE_ALLOCATION:
                    self._allocation_id = context_id
            elif reply == REP_ACK:
                break
            elif reply & REP_FLAG_ERROR:
                raise NbdError(errno.EOPNOTSUPP, option_error_message(reply, data))
            else:
                raise _protocol_error(f"unexpected reply {reply} to SET_META_CONTEXT")
        if self._allocation_id is None:
            raise NbdError(errno.EOPNOTSUPP, f"NBD server does not offer {BASE_ALLOCATION}")

    def _go(self, export_name: str, no_zeroes: bool) -> ExportInfo:
        self._send(encode_option(OPT_GO, encode_go(export_name, (INFO_EXPORT, INFO_BLOCK_SIZE))))
        size: int | None = None
        flags = 0
        blocks = (DEFAULT_MIN_BLOCK, 4096, MAX_REQUEST)
        while True:
            reply, data = self._option_reply(OPT_GO)
            if reply == REP_INFO:
                if len(data) < 2:
                    raise _protocol_error("short NBD_REP_INFO")
                (kind,) = struct.unpack_from(">H", data)
                if kind == INFO_EXPORT and len(data) == 12:
                    size, flags = struct.unpack_from(">QH", data, 2)
                elif kind == INFO_BLOCK_SIZE and len(data) == 14:
                    blocks = struct.unpack_from(">III", data, 2)
                # Unknown information types MUST be ignored by clients.
            elif reply == REP_ACK:
                break
            elif reply == REP_ERR_UNSUP:
                # An old server: NBD_OPT_EXPORT_NAME is the only way in (it cannot report errors).
                return self._export_name(export_name, no_zeroes)
            elif reply & REP_FLAG_ERROR:
                code = errno.ENOENT if reply == REP_ERR_UNKNOWN else errno.EIO
                message = option_error_message(reply, data)
                raise NbdError(code, f"NBD export {export_name!r}: {message}")
            else:
                raise _protocol_error(f"unexpected reply {reply} to NBD_OPT_GO")
        if size is None:
            raise _protocol_error("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        minimum, preferred, maximum = blocks
        if minimum < 1 or minimum & (minimum - 1) or maximum < minimum:
            raise _protocol_error(f"invalid block size constraints {blocks}")
        return ExportInfo(size, flags, minimum, preferred, maximum)

    def _export_name(self, export_name: str, no_zeroes: bool) -> ExportInfo:
        self._send(encode_option(OPT_EXPORT_NAME, export_name.encode()))
        size, flags = struct.unpack(">QH", self._recv(10))
        if not no_zeroes:
            self._recv(124)
        return ExportInfo(size, flags, DEFAULT_MIN_BLOCK, 4096, MAX_REQUEST)

    def _option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        self._send(encode_option(option, data))
        return self._option_reply(option)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, replied_to, reply, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
        if magic != OPTION_REPLY_MAGIC:
            raise _protocol_error("bad option reply magic")
        if replied_to != option:
            raise _protocol_error(f"reply to option {replied_to}, expected {option}")
        if length > MAX_OPTION_REPLY:
            raise _protocol_error(f"option reply of {length} bytes")
        return reply, self._recv(length) if length else b""

    # --- transmission --------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the export, cut short at its end."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        start, stop = aligned_span(offset, end - offset, self._min_block, self.size)
        buf = bytearray(stop - start)
        view = memoryview(buf)
        pos = start
        while pos < stop:
            piece = min(self._max_request, stop - pos)
            self._read_into(view[pos - start : pos - start + piece], pos)
            pos += piece
        return bytes(view[offset - start : end - start])

    def block_status(self, offset: int, length: int) -> list[BlockStatus]:
        """Allocation of ``[offset, offset+length)``; may describe less than asked, never more.

        The first descriptor starts at ``offset``; descriptors are trimmed to the asked range.
        """
        if self._allocation_id is None:
            raise NbdError(errno.EOPNOTSUPP, "block status was not negotiated (allocation=False)")
        end = min(offset + length, self.size)
        if offset < 0 or offset >= end:
            return []
        # The length field has 32 bits; 2 GiB is a multiple of any sane minimum block size.
        start, stop = aligned_span(offset, min(end - offset, 1 << 31), self._min_block, self.size)
        cookie = self._request(CMD_BLOCK_STATUS, start, stop - start)
        descriptors: list[tuple[int, int]] | None = None
        error: NbdError | None = None
        while True:
            flags, kind, payload = self._structured_chunk(cookie)
            if kind == REPLY_TYPE_BLOCK_STATUS:
                context_id, found = decode_block_status(payload)
                if context_id == self._allocation_id:
                    descriptors = found
            elif kind & REPLY_TYPE_ERROR_BIT:
                error = error or self._chunk_error(payload)
            elif kind != REPLY_TYPE_NONE:
                self._violation(f"chunk type {kind} in a block status reply")
            if flags & REPLY_FLAG_DONE:
                break
        if error is not None:
            self._after_error(error)
            raise error
        if not descriptors:
            self._violation("block status reply without base:allocation descriptors")
        result: list[BlockStatus] = []
        pos = start
        for run, state in descriptors:
            lo, hi = max(pos, offset), min(pos + run, end)
            if hi > lo:
                result.append(BlockStatus(lo, hi - lo, state))
            pos += run
            if pos >= end:
                break
        if pos > stop:
            self._violation("block status descriptors longer than the request")
        return result

    def allocation_map(self) -> Iterator[BlockStatus]:
        """Block status of the whole export, in order, adjacent equal states merged."""
        pos = 0
        pending: BlockStatus | None = None
        while pos < self.size:
            described = self.block_status(pos, self.size - pos)
            if not described:
                self._violation(f"block status made no progress at offset {pos}")
            for status in described:
                if pending is not None and pending.flags == status.flags:
                    pending = BlockStatus(
                        pending.offset, pending.length + status.length, pending.flags
                    )
                else:
                    if pending is not None:
                        yield pending
                    pending = status
                pos = status.offset + status.length
        if pending is not None:
            yield pending

    def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC, no reply) and close the socket; idempotent."""
        if self._sock is None:
            return
        try:
            self._send(encode_request(CMD_DISC, self._next_cookie(), 0, 0))
        except OSError:
            pass  # the server is already gone: nothing more to say to it
        finally:
            self._drop()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _next_cookie(self) -> int:
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        return self._cookie

    def _request(self, command: int, offset: int, length: int) -> int:
        cookie = self._next_cookie()
        self._send(encode_request(command, cookie, offset, length))
        return cookie

    def _read_into(self, view: memoryview, offset: int) -> None:
        cookie = self._request(CMD_READ, offset, len(view))
        if self._structured:
            self._read_structured(view, offset, cookie)
            return
        magic, error, replied = _SIMPLE_REPLY.unpack(self._recv(_SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            self._violation(f"reply magic 0x{magic:08x}")
        if replied != cookie:
            self._violation(f"reply to cookie {replied}, expected {cookie}")
        if error:
            failure = NbdError(error, f"NBD read at {offset}: {os.strerror(error)}")
            self._after_error(failure)
            raise failure
        self._recv_into(view)

    def _read_structured(self, view: memoryview, offset: int, cookie: int) -> None:
        """Reassemble a structured read reply; holes are zero-filled, coverage is checked."""
        end = offset + len(view)
        covered: list[tuple[int, int]] = []
        error: NbdError | None = None
        while True:
            flags, kind, length = self._structured_header(cookie)
            if kind == REPLY_TYPE_OFFSET_DATA:
                if length < 9:
                    self._violation("short OFFSET_DATA chunk")
                (at,) = struct.unpack(">Q", self._recv(8))
                size = length - 8
                if at < offset or at + size > end:
                    self._violation("OFFSET_DATA outside the request")
                self._recv_into(view[at - offset : at - offset + size])
                covered.append((at, at + size))
            elif kind == REPLY_TYPE_OFFSET_HOLE:
                if length != 12:
                    self._violation("OFFSET_HOLE chunk of wrong length")
                at, size = struct.unpack(">QI", self._recv(12))
                if size == 0 or at < offset or at + size > end:
                    self._violation("OFFSET_HOLE outside the request")
                view[at - offset : at - offset + size] = bytes(size)
                covered.append((at, at + size))
            elif kind & REPLY_TYPE_ERROR_BIT:
                if length > MAX_OPTION_REPLY:
                    self._violation(f"error chunk of {length} bytes")
                error = error or self._chunk_error(self._recv(length) if length else b"")
            elif kind == REPLY_TYPE_NONE:
                if length:
                    self._violation("NONE chunk with a payload")
            else:
                self._violation(f"chunk type {kind} in a read reply")
            if flags & REPLY_FLAG_DONE:
                break
        if error is not None:
            self._after_error(error)
            raise error
        covered.sort()
        pos = offset
        for lo, hi in covered:
            if lo != pos:
                self._violation("read reply chunks overlap or leave gaps")
            pos = hi
        if pos != end:
            self._violation("read reply does not cover the request")

    def _structured_chunk(self, cookie: int) -> tuple[int, int, bytes]:
        flags, kind, length = self._structured_header(cookie)
        if length > MAX_REQUEST + 64:
            self._violation(f"chunk of {length} bytes")
        return flags, kind, self._recv(length) if length else b""

    def _structured_header(self, cookie: int) -> tuple[int, int, int]:
        """Header of the next reply chunk; a simple reply (allowed without payload) maps to it."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, replied = struct.unpack(">IQ", self._recv(12))
            if replied != cookie:
                self._violation(f"reply to cookie {replied}, expected {cookie}")
            if not error:
                self._violation("simple reply without error where data was due")
            failure = NbdError(error, os.strerror(error))
            self._after_error(failure)
            raise failure
        if magic != STRUCTURED_REPLY_MAGIC:
            self._violation(f"reply magic 0x{magic:08x}")
        flags, kind, replied, length = _STRUCTURED_TAIL.unpack(self._recv(_STRUCTURED_TAIL.size))
        if replied != cookie:
            self._violation(f"reply to cookie {replied}, expected {cookie}")
        return flags, kind, length

    def _chunk_error(self, payload: bytes) -> NbdError:
        if len(payload) < 6:
            self._violation("short error chunk")
        code, message_length = struct.unpack_from(">IH", payload)
        if message_length > len(payload) - 6:
            self._violation("error message longer than its chunk")
        message = payload[6 : 6 + message_length].decode("utf-8", "replace")
        return NbdError(code or errno.EIO, message or os.strerror(code or errno.EIO))

    def _after_error(self, error: NbdError) -> None:
        if error.errno == errno.ESHUTDOWN:
            self.close()  # the spec requires a soft disconnect after ESHUTDOWN

    def _violation(self, message: str) -> NoReturn:
        self._drop()
        raise _protocol_error(message)

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionError("NBD connection is closed")
        try:
            self._sock.sendall(data)
        except OSError:
            self._drop()  # a partial request leaves the stream unusable
            raise

    def _recv(self, length: int) -> bytes:
        buf = bytearray(length)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        sock = self._sock
        if sock is None:
            raise ConnectionError("NBD connection is closed")
        got = 0
        while got < len(view):
            try:
                n = sock.recv_into(view[got:])
            except OSError:
                self._drop()  # a timeout mid-reply leaves the stream out of step
                raise
            if n == 0:
                self._drop()
                raise ConnectionError("NBD server closed the connection")
            got += n
