"""A raw NBD peer for conformance tests: the handshake and requests spoken byte by byte.

It sends what a test asks, including what a well-behaved client never would (zero-length reads,
unknown flags, oversized options), and hands back replies undecoded beyond their framing, so a
test asserts on the bytes the server put on the wire. Its constants are written out here from
the protocol (``doc/proto.md`` of the NetworkBlockDevice project) rather than imported from the
code under test, so a wrong number there cannot hide behind the same wrong number here.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0

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

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
EINVAL = 22


@dataclass(frozen=True)
class Chunk:
    """One structured reply chunk as it came off the wire."""

    flags: int
    kind: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    def error(self) -> tuple[int, str, int | None]:
        """(errno, message, offset or None) of an error chunk."""
        code, length = struct.unpack_from(">IH", self.payload)
        message = self.payload[6 : 6 + length].decode()
        rest = self.payload[6 + length :]
        if self.kind == REPLY_TYPE_ERROR_OFFSET:
            assert len(rest) == 8, "ERROR_OFFSET must end with a 64-bit offset"
            return code, message, struct.unpack(">Q", rest)[0]
        assert rest == b"", "ERROR carries nothing after its message"
        return code, message, None


class WirePeer:
    """One connection to an NBD server, driven by hand."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.handshake_flags: int | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WirePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bytes ---

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            count = self.sock.recv_into(view[got:])
            if count == 0:
                raise ConnectionError(f"server closed the connection after {got} of {n} bytes")
            got += count
        return bytes(buf)

    def closed_by_server(self, within: float) -> bool:
        """True when the server hangs up within ``within`` seconds (unread bytes are dropped)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False

    # --- handshake ---

    def greeting(self, client_flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.handshake_flags = flags
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        """An option header (``length`` may claim more than ``data`` holds) and its data."""
        size = len(data) if length is None else length
        self.send(struct.pack(">QII", IHAVEOPT, option, size) + data)

    def option_reply(self, option: int) -> tuple[int, bytes]:
        magic, replied, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC and replied == option, (hex(magic), replied, option)
        return kind, self.recv_exact(length) if length else b""

    def option_replies(self, option: int) -> list[tuple[int, bytes]]:
        """Replies up to the final one (an ACK or an error)."""
        out = []
        while True:
            kind, data = self.option_reply(option)
            out.append((kind, data))
            if kind == REP_ACK or kind & (1 << 31):
                return out

    def structured_replies(self) -> None:
        self.send_option(OPT_STRUCTURED_REPLY)
        assert self.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]

    def set_allocation(self, name: str = "disk") -> int:
        raw = name.encode()
        query = b"base:allocation"
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(query)) + query
        self.send_option(OPT_SET_META_CONTEXT, data)
        replies = self.option_replies(OPT_SET_META_CONTEXT)
        assert replies[-1] == (REP_ACK, b"") and replies[0][0] == REP_META_CONTEXT
        return int(struct.unpack_from(">I", replies[0][1])[0])

    def go(self, name: str = "disk") -> tuple[int, int]:
        """NBD_OPT_GO -> (export size, transmission flags)."""
        raw = name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        replies = self.option_replies(OPT_GO)
        assert replies[-1] == (REP_ACK, b""), replies[-1]
        for kind, data in replies[:-1]:
            assert kind == REP_INFO
            if struct.unpack_from(">H", data)[0] == INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", data, 2)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT before the ACK")

    def export_name(self, name: str = "disk") -> tuple[int, int]:
        """NBD_OPT_EXPORT_NAME (no zeroes negotiated) -> (export size, transmission flags)."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        return size, flags

    # --- transmission ---

    def request(
        self, command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0
    ) -> None:
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length))

    def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data): ``data_length`` bytes follow only a successful reply."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(data_length) if data_length and not error else b""
        return error, cookie, data

    def chunk(self) -> Chunk:
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return Chunk(flags, kind, cookie, self.recv_exact(length) if length else b"")

    def reply_chunks(self) -> list[Chunk]:
        """The chunks of one structured reply, up to the one flagged done (one cookie)."""
        chunks = [self.chunk()]
        while not chunks[-1].done:
            chunks.append(self.chunk())
        assert len({c.cookie for c in chunks}) == 1
        return chunks


def read_data(chunks: list[Chunk], offset: int, length: int) -> bytes:
    """Reassemble a successful structured read reply, checking the spec's rules on its chunks."""
    out = bytearray(length)
    covered = 0
    for chunk in chunks:
        assert not chunk.kind & (1 << 15), chunk.error()
        if chunk.kind == REPLY_TYPE_OFFSET_DATA:
            assert len(chunk.payload) >= 9, "OFFSET_DATA must carry at least one byte"
            (at,) = struct.unpack_from(">Q", chunk.payload)
            data = chunk.payload[8:]
            assert offset <= at and at + len(data) <= offset + length
            out[at - offset : at - offset + len(data)] = data
            covered += len(data)
        else:
            assert chunk.kind == REPLY_TYPE_NONE and chunk.payload == b"" and chunk.done
    assert covered == length
    return bytes(out)
