"""Disk images as the backup engine sees them: a size, positional reads and an allocation map.

The engine reads raw images itself (``os.pread`` plus ``SEEK_DATA``/``SEEK_HOLE`` for sparse
files and block devices). Every other container format (qcow2, vmdk, vhdx, ...) is opened by a
plug-in registered under the ``appliance.disk_formats`` entry-point group; the appliance never
imports those plug-ins by name, so the core stays free of subprocess calls to QEMU tools.

``detect_format`` is the core's own: it reads an image's magic bytes (``disk_magic``) and asks no
plug-in, so a raw disk is backed up with no plug-in and no qemu-img installed. Only an image in a
recognised container format goes to the plug-in.

A plug-in object provides:

``open_disk(path, fmt) -> DiskImage``
    a reader of the *guest-visible* bytes of the image.
``write_disk(raw_path, target, fmt) -> None``
    convert a (sparse) raw file into ``target`` in format ``fmt``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from appliance.backup.disk_magic import HEAD_BYTES, TAIL_BYTES, classify_image
from appliance.errors import InvalidInput, SourceError


@dataclass(frozen=True)
class Extent:
    """A run of the guest-visible disk: ``zero`` extents read as zeros and need not be read."""

    offset: int
    length: int
    zero: bool


class DiskImage(Protocol):
    """Guest-visible contents of a virtual disk.

    ``size`` is the virtual size in bytes. ``pread`` returns exactly ``length`` bytes unless the
    range crosses ``size`` (then the bytes up to ``size``). ``extents`` covers ``[0, size)`` in
    order without gaps; an extent marked zero may be skipped by readers. ``close`` is idempotent.
    """

    size: int
    format: str

    def pread(self, offset: int, length: int) -> bytes: ...

    def extents(self) -> Iterator[Extent]: ...

    def close(self) -> None: ...


class DiskFormatPlugin(Protocol):
    def open_disk(self, path: str, fmt: str) -> DiskImage: ...

    def write_disk(self, raw_path: str, target: str, fmt: str) -> None: ...


class RawDisk:
    """A raw image file or block device, read with ``pread``; holes found with SEEK_DATA/HOLE."""

    format = "raw"

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open disk {path}: {exc.strerror}", path=path) from exc
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
        self.path = path

    def pread(self, offset: int, length: int) -> bytes:
        return pread_exact(self._fd, offset, length, self.size, self.path)

    def fileno(self) -> int:
        return self._fd

    def extents(self) -> Iterator[Extent]:
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Extent(pos, self.size - pos, True)
                    return
                # SEEK_DATA unsupported (some block devices): treat everything as data.
                yield Extent(pos, self.size - pos, False)
                return
            if data > pos:
                yield Extent(pos, data - pos, True)
            hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            hole = min(hole, self.size)
            yield Extent(data, hole - data, False)
            pos = hole

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pread_exact(fd: int, offset: int, length: int, size: int, path: str = "the disk") -> bytes:
    """``length`` bytes at ``offset`` of a disk of ``size`` bytes (fewer only past its end)."""
    length = max(0, min(length, size - offset))
    data = os.pread(fd, length, offset)
    if len(data) < length:
        # The file shrank under us: report it rather than silently padding.
        raise SourceError(f"disk {path} shrank while it was read", path=path)
    return data


def _plugins() -> list[DiskFormatPlugin]:
    return [ep.load() for ep in entry_points(group="appliance.disk_formats")]


def detect_format(path: str) -> str:
    """Container format of ``path`` (file or block device) from its magic bytes; "raw" if unknown.

    No plug-in is asked (see the module docstring). The name is qemu's; formats that cannot be
    read ("qed", "luks", ...) are refused by ``open_disk``, not here.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot open disk {path}: {exc.strerror}", path=path) from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
        head = os.pread(fd, HEAD_BYTES, 0)
        tail = os.pread(fd, TAIL_BYTES, size - TAIL_BYTES) if size >= TAIL_BYTES else b""
    except OSError as exc:
        raise SourceError(f"cannot read disk {path}: {exc.strerror}", path=path) from exc
    finally:
        os.close(fd)
    return classify_image(head, tail)


def open_disk(path: str, fmt: str | None = None) -> DiskImage:
    fmt = fmt or detect_format(path)
    if fmt == "raw":
        return RawDisk(path)
    for plugin in _plugins():
        return plugin.open_disk(path, fmt)
    raise InvalidInput(
        f"disk format {fmt!r} of {path} needs the image plug-in (qemu-img); install the package "
        "with its entry points (pip install -e .) and apt-get install qemu-utils",
        path=path,
        format=fmt,
    )


def write_disk(raw_path: str, target: str, fmt: str) -> None:
    for plugin in _plugins():
        plugin.write_disk(raw_path, target, fmt)
        return
    raise InvalidInput(f"writing {fmt!r} images needs the image plug-in (qemu-img)")
