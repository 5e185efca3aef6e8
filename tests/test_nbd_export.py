"""The NBD export of an image point: the project's NBD client, qemu-img and qemu-io against it.

A synthetic disk with data, all-zero chunks and a short tail is backed up once per module; each
test exports it from the store and checks what clients see, what the store was asked for, and
that nothing was written to it. Needs qemu-utils: missing tools fail with the install hint.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, SMALL_PACKS, set_engine_env, store_digest
from nbd_wire import WirePeer, read_data

from appliance.backup.images import read_table
from appliance.engine import Appliance
from appliance.errors import ApplianceError
from appliance.store import format as fmt
from appliance.store.packs import pack_object_name
from image import nbd_client as nbd
from image.nbd_client import NbdClient, NbdError
from image.nbd_export import export_image_over_nbd, missing_blobs

CHUNK = 64 * 1024
SIZE = 40 * CHUNK + 4096  # a short last chunk


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    set_engine_env(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def _qemu_utils():
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/setup (apt-get install -y qemu-utils)")


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    base = tmp_path_factory.mktemp("nbd")
    rng = random.Random(7)
    data = bytearray(SIZE)
    for chunk in (0, 1, 2, 7, 20, 21, 39):
        data[chunk * CHUNK : (chunk + 1) * CHUNK] = rng.randbytes(CHUNK)
    data[5 * CHUNK + 100 : 5 * CHUNK + 200] = b"x" * 100  # a chunk with a little data
    data[40 * CHUNK : SIZE] = rng.randbytes(4096)
    disk = base / "disk.raw"
    disk.write_bytes(bytes(data))
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, pack_size=SMALL_PACKS)
    point = app.backup_image([str(disk)], "vm").point
    manifest = app.manifest(point.id)
    app.close()
    mp.undo()
    return base, bytes(data), manifest


@pytest.fixture
def app(backed_up):
    base, _, _ = backed_up
    appliance = Appliance.open(str(base / "app"), passphrase=PASSPHRASE)
    yield appliance
    appliance.close()


@pytest.fixture
def export(app, backed_up, tmp_path):
    _, _, manifest = backed_up
    handle = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "e.sock"))
    yield handle
    handle.stop()


def test_reads_match_the_disk_and_are_counted(export, backed_up):
    _, data, _ = backed_up
    with NbdClient.connect_unix(export.socket_path, "disk") as client:
        assert client.size == SIZE
        assert client.info.read_only and client.info.can_multi_conn
        assert client.info.min_block == 1 and client.info.preferred_block == CHUNK
        rng = random.Random(1)
        for _ in range(50):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, 3 * CHUNK)
            assert client.pread(offset, length) == data[offset : offset + length]
        assert client.pread(0, SIZE) == data
    stats = export.stats
    assert stats.reads >= 51
    assert stats.chunks_from_store == 9  # each stored chunk decoded once, then cached
    assert stats.bytes_from_store > 0
    assert stats.bytes_decoded == 8 * CHUNK + 4096
    assert stats.cache_hits > 0
    assert export.errors == []


def test_zero_chunks_are_reported_as_holes(export, backed_up):
    _, data, _ = backed_up
    with NbdClient.connect_unix(export.socket_path, "disk", allocation=True) as client:
        runs = list(client.allocation_map())
    assert sum(r.length for r in runs) == SIZE
    for run in runs:
        piece = data[run.offset : run.offset + run.length]
        if run.hole:
            assert run.zero and piece.count(0) == len(piece)
        else:
            assert piece.count(0) != len(piece) or run.length <= CHUNK
    holes = [(r.offset // CHUNK, (r.offset + r.length) // CHUNK) for r in runs if r.hole]
    assert holes == [(3, 5), (6, 7), (8, 20), (22, 39)]


def test_qemu_tools_read_the_export(export, backed_up, tmp_path):
    base, data, _ = backed_up
    uri = export.uri()
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(base / "disk.raw"), uri],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(out)], check=True)
    assert out.read_bytes() == data
    assert os.stat(out).st_blocks * 512 < SIZE  # zero chunks stayed holes
    result = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", "-c", f"read -P 0 {3 * CHUNK} {2 * CHUNK}", uri],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "read 131072/131072" in result.stdout, result.stdout
    # A qcow2 overlay over the export takes writes; the export stays unchanged.
    overlay = tmp_path / "o.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri, str(overlay)],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 4096", str(overlay)],
        check=True,
        capture_output=True,
    )
    with NbdClient.connect_unix(export.socket_path) as client:
        assert client.pread(0, 4096) == data[:4096]


def _raw_connection(path: str) -> socket.socket:
    """Handshake with NBD_OPT_EXPORT_NAME, by hand, to send requests the client never sends."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    magic, opt_magic, flags = struct.unpack(">QQH", _recv(sock, 18))
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags & nbd.FLAG_FIXED_NEWSTYLE
    sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
    sock.sendall(nbd.encode_option(nbd.OPT_EXPORT_NAME, b"disk"))
    size, tflags = struct.unpack(">QH", _recv(sock, 10))
    assert size == SIZE and tflags & nbd.FLAG_READ_ONLY
    return sock


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, "server closed the connection"
        out += data
    return out


