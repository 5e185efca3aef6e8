"""An object written in pieces before it is published: the write half of a local directory
store's ``put``, for callers that receive an object as a stream (a peer taking an upload).

:meth:`LocalDirectoryBackend.stage <appliance.store.backend.LocalDirectoryBackend.stage>` opens
one: a temporary file beside the object's final name (created with ``O_EXCL``, mode 0600, in a
folder opened relative to the checked root, so nothing lands outside it). :meth:`StagedObject.write`
appends, :meth:`StagedObject.finish` fsyncs and closes, :meth:`StagedObject.publish` renames it
into place and fsyncs the folder: a crash leaves the old state or the new one, never half an
object under its name. :meth:`StagedObject.abort` (also on leaving a ``with`` block without
publishing) removes the temporary file. Until :meth:`publish` nobody sees the object, so a caller
can check what it received (a checksum, a name) between :meth:`finish` and :meth:`publish`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from types import TracebackType

#: The most buffers one ``writev`` takes (Linux's IOV_MAX).
_IOV_MAX = 1024


class StagedObject:
    """One object being written; see the module docstring. Not thread-safe: one writer."""

    def __init__(
        self,
        dir_fd: int,
        tmp: str,
        final: str,
        *,
        fsync: bool,
        on_error: Callable[[OSError], Exception],
        on_published: Callable[[], None],
    ) -> None:
        self._dir_fd = dir_fd
        self._tmp = tmp
        self._final = final
        self._fsync = fsync
        self._on_error = on_error
        self._on_published = on_published
        self._fd: int | None = None
        self.size = 0
        self.published = False
        try:
            self._fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
            )
        except OSError as exc:
            self._close_dir()
            raise on_error(exc) from exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise ValueError("the object is finished")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self.abort()
            raise self._on_error(exc) from exc

    def write_many(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Append ``buffers`` in order, as :meth:`write` of their concatenation would, without
        making it: a body received in pieces goes to the file with ``writev``."""
        if self._fd is None:
            raise ValueError("the object is finished")
        pending = [memoryview(b) for b in buffers if b]
        try:
            while pending:
                written = os.writev(self._fd, pending[:_IOV_MAX])
                self.size += written
                while pending and written >= len(pending[0]):
                    written -= len(pending[0])
                    pending.pop(0)
                if written:
                    pending[0] = pending[0][written:]
        except OSError as exc:
            self.abort()
            raise self._on_error(exc) from exc

    def finish(self) -> None:
        """Everything written is on the disk (fsync) and the file closed."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.abort()
            raise self._on_error(exc) from exc
        os.close(fd)

    def publish(self, *, sync_folder: bool = True) -> None:
        """Put the object under its name (replacing what was there) and make that durable.

        ``sync_folder=False`` leaves the folder's fsync to the caller (the object's bytes are
        on the disk, its name may not survive a crash yet): for a writer that makes many
        objects durable at once, before something that refers to them (a peer taking a
        source's packs syncs their folders before the point's manifest)."""
        self.finish()
        try:
            os.replace(self._tmp, self._final, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self.published = True
            if self._fsync and sync_folder:
                os.fsync(self._dir_fd)
        except OSError as exc:
            self.abort()
            raise self._on_error(exc) from exc
        finally:
            self._close_dir()
        self._on_published()

    def abort(self) -> None:
        """Drop the temporary file (nothing of the object is left); harmless when done."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.published and self._dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir_fd)
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> StagedObject:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.published:
            self.abort()
