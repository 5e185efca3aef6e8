"""The server side of the NBD wire protocol: pure encoders, parsers and decisions.

:mod:`image.nbd_connection` does the I/O; everything here is bytes in, bytes or verdicts out, so
each rule of the protocol (``doc/proto.md`` of the NetworkBlockDevice project) is tested
directly. The numbers themselves live in :mod:`image.nbd_client`, the one table of protocol
constants (never renumber); this module adds the server's limits and its choices where the spec
leaves one:

- Option data up to :data:`MAX_OPTION_DATA` is read whole. Larger data is read in pieces and
  dropped, and the option is answered ``NBD_REP_ERR_TOO_BIG``; the connection goes on. Data over
  :data:`MAX_OPTION_DISCARD` is taken for a denial of service (the spec lets a server hang up
  then), and so is an oversized ``NBD_OPT_EXPORT_NAME``, which cannot be answered with an error.
- Command flags: only the flags the spec documents for a command, and that this server
  advertised, are accepted (``NBD_CMD_FLAG_DF`` on reads once structured replies are on,
  ``NBD_CMD_FLAG_REQ_ONE`` on block status); any other flag is ``EINVAL``. Write-type commands
  (write, trim, write zeroes) are the exception: they are ``EPERM`` whatever their flags, because
  the export is read-only and that is the answer a client can act on (``EINVAL`` would invite it
  to retry without the flag, only to meet ``EPERM``).
- The transmission flags never include ``NBD_FLAG_SEND_DF`` without structured replies, as the
  spec requires.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Literal

from image import nbd_client as nbd

#: Option data read whole; anything larger is read and dropped, and refused as too big.
MAX_OPTION_DATA = 64 * 1024
#: Option data larger than this is not even read: the client is hung up on.
MAX_OPTION_DISCARD = 16 * 1024 * 1024
#: Longest string the protocol allows (export names, error messages).
MAX_STRING = 4096

REQUEST = struct.Struct(">IHHQQI")
OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")

#: Commands that would write: refused with EPERM on this read-only export.
WRITE_COMMANDS = frozenset({nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES})
#: Commands this server knows (others are EINVAL).
KNOWN_COMMANDS = frozenset(
    {
        nbd.CMD_READ,
        nbd.CMD_WRITE,
        nbd.CMD_DISC,
        nbd.CMD_FLUSH,
        nbd.CMD_TRIM,
        nbd.CMD_CACHE,
        nbd.CMD_WRITE_ZEROES,
        nbd.CMD_BLOCK_STATUS,
    }
)


class ProtocolViolation(Exception):
    """The client broke a mandatory rule: the server hangs up (a hard disconnect)."""


@dataclass(frozen=True)
class Request:
    """One transmission request, as sent (the payload of a write follows it on the wire)."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def decode_request(header: bytes) -> Request:
    magic, flags, command, cookie, offset, length = REQUEST.unpack(header)
    if magic != nbd.REQUEST_MAGIC:
        raise ProtocolViolation(f"bad request magic 0x{magic:08x}")
    return Request(flags, command, cookie, offset, length)


def transmission_flags(structured: bool) -> int:
    """What the export advertises: read-only, flush and cache served, several connections
    allowed; "don't fragment" only with structured replies (the spec forbids it otherwise)."""
    flags = (
        nbd.FLAG_HAS_FLAGS
        | nbd.FLAG_READ_ONLY
        | nbd.FLAG_SEND_FLUSH
        | nbd.FLAG_SEND_CACHE
        | nbd.FLAG_CAN_MULTI_CONN
    )
    return flags | nbd.FLAG_SEND_DF if structured else flags


def allowed_command_flags(command: int, structured: bool) -> int:
    """The command flags accepted on ``command`` (``NBD_CMD_FLAG_FUA`` never is: the export
    does not advertise ``NBD_FLAG_SEND_FUA``)."""
    if command == nbd.CMD_READ:
        return nbd.CMD_FLAG_DF if structured else 0
    if command == nbd.CMD_BLOCK_STATUS:
        return nbd.CMD_FLAG_REQ_ONE
    return 0


