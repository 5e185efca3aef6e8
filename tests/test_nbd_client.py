"""The NBD client (image/nbd_client.py): against a real qemu-nbd serving a qcow2 image of a known
source, and against a scripted server for the protocol's corners."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from image_fixtures import MiB, Source, convert_all, make_source, require_qemu_utils

from appliance.backup import disks
from appliance.backup.disks import Extent
from image import nbd_client as nbd
from image.disk_source import qemu_nbd_argv
from image.nbd_client import NbdClient, NbdError


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return make_source(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="session")
def images(source: Source, tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_qemu_utils()
    return convert_all(source, tmp_path_factory.mktemp("images"))


# --- the NBD client against qemu-nbd -----------------------------------------------------------


@pytest.fixture
def nbd_server(images: dict, tmp_path: Path) -> Iterator[str]:
    """A qemu-nbd of our own for the qcow2 image, serving up to 4 clients."""
    sock = str(tmp_path / "nbd.sock")
    argv = qemu_nbd_argv(str(images["qcow2"]), "qcow2", sock, shared=4)
    proc = subprocess.Popen([*argv[:-1], "--persistent", argv[-1]])
    try:
        # The socket file appears at bind(), before qemu-nbd listens: wait for a connection.
        for _ in range(2000):
            assert proc.poll() is None, "qemu-nbd exited"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(sock)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    threading.Event().wait(0.005)
        yield sock
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.qemu
def test_nbd_client_simple_replies(nbd_server: str, source: Source) -> None:
    with NbdClient.connect_unix(nbd_server, "disk") as client:
        assert client.size == source.size
        assert client.info.read_only and client.info.can_multi_conn
        assert not client.allocation
        assert client.pread(3, 70000) == source.content[3:70003]
        assert client.pread(0, client.size) == source.content
        with pytest.raises(NbdError):
            client.block_status(0, 4096)
    assert client.closed


@pytest.mark.qemu
def test_nbd_client_block_status_matches_qemu_img_map(
    nbd_server: str, source: Source, images: dict
) -> None:
    with NbdClient.connect_unix(nbd_server, "disk", allocation=True) as client:
        assert client.allocation
        # Reads now arrive as structured replies, holes as OFFSET_HOLE chunks.
        for offset, length in [(0, source.size), (MiB - 5, 6 * MiB), (source.size - 3, 100)]:
            assert client.pread(offset, length) == source.content[offset : offset + length]
        statuses = list(client.allocation_map())
        as_extents = [Extent(s.offset, s.length, s.zero) for s in statuses]
        with closing(disks.open_disk(str(images["qcow2"]))) as disk:
            assert as_extents == list(disk.extents())
        assert all(s.hole == s.zero for s in statuses)
        inner = client.block_status(2 * MiB + 100, 1000)
        assert inner == [nbd.BlockStatus(2 * MiB + 100, 1000, nbd.STATE_HOLE | nbd.STATE_ZERO)]


@pytest.mark.qemu
def test_nbd_unknown_export_is_refused(nbd_server: str) -> None:
    with pytest.raises(NbdError, match="no such export") as raised:
        NbdClient.connect_unix(nbd_server, "nope")
    assert raised.value.errno == errno.ENOENT


# --- the NBD client against a scripted server (protocol corners) -------------------------------


class ScriptedServer:
    """The server side of a socketpair, driven step by step by a test in a thread."""

    def __init__(self, script: Callable[[ScriptedServer], None]) -> None:
        self.sock, self.client_sock = socket.socketpair()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,))
        self.thread.start()

    def _run(self, script: Callable[[ScriptedServer], None]) -> None:
        try:
            script(self)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close()

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise EOFError
            data += more
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greet(self, flags: int) -> int:
        self.send(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        return client_flags

    def option(self) -> tuple[int, bytes]:
        magic, option, length = struct.unpack(">QII", self.recv(16))
        assert magic == nbd.IHAVEOPT
        return option, self.recv(length)

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    def request(self) -> tuple[int, int, int, int, int]:
        magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", self.recv(28))
        assert magic == nbd.REQUEST_MAGIC
        return flags, kind, cookie, offset, length

    def finish(self) -> None:
        self.thread.join(5)
        if self.error is not None:
            raise self.error


def go_ack(server: ScriptedServer, size: int, minimum: int = 1) -> None:
    option, data = server.option()
    assert option == nbd.OPT_GO
    assert data == nbd.encode_go("", (nbd.INFO_EXPORT, nbd.INFO_BLOCK_SIZE))
    server.reply(option, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, size, 0x1 | 0x2))
    server.reply(
        option, nbd.REP_INFO, struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, minimum, 4096, MiB)
    )
    server.reply(option, nbd.REP_ACK)


def disconnect(server: ScriptedServer) -> None:
    assert server.request()[1] == nbd.CMD_DISC


def test_nbd_honours_the_minimum_block_size_and_error_replies() -> None:
    disk = bytes(range(256)) * 64  # 16 KiB
    seen: list[tuple[int, int]] = []

    def script(server: ScriptedServer) -> None:
        assert server.greet(nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) == 3
        go_ack(server, len(disk), minimum=512)
        _, _, cookie, offset, length = server.request()
        seen.append((offset, length))
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie))
        server.send(disk[offset : offset + length])
        _, _, cookie, offset, length = server.request()
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, errno.EIO, cookie))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    assert (client.info.min_block, client.info.max_block) == (512, MiB)
    assert client.pread(1000, 100) == disk[1000:1100]
    assert seen == [(512, 1024)]  # widened to the 512-byte grid, trimmed on the way back
    with pytest.raises(NbdError) as raised:
        client.pread(0, 10)
    assert raised.value.errno == errno.EIO
    assert not client.closed  # an error reply leaves the connection usable
    client.close()
    server.finish()


def test_nbd_splits_reads_at_the_maximum_block_size() -> None:
    disk = os.urandom(3 * MiB - 100)
    seen: list[tuple[int, int]] = []

    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        go_ack(server, len(disk))  # maximum 1 MiB
        for _ in range(3):
            _, _, cookie, offset, length = server.request()
            seen.append((offset, length))
            server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie))
            server.send(disk[offset : offset + length])
        disconnect(server)

    server = ScriptedServer(script)
    with NbdClient(server.client_sock) as client:
        assert client.pread(0, 5 * MiB) == disk
    assert seen == [(0, MiB), (MiB, MiB), (2 * MiB, MiB - 100)]
    server.finish()


def test_nbd_falls_back_to_export_name_on_old_servers() -> None:
    def script(server: ScriptedServer) -> None:
        assert server.greet(nbd.FLAG_FIXED_NEWSTYLE) == nbd.FLAG_C_FIXED_NEWSTYLE
        option, _ = server.option()
        server.reply(option, nbd.REP_ERR_UNSUP)
        option, name = server.option()
        assert (option, name) == (nbd.OPT_EXPORT_NAME, b"")
        server.send(struct.pack(">QH", 4096, 1) + bytes(124))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    assert client.size == 4096 and client.info.min_block == nbd.DEFAULT_MIN_BLOCK
    client.close()
    server.finish()


def test_nbd_gives_up_haggling_with_a_soft_disconnect() -> None:
    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        option, _ = server.option()
        assert option == nbd.OPT_STRUCTURED_REPLY
        server.reply(option, nbd.REP_ERR_UNSUP)
        assert server.option() == (nbd.OPT_ABORT, b"")

    server = ScriptedServer(script)
    with pytest.raises(NbdError, match="cannot report allocation") as raised:
        NbdClient(server.client_sock, allocation=True)
    assert raised.value.errno == errno.EOPNOTSUPP
    server.finish()


def test_nbd_protocol_violation_drops_the_connection() -> None:
    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        go_ack(server, 4096)
        _, _, cookie, _, _ = server.request()
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie + 1))

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    with pytest.raises(NbdError, match="cookie") as raised:
        client.pread(0, 512)
    assert raised.value.errno == errno.EPROTO
    assert client.closed
    with pytest.raises(ConnectionError):
        client.pread(0, 512)
    server.finish()


def test_nbd_structured_read_reassembles_data_and_holes() -> None:
    disk = bytes(1024) + os.urandom(1024)

    def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
        header = struct.pack(
            ">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)
        )
        return header + payload

    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        option, _ = server.option()
        assert option == nbd.OPT_STRUCTURED_REPLY
        server.reply(option, nbd.REP_ACK)
        option, data = server.option()
        assert data == nbd.encode_meta_context("", (nbd.BASE_ALLOCATION,))
        server.reply(option, nbd.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation")
        server.reply(option, nbd.REP_ACK)
        go_ack(server, len(disk))
        _, kind, cookie, offset, length = server.request()
        assert (kind, offset, length) == (nbd.CMD_READ, 0, 2048)
        server.send(
            chunk(0, nbd.REPLY_TYPE_OFFSET_DATA, cookie, struct.pack(">Q", 1024) + disk[1024:])
        )
        server.send(chunk(0, nbd.REPLY_TYPE_OFFSET_HOLE, cookie, struct.pack(">QI", 0, 1024)))
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, cookie, b""))
        _, kind, cookie, offset, length = server.request()
        assert kind == nbd.CMD_BLOCK_STATUS
        payload = struct.pack(">III", 7, 1024, 3) + struct.pack(">II", 1024, 0)
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_BLOCK_STATUS, cookie, payload))
        _, _, cookie, _, _ = server.request()
        message = b"broken sector"
        payload = struct.pack(">IH", errno.EIO, len(message)) + message
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR_BIT | 1, cookie, payload))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock, allocation=True)
    assert client.pread(0, 2048) == disk
    assert client.block_status(0, 2048) == [
        nbd.BlockStatus(0, 1024, 3),
        nbd.BlockStatus(1024, 1024, 0),
    ]
    with pytest.raises(NbdError, match="broken sector"):
        client.pread(0, 10)
    client.close()
    server.finish()


def test_nbd_pure_helpers() -> None:
    assert nbd.aligned_span(1000, 100, 512, 1 << 20) == (512, 1536)
    assert nbd.aligned_span(0, 512, 512, 1 << 20) == (0, 512)
    assert nbd.aligned_span(1000, 100, 1, 1 << 20) == (1000, 1100)
    assert nbd.aligned_span(1000, 100, 512, 1050) == (512, 1050)  # an unaligned export end
    assert nbd.encode_request(nbd.CMD_READ, 5, 4096, 512) == struct.pack(
        ">IHHQQI", 0x25609513, 0, 0, 5, 4096, 512
    )
    assert nbd.encode_go("disk", (3,)) == b"\x00\x00\x00\x04disk\x00\x01\x00\x03"
    with pytest.raises(NbdError):
        nbd.decode_block_status(struct.pack(">III", 1, 0, 0))
    assert nbd.option_error_message(nbd.REP_ERR_UNKNOWN, b"") == "no such export"
