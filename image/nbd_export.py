"""Serve one disk of an image recovery point, read-only, over NBD, straight from the store.

This is what makes a failover instant: QEMU boots the VM on a qcow2 overlay whose backing is this
export, so only the chunks the guest actually reads are fetched and decoded (a busybox guest on a
256 MiB disk reads about 12 MiB while it boots, and the same on a 4 GiB disk).

The server speaks the NBD protocol (``doc/proto.md`` of the NetworkBlockDevice project) on a unix
socket, in an asyncio loop on its own thread, with decoding in processes (see below); the wire
format and the protocol decisions are pure functions in :mod:`image.nbd_protocol`, what the
export knows of its disk in :mod:`image.nbd_chunks`. The protocol, and the bounds that keep any
client from growing the server, are in :mod:`image.nbd_connection`.

How the cores are used: the loop thread does only the protocol (parsing requests, looking chunks
up in the cache, writing replies); decoding runs in decoder processes, one per core (at most 8),
that write plaintext straight into the shared chunk cache, with jobs served round-robin between
connections so that no read waits behind another client's queue (:mod:`image.nbd_loader`,
:mod:`image.nbd_decode`). A read whose chunks are all cached (or all-zero) is answered on the
loop without any hop.

Invariants:

- Nothing is ever written to the store; a read holds no lock on it. The caller keeps the store's
  shared lock for the export's lifetime, so GC cannot remove packs under it; :meth:`NbdExport.stop`
  returns only after the decoders stopped.
- Each request is answered exactly once, in any order (replies carry the request's cookie);
  replies are written whole under a per-connection lock.
- A chunk is decoded once however many requests want it at the same time; decoded chunks are
  kept in an LRU cache of :data:`CACHE_CHUNKS` slots (:class:`image.nbd_chunks.SlotCache`), and
  a slot that a reply is being built from is never reused under it.
- Stats, errors and the boot profile live in the export's process (the decoders report each
  chunk's outcome back), on the loop thread: :attr:`NbdExport.stats` and
  :attr:`NbdExport.errors` are snapshots.
- A chunk that cannot be read (a corrupt or missing pack) answers ``EIO`` (with structured
  replies: ``NBD_REPLY_TYPE_ERROR_OFFSET`` at the failing offset, with a message naming the
  point and the disk), is logged as a warning with the point, disk and offset, and is recorded
  in ``errors`` as "point X damaged: blob ... in pack ...", which the failover reports.

Boot profiles: the source records which chunks the guest read, in first-read order
(:attr:`ChunkSource.read_order`, at most :data:`PROFILE_MAX_CHUNKS`). The failover keeps that
list after a proven boot, and :meth:`NbdExport.warm` queues the same chunks of the next point for
decoding into the cache (as one more owner of the fair queue) while QEMU and the firmware start,
so that the boot's reads are answered from memory instead of each waiting for a pack read and a
decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any

from appliance.errors import NotFound
from appliance.store.repository import Repository
from image import nbd_protocol as proto
from image.nbd_chunks import (
    CACHE_CHUNKS,
    PROFILE_MAX_CHUNKS,
    ChunkSource,
    ExportStats,
    UnreadableChunk,
    missing_blobs,
    zero_runs,
)
from image.nbd_connection import (
    HANDSHAKE_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_BYTES,
    MAX_REQUEST,
    NbdConnection,
)
from image.nbd_loader import READAHEAD_CHUNKS, ChunkLoader
from image.nbd_protocol import allocation_descriptors

__all__ = [
    "CACHE_CHUNKS",
    "HANDSHAKE_TIMEOUT",
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_BYTES",
    "PROFILE_MAX_CHUNKS",
    "READAHEAD_CHUNKS",
    "ChunkSource",
    "ExportStats",
    "NbdExport",
    "UnreadableChunk",
    "allocation_descriptors",
    "export_image_over_nbd",
    "missing_blobs",
    "zero_runs",
]

logger = logging.getLogger(__name__)

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
        decoders: int | None = None,
        processes: bool = True,
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
        #: Set by :meth:`start` (which starts the decoders).
        self.loader: ChunkLoader | None = None
        self._decoders = decoders
        self._processes = processes
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, name=f"nbd-export-{export_name}", daemon=True
        )
        self._stopped = False

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

    @property
    def decode_backlog(self) -> int:
        """Decode jobs waiting for a decoder (all clients together)."""
        return self.loader.backlog if self.loader is not None else 0

    def start(self) -> NbdExport:
        self.loader = ChunkLoader(self.source, workers=self._decoders, processes=self._processes)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self.loader.close()
            raise self._startup_error
        return self

    def warm(self, indices: list[int]) -> None:
        """Queue chunks ``indices`` (a boot profile) for decoding into the cache, in order, as
        one more owner of the decoders' fair queue: a guest's read waits behind at most the
        warming jobs in hand, never the whole profile. Indices that are out of range, all-zero
        or cached already are skipped; a chunk that cannot be read is left for the guest's read
        to report."""
        source = self.source
        wanted = [
            i for i in dict.fromkeys(indices) if isinstance(i, int) and 0 <= i < len(source.table)
        ][:PROFILE_MAX_CHUNKS]
        wanted = [i for i in wanted if source.is_data(i)]
        if wanted and self.loader is not None and self.running:
            self._loop.call_soon_threadsafe(self.loader.warm, wanted)

    def stop(self) -> None:
        """Close the listening socket and every connection, then stop the decoders (a job in
        hand is finished first: no store read outlives the caller's lock); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))
            self._thread.join(timeout=10)
        if self.loader is not None:
            self.loader.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> NbdExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ---

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

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            assert self.loader is not None
            self.loader.attach(self._loop)
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
            await NbdConnection(self, reader, writer).run()
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
    decoders: int | None = None,
    processes: bool = True,
) -> NbdExport:
    """Serve disk ``disk_name`` of the image point ``manifest`` on ``socket_path`` (read-only).

    Returns the running export; call ``stop()`` when done. ``stats`` and ``errors`` tell what it
    read from the store and which reads failed. ``decoders`` is how many chunks are decoded at
    once (default: the cores, at most 8), in processes unless ``processes`` is False (or the
    store cannot be reopened in another process): then on threads of this one.
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
        source,
        os.path.abspath(socket_path),
        disk_name,
        handshake_timeout=handshake_timeout,
        decoders=decoders,
        processes=processes,
    ).start()