def test_writes_trims_and_unknown_commands_are_refused(export):
    sock = _raw_connection(export.socket_path)
    try:
        sock.sendall(nbd.encode_request(nbd.CMD_WRITE, 1, 0, 512) + b"\xaa" * 512)
        assert struct.unpack(">IIQ", _recv(sock, 16)) == (nbd.SIMPLE_REPLY_MAGIC, errno.EPERM, 1)
        sock.sendall(nbd.encode_request(nbd.CMD_TRIM, 2, 0, 512))
        assert struct.unpack(">IIQ", _recv(sock, 16))[1:] == (errno.EPERM, 2)
        sock.sendall(nbd.encode_request(nbd.CMD_WRITE_ZEROES, 3, 0, 512))
        assert struct.unpack(">IIQ", _recv(sock, 16))[1:] == (errno.EPERM, 3)
        sock.sendall(nbd.encode_request(99, 4, 0, 0))
        assert struct.unpack(">IIQ", _recv(sock, 16))[1:] == (errno.EINVAL, 4)
        sock.sendall(nbd.encode_request(nbd.CMD_READ, 5, SIZE - 10, 20))
        assert struct.unpack(">IIQ", _recv(sock, 16))[1:] == (errno.EINVAL, 5)
        # The connection still works after the refusals.
        sock.sendall(nbd.encode_request(nbd.CMD_READ, 6, 0, 8))
        assert struct.unpack(">IIQ", _recv(sock, 16))[1:] == (0, 6)
        assert len(_recv(sock, 8)) == 8
        sock.sendall(nbd.encode_request(nbd.CMD_DISC, 7, 0, 0))
        assert sock.recv(1) == b""
    finally:
        sock.close()


def test_unknown_export_names_are_refused(export):
    with pytest.raises(NbdError) as info:
        NbdClient.connect_unix(export.socket_path, "other")
    assert info.value.errno == errno.ENOENT


def test_nothing_is_written_to_the_store(app, backed_up, tmp_path):
    _, _, manifest = backed_up
    store = app.data_dir.store_path
    before = store_digest(store)
    handle = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "e.sock"))
    try:
        uri = handle.uri()
        subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(tmp_path / "c")], check=True)
        subprocess.run(["qemu-img", "map", uri], check=True, capture_output=True)
    finally:
        handle.stop()
    assert not os.path.exists(tmp_path / "e.sock")
    assert store_digest(store) == before


def test_several_connections_at_once(export, backed_up):
    _, data, _ = backed_up
    clients = [NbdClient.connect_unix(export.socket_path) for _ in range(3)]
    try:
        for i, client in enumerate(clients):
            assert client.pread(i * CHUNK, CHUNK) == data[i * CHUNK : (i + 1) * CHUNK]
    finally:
        for client in clients:
            client.close()
    assert export.stats.connections == 3


def _copy_appliance(backed_up, tmp_path: Path) -> Appliance:
    base, _, _ = backed_up
    shutil.copytree(base / "app", tmp_path / "app")
    return Appliance.open(str(tmp_path / "app"), passphrase=PASSPHRASE)


