"""Conformance of the NBD export on the wire, and its bounds, with a raw peer (``nbd_wire``).

A 34 MiB disk (so that 32 MiB reads fit) with a few data chunks is backed up once per module;
each test exports it and speaks the protocol byte by byte: zero-length reads, command flags,
oversized and malformed options, flush and cache, the in-flight bound and the handshake timeout.
The pure protocol decisions of ``image.nbd_protocol`` are tested directly at the end.
"""

from __future__ import annotations

import random
import struct
import time

import pytest
from engine_support import PASSPHRASE, SMALL_PACKS, set_engine_env
from nbd_wire import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EPERM,
    FLAG_CAN_MULTI_CONN,
    FLAG_HAS_FLAGS,
    FLAG_READ_ONLY,
    FLAG_SEND_CACHE,
    FLAG_SEND_DF,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_SERVER,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    WirePeer,
    read_data,
)

from appliance.engine import Appliance
from image import nbd_client as nbd
from image import nbd_protocol as proto
from image.nbd_client import NbdClient
from image.nbd_export import MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, export_image_over_nbd

CHUNK = 64 * 1024
MIB = 1024 * 1024
SIZE = 34 * MIB
DATA_CHUNKS = (0, 1, 2, 17, 100, 101, 300, 543)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    set_engine_env(monkeypatch)


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    base = tmp_path_factory.mktemp("nbdwire")
    rng = random.Random(11)
    data = bytearray(SIZE)
    for chunk in DATA_CHUNKS:
        data[chunk * CHUNK : (chunk + 1) * CHUNK] = rng.randbytes(CHUNK)
    disk = base / "disk.raw"
    disk.write_bytes(bytes(data))
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, pack_size=SMALL_PACKS)
    manifest = app.manifest(app.backup_image([str(disk)], "vm").point.id)
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
    handle = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "w.sock"))
    yield handle
    handle.stop()


def _structured_peer(path: str, allocation: bool = False) -> WirePeer:
    peer = WirePeer(path)
    peer.greeting()
    peer.structured_replies()
    if allocation:
        peer.set_allocation()
    size, _ = peer.go()
    assert size == SIZE
    return peer


def _simple_peer(path: str) -> tuple[WirePeer, int]:
    peer = WirePeer(path)
    peer.greeting()
    size, flags = peer.export_name()
    assert size == SIZE
    return peer, flags


