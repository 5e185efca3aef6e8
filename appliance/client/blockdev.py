"""Block devices through the client: whole disks (or raw image files) as an image point.

Each device is read front to back in large reads and cut into the store's fixed-size disk chunks
(``disk_chunk_size`` from the appliance's hello, 64 KiB by default), so the point is the same as
one the appliance makes from a disk of its own: it restores as raw or qcow2 and fails over. An
all-zero chunk is named by the zero ID and never sent. Before a device is read, the client
fetches the chunk table of the same disk (same name and size) in the asset's previous point and
sends only the chunks that differ from it at the same place and were not sent earlier in the
session; so an incremental sends what changed, though it reads the whole device (a block device
keeps no change list that the client could trust). The table itself goes up in numbered batches
(raw IDs) and the appliance checks every ID before the point is made
(:mod:`appliance.sources.ingest_image`).

A mounted device changes while it is read: take a snapshot first (``--pre 'lvcreate -s ...'``)
and back up the snapshot, or the point is only crash-consistent at best.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import blake3

from appliance.client import wire
from appliance.client.backup import (
    UploadSink,
    disk_frame,
    hello_for,
    open_session,
    send_batch,
)
from appliance.client.connection import ClientError, Connection

#: Bytes read from a device at a time.
READ_SIZE = 4 << 20
#: Chunk IDs per table batch (8 MiB of IDs, 32 GiB of disk at 64 KiB chunks).
TABLE_BATCH = 262_144
ZERO_ID = bytes(wire.ID_SIZE)


@dataclass
class ImageRequest:
    paths: list[str]
    asset: str
    host: str
    mode: str = "incremental"
    #: Regular files are backed up as raw disk images too (not only block devices).
    image_files: bool = False
    state_dir: str = "/var/lib/appliance-client"
    threads: int = 2


@dataclass(frozen=True)
class Device:
    name: str
    path: str
    size: int


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def disk_name(path: str) -> str:
    """A disk's name in the point: the path's last part, in the letters a point allows."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(path.rstrip("/")))
    return name.lstrip(".-")[:64] or "disk"


def devices_of(request: ImageRequest) -> list[Device]:
    devices: list[Device] = []
    for given in request.paths:
        path = os.path.abspath(given)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ClientError(f"{path} cannot be read: {exc.strerror}", code="no_device") from None
        if stat.S_ISREG(st.st_mode) and not request.image_files:
            raise ClientError(
                f"{path} is a file: add --image to back it up as a raw disk image",
                code="not_a_device",
            )
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ClientError(f"{path} is neither a block device nor a file", code="not_a_device")
        size = _size(path)
        if size == 0:
            raise ClientError(f"{path} is empty", code="empty_device")
        name = base = disk_name(path)
        n = 1
        while any(d.name == name for d in devices):
            n += 1
            name = f"{base[:60]}-{n}"
        devices.append(Device(name, path, size))
    return devices


def source_name(host: str, devices: list[Device]) -> str:
    paths = [d.path for d in devices]
    if len(paths) == 1:
        return f"client://{host}{paths[0]}"
    return f"client://{host}/" + ",".join(sorted(paths))


@dataclass
class _Counts:
    bytes_read: int = 0
    same_as_base: int = 0
    zero_chunks: int = 0


