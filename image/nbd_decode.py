"""Decoding an NBD export's chunks on every core, fairly between clients.

The export's event loop does the protocol; the work of a read that misses the cache (a ranged
pack read, AES-GCM, zstd, the BLAKE3 check of the chunk's ID) is done by decoders:

- **Processes.** :class:`ProcessDecoders` starts ``workers`` processes (the cores, at most 8)
  from the engine's fork server (:mod:`appliance.workers`), each reopening the store from
  :meth:`Repository.worker_spec` and dying with its parent (``die_with_parent``: a killed
  export leaves no decoder behind holding the store open). A store that cannot be reopened in
  another process (the in-memory backend), or a decoder that does not start, falls back to
  :class:`ThreadDecoders` in the export's own process, under the same contract.
- **The slab.** Decoded chunks go straight into the cache: one ``memfd`` of ``slots x chunk
  size`` bytes, mapped by the export and by every decoder (which opens it through
  ``/proc/<export pid>/fd``, so it has no name and dies with the export). A job names the slot
  of each chunk; the pipe carries only a few bytes per chunk back (status, sealed size). When
  every slot is pinned by replies in flight, the chunk's bytes come back over the pipe instead.
- **Jobs.** A request's missing chunks are cut into jobs of at most :data:`JOB_CHUNKS`; a decoder
  looks a job's blobs up in the index together and reads each run of nearby blobs in one ranged
  pack read (as :meth:`Repository.read_blobs` does); a blob that fails there is read again on its
  own by :meth:`Repository.read_blob`, whose error names the blob and its pack.
- **Fairness.** Jobs wait in a :class:`FairQueue`, one line per owner (a connection, or the boot
  profile warmer), served round-robin; each decoder has one message at a time (a job, with the
  same owner's next jobs while they fit in :data:`JOB_CHUNKS` chunks). A client's read thus waits
  at most for the work in hand (one message per decoder, a few milliseconds), never behind
  another client's queue: during a failover boot no read waits on another client's read.

:class:`image.nbd_loader.ChunkLoader` gives the decoders their jobs and takes their outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import signal
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from appliance.errors import ApplianceError
from appliance.store.crypto import Envelope
from appliance.store.index import IndexEntry
from appliance.store.packs import pack_object_name
from appliance.store.repository import READ_GAP, Repository
from appliance.workers import die_with_parent, worker_context

logger = logging.getLogger(__name__)

#: Most chunks in one decode job (about a millisecond of one core's work).
JOB_CHUNKS = 8
#: Seconds a decoder process may take to start.
START_TIMEOUT = 30.0

#: A chunk to decode: blob ID, plaintext length expected, slot (-1: send the bytes back).
Item = tuple[bytes, int, int]
#: What became of it: status ("ok", "damaged" or "short"), sealed bytes read, the plaintext
#: when it had no slot, and the error message.
Outcome = tuple[str, int, bytes | None, str]

_J = TypeVar("_J")


class FairQueue(Generic[_J]):
    """Jobs of several owners, served round-robin: after an owner's job is taken, every other
    owner with jobs waiting, including one that arrives meanwhile, has one taken before that
    owner's next. (The owner just served waits aside until the next take, then goes to the end
    of the line, behind any newcomer.)"""

    def __init__(self) -> None:
        self._lines: OrderedDict[Hashable, deque[_J]] = OrderedDict()
        self._served: tuple[Hashable, deque[_J]] | None = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, owner: Hashable, job: _J) -> None:
        if self._served is not None and self._served[0] == owner:
            self._served[1].append(job)
        else:
            self._lines.setdefault(owner, deque()).append(job)
        self._count += 1

    def take(self) -> _J:
        """The next job (raises IndexError when there is none)."""
        if self._served is not None:
            owner, line = self._served
            self._served = None
            self._lines[owner] = line
        if not self._lines:
            raise IndexError("no job waiting")
        owner, line = next(iter(self._lines.items()))
        del self._lines[owner]
        job = line.popleft()
        self._count -= 1
        if line:
            self._served = (owner, line)
        return job

    def peek_more(self) -> _J | None:
        """The next job of the owner just served (see :meth:`take_more`), or None."""
        return self._served[1][0] if self._served is not None else None

    def take_more(self) -> _J:
        """The next job of the owner just served, batched with its last one: its turn does
        not change (raises IndexError when it has none)."""
        if self._served is None:
            raise IndexError("no job of the owner just served")
        line = self._served[1]
        job = line.popleft()
        self._count -= 1
        if not line:
            self._served = None
        return job

    def drain(self) -> list[_J]:
        """Every waiting job, removed."""
        lines = list(self._lines.values()) + ([self._served[1]] if self._served else [])
        self._lines.clear()
        self._served = None
        self._count = 0
        return [job for line in lines for job in line]


# --- the decoders' side --------------------------------------------------------------------------


def decode_chunks(
    repo: Repository, envelope: Envelope, slab: Any, slot_size: int, items: list[Item]
) -> list[Outcome]:
    """Decode ``items`` into their slots of ``slab`` (runs of nearby blobs read together)."""
    entries = repo.index.lookup_many({blob for blob, _, _ in items})
    out: list[Outcome | None] = [None] * len(items)
    located = sorted(
        (k for k, (blob, _, _) in enumerate(items) if blob in entries),
        key=lambda k: (entries[items[k][0]].pack, entries[items[k][0]].offset),
    )
    run: list[int] = []
    end = 0
    for k in located:
        entry = entries[items[k][0]]
        if run and (entry.pack != entries[items[run[0]][0]].pack or entry.offset - end > READ_GAP):
            _decode_run(repo, envelope, slab, slot_size, items, entries, run, out)
            run = []
        end = max(end, entry.offset + entry.length) if run else entry.offset + entry.length
        run.append(k)
    if run:
        _decode_run(repo, envelope, slab, slot_size, items, entries, run, out)
    return [
        outcome if outcome is not None else _decode_one(repo, envelope, slab, slot_size, item)
        for outcome, item in zip(out, items, strict=True)
    ]


def _decode_run(
    repo: Repository,
    envelope: Envelope,
    slab: Any,
    slot_size: int,
    items: list[Item],
    entries: dict[bytes, IndexEntry],
    run: list[int],
    out: list[Outcome | None],
) -> None:
    first = entries[items[run[0]][0]]
    start = first.offset
    end = max(entries[items[k][0]].offset + entries[items[k][0]].length for k in run)
    try:
        data = memoryview(
            repo.backend.get(pack_object_name(first.pack, first.pack_kind), start, end - start)
        )
    except ApplianceError:
        return  # each blob is read on its own, and the error names the first one lost
    for k in run:
        blob, length, slot = items[k]
        entry = entries[blob]
        sealed = data[entry.offset - start : entry.offset - start + entry.length]
        try:
            plaintext = envelope.open_content(entry.blob_type, blob, sealed)
        except ApplianceError:
            continue  # read again on its own: read_blob names the blob and the pack
        out[k] = _place(plaintext, entry.length, length, slot, slab, slot_size)


def _decode_one(
    repo: Repository, envelope: Envelope, slab: Any, slot_size: int, item: Item
) -> Outcome:
    blob, length, slot = item
    try:
        sealed = repo.locate(blob).length
        plaintext = repo.read_blob(blob, envelope)
    except ApplianceError as exc:
        return ("damaged", 0, None, exc.message)
    return _place(plaintext, sealed, length, slot, slab, slot_size)


def _place(
    plaintext: bytes, sealed: int, length: int, slot: int, slab: Any, slot_size: int
) -> Outcome:
    if len(plaintext) != length:
        return ("short", 0, None, f"has {len(plaintext)} bytes, not {length}")
    if slot < 0:
        return ("ok", sealed, plaintext, "")
    slab[slot * slot_size : slot * slot_size + length] = plaintext
    return ("ok", sealed, None, "")


def _decoder_main(
    spec: tuple[Any, ...], slab_path: str, slab_size: int, slot_size: int, conn: Any
) -> None:
    """A decoder process: one job at a time from ``conn``, until it closes or sends None."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the export stops its decoders itself
    try:
        repo = Repository.from_worker_spec(spec)
        fd = os.open(slab_path, os.O_RDWR)
        try:
            slab = mmap.mmap(fd, slab_size)
        finally:
            os.close(fd)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ""))
    envelope = Envelope(repo.key)
    try:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                break
            if job is None:
                break
            conn.send(decode_chunks(repo, envelope, slab, slot_size, job))
    finally:
        repo.close()