def command_flags_error(command: int, flags: int, structured: bool) -> str | None:
    """Why the flags of a request are refused with EINVAL, or None when they are acceptable.

    Write-type and unknown commands are refused for what they are (EPERM, EINVAL) whatever
    their flags, so this says None for them."""
    if command in WRITE_COMMANDS or command not in KNOWN_COMMANDS:
        return None
    bad = flags & ~allowed_command_flags(command, structured)
    if bad:
        return f"command flags 0x{bad:04x} are not valid on command {command}"
    return None


OptionDataAction = Literal["read", "discard", "disconnect"]


def option_data_action(option: int, length: int) -> OptionDataAction:
    """What to do with ``length`` bytes of option data (see the module docstring)."""
    if length <= MAX_OPTION_DATA:
        return "read"
    if option == nbd.OPT_EXPORT_NAME or length > MAX_OPTION_DISCARD:
        return "disconnect"
    return "discard"


def encode_string(text: str) -> bytes:
    """``text`` as a protocol string: UTF-8, cut to :data:`MAX_STRING` bytes on a character
    boundary."""
    raw = text.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()


# --- replies ---------------------------------------------------------------------------------


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(nbd.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """The header of a simple reply (a successful read's data follows it)."""
    return _SIMPLE_REPLY.pack(nbd.SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, kind: int, length: int, done: bool = True) -> bytes:
    flags = nbd.REPLY_FLAG_DONE if done else 0
    return _STRUCTURED_REPLY.pack(nbd.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def structured_none(cookie: int) -> bytes:
    """The final chunk that says "done, no error" (valid as the whole reply to any request)."""
    return structured_header(cookie, nbd.REPLY_TYPE_NONE, 0)


def structured_error(cookie: int, error: int, message: str, offset: int | None = None) -> bytes:
    """An error chunk that ends the reply: ``NBD_REPLY_TYPE_ERROR_OFFSET`` when the failing
    offset is known (it must lie within the request), else ``NBD_REPLY_TYPE_ERROR``."""
    text = encode_string(message)
    payload = struct.pack(">IH", error, len(text)) + text
    if offset is None:
        return structured_header(cookie, nbd.REPLY_TYPE_ERROR, len(payload)) + payload
    payload += struct.pack(">Q", offset)
    return structured_header(cookie, nbd.REPLY_TYPE_ERROR_OFFSET, len(payload)) + payload


def offset_data_header(cookie: int, offset: int, data_length: int) -> bytes:
    """Header and offset of the one ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk of a read reply; the
    data follows. The spec requires at least one byte of data in such a chunk."""
    if data_length < 1:
        raise ValueError("an OFFSET_DATA chunk carries at least one byte")
    return structured_header(cookie, nbd.REPLY_TYPE_OFFSET_DATA, 8 + data_length) + struct.pack(
        ">Q", offset
    )


def block_status_chunk(cookie: int, context_id: int, descriptors: list[tuple[int, int]]) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, state) for length, state in descriptors
    )
    return structured_header(cookie, nbd.REPLY_TYPE_BLOCK_STATUS, len(payload)) + payload


# --- option data -----------------------------------------------------------------------------


def parse_info_request(data: bytes) -> tuple[str, tuple[int, ...]]:
    """Data of ``NBD_OPT_INFO``/``NBD_OPT_GO`` -> (export name, information requests).

    Raises ValueError when the data is malformed (``NBD_REP_ERR_INVALID``)."""
    try:
        (name_length,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + name_length].decode()
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            raise ValueError("option length does not match its contents")
        requests = struct.unpack_from(f">{count}H", data, 6 + name_length)
    except (struct.error, UnicodeError) as exc:
        raise ValueError(str(exc)) from exc
    return name, requests


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """Data of ``NBD_OPT_LIST_META_CONTEXT``/``NBD_OPT_SET_META_CONTEXT`` -> (export name,
    queries). Raises ValueError when the data is malformed (``NBD_REP_ERR_INVALID``)."""
    try:
        (name_length,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + name_length].decode()
        pos = 4 + name_length
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if pos + length > len(data):
                raise ValueError("a query runs past the option data")
            queries.append(data[pos : pos + length].decode())
            pos += length
        if pos != len(data):
            raise ValueError("option length does not match its contents")
    except (struct.error, UnicodeError) as exc:
        raise ValueError(str(exc)) from exc
    return name, queries


# --- option haggling -------------------------------------------------------------------------

