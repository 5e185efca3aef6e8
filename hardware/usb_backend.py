"""The ``removable`` backend kind: a store on a USB disk the appliance initialised.

Registered under the ``appliance.backends`` entry point group (``pyproject.toml``), so the core
opens it by kind without importing ``hardware``. A location of this kind has the disk's
filesystem UUID as its address and its mountpoint (``<data dir>/media/<uuid>``) and label as
options; the store lies in ``<mountpoint>/store``.

Opening mounts the filesystem by UUID when the disk is plugged in and not mounted yet; a disk
that is not there is :class:`LocationUnavailable` ("USB disk OFFSITE-A is not plugged in"),
never an empty store. Every operation checks again that the mountpoint is still a mountpoint: a
disk pulled (or lazily unmounted) under a running copy makes the next operation unavailable
rather than write into the bare mountpoint.

The file descriptors a backend caches for reads keep the filesystem busy. The engine's work
functions close every backend they open (``appliance.locations.work``), so an export, its
verification, a restore or an adoption leaves nothing open on the disk. An eject or a pull must
win even over a reader someone else still holds (a failover session keeps its reader for its
lifetime): the live backends are remembered (weakly) by mountpoint, and
:func:`close_open_backends` closes their descriptors before the disk is unmounted; their next
operation then finds the disk gone. A backend dropped without being closed closes itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any

from appliance.errors import InvalidInput, LocationUnavailable, NotFound
from appliance.store.backend import LocalDirectoryBackend
from hardware.mounts import (
    CommandFailed,
    devnodes_of,
    mount_filesystem,
)

#: The folder of the store on the disk's filesystem.
STORE_FOLDER = "store"

_open: weakref.WeakSet[RemovableDiskBackend] = weakref.WeakSet()
_open_lock = threading.Lock()


class RemovableDiskBackend(LocalDirectoryBackend):
    """A :class:`LocalDirectoryBackend` on a mounted USB disk (see the module doc)."""

    def __init__(self, mountpoint: str, label: str, *, fsync: bool = True) -> None:
        super().__init__(os.path.join(mountpoint, STORE_FOLDER), fsync=fsync, require_root=True)
        self.mountpoint = os.path.abspath(mountpoint)
        self.label = label
        with _open_lock:
            _open.add(self)

    def describe(self) -> str:
        return f"USB disk {self.label}"

    def __del__(self) -> None:
        # A holder that drops its reader without closing it (see the module doc) must not leave
        # descriptors behind: nothing could close them, and the disk would stay busy.
        with contextlib.suppress(Exception):
            self.close()

    def _open_root(self) -> int:
        # Checked at every operation: a disk pulled mid-copy is gone, not an empty folder.
        if not os.path.ismount(self.mountpoint):
            raise LocationUnavailable(
                f"USB disk {self.label} is not plugged in",
                location=self.mountpoint,
                reason="not mounted",
            )
        return super()._open_root()


def open_removable(
    address: str, *, mountpoint: str | None = None, label: str | None = None, fsync: bool = True
) -> RemovableDiskBackend:
    """The ``removable`` backend kind: ``address`` is the disk's filesystem UUID, ``mountpoint``
    where it is mounted (mounted now if it is plugged in and not mounted yet)."""
    if not mountpoint:
        raise InvalidInput("a removable location needs its mountpoint option", address=address)
    name = label or address
    mount_medium(address, mountpoint, name)
    return RemovableDiskBackend(mountpoint, name, fsync=fsync)


def medium_devnodes(fs_uuid: str) -> list[str]:
    """The devices holding the medium's filesystem now, probed afresh (not blkid's cache)."""
    return devnodes_of(fs_uuid)


def mount_medium(fs_uuid: str, mountpoint: str, label: str) -> str:
    """Mount the medium's filesystem at ``mountpoint`` unless it is mounted there already;
    returns the device. :class:`LocationUnavailable` when no attached disk holds it."""
    try:
        return mount_filesystem(fs_uuid, mountpoint)
    except NotFound:
        raise LocationUnavailable(
            f"USB disk {label} is not plugged in", location=fs_uuid, reason="absent"
        ) from None
    except CommandFailed as exc:
        raise CommandFailed(f"USB disk {label}: {exc.message}") from exc


def close_open_backends(mountpoint: str) -> int:
    """Close the cached descriptors of every live backend opened on ``mountpoint`` (they reopen
    what they need if used again, which fails once the disk is unmounted); returns how many
    backends there were. For an eject or a pull: the engine closes its own backends."""
    target = os.path.abspath(mountpoint)
    with _open_lock:
        backends = [b for b in _open if b.mountpoint == target]
    for backend in backends:
        backend.close()
    return len(backends)


def removable_options(mountpoint: str, label: str) -> dict[str, Any]:
    """The options a ``removable`` location keeps (its backend factory's arguments)."""
    return {"mountpoint": os.path.abspath(mountpoint), "label": label}
