"""A disk of a libvirt backup job, read over NBD through the SSH tunnel (a ``DiskImage``).

libvirt's pull-mode backup serves each disk's point-in-time view as an NBD export (named after
the disk's target, ``vda``) on a unix socket of the host; :class:`image.libvirt.host.NbdTunnel`
makes that socket reachable here. :class:`ExportDisk` reads it with the project's own
:class:`image.nbd_client.NbdClient`, as ``image.disk_source.QemuDisk`` reads its private
qemu-nbd: a small pool of connections (the engine reads from several threads), allocation from
``base:allocation`` block status.

Changed blocks: an incremental job's export also offers the metadata context
``qemu:dirty-bitmap:backup-<target>``: the blocks written since the checkpoint named in the job
(flag bit 0 = dirty). :func:`dirty_ranges` asks for that context on a connection of its own and
returns the dirty extents, which the engine reads instead of every allocated chunk.

``NbdClient`` negotiates ``base:allocation`` only; :class:`_ContextClient` asks for another
context through the same handshake (one override of the negotiation step, nothing else).
"""

from __future__ import annotations

import errno
import functools
import struct
import threading
import time
from collections.abc import Iterator

from appliance.backup.disks import Extent
from appliance.errors import SourceError
from image.disk_source import _ConnectionPool
from image.nbd_client import (
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_FLAG_ERROR,
    REP_META_CONTEXT,
    STATE_ZERO,
    NbdClient,
    NbdError,
    encode_meta_context,
    encode_option,
    option_error_message,
)

#: NBD connections per disk (the engine's two readers; see image.disk_source).
CONNECTIONS = 2
#: How long a forwarded export may take to answer its first connection.
CONNECT_TIMEOUT = 30.0
#: Dirty flag of a qemu:dirty-bitmap context.
DIRTY = 1


class _ContextClient(NbdClient):
    """An ``NbdClient`` whose block status reports ``context`` instead of base:allocation."""

    context = "base:allocation"

    def _negotiate_allocation(self, export_name: str) -> None:
        reply, data = self._option(OPT_STRUCTURED_REPLY)
        if reply != REP_ACK:
            raise NbdError(errno.EOPNOTSUPP, option_error_message(reply, data))
        self._structured = True
        self._send(
            encode_option(OPT_SET_META_CONTEXT, encode_meta_context(export_name, (self.context,)))
        )
        while True:
            reply, data = self._option_reply(OPT_SET_META_CONTEXT)
            if reply == REP_META_CONTEXT and len(data) >= 4:
                (context_id,) = struct.unpack_from(">I", data)
                if data[4:].decode("utf-8", "replace") == self.context:
                    self._allocation_id = context_id
            elif reply == REP_ACK:
                break
            elif reply & REP_FLAG_ERROR:
                raise NbdError(errno.EOPNOTSUPP, option_error_message(reply, data))
        if self._allocation_id is None:
            raise NbdError(errno.EOPNOTSUPP, f"the export offers no {self.context} context")


def connect(socket_path: str, export: str, *, context: str | None = None) -> NbdClient:
    """A connection to ``export``, retried while the far end of the tunnel is not serving yet
    (ssh accepts locally before the host's socket answers)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            if context is None:
                return NbdClient.connect_unix(socket_path, export, allocation=True)
            client_type: type[_ContextClient] = type(
                "_Client", (_ContextClient,), {"context": context}
            )
            return client_type.connect_unix(socket_path, export, allocation=True)
        except (ConnectionError, FileNotFoundError) as exc:
            if time.monotonic() > deadline:
                raise SourceError(f"the NBD export {export} did not answer: {exc}") from exc
            time.sleep(0.1)
        except OSError as exc:
            raise SourceError(f"cannot read the NBD export {export}: {exc}") from exc


class ExportDisk:
    """Guest-visible bytes of one exported disk (the ``DiskImage`` protocol).

    ``bytes_read`` counts the payload bytes read over the tunnel (the benchmark's number).
    """

    def __init__(self, socket_path: str, export: str, *, fmt: str = "raw") -> None:
        self.export = export
        self.format = fmt
        first = connect(socket_path, export)
        self.size = first.size
        self.bytes_read = 0
        self._count = threading.Lock()
        self._pool = _ConnectionPool(
            functools.partial(connect, socket_path, export), first, CONNECTIONS
        )

    def pread(self, offset: int, length: int) -> bytes:
        try:
            with self._pool.connection() as client:
                data = client.pread(offset, length)
        except OSError as exc:
            raise SourceError(f"reading {self.export} at offset {offset} failed: {exc}") from exc
        with self._count:
            self.bytes_read += len(data)
        return data

    def extents(self) -> Iterator[Extent]:
        """Allocation of the whole export; zero runs need not be read."""
        try:
            with self._pool.connection() as client:
                found = list(client.allocation_map())
        except OSError as exc:
            raise SourceError(f"allocation map of {self.export} failed: {exc}") from exc
        for status in found:
            yield Extent(status.offset, status.length, bool(status.flags & STATE_ZERO))

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ExportDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dirty_ranges(socket_path: str, export: str, bitmap: str) -> list[tuple[int, int]]:
    """(offset, length) of the dirty extents of ``bitmap`` on ``export``, merged, in order."""
    client = connect(socket_path, export, context=bitmap)
    try:
        ranges: list[tuple[int, int]] = []
        for status in client.allocation_map():
            if not status.flags & DIRTY:
                continue
            if ranges and ranges[-1][0] + ranges[-1][1] == status.offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + status.length)
            else:
                ranges.append((status.offset, status.length))
        return ranges
    except OSError as exc:
        raise SourceError(f"the changed-block map of {export} could not be read: {exc}") from exc
    finally:
        client.close()
