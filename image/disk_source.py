"""The disk-format plug-in: VM images in qcow2, vmdk, vhdx, vdi and vpc as ``DiskImage`` objects.

``QEMU_DISK_FORMATS`` is registered under the ``appliance.disk_formats`` entry point; the backup
engine finds it there and never imports this package by name.

How an image is read (``QemuDisk``):

1. ``qemu-img info`` validates the header and ``qemu-img check`` (for formats that have one)
   refuses corrupt or truncated images: qemu reads clusters past the end of a file as zeros, so
   a damaged image would otherwise back up as silently zeroed data.
2. A private ``qemu-nbd --read-only`` serves the guest-visible bytes on a unix socket in a fresh
   temp directory; ``pread`` reads them through ``image.nbd_client``. The engine reads from
   several threads, so reads borrow a connection from a small pool (one per concurrent reader,
   up to ``CONNECTIONS``; qemu-nbd is started with ``--shared`` equal to that number).
3. ``extents()`` streams ``qemu-img map`` (see ``image.qemu_img.map_extents``), which also
   catches the truncations ``qemu-img check`` does not (vdi): top-layer data mapped past the end
   of the image file.

Invariants:

- qemu-nbd runs *without* ``--persistent``: it serves while at least one of our connections is
  open (the first is opened at start and kept until ``close``) and exits by itself once the last
  one goes, so even a crash of the appliance leaves no server behind. ``close`` disconnects, waits
  for that exit, and only then signals the process it started (by its pid, never by name).
- ``close`` is idempotent and also runs from a finalizer if a disk is dropped unclosed; it must
  not race reads still in flight (the engine closes after its readers finish).
- Raw images never go through qemu: ``open_disk(path, "raw")`` is the core's ``RawDisk``.
- ``write_disk`` never leaves a half-written regular file under the target's name: it converts
  into a temp directory beside the target, fsyncs, then renames (the basename is kept because a
  monolithic vmdk names its own file inside its descriptor). A block device target is raw only
  and written in place.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from appliance.backup.disks import DiskImage, Extent, RawDisk
from appliance.errors import InvalidInput, SourceError
from image.nbd_client import NbdClient
from image.qemu_img import (
    INSTALL_HINT,
    ImageInfo,
    convert_raw,
    image_check,
    image_info,
    map_extents,
    qemu_message,
    qemu_tool,
    require_format,
)

#: NBD connections per open disk: the engine reads with two threads, and two connections ran
#: faster than one connection behind a lock (measured, see docs/disk-images.md).
CONNECTIONS = 2
#: Export name given to qemu-nbd and asked for by the client.
EXPORT_NAME = "disk"
#: How long qemu-nbd may take to open an image and listen.
START_TIMEOUT = 30.0
#: How long qemu-nbd may take to exit after our last disconnect before it is signalled.
STOP_TIMEOUT = 5.0


def qemu_nbd_argv(image: str, fmt: str, socket_path: str, *, shared: int) -> list[str]:
    """Command line of the private, read-only qemu-nbd serving ``image`` on ``socket_path``.

    No ``--persistent``: the server exits when our last connection closes (see the module
    docstring). Page-cache reads (qemu's default ``writeback`` cache, which for a read-only export
    only means "not O_DIRECT") keep working on every filesystem, tmpfs included.
    """
    fmt = require_format(fmt)
    for path in (image, socket_path):
        if not os.path.isabs(path):
            raise ValueError(f"qemu-nbd needs absolute paths, got {path!r}")
    return [
        "qemu-nbd",
        "--read-only",
        f"--format={fmt}",
        f"--shared={shared}",
        f"--socket={socket_path}",
        f"--export-name={EXPORT_NAME}",
        image,
    ]


class _ConnectionPool:
    """Up to ``limit`` NBD connections, each used by one thread at a time."""

    def __init__(self, connect: Callable[[], NbdClient], first: NbdClient, limit: int) -> None:
        self._connect = connect
        self._limit = limit
        self._idle = [first]
        self._opened = 1
        self._closed = False
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def connection(self) -> Iterator[NbdClient]:
        client: NbdClient | None = None
        with self._cond:
            while not self._idle and self._opened >= self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise SourceError("the disk image was closed")
            if self._idle:
                client = self._idle.pop()
            else:
                self._opened += 1
        try:
            if client is None:
                client = self._connect()
            yield client
        finally:
            with self._cond:
                if client is not None and not client.closed and not self._closed:
                    self._idle.append(client)
                else:
                    self._opened -= 1
                    if client is not None:
                        client.close()
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for client in idle:
            client.close()


def _shutdown(pool: _ConnectionPool, proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Disconnect, let qemu-nbd exit on its own, signal it only if it lingers, remove its dir."""
    try:
        pool.close()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # our own child, by pid
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class QemuDisk:
    """Guest-visible bytes of a non-raw image, served by a private qemu-nbd (``DiskImage``)."""

    def __init__(self, path: str, fmt: str, *, connections: int = CONNECTIONS) -> None:
        fmt = require_format(fmt)
        if fmt == "raw":
            raise InvalidInput("raw images are read directly: use RawDisk", path=path)
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.path = os.path.abspath(path)
        self.format = fmt
        self.info: ImageInfo = image_info(self.path, fmt)
        if self.info.encrypted:
            raise InvalidInput(f"encrypted disk images are not supported: {path}", path=path)
        if self.info.corrupt:
            raise SourceError(
                f"disk image {path} is marked corrupt by qemu; repair a copy with "
                "`qemu-img check -r all` before backing it up",
                path=path,
            )
        image_check(self.path, fmt)
        self._workdir = tempfile.mkdtemp(prefix="appliance-nbd-")
        try:
            self._socket = os.path.join(self._workdir, "nbd.sock")
            self._proc, first = self._start(connections)
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.pid = self._proc.pid
        self.size = first.size
        # Nothing the finalizer holds may refer back to self, or self would never be collected.
        connect = functools.partial(NbdClient.connect_unix, self._socket, EXPORT_NAME)
        self._pool = _ConnectionPool(connect, first, connections)
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._proc, self._workdir)

    def _start(self, connections: int) -> tuple[subprocess.Popen[bytes], NbdClient]:
        argv = qemu_nbd_argv(self.path, self.format, self._socket, shared=connections)
        tool = qemu_tool(argv[0])
        log_path = os.path.join(self._workdir, "qemu-nbd.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [tool, *argv[1:]], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            # The first successful connection is also the one that keeps the server alive: a
            # probe that connected and left would make a non-persistent qemu-nbd exit.
            while True:
                if proc.poll() is not None:
                    with open(log_path, errors="replace") as log_text:
                        message = qemu_message(log_text.read(), "qemu-nbd exited at start")
                    raise SourceError(f"cannot serve {self.path}: {message}", path=self.path)
                if os.path.exists(self._socket):
                    try:
                        return proc, NbdClient.connect_unix(self._socket, EXPORT_NAME)
                    except (ConnectionRefusedError, FileNotFoundError):
                        pass  # bound but not yet listening
                    except OSError as exc:
                        raise SourceError(
                            f"cannot read {self.path} over NBD: {exc}", path=self.path
                        ) from exc
                if time.monotonic() > deadline:
                    raise SourceError(
                        f"qemu-nbd did not start serving {self.path} within {START_TIMEOUT:.0f} s",
                        path=self.path,
                    )
                time.sleep(0.005)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise

    def pread(self, offset: int, length: int) -> bytes:
        try:
            with self._pool.connection() as client:
                return client.pread(offset, length)
        except OSError as exc:
            raise SourceError(
                f"reading {self.path} at offset {offset} failed: {exc}", path=self.path
            ) from exc

    def extents(self) -> Iterator[Extent]:
        return map_extents(self.path, self.format, self.size, self.info)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> QemuDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuDiskFormats:
    """The ``appliance.disk_formats`` plug-in backed by qemu-utils (see module docstring)."""

    def detect_format(self, path: str) -> str:
        """Format qemu-img probes for ``path`` (file or block device); unsupported ones refused.

        The engine does not call this: ``appliance.backup.disks.detect_format`` reads the magic
        bytes itself, so raw disks need no qemu-img. Probing trusts the image's header: a raw
        disk whose guest wrote a qcow2 header is taken for qcow2.
        """
        return require_format(image_info(path).format)

    def open_disk(self, path: str, fmt: str) -> DiskImage:
        if require_format(fmt) == "raw":
            return RawDisk(path)
        try:
            qemu_tool("qemu-img")
        except InvalidInput as exc:
            raise InvalidInput(
                f"{path} is a {fmt} image: reading it needs qemu-img; install it with "
                f"`{INSTALL_HINT}`",
                path=path,
                format=fmt,
            ) from exc
        return QemuDisk(path, fmt)

    def write_disk(self, raw_path: str, target: str, fmt: str) -> None:
        """Write the raw file ``raw_path`` to ``target`` as ``fmt``, zeros left as holes."""
        fmt = require_format(fmt)
        qemu_tool("qemu-img")
        raw_path, target = os.path.abspath(raw_path), os.path.abspath(target)
        if not os.path.isfile(raw_path):
            raise InvalidInput(f"no raw image at {raw_path}", path=raw_path)
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            mode = 0
        if stat.S_ISBLK(mode):
            if fmt != "raw":
                raise InvalidInput(
                    f"only raw images can be written onto a block device, not {fmt}", path=target
                )
            convert_raw(raw_path, target, fmt, in_place=True)
            return
        if mode and not stat.S_ISREG(mode):
            raise InvalidInput(f"{target} is neither a file nor a block device", path=target)
        directory, name = os.path.split(target)
        if not os.path.isdir(directory):
            raise InvalidInput(f"no directory {directory} to write {name} into", path=target)
        staging = tempfile.mkdtemp(prefix=".restore-", dir=directory)
        try:
            staged = os.path.join(staging, name)
            convert_raw(raw_path, staged, fmt)
            _fsync_path(staged)
            os.replace(staged, target)
            _fsync_path(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The object the ``appliance.disk_formats`` entry point names.
QEMU_DISK_FORMATS = QemuDiskFormats()