def test_a_corrupt_pack_answers_eio_and_names_the_point(backed_up, tmp_path, caplog):
    _, data, manifest = backed_up
    point = manifest["point_id"]
    caplog.set_level(logging.DEBUG, logger="image.nbd_export")
    app = _copy_appliance(backed_up, tmp_path)
    try:
        table = read_table(app.repo, manifest["disks"][0])
        entry = app.repo.locate(table[20])
        path = app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind))
        with open(path, "r+b") as f:
            f.seek(entry.offset + entry.length // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        handle = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "e.sock"))
        try:
            with NbdClient.connect_unix(handle.socket_path) as client:
                assert client.pread(0, CHUNK) == data[:CHUNK]  # other chunks still read
                with pytest.raises(NbdError) as info:
                    client.pread(20 * CHUNK, 10)
                assert info.value.errno == errno.EIO
                assert client.pread(CHUNK, 10) == data[CHUNK : CHUNK + 10]
            (error,) = handle.errors
            assert error.startswith(
                f"point {manifest['point_id']} damaged: blob {table[20].hex()[:16]}"
            )
            assert entry.pack.hex()[:16] in error
            assert handle.stats.errors == 1
            # The guest's read is logged once as a warning, with the point, disk and offset.
            (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert (warning.point, warning.disk, warning.offset) == (point, "disk", 20 * CHUNK)
            text = warning.getMessage()
            assert point in text and "disk disk" in text and str(20 * CHUNK) in text
            # With structured replies the error chunk carries the failing offset and a message
            # naming the point and the disk.
            with WirePeer(handle.socket_path) as peer:
                peer.greeting()
                peer.structured_replies()
                peer.go()
                peer.request(nbd.CMD_READ, 1, 19 * CHUNK, 2 * CHUNK)
                (chunk,) = peer.reply_chunks()
                assert chunk.kind == nbd.REPLY_TYPE_ERROR_OFFSET
                code, message, offset = chunk.error()
                assert (code, offset) == (errno.EIO, 20 * CHUNK)
                assert message.startswith(f"point {point} damaged: disk disk offset {offset}")
                assert table[20].hex()[:16] in message
                peer.request(nbd.CMD_READ, 2, 0, 16)  # the connection goes on
                assert read_data(peer.reply_chunks(), 0, 16) == data[:16]
            # Our own client surfaces the message with structured replies too.
            with (
                NbdClient.connect_unix(handle.socket_path, allocation=True) as client,
                pytest.raises(NbdError, match=f"point {point} damaged: disk disk"),
            ):
                client.pread(20 * CHUNK + 5, 10)
            assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
            assert handle.errors == [error] and handle.stats.errors == 3
        finally:
            handle.stop()
    finally:
        app.close()


def test_missing_blobs_names_what_is_not_local(backed_up, tmp_path):
    _, _, manifest = backed_up
    app = _copy_appliance(backed_up, tmp_path)
    try:
        disks = manifest["disks"]
        assert missing_blobs(app.repo, disks) == {
            "tables": [],
            "blobs": 0,
            "packs": [],
            "example": "",
        }
        table = read_table(app.repo, disks[0])
        entry = app.repo.locate(table[7])
        os.unlink(app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind)))
        found = missing_blobs(app.repo, disks)
        assert found["packs"] == [entry.pack.hex()]
        # Data chunks the index forgot (a repair dropped damaged copies): counted, one named.
        data_ids = {i for i in table if i != fmt.ZERO_ID and app.repo.index.contains(i)}
        forgotten = sorted(data_ids)[:3]
        app.repo.index.remove_blobs([(i, app.repo.locate(i).pack) for i in forgotten])
        found = missing_blobs(app.repo, disks)
        assert found["tables"] == [] and found["blobs"] == len(forgotten) == 3
        assert found["example"] == forgotten[0].hex()
        # A point whose blobs the local index does not know (moved to a cold tier).
        app.repo.index.clear()
        found = missing_blobs(app.repo, disks)
        assert found["tables"] == disks[0]["tables"]
    finally:
        app.close()


def test_export_of_an_unknown_disk_or_a_files_point(app, backed_up, tmp_path):
    _, _, manifest = backed_up
    with pytest.raises(ApplianceError, match="no disk named"):
        export_image_over_nbd(app.repo, manifest, "nope", str(tmp_path / "e.sock"))
    with pytest.raises(ApplianceError, match="not a VM image point"):
        export_image_over_nbd(app.repo, {**manifest, "kind": "files"}, "disk", str(tmp_path / "x"))