# --- the export's side ---------------------------------------------------------------------------


#: Called on the loop with a decoder's number and its outcomes (None: the decoder is gone).
DoneCallback = Callable[[int, "list[Outcome] | None"], None]


class Decoders(Protocol):
    workers: int

    def attach(self, loop: asyncio.AbstractEventLoop, done: DoneCallback) -> None:
        """Start delivering outcomes to ``done`` on ``loop`` (called on the loop's thread)."""

    def submit(self, worker: int, items: list[Item]) -> None:
        """Give decoder ``worker`` (which has no job) a job."""

    def close(self) -> None:
        """Stop the decoders; a job in hand is finished first (no store read outlives this)."""


class ProcessDecoders:
    """Decoder processes from the fork server, each with its own pipe (see the module doc)."""

    def __init__(
        self, spec: tuple[Any, ...], slab_fd: int, slab_size: int, slot_size: int, workers: int
    ) -> None:
        self.workers = workers
        ctx: Any = worker_context(True)
        slab_path = f"/proc/{os.getpid()}/fd/{slab_fd}"
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            for number in range(workers):
                mine, theirs = ctx.Pipe()
                process = ctx.Process(
                    target=_decoder_main,
                    args=(spec, slab_path, slab_size, slot_size, theirs),
                    name=f"nbd-decoder-{number}",
                    daemon=True,
                )
                process.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(process)
            for conn in self._conns:
                if not conn.poll(START_TIMEOUT):
                    raise RuntimeError("a decoder process did not start in time")
                state, message = conn.recv()
                if state != "ready":
                    raise RuntimeError(f"a decoder process failed to start: {message}")
        except BaseException:
            self.close()
            raise

    def attach(self, loop: asyncio.AbstractEventLoop, done: DoneCallback) -> None:
        self._loop = loop
        self._done = done
        for number, conn in enumerate(self._conns):
            loop.add_reader(conn.fileno(), self._readable, number)

    def submit(self, worker: int, items: list[Item]) -> None:
        try:
            self._conns[worker].send(items)
        except (OSError, ValueError):
            assert self._loop is not None
            self._loop.call_soon(self._lost, worker)

    def _readable(self, worker: int) -> None:
        try:
            outcomes = self._conns[worker].recv()
        except (EOFError, OSError):
            self._lost(worker)
            return
        self._done(worker, outcomes)

    def _lost(self, worker: int) -> None:
        assert self._loop is not None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._conns[worker].fileno())
        logger.error("NBD decoder process %d ended unexpectedly", worker)
        self._done(worker, None)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for process in self._procs:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


class ThreadDecoders:
    """Decoder threads in the export's process (when processes cannot be used)."""

    def __init__(self, repo: Repository, slab: Any, slot_size: int, workers: int) -> None:
        self.workers = workers
        self._repo = repo
        self._slab = slab
        self._slot_size = slot_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-decode")
        self._local = threading.local()

    def attach(self, loop: asyncio.AbstractEventLoop, done: DoneCallback) -> None:
        self._loop = loop
        self._done = done

    def _envelope(self) -> Envelope:
        envelope: Envelope | None = getattr(self._local, "envelope", None)
        if envelope is None:
            envelope = self._local.envelope = Envelope(self._repo.key)
        return envelope

    def submit(self, worker: int, items: list[Item]) -> None:
        def run() -> list[Outcome]:
            return decode_chunks(self._repo, self._envelope(), self._slab, self._slot_size, items)

        def finished(future: Future[list[Outcome]]) -> None:
            outcomes = None
            if not future.cancelled() and future.exception() is None:
                outcomes = future.result()
            elif not future.cancelled():
                logger.error("NBD decoder thread failed", exc_info=future.exception())
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._done, worker, outcomes)

        self._pool.submit(run).add_done_callback(finished)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