def _wait_for(condition, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- 1. zero-length reads ------------------------------------------------------------------------


def test_a_zero_length_read_is_one_done_none_chunk(export, backed_up):
    _, data, _ = backed_up
    with _structured_peer(export.socket_path) as peer:
        for cookie, offset, flags in ((1, 0, 0), (2, SIZE, 0), (3, 5 * CHUNK, CMD_FLAG_DF)):
            peer.request(CMD_READ, cookie, offset, 0, flags)
            (chunk,) = peer.reply_chunks()
            assert (chunk.kind, chunk.cookie, chunk.payload, chunk.done) == (
                REPLY_TYPE_NONE,
                cookie,
                b"",
                True,
            )
        peer.request(CMD_READ, 4, SIZE + 1, 0)
        (chunk,) = peer.reply_chunks()
        assert chunk.kind == REPLY_TYPE_ERROR and chunk.error()[0] == EINVAL
        # Nothing trails the empty replies: the next reply is the next request's.
        peer.request(CMD_READ, 5, CHUNK - 4, 8)
        assert read_data(peer.reply_chunks(), CHUNK - 4, 8) == data[CHUNK - 4 : CHUNK + 4]
    assert export.errors == []


def test_a_zero_length_simple_read_is_a_reply_without_data(export, backed_up):
    _, data, _ = backed_up
    peer, _ = _simple_peer(export.socket_path)
    with peer:
        peer.request(CMD_READ, 1, 3 * CHUNK, 0)
        assert peer.simple_reply() == (0, 1, b"")
        peer.request(CMD_READ, 2, 0, 16)
        assert peer.simple_reply(16) == (0, 2, data[:16])


# --- 2. requests in flight -----------------------------------------------------------------------


def _flood(path: str, data: bytes, count: int, length: int, export, settled) -> tuple[int, int]:
    """Send ``count`` reads without reading a reply; once ``settled`` holds, read them all."""
    with _structured_peer(path) as peer:
        offsets = {cookie: (cookie * 3 * CHUNK) % (SIZE - length + 1) for cookie in range(count)}
        for cookie, offset in offsets.items():
            peer.request(CMD_READ, cookie, offset, length)
        assert _wait_for(settled), (export.peak_in_flight, export.peak_in_flight_bytes)
        time.sleep(0.3)  # room for the server to overshoot, if it would
        peaks = (export.peak_in_flight, export.peak_in_flight_bytes)
        seen = set()
        for _ in range(count):
            chunks = peer.reply_chunks()
            cookie = chunks[0].cookie
            offset = offsets[cookie]
            assert read_data(chunks, offset, length) == data[offset : offset + length]
            seen.add(cookie)
        assert seen == set(offsets)
        peer.request(CMD_DISC, count)
    return peaks


def test_requests_in_flight_are_bounded_by_count(export, backed_up):
    _, data, _ = backed_up
    peak, peak_bytes = _flood(
        export.socket_path,
        data,
        40,
        MIB,
        export,
        lambda: export.peak_in_flight >= MAX_IN_FLIGHT,
    )
    assert peak == MAX_IN_FLIGHT == 16
    assert peak_bytes == MAX_IN_FLIGHT * MIB
    assert export.peak_in_flight == MAX_IN_FLIGHT  # reading the replies did not overshoot
    assert export.stats.reads == 40


def test_read_reply_bytes_in_flight_are_bounded(export, backed_up):
    _, data, _ = backed_up
    length = 32 * MIB
    peak, peak_bytes = _flood(
        export.socket_path,
        data,
        40,
        length,
        export,
        lambda: export.peak_in_flight_bytes >= MAX_IN_FLIGHT_BYTES,
    )
    assert peak_bytes == MAX_IN_FLIGHT_BYTES == 2 * length
    assert peak == 2  # 16 requests would have held 512 MiB of replies
    assert export.peak_in_flight_bytes == MAX_IN_FLIGHT_BYTES
    assert export.stats.reads == 40


# --- 3. the handshake timeout --------------------------------------------------------------------


def test_a_client_that_says_nothing_is_disconnected(app, backed_up, tmp_path):
    _, data, manifest = backed_up
    handle = export_image_over_nbd(
        app.repo, manifest, "disk", str(tmp_path / "t.sock"), handshake_timeout=0.3
    )
    try:
        silent = WirePeer(handle.socket_path)  # never reads nor writes
        half = WirePeer(handle.socket_path)
        half.greeting()
        half.send(struct.pack(">QI", 0x49484156454F5054, OPT_GO))  # half an option header
        with silent, half:
            assert silent.closed_by_server(within=5)
            assert half.closed_by_server(within=5)
        assert _wait_for(lambda: handle.open_connections == 0, within=5)
        # A client that completes its handshake in time is served, and stays: the timeout
        # covers the handshake only, not an idle transmission phase.
        with NbdClient.connect_unix(handle.socket_path, "disk") as client:
            time.sleep(0.6)
            assert client.pread(CHUNK, 100) == data[CHUNK : CHUNK + 100]
            assert handle.open_connections == 1
    finally:
        handle.stop()


# --- 4. NBD_OPT_LIST with data -------------------------------------------------------------------


def test_opt_list_with_data_is_invalid_and_the_handshake_goes_on(export, backed_up):
    _, data, _ = backed_up
    with WirePeer(export.socket_path) as peer:
        peer.greeting()
        peer.send_option(OPT_LIST, b"nonsense")
        ((kind, _),) = peer.option_replies(OPT_LIST)
        assert kind == REP_ERR_INVALID
        peer.send_option(OPT_LIST)
        (server, ack) = peer.option_replies(OPT_LIST)
        assert server == (REP_SERVER, struct.pack(">I", 4) + b"disk") and ack == (REP_ACK, b"")
        peer.go()
        peer.request(CMD_READ, 1, 0, 64)
        assert peer.simple_reply(64) == (0, 1, data[:64])


# --- 5. command flags ----------------------------------------------------------------------------


def test_unknown_or_inapplicable_command_flags_are_einval(export, backed_up):
    _, data, _ = backed_up
    with _structured_peer(export.socket_path, allocation=True) as peer:

        def error_of(command: int, flags: int, offset: int = 0, length: int = 512) -> int:
            peer.request(command, 7, offset, length, flags)
            if command == CMD_WRITE:
                peer.send(b"\xaa" * length)
            (chunk,) = peer.reply_chunks()
            assert chunk.cookie == 7 and chunk.done
            return chunk.error()[0] if chunk.kind & (1 << 15) else 0

        assert error_of(CMD_READ, 1 << 15) == EINVAL  # no such flag
        assert error_of(CMD_READ, CMD_FLAG_FUA) == EINVAL  # NBD_FLAG_SEND_FUA not advertised
        assert error_of(CMD_READ, CMD_FLAG_REQ_ONE) == EINVAL  # a block status flag
        assert error_of(CMD_BLOCK_STATUS, CMD_FLAG_DF) == EINVAL
        assert error_of(CMD_CACHE, CMD_FLAG_FUA) == EINVAL
        assert error_of(CMD_FLUSH, CMD_FLAG_NO_HOLE, 0, 0) == EINVAL
        assert error_of(99, CMD_FLAG_DF) == EINVAL  # an unknown command, whatever its flags
        # Writes are refused as writes: EPERM, whatever flags they carry (a read-only export).
        assert error_of(CMD_WRITE, CMD_FLAG_FUA) == EPERM
        assert error_of(CMD_TRIM, CMD_FLAG_FUA) == EPERM
        assert error_of(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) == EPERM
        # The documented flags work, and the connection survived every refusal.
        peer.request(CMD_READ, 8, 2 * CHUNK, 3 * CHUNK, CMD_FLAG_DF)
        chunks = peer.reply_chunks()
        assert [c.kind for c in chunks] == [REPLY_TYPE_OFFSET_DATA]  # one content chunk
        assert read_data(chunks, 2 * CHUNK, 3 * CHUNK) == data[2 * CHUNK : 5 * CHUNK]
        peer.request(CMD_BLOCK_STATUS, 9, 0, 10 * CHUNK, CMD_FLAG_REQ_ONE)
        (chunk,) = peer.reply_chunks()
        assert chunk.kind == REPLY_TYPE_BLOCK_STATUS and len(chunk.payload) == 4 + 8
        assert struct.unpack_from(">II", chunk.payload, 4) == (3 * CHUNK, 0)


def test_df_is_einval_without_structured_replies(export):
    peer, flags = _simple_peer(export.socket_path)
    with peer:
        assert not flags & FLAG_SEND_DF  # the spec: never advertised without structured replies
        peer.request(CMD_READ, 1, 0, 512, CMD_FLAG_DF)
        assert peer.simple_reply(512) == (EINVAL, 1, b"")
        peer.request(CMD_FLUSH, 2, 0, 0, CMD_FLAG_FUA)
        assert peer.simple_reply() == (EINVAL, 2, b"")


# --- 6. oversized options ------------------------------------------------------------------------


def test_oversized_option_data_is_too_big_and_the_handshake_goes_on(export, backed_up):
    _, data, _ = backed_up
    with WirePeer(export.socket_path) as peer:
        peer.greeting()
        peer.send_option(OPT_GO, b"\x00" * (64 * 1024 + 1))
        ((kind, message),) = peer.option_replies(OPT_GO)
        assert kind == REP_ERR_TOO_BIG and b"64 KiB" in message
        peer.send_option(99, b"\x01" * (4 * MIB))  # an unknown option, larger still
        assert [k for k, _ in peer.option_replies(99)] == [REP_ERR_TOO_BIG]
        peer.send_option(OPT_GO, b"\x00" * (64 * 1024))  # the limit itself is read and parsed
        assert [k for k, _ in peer.option_replies(OPT_GO)] == [REP_ERR_INVALID]
        peer.go()
        peer.request(CMD_READ, 1, 17 * CHUNK, 32)
        assert peer.simple_reply(32) == (0, 1, data[17 * CHUNK : 17 * CHUNK + 32])


def test_absurd_option_data_or_an_oversized_export_name_hang_up(export):
    with WirePeer(export.socket_path) as peer:
        peer.greeting()
        peer.send_option(OPT_GO, b"", length=17 * MIB)  # the data is never sent
        assert peer.closed_by_server(within=5)
    with WirePeer(export.socket_path) as peer:
        peer.greeting()
        # NBD_OPT_EXPORT_NAME cannot be answered with an error: the spec's answer is to hang up.
        peer.send_option(OPT_EXPORT_NAME, b"d" * (64 * 1024 + 1))
        assert peer.closed_by_server(within=5)


# --- 7. flush and cache --------------------------------------------------------------------------


def test_flush_and_cache_are_advertised_and_served(export, backed_up):
    _, data, _ = backed_up
    peer, flags = _simple_peer(export.socket_path)
    with peer:
        expected = (
            FLAG_HAS_FLAGS
            | FLAG_READ_ONLY
            | FLAG_SEND_FLUSH
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
        )
        assert flags == expected and not flags & FLAG_SEND_FUA
        peer.request(CMD_FLUSH, 1)
        assert peer.simple_reply() == (0, 1, b"")
        peer.request(CMD_CACHE, 2, 99 * CHUNK, 4 * CHUNK)  # data chunks 100 and 101
        assert peer.simple_reply() == (0, 2, b"")
    stats = export.stats
    assert stats.chunks_cached == 2 and stats.chunks_from_store == 2
    with _structured_peer(export.socket_path) as peer:
        peer.request(CMD_FLUSH, 3)
        (chunk,) = peer.reply_chunks()
        assert (chunk.kind, chunk.done, chunk.cookie) == (REPLY_TYPE_NONE, True, 3)
        peer.request(CMD_CACHE, 4, SIZE - CHUNK, 2 * CHUNK)  # past the end
        (chunk,) = peer.reply_chunks()
        assert chunk.error()[0] == EINVAL
        peer.request(CMD_READ, 5, 100 * CHUNK, 2 * CHUNK)
        assert (
            read_data(peer.reply_chunks(), 100 * CHUNK, 2 * CHUNK)
            == (data[100 * CHUNK : 102 * CHUNK])
        )
    assert export.stats.chunks_from_store == 2  # the read was answered from the cache


def test_go_advertises_df_with_structured_replies(export):
    with WirePeer(export.socket_path) as peer:
        peer.greeting()
        peer.structured_replies()
        _, flags = peer.go()
        assert flags & FLAG_SEND_DF and flags & FLAG_SEND_FLUSH and flags & FLAG_SEND_CACHE


# --- the pure protocol decisions -----------------------------------------------------------------


def test_command_flag_rules():
    assert proto.command_flags_error(nbd.CMD_READ, nbd.CMD_FLAG_DF, structured=True) is None
    assert proto.command_flags_error(nbd.CMD_READ, nbd.CMD_FLAG_DF, structured=False)
    assert proto.command_flags_error(nbd.CMD_BLOCK_STATUS, nbd.CMD_FLAG_REQ_ONE, True) is None
    assert proto.command_flags_error(nbd.CMD_CACHE, nbd.CMD_FLAG_FUA, True)
    assert proto.command_flags_error(nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, True) is None  # EPERM
    assert proto.command_flags_error(42, 0xFFFF, True) is None  # EINVAL as a command


def test_option_data_rules():
    assert proto.option_data_action(nbd.OPT_GO, proto.MAX_OPTION_DATA) == "read"
    assert proto.option_data_action(nbd.OPT_GO, proto.MAX_OPTION_DATA + 1) == "discard"
    assert proto.option_data_action(nbd.OPT_GO, proto.MAX_OPTION_DISCARD + 1) == "disconnect"
    assert proto.option_data_action(nbd.OPT_EXPORT_NAME, proto.MAX_OPTION_DATA + 1) == (
        "disconnect"
    )


def test_reply_encoders_follow_the_spec():
    with pytest.raises(ValueError):
        proto.offset_data_header(1, 0, 0)
    error = proto.structured_error(5, 5, "é" * 3000, offset=4096)
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", error)
    assert (magic, flags, kind, cookie) == (0x668E33EF, 1, (1 << 15) + 2, 5)
    code, message_length = struct.unpack_from(">IH", error, 20)
    assert code == 5 and message_length <= 4096 and length == 6 + message_length + 8
    error[26 : 26 + message_length].decode()  # cut on a character boundary
    assert struct.unpack_from(">Q", error, 26 + message_length) == (4096,)
    assert proto.transmission_flags(False) & nbd.FLAG_SEND_DF == 0
    assert proto.transmission_flags(True) & nbd.FLAG_SEND_DF
    with pytest.raises(ValueError):
        proto.parse_info_request(struct.pack(">I", 10) + b"abc")
    assert proto.parse_info_request(struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3)) == (
        "disk",
        (3,),
    )


