"""One client backup: session, walk, chunk upload, records, finish.

Pipeline: the main thread walks and reads (``TreeReader``), cuts chunks and hashes them with the
store's key (BLAKE3 and FastCDC release the GIL). A chunk the appliance already has for this asset
(its previous point's chunks, or sent earlier in this session) is only named in the record. Every
other chunk is compressed by a small thread pool and framed into batches of about one pack;
:data:`SENDERS` sender threads post the batches, at most :data:`IN_FLIGHT` waiting, so memory
stays bounded and reading, compressing, sending and the appliance's writes overlap.

Files cache: like borg's, kept on the host (``files-*.zst`` in the state folder): the file records
of the last backup that made a point. A file whose size, mtime, ctime and inode match its cached
record reuses its chunk list without being read, provided the appliance listed every one of those
chunks for this session (its previous point's); otherwise the file is read. So an incremental
reads only what changed, as local backups do, while the appliance still checks every record.

Resuming: the session ID is kept in the state folder until the point is made. Run again after a
crash or a lost link, the client reopens the same session; the appliance answers every chunk it
got, so only the rest is sent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from appliance.client import wire
from appliance.client.connection import ClientError, Connection
from appliance.sources.tree_source import LocalFS, Record, SourceFS, TreeReader

#: Chunk batches queued for the senders beyond those being sent.
IN_FLIGHT = 2
#: Batches posted at once: the appliance checks and writes one while the next one arrives
#: (measured: one sender left the client waiting on the appliance's writes most of the time).
SENDERS = 2
RECORDS_BATCH = 20_000


class _Compressors(threading.local):
    def __init__(self) -> None:
        self.level3 = zstandard.ZstdCompressor(level=3)
        self.level1 = zstandard.ZstdCompressor(level=1)


_zstd = _Compressors()


def compress(data: bytes) -> tuple[int, bytes]:
    """As the store compresses file chunks: skip data that does not compress (probed on a
    slice at a fast level), else zstd level 3."""
    if len(data) >= 65536:
        sample = data[:16384]
        if len(_zstd.level1.compress(sample)) > len(sample) * 0.97:
            return wire.COMPRESSION_NONE, data
    packed = _zstd.level3.compress(data)
    if len(packed) >= len(data):
        return wire.COMPRESSION_NONE, data
    return wire.COMPRESSION_ZSTD, packed


def _frame(chunk_id: bytes, data: bytes) -> bytes:
    compression, body = compress(data)
    return wire.encode_frame(chunk_id, compression, len(data), body)


def disk_frame(chunk_id: bytes, data: bytes) -> bytes:
    """As the store compresses disk chunks: zstd level 1, no probe (64 KiB chunks)."""
    packed = _zstd.level1.compress(data)
    if len(packed) >= len(data):
        return wire.encode_frame(chunk_id, wire.COMPRESSION_NONE, len(data), data)
    return wire.encode_frame(chunk_id, wire.COMPRESSION_ZSTD, len(data), packed)


@dataclass
class UploadStats:
    chunks_new: int = 0
    chunks_known: int = 0
    bytes_new_plain: int = 0
    bytes_sent_chunks: int = 0
    batches: int = 0
    stored: int = 0


@dataclass
class _Batch:
    frames: list[Future[bytes]] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    plain: int = 0


class UploadSink:
    """Names every chunk; sends those the appliance lacks (see the module docstring)."""

    def __init__(
        self,
        conn: Connection,
        session: str,
        id_key: bytes,
        known: set[bytes],
        threads: int = 2,
        frame: Callable[[bytes, bytes], bytes] = _frame,
    ) -> None:
        self.frame = frame
        self.conn = conn
        self.session = session
        self.id_key = id_key
        self.known = known
        self.stats = UploadStats()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        self._batch = _Batch()
        self._queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._error: BaseException | None = None
        self._stats_lock = threading.Lock()
        self._senders = [
            threading.Thread(target=self._send_loop, name=f"sender-{n}", daemon=True)
            for n in range(SENDERS)
        ]
        for sender in self._senders:
            sender.start()

    def put(self, data: bytes) -> str:
        chunk_id = blake3.blake3(data, key=self.id_key).digest()
        self.send(chunk_id, data)
        return chunk_id.hex()

    def send(self, chunk_id: bytes, data: bytes) -> None:
        """Send the chunk unless the appliance has it for this session already."""
        if chunk_id in self.known:
            self.stats.chunks_known += 1
            return
        self.known.add(chunk_id)
        self.stats.chunks_new += 1
        self.stats.bytes_new_plain += len(data)
        batch = self._batch
        batch.frames.append(self._pool.submit(self.frame, chunk_id, data))
        batch.ids.append(chunk_id)
        batch.plain += len(data)
        if batch.plain >= wire.BATCH_TARGET:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        if self._batch.frames:
            self._queue.put(self._batch)
            self._batch = _Batch()

    def _send_loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is not None:
                continue
            try:
                body = b"".join(f.result() for f in batch.frames)
                answer = self.conn.request(
                    "POST", f"/api/client/sessions/{self.session}/chunks", content=body
                ).json()
                with self._stats_lock:
                    self.stats.bytes_sent_chunks += len(body)
                    self.stats.batches += 1
                    self.stats.stored += int(answer.get("stored", 0))
            except BaseException as exc:  # raised in the main thread at its next step
                self._error = exc

    def finish(self) -> None:
        """Send what is left and wait until every batch is acknowledged."""
        self._hand_over()
        for _ in self._senders:
            self._queue.put(None)
        for sender in self._senders:
            sender.join()
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        self._error = self._error or ClientError("abandoned", code="abandoned")
        for _ in self._senders:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class BackupRequest:
    paths: list[str]
    asset: str
    host: str
    mode: str = "incremental"
    excludes: tuple[str, ...] = ()
    one_file_system: bool = False
    state_dir: str = "/var/lib/appliance-client"
    threads: int = 2


def source_of(request: BackupRequest) -> tuple[SourceFS, str, tuple[str, ...]]:
    """The tree to walk and its ``source`` name. One folder is the tree's root; several are
    kept under ``/`` with their parents, and everything else under ``/`` excluded."""
    paths = [os.path.abspath(p) for p in request.paths]
    for path in paths:
        if not os.path.isdir(path):
            raise ClientError(f"{path} is not a folder on this host", code="not_a_folder")
    if len(paths) == 1:
        return LocalFS(paths[0]), f"client://{request.host}{paths[0]}", request.excludes
    return (
        _SelectedFS("/", paths),
        f"client://{request.host}/" + ",".join(sorted(paths)),
        request.excludes,
    )


class _SelectedFS(LocalFS):
    """``/`` showing only the chosen folders and the folders above them."""

    def __init__(self, root: str, chosen: list[str]) -> None:
        super().__init__(root)
        self.chosen = [p.strip("/") for p in chosen]

    def listdir(self, rel: str) -> list[str]:
        names = super().listdir(rel)
        if any(rel == c or rel.startswith(c + "/") for c in self.chosen):
            return names
        keep = []
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if any(c == child or c.startswith(child + "/") for c in self.chosen):
                keep.append(name)
        return keep


def state_file_for(state_dir: str, asset: str, source: str) -> str:
    key = blake3.blake3(f"{asset}\n{source}".encode()).hexdigest()[:24]
    return os.path.join(state_dir, f"session-{key}.json")


def files_cache_for(state_dir: str, asset: str, source: str) -> str:
    key = blake3.blake3(f"{asset}\n{source}".encode()).hexdigest()[:24]
    return os.path.join(state_dir, f"files-{key}.zst")


def cached_files(path: str, known: set[bytes]) -> Iterator[Record] | None:
    """The files cache's records whose chunks the appliance listed; None without a cache."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed when the generator ends
    except FileNotFoundError:
        return None

    def records() -> Iterator[Record]:
        with f, zstandard.ZstdDecompressor().stream_reader(f) as raw:
            lines = io.TextIOWrapper(raw, encoding="utf-8")
            while True:
                try:
                    line = lines.readline()
                    if not line:
                        return
                    record = json.loads(line)
                    chunks = record["chunks"]
                    if not isinstance(record["path"], str) or record["size"] != sum(
                        n for _, n in chunks
                    ):
                        return
                    usable = all(c is None or bytes.fromhex(c) in known for c, _ in chunks)
                except (zstandard.ZstdError, OSError, ValueError, KeyError, TypeError):
                    return  # a damaged cache: the rest of the files are read
                if usable:
                    yield record

    return records()


