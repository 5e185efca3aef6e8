"""The appliance's side of the backup client: upload sessions that end in a files point.

A session belongs to one asset and one client token. Its life:

1. ``open_session``: picks the base (the asset's previous point from the same source, or none),
   and answers the chunk IDs the client may skip: every chunk of the base's tree and every chunk
   uploaded in this session so far (a resumed session). The client never learns whether the
   store holds any other chunk, so a token cannot probe other assets' data.
2. ``add_chunks``: a batch of compressed chunks. Each is decompressed (bounded by the store's
   largest chunk), hashed with the store's keyed hash and refused unless it matches its ID, then
   sealed and packed. The batch's packs and index are on disk before the call returns, and the
   IDs are appended to the session's ``uploaded`` file: a reply means the batch is durable, so
   a client that lost the reply sends it again (idempotent) and a restarted service resumes the
   session from its folder.
3. ``add_records``: numbered batches of tree records, kept as files; resending one replaces it.
4. ``finish``: every record is checked (paths, order, types, chunk IDs this session may use, chunk
   lengths) before the tree, manifest and catalog row are written, under the asset's lock.

An ``image`` session (block devices, :mod:`appliance.sources.ingest_image`) declares its disks
when it opens, sends fixed-size disk chunks, and its records batches are the disks' chunk tables
(raw IDs) instead of tree records; it ends in an image point.

Session folders live in ``<data>/ingest/<session id>/`` and are removed when the point is made or
after :data:`SESSION_TTL` of silence; their chunks then wait for GC like any unreferenced pack.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard

from appliance.backup.tree import iter_tree, path_key
from appliance.client import wire
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.sources import ingest_image
from appliance.sources.points import commit_tree_point, write_tree
from appliance.space import check_free_space
from appliance.store import format as fmt

if TYPE_CHECKING:
    from appliance.engine import Appliance, BackupOutcome

SESSION_TTL = 24 * 3600
KINDS = ("files", "image")
RECORD_TYPES = ("file", "dir", "symlink", "hardlink")
_SESSION_ID = frozenset("0123456789abcdef")


def ingest_dir(app: Appliance) -> str:
    return os.path.join(app.data_dir.path, "ingest")


def chunk_parameters(app: Appliance) -> dict[str, int]:
    config = app.repo.config
    return {
        "min": config.file_chunk_min,
        "avg": config.file_chunk_avg,
        "max": config.file_chunk_max,
    }


@dataclass
class IngestSession:
    id: str
    asset: str
    source: str
    mode: str
    base_point: str | None
    token_id: str
    created: str
    folder: str
    #: "files" (a tree) or "image" (block devices: ``disks`` lists their names and sizes).
    kind: str = "files"
    disks: list[dict[str, Any]] = field(default_factory=list)
    #: Files: the chunks of the base tree and those uploaded. Images: those uploaded only (the
    #: base's chunks are matched by position, see ingest_image).
    known: set[bytes] = field(default_factory=set)
    uploaded: int = 0
    #: Sealed bytes this session added to the store (its chunks; the tree is added at finish).
    new_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "asset": self.asset,
            "source": self.source,
            "mode": self.mode,
            "kind": self.kind,
            "base_point": self.base_point,
            "known_chunks": len(self.known),
        }


class IngestSessions:
    """The open sessions of one appliance; safe to call from many request threads."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self._open: dict[str, IngestSession] = {}
        self._lock = threading.Lock()
        self._decompressor = threading.local()

    # --- sessions ----------------------------------------------------------------------------

    def open_session(
        self,
        asset: str,
        source: str,
        mode: str,
        token_id: str,
        resume: str | None = None,
        *,
        kind: str = "files",
        disks: list[dict[str, Any]] | None = None,
    ) -> IngestSession:
        if kind not in KINDS:
            raise InvalidInput(f"an upload session is one of {', '.join(KINDS)}")
        disks = ingest_image.check_disks(disks or []) if kind == "image" else []
        if resume:
            try:
                session = self.get(resume, token_id)
            except NotFound:
                session = None
            if session is not None and (
                session.asset,
                session.source,
                session.kind,
                session.disks,
            ) == (asset, source, kind, disks):
                return session
        holds = self.app.catalog.get_asset(asset).kind
        if holds != ("vm" if kind == "image" else "files"):
            raise Conflict(
                f"asset {asset} holds {holds} points: "
                + (
                    "block devices go to a VM asset (add the host with its disks)"
                    if kind == "image"
                    else "folders go to a files asset"
                ),
                asset=asset,
            )
        self._expire()
        check_free_space(self.app.data_dir.store_path, "pool default")
        mode, base = self.app._base(asset, kind, mode)
        if base is not None and base.get("source") != source:
            mode, base = "full", None
        session_id = secrets.token_hex(16)
        folder = os.path.join(ingest_dir(self.app), session_id)
        os.makedirs(os.path.join(folder, "records"), mode=0o700)
        state: dict[str, Any] = {
            "asset": asset,
            "source": source,
            "mode": mode,
            "base_point": base["point_id"] if base else None,
            "token_id": token_id,
            "created": self.app.clock().isoformat(),
            "kind": kind,
            "disks": disks,
        }
        _write_atomic(os.path.join(folder, "state.json"), json.dumps(state).encode())
        session = IngestSession(session_id, folder=folder, **state)
        if kind == "files":
            session.known = self._base_chunks(base)
        with self._lock:
            self._open[session_id] = session
        return session

    def get(self, session_id: str, token_id: str) -> IngestSession:
        """The session, reloaded from its folder after a restart; only its own token sees it."""
        if len(session_id) != 32 or not set(session_id) <= _SESSION_ID:
            raise NotFound("no such upload session")
        with self._lock:
            session = self._open.get(session_id)
        if session is None:
            session = self._load(session_id)
        if session.token_id != token_id:
            raise NotFound("no such upload session")
        return session

    def _load(self, session_id: str) -> IngestSession:
        folder = os.path.join(ingest_dir(self.app), session_id)
        try:
            with open(os.path.join(folder, "state.json"), "rb") as f:
                state = json.loads(f.read())
        except (OSError, ValueError):
            raise NotFound("no such upload session (it ended or expired)") from None
        session = IngestSession(session_id, folder=folder, **state)
        if session.kind == "files" and session.base_point:
            session.known = self._base_chunks(self.app.repo.get_manifest(session.base_point))
        try:
            with open(os.path.join(folder, "uploaded"), "rb") as f:
                data = f.read()
            whole = len(data) - len(data) % wire.ID_SIZE
            for pos in range(0, whole, wire.ID_SIZE):
                session.known.add(data[pos : pos + wire.ID_SIZE])
                session.uploaded += 1
        except FileNotFoundError:
            pass
        with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, "new_bytes")) as f:
            session.new_bytes = int(f.read())
        with self._lock:
            session = self._open.setdefault(session_id, session)
        return session

    def _base_chunks(self, base: dict[str, Any] | None) -> set[bytes]:
        known: set[bytes] = set()
        if base is None:
            return known
        for record in iter_tree(self.app.repo, base):
            for chunk_id, _ in record.get("chunks", ()):
                if chunk_id is not None:
                    known.add(bytes.fromhex(chunk_id))
        return known

    def known_ids(self, session: IngestSession) -> bytes:
        with session.lock:
            return b"".join(session.known)

    def abort(self, session: IngestSession) -> None:
        with self._lock:
            self._open.pop(session.id, None)
        shutil.rmtree(session.folder, ignore_errors=True)

    def _expire(self) -> None:
        folder = ingest_dir(self.app)
        now = time.time()
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            try:
                idle = now - max(os.stat(path).st_mtime, _newest(path))
            except OSError:
                continue
            if idle > SESSION_TTL:
                with self._lock:
                    self._open.pop(name, None)
                shutil.rmtree(path, ignore_errors=True)

    # --- chunks and records --------------------------------------------------------------------

    def add_chunks(self, session: IngestSession, body: bytes) -> dict[str, int]:
        """Check and store one batch; durable on return. Returns counts for the client."""
        if len(body) > wire.MAX_BATCH:
            raise InvalidInput(f"a chunk batch holds at most {wire.MAX_BATCH} bytes")
        # Every batch, not only the session's start: a host must not fill the pool past its
        # reserve (507; the session stays and resumes once there is room).
        check_free_space(self.app.data_dir.store_path, "pool default", needed_bytes=len(body))
        config = self.app.repo.config
        largest, blob_type = config.file_chunk_max, fmt.BLOB_DATA
        if session.kind == "image":
            largest, blob_type = config.disk_chunk_size, fmt.BLOB_DISK
        envelope = self.app.repo.envelope
        writer = self.app.repo.writer()
        ids: list[bytes] = []
        stored = skipped = 0
        try:
            frames = list(wire.decode_frames(body))
            present = self.app.repo.index.lookup_many(f[0] for f in frames)
            for chunk_id, compression, size, data in frames:
                if size > largest or size == 0:
                    raise InvalidInput(f"chunk {chunk_id.hex()[:16]} has an impossible size {size}")
                plain = self._plaintext(chunk_id, compression, size, data)
                if envelope.chunk_id(plain) != chunk_id:
                    raise InvalidInput(
                        f"chunk {chunk_id.hex()[:16]} does not match its content "
                        "(a wrong chunk key, or corrupted on the way)",
                        chunk=chunk_id.hex(),
                    )
                code = (
                    fmt.COMPRESSION_ZSTD
                    if compression == wire.COMPRESSION_ZSTD
                    else fmt.COMPRESSION_NONE
                )
                # Checked against its ID above even when the store has it: a host may name only
                # chunks whose content it sent.
                if writer.put_compressed(
                    chunk_id, size, code, bytes(data), blob_type, in_index=chunk_id in present
                ):
                    stored += 1
                else:
                    skipped += 1
                ids.append(chunk_id)
        except wire.WireError as exc:
            writer.discard()
            raise InvalidInput(str(exc)) from None
        except BaseException:
            writer.discard()
            raise
        self.app.repo.commit_index(writer.flush())
        with session.lock:
            new = [i for i in ids if i not in session.known]
            with open(os.path.join(session.folder, "uploaded"), "ab") as f:
                f.write(b"".join(new))
                f.flush()
                os.fsync(f.fileno())
            session.known.update(new)
            session.uploaded += len(new)
            session.new_bytes += writer.new_bytes
            # A statistic: after a crash it may lag a batch, which costs no data; not fsynced.
            _write_atomic(
                os.path.join(session.folder, "new_bytes"),
                str(session.new_bytes).encode(),
                sync=False,
            )
        return {"chunks": len(ids), "stored": stored, "present": skipped, "bytes": writer.new_bytes}

    def _plaintext(self, chunk_id: bytes, compression: int, size: int, data: memoryview) -> bytes:
        if compression == wire.COMPRESSION_NONE:
            if len(data) != size:
                raise InvalidInput(f"chunk {chunk_id.hex()[:16]} is not {size} bytes long")
            return bytes(data)
        if compression != wire.COMPRESSION_ZSTD:
            raise InvalidInput(
                f"chunk {chunk_id.hex()[:16]} uses unknown compression {compression}"
            )
        decompressor = getattr(self._decompressor, "d", None)
        if decompressor is None:
            decompressor = self._decompressor.d = zstandard.ZstdDecompressor()
        try:
            plain = decompressor.decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise InvalidInput(f"chunk {chunk_id.hex()[:16]} does not decompress: {exc}") from None
        if len(plain) != size:
            raise InvalidInput(f"chunk {chunk_id.hex()[:16]} is not {size} bytes long")
        return plain

    def add_records(self, session: IngestSession, seq: int, body: bytes) -> None:
        if not 0 <= seq < 1_000_000:
            raise InvalidInput("a records batch number is 0 to 999999")
        if len(body) > wire.MAX_RECORDS_BATCH:
            raise InvalidInput(f"a records batch holds at most {wire.MAX_RECORDS_BATCH} bytes")
        _write_atomic(os.path.join(session.folder, "records", f"{seq:06d}.zst"), body)

    # --- the point -------------------------------------------------------------------------------

    def finish(
        self,
        session: IngestSession,
        *,
        batches: int,
        stats: dict[str, Any],
        warnings: list[dict[str, str]],
        warning_count: int,
    ) -> BackupOutcome:
        folder = os.path.join(session.folder, "records")
        if not 1 <= batches <= 1_000_000:
            raise InvalidInput("a tree has 1 to 1000000 records batches")
        have = set(os.listdir(folder))
        expected = [f"{n:06d}.zst" for n in range(batches)]
        missing = [name for name in expected if name not in have]
        if missing:
            raise Conflict(
                f"the records batches are incomplete: {len(missing)} of {batches} missing",
                missing=[int(m[:6]) for m in missing[:20]],
            )
        app = self.app
        if session.kind == "image":
            try:
                outcome = ingest_image.finish_image(
                    app,
                    session,
                    [os.path.join(folder, name) for name in expected],
                    stats=stats,
                    warnings=_clean_warnings(warnings),
                )
            except ingest_image.BaseGone:
                self.abort(session)
                raise
            self.abort(session)
            return outcome
        with app.locks.shared(), app.locks.asset(session.asset):
            base = app.repo.get_manifest(session.base_point) if session.base_point else None
            checker = RecordChecker(session.known, app.repo.index.contains)
            writer = app.repo.writer()
            tree_ids = write_tree(app, writer, checker.check(_read_batches(folder, expected)))
            clean = {k: v for k, v in stats.items() if isinstance(v, int | float) and len(k) < 40}
            clean.update(
                files=checker.files,
                bytes_total=checker.bytes_total,
                logical_bytes=checker.bytes_total,
                uploaded_chunks=session.uploaded,
                new_bytes=session.new_bytes + writer.new_bytes,
            )
            outcome = commit_tree_point(
                app,
                asset=session.asset,
                source=session.source,
                mode=session.mode,
                base=base,
                created=app.clock(),
                tree_ids=tree_ids,
                stats=clean,
                warnings=_clean_warnings(warnings),
                warning_count=max(warning_count, len(warnings)),
            )
        self.abort(session)
        return outcome