def test_option_answers():
    facts = proto.ExportFacts("disk", SIZE, CHUNK, 32 * MIB, "point p disk disk (read-only)")
    reply = proto.list_reply(nbd.OPT_LIST, b"x", facts)
    assert struct.unpack_from(">QIII", reply)[2] == nbd.REP_ERR_INVALID
    go = struct.pack(">I", 5) + b"other" + struct.pack(">H", 0)
    reply, ok = proto.info_reply(nbd.OPT_GO, go, facts, structured=True)
    assert not ok and struct.unpack_from(">QIII", reply)[2] == nbd.REP_ERR_UNKNOWN
    go = struct.pack(">I", 0) + struct.pack(">HH", 1, nbd.INFO_DESCRIPTION)
    reply, ok = proto.info_reply(nbd.OPT_GO, go, facts, structured=False)
    assert ok and b"point p disk disk (read-only)" in reply
    _, _, kind, length = struct.unpack_from(">QIII", reply)
    assert kind == nbd.REP_INFO and length == 12
    flags = (
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
    )
    assert struct.unpack_from(">HQH", reply, 20) == (nbd.INFO_EXPORT, SIZE, flags)
    query = b"base:allocation"
    select = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(query)) + query
    assert proto.meta_context_reply(nbd.OPT_SET_META_CONTEXT, select, facts, True)[1]
    # Without structured replies the SET fails, and a failed SET selects nothing (the spec).
    reply, selected = proto.meta_context_reply(nbd.OPT_SET_META_CONTEXT, select, facts, False)
    assert not selected and struct.unpack_from(">QIII", reply)[2] == nbd.REP_ERR_INVALID
    assert not proto.meta_context_reply(nbd.OPT_LIST_META_CONTEXT, select, facts, True)[1]
