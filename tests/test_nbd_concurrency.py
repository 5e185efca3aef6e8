"""No read waits on another client's read: the export's decoders serve clients in turn.

The decoders take jobs (a few chunks of one request) from a queue with one line per client,
round-robin. The integration test holds the only decoder at a gate and lets it decode one job at
a time, so the order is deterministic: client A queues eight jobs (four reads of 16 chunks),
client B then asks for one chunk, and B's read is answered after A's first job, while A's first
read is still unanswered. With one first-come-first-served queue (the export before), B's job
would be the ninth. The cache's pins and eviction and the fair queue are tested directly too.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, SMALL_PACKS, set_engine_env
from nbd_wire import CMD_DISC, CMD_READ, WirePeer

from appliance.engine import Appliance
from image import nbd_decode
from image.nbd_chunks import SlotCache
from image.nbd_client import NbdClient
from image.nbd_decode import JOB_CHUNKS, FairQueue
from image.nbd_export import export_image_over_nbd
from image.nbd_loader import READAHEAD_CHUNKS

CHUNK = 64 * 1024
CHUNKS = 96
SIZE = CHUNKS * CHUNK


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict]:
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    base = tmp_path_factory.mktemp("nbdconc")
    data = random.Random(5).randbytes(SIZE)  # every chunk holds data, none repeats
    disk = base / "disk.raw"
    disk.write_bytes(data)
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, pack_size=SMALL_PACKS)
    manifest = app.manifest(app.backup_image([str(disk)], "vm").point.id)
    app.close()
    mp.undo()
    return base, data, manifest


@pytest.fixture
def app(backed_up: tuple[Path, bytes, dict]) -> Iterator[Appliance]:
    appliance = Appliance.open(str(backed_up[0] / "app"), passphrase=PASSPHRASE)
    yield appliance
    appliance.close()


def _wait_for(condition: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def _simple_peer(path: str) -> WirePeer:
    peer = WirePeer(path)
    peer.greeting()
    peer.export_name()
    return peer


def _has_bytes(peer: WirePeer) -> bool:
    readable, _, _ = select.select([peer.sock], [], [], 0)
    return bool(readable)


def test_a_read_is_answered_while_another_clients_reads_wait(
    app: Appliance,
    backed_up: tuple[Path, bytes, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, data, manifest = backed_up
    gate = threading.Semaphore(0)
    jobs: list[int] = []  # one entry per job the decoder started
    finished: list[int] = []  # and per job it finished
    decode = nbd_decode.decode_chunks

    def gated(repo, envelope, slab, slot_size, items):  # type: ignore[no-untyped-def]
        jobs.append(len(items))
        assert gate.acquire(timeout=20), "the test never opened the gate"
        outcomes = decode(repo, envelope, slab, slot_size, items)
        finished.append(len(items))
        return outcomes

    monkeypatch.setattr(nbd_decode, "decode_chunks", gated)
    export = export_image_over_nbd(
        app.repo, manifest, "disk", str(tmp_path / "c.sock"), decoders=1, processes=False
    )
    a = _simple_peer(export.socket_path)
    b = _simple_peer(export.socket_path)
    try:
        reads = 4
        per_read = 2 * JOB_CHUNKS  # two jobs each
        for cookie in range(reads):
            a.request(CMD_READ, cookie, cookie * per_read * CHUNK, per_read * CHUNK)
        # One job in the decoder (held at the gate), the other seven queued.
        assert _wait_for(lambda: len(jobs) == 1 and export.decode_backlog == 2 * reads - 1)
        b.request(CMD_READ, 100, 90 * CHUNK, 4096)  # one chunk nobody asked for yet
        assert _wait_for(lambda: export.decode_backlog == 2 * reads)

        gate.release()  # A's first job
        assert _wait_for(lambda: len(jobs) == 2)
        gate.release()  # the next job: B's, not A's second
        assert b.simple_reply(4096) == (0, 100, data[90 * CHUNK : 90 * CHUNK + 4096])
        assert finished == [JOB_CHUNKS, 1]  # B was answered after two jobs, not nine
        assert not _has_bytes(a)  # while A's first read still waits for its second job

        gate.release(2 * reads)
        for _ in range(reads):
            error, cookie, got = a.simple_reply(per_read * CHUNK)
            offset = cookie * per_read * CHUNK
            assert error == 0 and got == data[offset : offset + per_read * CHUNK]
        a.request(CMD_DISC, 99)
        b.request(CMD_DISC, 101)
    finally:
        gate.release(100)
        a.close()
        b.close()
        export.stop()
    assert export.stats.chunks_from_store >= reads * per_read + 1  # and readahead
    assert export.errors == []


def test_a_chunk_wanted_by_several_reads_is_decoded_once(
    app: Appliance, backed_up: tuple[Path, bytes, dict], tmp_path: Path
) -> None:
    _, data, manifest = backed_up
    export = export_image_over_nbd(app.repo, manifest, "disk", str(tmp_path / "d.sock"))
    try:
        clients = [NbdClient.connect_unix(export.socket_path) for _ in range(4)]
        results: dict[int, bytes] = {}

        def read(n: int) -> None:
            results[n] = clients[n].pread(10 * CHUNK + n, 3 * CHUNK)

        threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for n in range(4):
            assert results[n] == data[10 * CHUNK + n : 13 * CHUNK + n]
            clients[n].close()
        # Chunks 10 to 13 (the last read's end), plus their readahead, each decoded once.
        assert export.stats.chunks_from_store <= 4 + READAHEAD_CHUNKS
    finally:
        export.stop()


def test_decoders_die_with_the_export_process(
    backed_up: tuple[Path, bytes, dict], tmp_path: Path
) -> None:
    """A killed export (SIGKILL, the OOM killer) leaves no decoder holding the store open."""
    base, _, manifest = backed_up
    script = tmp_path / "serve.py"
    script.write_text(
        "import json, sys\n"
        "from appliance.engine import Appliance\n"
        "from image.nbd_export import export_image_over_nbd\n"
        "def main():\n"
        "    app = Appliance.open(sys.argv[1], passphrase=sys.argv[2])\n"
        "    manifest = json.loads(sys.argv[3])\n"
        "    export = export_image_over_nbd(app.repo, manifest, 'disk', sys.argv[4], decoders=2)\n"
        "    print(type(export.loader.decoders).__name__, flush=True)\n"
        "    sys.stdin.read()\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(base / "app"),
            PASSPHRASE,
            json.dumps(manifest),
            str(tmp_path / "k.sock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(root)},
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ProcessDecoders"
        descendants = _descendants(server.pid)
        assert len(descendants) >= 2  # the fork server and its decoders
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert _wait_for(lambda: not [p for p in descendants if _alive(p)], within=10)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the parts, directly -------------------------------------------------------------------------


def test_the_fair_queue_serves_owners_in_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(4):
        queue.put("a", f"a{n}")
    queue.put("b", "b0")
    queue.put("warm", "w0")
    queue.put("warm", "w1")
    assert len(queue) == 7
    assert [queue.take() for _ in range(7)] == ["a0", "b0", "w0", "a1", "w1", "a2", "a3"]
    assert len(queue) == 0
    with pytest.raises(IndexError):
        queue.take()
    # A decoder may batch the served owner's next jobs with its last: the turns do not change.
    for job in ("a0", "a1", "a2"):
        queue.put("a", job)
    queue.put("b", "b0")
    assert queue.peek_more() is None and queue.take() == "a0"
    assert queue.peek_more() == "a1" and queue.take_more() == "a1"
    assert queue.take() == "b0" and queue.take() == "a2" and queue.peek_more() is None
    queue.put("a", "x")
    assert queue.drain() == ["x"] and len(queue) == 0


def test_the_slot_cache_never_reuses_a_pinned_slot() -> None:
    cache = SlotCache(2)
    first = cache.reserve(10)
    second = cache.reserve(11)
    assert {first, second} == {0, 1} and cache.reserve(12) is None  # both pending
    assert first is not None and second is not None
    cache.fill(first)
    cache.unpin(first)  # cached, idle: may be evicted
    cache.fill(second)  # cached, still pinned by a reply
    assert cache.lookup(10) == first
    cache.unpin(first)
    assert cache.reserve(12) == first  # the idle one goes, the pinned one stays
    assert 10 not in cache and 11 in cache
    cache.fail(first)  # chunk 12 did not decode: freed once unpinned
    cache.unpin(first)
    assert 12 not in cache
    cache.unpin(second)
    assert cache.reserve(13) == first and cache.reserve(14) == second  # free first, then LRU
