"""Reading a files point for the browser: directory pages, file bytes, tar and zip streams.

Nothing here holds a whole tree or a whole file in memory. A directory listing streams the
point's records (:func:`appliance.backup.tree.iter_tree`, canonical order) and stops as soon as
it leaves the directory's subtree (a subtree is contiguous in pre-order) or the page is full.
File bytes are decoded chunk by chunk. Tar and zip archives are produced by a writer thread into a
bounded queue that the response drains, so a slow client slows the producer instead of filling
memory, and a client that goes away stops it (the writer raises on its next write).

Paths are relative, ``/``-separated. A name that is not valid UTF-8 (kept in manifests as
surrogate escapes) is shown with U+FFFD and can be downloaded only as part of its folder.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from appliance.backup.tree import Record, iter_tree
from appliance.errors import InvalidInput, NotFound
from appliance.restore import safe_relative_path
from appliance.store.repository import Repository

log = logging.getLogger(__name__)

#: Size of the pieces streamed to the client and of the producer's write buffer.
PIECE = 1 << 20
#: Pieces the producer may run ahead of the client.
QUEUE_DEPTH = 8
#: A client that reads nothing for this long is abandoned (the producer holds a store lock).
STALL_TIMEOUT = 300.0


def display(path: str) -> str:
    """A manifest path as valid Unicode (undecodable bytes become U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def normalise(path: str | None) -> str:
    """A client-given path as a manifest path ("" is the point's root)."""
    text = (path or "").strip("/")
    return safe_relative_path(text) if text else ""


def in_subtree(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def relative_to(path: str, prefix: str) -> str:
    """``path`` as it appears in an archive of ``prefix`` (the prefix's own name kept)."""
    parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    return path[len(parent) + 1 :] if parent else path


def find_record(repo: Repository, manifest: dict[str, Any], path: str) -> Record:
    """The record of ``path`` (a hardlink resolves to the file it links to)."""
    record = None
    for candidate in iter_tree(repo, manifest):
        if candidate.get("path") == path:
            record = candidate
            break
    if record is None:
        raise NotFound(f"{display(path) or '/'} is not in this recovery point", path=display(path))
    if record.get("type") == "hardlink":
        target = str(record.get("target", ""))
        linked = find_record(repo, manifest, safe_relative_path(target))
        return {**linked, "path": record["path"]}
    return record


def list_directory(
    repo: Repository, manifest: dict[str, Any], path: str, *, after: str | None, limit: int
) -> tuple[list[Record], str | None]:
    """The entries of directory ``path`` sorted by name, after the name ``after``; one page
    of at most ``limit`` and the name to continue after (None on the last page)."""
    found = path == ""
    entries: list[Record] = []
    more = False
    for record in iter_tree(repo, manifest):
        p = str(record.get("path", ""))
        if path:
            if p == path:
                if record.get("type") != "dir":
                    raise InvalidInput(f"{display(path)} is not a folder", path=display(path))
                found = True
                continue
            if not p.startswith(path + "/"):
                if found:
                    break  # past the subtree: pre-order keeps a subtree contiguous
                continue
            rest = p[len(path) + 1 :]
        else:
            if not p:
                continue  # the root's own record
            rest = p
        if "/" in rest:
            continue
        if after is not None and rest <= after:
            continue
        if len(entries) == limit:
            more = True
            break
        entries.append(record)
    if not found:
        raise NotFound(f"{display(path)} is not in this recovery point", path=display(path))
    next_after = str(entries[-1]["path"]).rsplit("/", 1)[-1] if more and entries else None
    return _resolve_hardlinks(repo, manifest, entries), next_after


def _resolve_hardlinks(
    repo: Repository, manifest: dict[str, Any], entries: list[Record]
) -> list[Record]:
    """Show hard links as the files they are (size, mode), keeping the first name in
    ``target``; costs one more pass over the tree, only for a page that has any."""
    wanted = {str(r.get("target")) for r in entries if r.get("type") == "hardlink"}
    if not wanted:
        return entries
    files = {
        str(r["path"]): r
        for r in iter_tree(repo, manifest)
        if r.get("path") in wanted and r.get("type") == "file"
    }
    out = []
    for record in entries:
        first = files.get(str(record.get("target"))) if record.get("type") == "hardlink" else None
        if first is not None:
            record = {**first, "path": record["path"], "target": record["target"]}
        out.append(record)
    return out


def record_mtime(record: Record) -> datetime:
    return datetime.fromtimestamp(int(record.get("mtime_ns", 0)) / 1e9, UTC)


def file_bytes(repo: Repository, record: Record) -> Iterator[bytes]:
    """A file record's contents, chunk by chunk (holes as zeros, at most PIECE at a time)."""
    envelope = repo.envelope
    for hex_id, length in record.get("chunks", []):
        if hex_id is None:
            remaining = int(length)
            while remaining:
                n = min(remaining, PIECE)
                yield bytes(n)
                remaining -= n
            continue
        data = repo.read_blob(bytes.fromhex(hex_id), envelope)
        if len(data) != length:
            raise InvalidInput(f"chunk {hex_id[:16]} has {len(data)} bytes, expected {length}")
        yield data


# --- archives produced by a thread ------------------------------------------------------------------


class _Stopped(Exception):
    """The client went away; the producer unwinds."""


class _QueueWriter(io.RawIOBase):
    def __init__(self, pieces: queue.Queue[object], stop: threading.Event) -> None:
        self._pieces = pieces
        self._stop = stop

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        piece = bytes(data)
        deadline = time.monotonic() + STALL_TIMEOUT
        while True:
            if self._stop.is_set():
                raise _Stopped()
            try:
                self._pieces.put(piece, timeout=1.0)
                return len(piece)
            except queue.Full:
                if time.monotonic() > deadline:
                    self._stop.set()
                    raise _Stopped() from None


_DONE = object()


def produced(write: Callable[[IO[bytes]], object]) -> Iterator[bytes]:
    """Run ``write(out)`` in a thread and yield what it writes, in pieces of up to PIECE.

    The first piece is produced before this returns (see :func:`primed`), so an error before any
    byte (a missing path, a locked store) still becomes a proper error response.
    """
    pieces: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()

    def run() -> None:
        try:
            with io.BufferedWriter(_QueueWriter(pieces, stop), buffer_size=PIECE) as out:
                write(out)
            pieces.put(_DONE)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the consumer, which raises it
            if not stop.is_set():
                pieces.put(exc)

    thread = threading.Thread(target=run, name="archive-stream", daemon=True)
    thread.start()

    def consume() -> Iterator[bytes]:
        try:
            while True:
                item = pieces.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    pieces.get(timeout=0.1)

    return consume()


def primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pull the first piece now (raising any early error) and give back the whole stream."""
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())

    def rest() -> Iterator[bytes]:
        yield first
        yield from chunks

    return rest()


def _zip_time(record: Record) -> tuple[int, int, int, int, int, int]:
    t = record_mtime(record)
    if t.year < 1980:  # the zip format starts in 1980
        return (1980, 1, 1, 0, 0, 0)
    return (min(t.year, 2107), t.month, t.day, t.hour, t.minute, t.second)


def write_zip(repo: Repository, manifest: dict[str, Any], prefix: str, out: IO[bytes]) -> int:
    """Write the subtree ``prefix`` of a files point as a zip to ``out``; returns entries.

    Hardlinks become copies (zip has no links); they are written after one more pass over the
    tree that collects just their targets, so no file list is held in memory.
    """
    count = 0
    hardlinks: list[tuple[str, str]] = []  # (archive name, target path)
    with zipfile.ZipFile(
        out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True
    ) as archive:

        def add_file(name: str, record: Record) -> None:
            info = zipfile.ZipInfo(name, _zip_time(record))
            info.create_system = 3  # unix: external_attr carries the mode
            info.external_attr = (stat.S_IFREG | (int(record.get("mode", 0o644)) & 0o7777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = int(record.get("size", 0))
            with archive.open(info, "w", force_zip64=info.file_size > 1 << 30) as member:
                for data in file_bytes(repo, record):
                    member.write(data)

        for record in iter_tree(repo, manifest):
            path = str(record.get("path", ""))
            if not in_subtree(path, prefix):
                continue
            safe_relative_path(path)
            name = display(relative_to(path, prefix)) if path else ""
            kind = record.get("type")
            if kind == "dir":
                if not name:
                    continue
                info = zipfile.ZipInfo(name + "/", _zip_time(record))
                info.create_system = 3
                info.external_attr = (
                    stat.S_IFDIR | (int(record.get("mode", 0o755)) & 0o7777)
                ) << 16
                info.external_attr |= 0x10  # MS-DOS directory flag
                archive.writestr(info, b"")
            elif kind == "symlink":
                info = zipfile.ZipInfo(name, _zip_time(record))
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, str(record.get("target", "")).encode("utf-8", "replace"))
            elif kind == "hardlink":
                hardlinks.append((name, str(record.get("target", ""))))
            elif kind == "file":
                add_file(name, record)
            else:
                continue
            count += 1
        if hardlinks:
            wanted = {target for _, target in hardlinks}
            targets = {
                str(r["path"]): r
                for r in iter_tree(repo, manifest)
                if r.get("path") in wanted and r.get("type") == "file"
            }
            for name, target in hardlinks:
                if target in targets:
                    add_file(name, targets[target])
                    count += 1
    return count