def run_image_backup(
    conn: Connection, request: ImageRequest, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    hello = hello_for(conn, request.asset)
    chunk_size = hello.get("disk_chunk_size")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ClientError(
            "this appliance's release takes no block devices from clients: update it",
            code="unsupported",
        )
    devices = devices_of(request)
    session, state_file, known = open_session(
        conn,
        state_dir=request.state_dir,
        asset=request.asset,
        source=source_name(request.host, devices),
        mode=request.mode,
        say=say,
        kind="image",
        disks=[{"name": d.name, "size": d.size} for d in devices],
    )
    id_key = bytes.fromhex(hello["id_key"])
    sink = UploadSink(conn, session, id_key, known, threads=request.threads, frame=disk_frame)
    counts = _Counts()
    started = time.monotonic()
    table = bytearray()
    batches = 0
    try:
        for device in devices:
            base = conn.request(
                "GET", f"/api/client/sessions/{session}/base", params={"disk": device.name}
            ).content
            chunks = (device.size + chunk_size - 1) // chunk_size
            if len(base) != chunks * wire.ID_SIZE:
                base = b""
            last_said = time.monotonic()
            for first, data, ids in _hashed(device, chunk_size, id_key, request.threads):
                counts.bytes_read += len(data)
                for k, chunk_id in enumerate(ids):
                    if chunk_id == ZERO_ID:
                        counts.zero_chunks += 1
                        continue
                    pos = (first + k) * wire.ID_SIZE
                    if base and base[pos : pos + wire.ID_SIZE] == chunk_id:
                        counts.same_as_base += 1
                    else:
                        sink.send(chunk_id, data[k * chunk_size : (k + 1) * chunk_size])
                table += b"".join(ids)
                if len(table) >= TABLE_BATCH * wire.ID_SIZE:
                    send_batch(conn, session, batches, bytes(table))
                    batches += 1
                    table.clear()
                if time.monotonic() - last_said >= 2.0:
                    last_said = time.monotonic()
                    say(
                        f"{device.name}: {(first + len(ids)) * chunk_size / 2**20:.0f} of "
                        f"{device.size / 2**20:.0f} MiB read, "
                        f"{sink.stats.bytes_sent_chunks / 2**20:.0f} MiB sent"
                    )
        if table or batches == 0:
            send_batch(conn, session, batches, bytes(table))
            batches += 1
        sink.finish()
    except BaseException:
        sink.abandon()
        raise
    stats = {
        "disks": len(devices),
        "bytes_read": counts.bytes_read,
        "chunks_new": sink.stats.chunks_new,
        "chunks_known": sink.stats.chunks_known + counts.same_as_base,
        "zero_chunks": counts.zero_chunks,
        "seconds": round(time.monotonic() - started, 3),
    }
    done = conn.post_json(
        f"/api/client/sessions/{session}/finish", {"batches": batches, "stats": stats}
    )
    os.unlink(state_file)
    return {
        "point": done["point"],
        "mode": done["mode"],
        "kind": "image",
        "stored_bytes": done.get("new_bytes", 0),
        "devices": {d.name: d.path for d in devices},
        **stats,
        "bytes_sent": conn.traffic.bytes_sent,
        "chunk_bytes_sent": sink.stats.bytes_sent_chunks,
        "retries": conn.traffic.retries,
    }


def _hashed(
    device: Device, chunk_size: int, id_key: bytes, workers: int
) -> Iterator[tuple[int, bytes, list[bytes]]]:
    """(first chunk index, bytes read, their chunk IDs) of the whole device, in order, read
    about ``READ_SIZE`` at a time. Threads read and hash a few reads ahead (``pread`` and
    BLAKE3 release the GIL), so the caller only compares and sends."""
    read_size = chunk_size * max(1, READ_SIZE // chunk_size)
    zero = bytes(chunk_size)
    fd = os.open(device.path, os.O_RDONLY)

    def read(offset: int) -> tuple[bytes, list[bytes]]:
        want = min(read_size, device.size - offset)
        data = os.pread(fd, want, offset)
        if len(data) < want:
            raise ClientError(
                f"{device.path} ended at {offset + len(data)} bytes while it was read "
                f"(it had {device.size})",
                code="device_shrank",
            )
        view = memoryview(data)
        ids = []
        for pos in range(0, want, chunk_size):
            end = min(pos + chunk_size, want)
            # Most data chunks are told apart by their ends; a memoryview compares slowly,
            # so a likely zero chunk is compared as bytes.
            if not data[pos] and not data[end - 1] and data[pos:end] == zero[: end - pos]:
                ids.append(ZERO_ID)
            else:
                ids.append(blake3.blake3(view[pos:end], key=id_key).digest())
        return data, ids

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hash") as pool:
            offsets = iter(range(0, device.size, read_size))
            ahead: deque[tuple[int, Future[tuple[bytes, list[bytes]]]]] = deque()
            for offset in itertools.islice(offsets, 2 * max(1, workers)):
                ahead.append((offset, pool.submit(read, offset)))
            while ahead:
                offset, future = ahead.popleft()
                data, ids = future.result()
                following = next(offsets, None)
                if following is not None:
                    ahead.append((following, pool.submit(read, following)))
                yield offset // chunk_size, data, ids
    finally:
        os.close(fd)
