"""The chunks of an export's reads, on its event loop: cache, decode jobs, readahead, warming.

:class:`ChunkLoader` is what a connection asks for the bytes of a read. On the loop thread (no
locks), it finds each chunk of the range in the :class:`~image.nbd_chunks.SlotCache` (pinned
until the reply is written), or joins the job that already decodes it, or reserves a slot and
queues a job for the decoders of :mod:`image.nbd_decode` (a chunk is decoded once however many
reads want it at the same time). Jobs are cut at :data:`~image.nbd_decode.JOB_CHUNKS` chunks and
queued under their owner (the connection, or "warm" for a boot profile) in the fair queue, so a
read waits at most for the jobs in hand, never behind another client's queue.

When a job's outcomes come back the loader fills or frees the slots and keeps the
:class:`~image.nbd_chunks.ChunkSource`'s counters. A chunk that failed is not cached: the next
read tries the store again. Only a guest's read records damage (``errors``, ``stats.errors``);
a readahead, ``NBD_CMD_CACHE`` or warming that fails is nobody's error until a read needs the
chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from appliance.store.format import ZERO_ID
from appliance.workers import default_workers
from image.nbd_chunks import ChunkSource, SlotCache, UnreadableChunk
from image.nbd_decode import (
    JOB_CHUNKS,
    Decoders,
    FairQueue,
    Outcome,
    ProcessDecoders,
    ThreadDecoders,
)

logger = logging.getLogger(__name__)

#: Chunks decoded ahead of a read that missed the cache.
READAHEAD_CHUNKS = 4


class _ChunkFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class _Job:
    """Chunks decoded together; ``done`` when each has its result: the slot it is cached in,
    its bytes (when it got no slot), or why it failed."""

    done: asyncio.Future[None]
    warm: bool
    #: Chunk index, slot (-1: none free, the bytes come back), length, blob ID.
    items: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    results: dict[int, int | bytes | _ChunkFailed] = field(default_factory=dict)


#: What a read waits for: a chunk index and the job decoding it.
_Wait = tuple[int, _Job]


class ChunkLoader:
    """Reads chunks for the export's connections on its loop thread (see the module doc)."""

    def __init__(
        self, source: ChunkSource, *, workers: int | None = None, processes: bool = True
    ) -> None:
        self.source = source
        self.cache = SlotCache(source.cache_chunks)
        self.slot_size = source.chunk_size
        self.queue: FairQueue[_Job] = FairQueue()
        self._pending: dict[int, tuple[_Job, int]] = {}  # chunk index -> its job, its slot
        self._running: dict[int, list[_Job]] = {}  # decoder -> the jobs it has (one message)
        self._idle: list[int] = []
        self._zeros = memoryview(bytes(source.chunk_size))
        self._loop: asyncio.AbstractEventLoop | None = None
        workers = workers or default_workers()
        size = source.cache_chunks * source.chunk_size
        spec = source.repo.worker_spec() if processes else None
        self.decoders: Decoders
        if spec is not None and hasattr(os, "memfd_create"):
            fd = os.memfd_create("nbd-chunk-cache", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self._slab = mmap.mmap(fd, size)
                try:
                    self.decoders = ProcessDecoders(spec, fd, size, self.slot_size, workers)
                except Exception as exc:
                    logger.warning("NBD export: decoding on threads (no processes: %s)", exc)
                    self.decoders = ThreadDecoders(source.repo, self._slab, self.slot_size, workers)
            finally:
                os.close(fd)  # the decoders mapped it; the mapping keeps it
        else:
            self._slab = mmap.mmap(-1, size)
            self.decoders = ThreadDecoders(source.repo, self._slab, self.slot_size, workers)
        self._view = memoryview(self._slab)

    @property
    def backlog(self) -> int:
        """Decode jobs waiting for a decoder."""
        return len(self.queue)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start taking jobs (on the loop's thread)."""
        self._loop = loop
        self._idle = list(range(self.decoders.workers))
        self.decoders.attach(loop, self._finished)

    def close(self) -> None:
        """Stop the decoders (after the loop stopped)."""
        self.decoders.close()
        with contextlib.suppress(BufferError):  # a reply's view still alive: the GC unmaps it
            self._view.release()
            self._slab.close()

    # --- reads ---

    async def read_pinned(
        self, owner: Hashable, offset: int, length: int
    ) -> tuple[list[memoryview], list[int]]:
        """The bytes of ``[offset, offset+length)`` as views (of the slab, or of a zero chunk),
        and the slots they pin: the caller sends the views, then calls :meth:`release`.
        Raises :class:`UnreadableChunk` (recorded as damage) naming the first chunk that cannot
        be read."""
        source = self.source
        span = source.chunk_span(offset, length)
        held: list[int] = []
        waits: list[_Wait] = []
        got: dict[int, int | bytes] = {}
        missed = self._claim(owner, span, held=held, waits=waits, got=got)
        try:
            await _jobs_done(waits)
            for index, job in waits:  # in chunk order: the first failure is reported
                result = job.results[index]
                if isinstance(result, _ChunkFailed):
                    raise self._damaged(offset, index, result.message)
                got[index] = result
            pieces = self._pieces(offset, length, span, got)
        except BaseException:
            self.release(held)
            raise
        after = span[-1] + 1 if span else 0
        if missed and after < len(source.table) and after not in self._pending:
            # Guests read on: decode the next chunks while this reply travels (unless a
            # request already did: a streaming client has its next reads in flight).
            self._claim(owner, range(after, min(after + READAHEAD_CHUNKS, len(source.table))))
        return pieces, held

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.cache.unpin(slot)

    def _pieces(
        self, offset: int, length: int, span: range, got: dict[int, int | bytes]
    ) -> list[memoryview]:
        source, size = self.source, self.slot_size
        end = min(offset + length, source.size)
        pieces = []
        for index in span:
            start = index * size
            low, high = max(offset, start) - start, min(end, start + size) - start
            found = got.get(index)
            if found is None:
                pieces.append(self._zeros[low:high])
            elif isinstance(found, int):
                pieces.append(self._view[found * size + low : found * size + high])
            else:
                pieces.append(memoryview(found)[low:high])
        return pieces

    def _damaged(self, offset: int, index: int, message: str) -> UnreadableChunk:
        source = self.source
        source.record_damage(f"point {source.point_id} damaged: {message}")
        at = max(offset, index * source.chunk_size)
        text = (
            f"point {source.point_id} damaged: disk {source.name} offset {at} "
            f"(chunk {index}): {message}"
        )
        return UnreadableChunk(text, offset=at, index=index)

    async def cache_range(self, owner: Hashable, offset: int, length: int) -> int:
        """Decode the range's uncached chunks (at most half the cache, so caching a range never
        evicts its own start) and return how many; :class:`UnreadableChunk` for the first that
        cannot be read (not recorded as damage: only a guest's read is)."""
        source = self.source
        wanted = [
            i
            for i in source.chunk_span(offset, length)
            if source.is_data(i) and i not in self.cache
        ][: max(1, self.cache.slots // 2)]
        waits: list[_Wait] = []
        self._claim(owner, wanted, waits=waits)
        await _jobs_done(waits)
        for index, job in waits:
            result = job.results[index]
            if isinstance(result, _ChunkFailed):
                message = f"point {source.point_id} disk {source.name}: chunk {index}: "
                raise UnreadableChunk(
                    message + result.message, offset=index * source.chunk_size, index=index
                )
        return len(wanted)

    def warm(self, indices: Iterable[int]) -> None:
        """Queue chunks ``indices`` (valid data chunks) for decoding into the cache, in order,
        as one more owner of the fair queue (on the loop's thread)."""
        self._claim("warm", indices, warm=True)

    # --- jobs ---

    def _claim(
        self,
        owner: Hashable,
        indices: Iterable[int],
        *,
        held: list[int] | None = None,
        waits: list[_Wait] | None = None,
        got: dict[int, int | bytes] | None = None,
        warm: bool = False,
    ) -> int:
        """Queue the decoding of those of ``indices`` that hold data and are neither cached
        nor being decoded; with ``held``, pin the slots of all of them (cached ones go to
        ``got``), with ``waits``, collect what to await. Returns how many were queued."""
        assert self._loop is not None
        source, cache, loop, table = self.source, self.cache, self._loop, self.source.table
        job = _Job(loop.create_future(), warm)
        queued = 0
        for index in indices:
            if table[index] == ZERO_ID:
                continue
            if index in cache:
                if held is not None and got is not None:
                    slot = cache.lookup(index)
                    assert slot is not None
                    held.append(slot)
                    got[index] = slot
                    source.stats.cache_hits += 1
                continue
            pending = self._pending.get(index)
            if pending is None:
                reserved = cache.reserve(index)
                pending = self._pending[index] = (job, -1 if reserved is None else reserved)
                job.items.append(
                    (index, pending[1], source.chunk_length(index), source.table[index])
                )
                queued += 1
                if len(job.items) == JOB_CHUNKS:
                    self.queue.put(owner, job)
                    job = _Job(loop.create_future(), warm)
            if held is not None and pending[1] >= 0:
                cache.pin(pending[1])
                held.append(pending[1])
            if waits is not None:
                waits.append((index, pending[0]))
        if job.items:
            self.queue.put(owner, job)
        self._pump()
        return queued

    def _pump(self) -> None:
        while self._idle and self.queue:
            # A decoder takes the next job, and more of the same owner's while they fit in
            # JOB_CHUNKS (small requests go in one message; the fairness bound stays a job).
            jobs = [self.queue.take()]
            size = len(jobs[0].items)
            while (more := self.queue.peek_more()) is not None and (
                size + len(more.items) <= JOB_CHUNKS
            ):
                jobs.append(self.queue.take_more())
                size += len(more.items)
            worker = self._idle.pop()
            self._running[worker] = jobs
            items = [(blob, n, slot) for job in jobs for _, slot, n, blob in job.items]
            self.decoders.submit(worker, items)
        if not self._idle and not self._running:
            for job in self.queue.drain():  # no decoder left: fail rather than hang
                self._resolve(job, [("damaged", 0, None, "no decoder is running")] * len(job.items))

    def _finished(self, worker: int, outcomes: list[Outcome] | None) -> None:
        jobs = self._running.pop(worker, [])
        if outcomes is not None:
            self._idle.append(worker)
        start = 0
        for job in jobs:
            count = len(job.items)
            if outcomes is None:
                self._resolve(job, [("damaged", 0, None, "the decoder process ended")] * count)
            else:
                self._resolve(job, outcomes[start : start + count])
            start += count
        self._pump()

    def _resolve(self, job: _Job, outcomes: list[Outcome]) -> None:
        source, stats, cache = self.source, self.source.stats, self.cache
        for (index, slot, length, _), (status, sealed, data, message) in zip(
            job.items, outcomes, strict=True
        ):
            del self._pending[index]
            if status == "ok":
                stats.chunks_from_store += 1
                stats.bytes_from_store += sealed
                stats.bytes_decoded += length
                if job.warm:
                    stats.chunks_warmed += 1
                if slot >= 0:
                    cache.fill(slot)
                    cache.unpin(slot)
                    job.results[index] = slot
                else:
                    assert data is not None
                    job.results[index] = data
                continue
            if status == "short":
                message = f"chunk {index} of disk {source.name} {message}"
            if slot >= 0:
                cache.fail(slot)
                cache.unpin(slot)
            job.results[index] = _ChunkFailed(message)
        job.done.set_result(None)


async def _jobs_done(waits: list[_Wait]) -> None:
    """Wait for the jobs of ``waits`` (shielded: a cancelled read leaves them running for the
    other reads that wait on the same chunks)."""
    seen: set[int] = set()
    for _, job in waits:
        if not job.done.done() and id(job) not in seen:
            seen.add(id(job))
            await asyncio.shield(job.done)