def _clean_warnings(warnings: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {"path": str(w.get("path", ""))[:4096], "message": str(w.get("message", ""))[:500]}
        for w in warnings[:1000]
    ]


def _read_batches(folder: str, names: list[str]) -> Iterator[dict[str, Any]]:
    decompressor = zstandard.ZstdDecompressor()
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            try:
                with decompressor.stream_reader(f) as reader:
                    text = reader.read()
            except zstandard.ZstdError as exc:
                raise InvalidInput(f"records batch {name[:6]} does not decompress: {exc}") from None
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                raise InvalidInput(
                    f"records batch {name[:6]} holds a line that is not JSON"
                ) from None
            if not isinstance(record, dict):
                raise InvalidInput(f"records batch {name[:6]} holds a line that is not a record")
            yield record


class RecordChecker:
    """Checks records from a client before they become a tree: nothing a hostile host sends
    may make a point that restores outside its target or refers to data it may not use."""

    def __init__(self, allowed: set[bytes], in_store: Any) -> None:
        self.allowed = allowed
        self.in_store = in_store
        self.files = 0
        self.bytes_total = 0

    def check(self, records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        last: tuple[str, ...] | None = None
        last_type = ""
        for n, record in enumerate(records):
            clean = self._record(record, n)
            key = path_key(clean["path"])
            if last is None:
                if clean["path"] != "" or clean["type"] != "dir":
                    raise InvalidInput('the first record must be the root folder (path "")')
            elif key <= last:
                raise InvalidInput(f"record {n} ({clean['path'][:200]!r}) is out of order")
            else:
                parent = key[:-1]
                if parent != last[: len(parent)] or (parent == last and last_type != "dir"):
                    raise InvalidInput(
                        f"record {n} ({clean['path'][:200]!r}) has no folder before it"
                    )
            last, last_type = key, clean["type"]
            yield clean

    def _record(self, record: dict[str, Any], n: int) -> dict[str, Any]:
        def bad(why: str) -> InvalidInput:
            return InvalidInput(f"record {n} {why}")

        path = record.get("path")
        kind = record.get("type")
        if not isinstance(path, str) or len(path) > 4096:
            raise bad("has no valid path")
        if path and any(p in ("", ".", "..") or "\0" in p for p in path.split("/")):
            raise bad(f"has a path that is not a plain relative path: {path[:200]!r}")
        if kind not in RECORD_TYPES:
            raise bad(f"has an unknown type {str(kind)[:20]!r}")
        clean: dict[str, Any] = {"path": path, "type": kind}
        for name, top in (("mode", 0o7777), ("uid", 2**32 - 1), ("gid", 2**32 - 1)):
            clean[name] = _int(record.get(name), 0, top, bad, name)
        clean["mtime_ns"] = _int(record.get("mtime_ns"), -(2**63), 2**63 - 1, bad, "mtime_ns")
        for name in ("user", "group"):
            value = record.get(name)
            if value is not None:
                if not isinstance(value, str) or not value or len(value) > 256 or "\0" in value:
                    raise bad(f"has an invalid {name}")
                clean[name] = value
        if kind in ("symlink", "hardlink"):
            target = record.get("target")
            if not isinstance(target, str) or not target or len(target) > 4096 or "\0" in target:
                raise bad("has no valid target")
            if kind == "hardlink" and (
                target.startswith("/") or any(p in ("", ".", "..") for p in target.split("/"))
            ):
                raise bad("links to a path outside the tree")
            clean["target"] = target
        if kind == "file":
            size = _int(record.get("size"), 0, 2**63 - 1, bad, "size")
            clean["size"] = size
            clean["ctime_ns"] = _int(
                record.get("ctime_ns", 0), -(2**63), 2**63 - 1, bad, "ctime_ns"
            )
            clean["ino"] = _int(record.get("ino", 0), 0, 2**64 - 1, bad, "ino")
            chunks = record.get("chunks")
            if not isinstance(chunks, list):
                raise bad("has no chunk list")
            total = 0
            out: list[list[Any]] = []
            for entry in chunks:
                if not isinstance(entry, list) or len(entry) != 2:
                    raise bad("has a malformed chunk entry")
                chunk_id, length = entry
                length = _int(length, 0, 2**63 - 1, bad, "chunk length")
                total += length
                if chunk_id is None:
                    out.append([None, length])
                    continue
                if not isinstance(chunk_id, str) or len(chunk_id) != 64:
                    raise bad("names a chunk that is not an ID")
                try:
                    raw = bytes.fromhex(chunk_id)
                except ValueError:
                    raise bad("names a chunk that is not an ID") from None
                if raw not in self.allowed:
                    raise bad(
                        f"uses chunk {chunk_id[:16]} that was neither uploaded nor in the base"
                    )
                if not self.in_store(raw):
                    raise bad(f"uses chunk {chunk_id[:16]} that the store does not hold")
                out.append([chunk_id, length])
            if total != size:
                raise bad(f"has chunks of {total} bytes for a size of {size}")
            clean["chunks"] = out
            if record.get("sparse") is True:
                clean["sparse"] = True
            self.files += 1
            self.bytes_total += size
        return clean


def _int(value: Any, low: int, high: int, bad: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"has an invalid {name}")
    return value


def _write_atomic(path: str, data: bytes, *, sync: bool = True) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _newest(folder: str) -> float:
    newest = 0.0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    return newest


def session_chunks(data_dir: str) -> list[bytes]:
    """The chunks every open upload session has sent: GC keeps them (no point names them
    until the session finishes)."""
    folder = os.path.join(data_dir, "ingest")
    ids: list[bytes] = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        with contextlib.suppress(OSError), open(os.path.join(folder, name, "uploaded"), "rb") as f:
            data = f.read()
            ids.extend(
                data[pos : pos + wire.ID_SIZE]
                for pos in range(0, len(data) - len(data) % wire.ID_SIZE, wire.ID_SIZE)
            )
    return ids