class FilesCache:
    """Writes the next files cache as records go by; it replaces the old one on :meth:`commit`."""

    FIELDS = ("path", "type", "size", "mtime_ns", "ctime_ns", "ino", "chunks")

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path + ".new", "wb")  # noqa: SIM115 - closed by commit or close
        self._out = zstandard.ZstdCompressor(level=3).stream_writer(self._file)

    def add(self, record: Record) -> None:
        if record.get("type") == "file":
            line = json.dumps({k: record[k] for k in self.FIELDS if k in record})
            self._out.write(line.encode() + b"\n")

    def commit(self) -> None:
        self._out.close()  # closes the file too
        os.replace(self.path + ".new", self.path)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.close()


def hello_for(conn: Connection, asset: str) -> dict[str, Any]:
    """The appliance's hello, refusing an asset this host's token may not add points to."""
    hello: dict[str, Any] = conn.get_json("/api/client/hello")
    if asset not in hello.get("assets", []):
        raise ClientError(
            f"this host's token may add points to {', '.join(hello.get('assets', [])) or 'no asset'}, "
            f"not to {asset}",
            code="asset_not_allowed",
        )
    return hello


def open_session(
    conn: Connection,
    *,
    state_dir: str,
    asset: str,
    source: str,
    mode: str,
    say: Callable[[str], None],
    **extra: Any,
) -> tuple[str, str, set[bytes]]:
    """Open (or resume, from the state folder) an upload session: (session, state file, the
    chunk IDs it need not send)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    state_file = state_file_for(state_dir, asset, source)
    resume = None
    if os.path.exists(state_file):
        with open(state_file) as f:
            resume = json.load(f).get("session")
    opened = conn.post_json(
        "/api/client/sessions",
        {"asset": asset, "source": source, "mode": mode, "resume": resume, **extra},
    )
    session: str = opened["session"]
    if session == resume:
        say(f"resuming session {session[:8]}")
    with open(state_file + ".new", "w") as f:
        json.dump({"session": session, "asset": asset, "source": source}, f)
    os.replace(state_file + ".new", state_file)
    known_raw = conn.request("GET", f"/api/client/sessions/{session}/known").content
    known = {known_raw[i : i + wire.ID_SIZE] for i in range(0, len(known_raw), wire.ID_SIZE)}
    return session, state_file, known


def run_backup(
    conn: Connection, request: BackupRequest, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    hello = hello_for(conn, request.asset)
    fs, source, excludes = source_of(request)
    session, state_file, known = open_session(
        conn,
        state_dir=request.state_dir,
        asset=request.asset,
        source=source,
        mode=request.mode,
        say=say,
    )
    sink = UploadSink(conn, session, bytes.fromhex(hello["id_key"]), known, threads=request.threads)
    started = time.monotonic()
    progress = _Progress(say)
    reader = TreeReader(
        fs,
        sink,
        hello["chunking"],
        excludes=excludes,
        one_file_system=request.one_file_system,
        read_progress=progress.add,
    )
    batches = 0
    cache_path = files_cache_for(request.state_dir, request.asset, source)
    previous = None if request.mode == "full" else cached_files(cache_path, known)
    cache = FilesCache(cache_path)
    try:
        pending: list[bytes] = []
        for record in reader.records(previous):
            cache.add(record)
            pending.append(json.dumps(record, separators=(",", ":")).encode())
            if len(pending) >= RECORDS_BATCH:
                send_records(conn, session, batches, pending)
                batches += 1
                pending = []
            progress.tick(reader.stats.files, sink.stats.bytes_sent_chunks)
        if pending or batches == 0:
            send_records(conn, session, batches, pending)
            batches += 1
        sink.finish()
    except BaseException:
        sink.abandon()
        cache.close()
        raise
    walk = reader.stats
    stats = {
        "files": walk.files,
        "directories": walk.directories,
        "files_read": walk.files_read,
        "files_reused": walk.files_reused,
        "bytes_read": walk.bytes_read,
        "chunks_new": sink.stats.chunks_new,
        "chunks_known": sink.stats.chunks_known,
        "bytes_sent": conn.traffic.bytes_sent,
        "seconds": round(time.monotonic() - started, 3),
    }
    try:
        done = conn.post_json(
            f"/api/client/sessions/{session}/finish",
            {
                "batches": batches,
                "stats": stats,
                "warnings": walk.warnings,
                "warning_count": walk.warning_count,
            },
        )
    except BaseException:
        cache.close()
        raise
    cache.commit()
    os.unlink(state_file)
    return {
        "point": done["point"],
        "mode": done["mode"],
        "stored_bytes": done.get("new_bytes", 0),
        "warnings": walk.warning_count,
        **stats,
        "bytes_sent": conn.traffic.bytes_sent,
        "chunk_bytes_sent": sink.stats.bytes_sent_chunks,
        "retries": conn.traffic.retries,
    }


def send_records(conn: Connection, session: str, seq: int, lines: list[bytes]) -> None:
    send_batch(conn, session, seq, b"\n".join(lines) + b"\n" if lines else b"")


def send_batch(conn: Connection, session: str, seq: int, data: bytes) -> None:
    body = zstandard.ZstdCompressor(level=3).compress(data)
    conn.request(
        "POST", f"/api/client/sessions/{session}/records", content=body, params={"seq": seq}
    )


class _Progress:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.read = 0
        self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.read += n

    def tick(self, files: int, sent: int) -> None:
        now = time.monotonic()
        if now - self.last >= 2.0:
            self.last = now
            self.say(
                f"{files} files, {self.read / 2**20:.0f} MiB read, {sent / 2**20:.0f} MiB sent"
            )


def iter_records(lines: Iterator[bytes]) -> Iterator[Record]:
    for line in lines:
        yield json.loads(line)