#: Context ID of base:allocation on every connection.
ALLOCATION_CONTEXT_ID = 1


@dataclass(frozen=True)
class ExportFacts:
    """What the handshake tells a client about the one export."""

    name: str
    size: int
    preferred_block: int
    max_block: int
    description: str

    def selects(self, name: str) -> bool:
        """The empty name (QEMU's default) and the export's own name both select it."""
        return name in ("", self.name)


def list_reply(option: int, data: bytes, facts: ExportFacts) -> bytes:
    """The answer to ``NBD_OPT_LIST``: the one export, or ``NBD_REP_ERR_INVALID`` when the
    client sent data (the spec: it MUST NOT, and the server SHOULD refuse it so)."""
    if data:
        return option_reply(option, nbd.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
    name = facts.name.encode()
    return option_reply(option, nbd.REP_SERVER, struct.pack(">I", len(name)) + name) + (
        option_reply(option, nbd.REP_ACK)
    )


def info_reply(
    option: int, data: bytes, facts: ExportFacts, structured: bool
) -> tuple[bytes, bool]:
    """The answer to ``NBD_OPT_INFO``/``NBD_OPT_GO`` and whether it ends in success (for GO:
    transmission starts). Block sizes are always sent: minimum 1, the preferred and maximum of
    ``facts``; the name and description on request."""
    try:
        name, requests = parse_info_request(data)
    except ValueError as exc:
        return option_reply(option, nbd.REP_ERR_INVALID, encode_string(str(exc))), False
    if not facts.selects(name):
        message = encode_string(f"no export named {name!r}")
        return option_reply(option, nbd.REP_ERR_UNKNOWN, message), False
    flags = transmission_flags(structured)
    infos = [
        struct.pack(">HQH", nbd.INFO_EXPORT, facts.size, flags),
        struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1, facts.preferred_block, facts.max_block),
    ]
    if nbd.INFO_NAME in requests:
        infos.append(struct.pack(">H", nbd.INFO_NAME) + encode_string(facts.name))
    if nbd.INFO_DESCRIPTION in requests:
        infos.append(struct.pack(">H", nbd.INFO_DESCRIPTION) + encode_string(facts.description))
    replies = [option_reply(option, nbd.REP_INFO, info) for info in infos]
    return b"".join(replies) + option_reply(option, nbd.REP_ACK), True


def meta_context_reply(
    option: int, data: bytes, facts: ExportFacts, structured: bool
) -> tuple[bytes, bool]:
    """The answer to ``NBD_OPT_LIST_META_CONTEXT``/``NBD_OPT_SET_META_CONTEXT``, and whether
    base:allocation is selected afterwards (for SET; a failed SET selects nothing, as the spec
    says; for LIST, False)."""
    try:
        name, queries = parse_meta_context_request(data)
    except ValueError as exc:
        return option_reply(option, nbd.REP_ERR_INVALID, encode_string(str(exc))), False
    if option == nbd.OPT_SET_META_CONTEXT and not structured:
        message = b"structured replies needed first"
        return option_reply(option, nbd.REP_ERR_INVALID, message), False
    if not facts.selects(name):
        return option_reply(option, nbd.REP_ERR_UNKNOWN), False
    context = nbd.BASE_ALLOCATION
    if option == nbd.OPT_LIST_META_CONTEXT:
        matches = not queries or any(q in ("base:", context) for q in queries)
    else:
        matches = context in queries
    replies = []
    if matches:
        payload = struct.pack(">I", ALLOCATION_CONTEXT_ID) + context.encode()
        replies.append(option_reply(option, nbd.REP_META_CONTEXT, payload))
    replies.append(option_reply(option, nbd.REP_ACK))
    return b"".join(replies), matches and option == nbd.OPT_SET_META_CONTEXT


def allocation_descriptors(
    runs: list[tuple[int, bool]],
    chunk_size: int,
    size: int,
    offset: int,
    length: int,
    limit: int,
) -> list[tuple[int, int]]:
    """Block status descriptors ``(length, NBD state flags)`` for ``[offset, offset+length)``
    clipped to ``size``, at most ``limit``; ``runs`` are ``(first chunk, all-zero?)`` in order
    (all-zero runs are ``NBD_STATE_HOLE|NBD_STATE_ZERO``)."""
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
