"""The replication phase: a source appliance replicating to a paired peer on 127.0.0.1 over TLS.

Two real services, each ``appliance serve`` (TLS with its generated certificate, no scheduler,
no device monitor) in a process of its own with its own data dir, paired the way a user pairs
them (a code from the peer, ``POST /api/replication/pairing-codes``; ``POST /api/peers`` on the
source). Everything is driven through their APIs; only the processes started here are stopped,
by their pids. Nothing else is talked to.

Per repetition (the order of the transfers rotates):

1. **Throughput.** The asset's tree is replaced by N MiB of new random (incompressible) files
   (N = 512 x scale), backed up (not measured) with "replicate new points" off, then:
   ``ours`` is "replicate now" (``POST /api/peers/{id}/replicate``), timed by the job's own
   ``started_at``..``finished_at`` (opening the link, finding what is pending, ``copy_point``
   with the peer's presence query, the uploads the peer checks (a pack by its BLAKE3 name, the
   rest by SHA-256), index, manifest, the point's summary; one put in flight to a peer while the
   copy's threads read the next packs); ``plain`` is httpx streaming PUTs of the same new pack files,
   one after another on one keep-alive connection, from this process to a minimal uvicorn app
   (``https_sink.py``: same uvicorn configuration and certificate type, each body written to a
   file with fsync: what a peer does minus our protocol); ``plain3`` the same with as many PUTs
   in flight as a copy has threads (``COPY_THREADS``, 3). Before each transfer: ``sync`` and a
   wait until the three server processes are idle (the catalog and index work a backup leaves
   behind it done), so each starts on a quiet machine. MiB/s counts the new pack bytes, the
   same for all.
2. **Incremental bytes and RPO.** "Replicate new points" on, a new random file of 5 % of the
   tree added and backed up; the backup queues the replicate job itself. Bytes on the wire are
   the job's ``bytes_sent`` (``api.peer_backend.TRAFFIC``: request lines, headers and bodies of
   every request, presence queries, index file, manifest and summary included) against the
   sizes of the packs the backup added to the source's store. The RPO is the time from the
   backup job's end to the replicate job's end (the point ``present`` at the peer: every pack
   checked there, the manifest in last, its summary sent), both from the source's job records.

At the end the peer's replica must hold exactly the source's packs (names and sizes).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

MiB = 1 << 20
#: Throughput of ours at least this much of the plain transfer's.
RATIO_TARGET = 0.8
#: Bytes on the wire for an incremental point at most this much of its new packs.
BYTES_TARGET = 1.05
#: New data per repetition at scale 1, and the incremental's share of it.
FULL_MIB = 512
INCREMENT_SHARE = 0.05
FILE_BYTES = 4 * MiB
PASSPHRASE = "bench replication passphrase"
ADMIN = ("admin", "bench-admin-password")
SINK = Path(__file__).resolve().with_name("https_sink.py")
#: The measured transfers; their order rotates per repetition.
TRANSFERS = ["plain", "ours", "plain3"]
LABELS = {"ours": "ours", "plain": "plain", "plain3": "plain, 3 in flight"}
DONE = ("succeeded", "failed", "cancelled")

TITLE = "replication: source to a paired peer (two appliances, TLS on 127.0.0.1)"
METHOD = (
    "Two `appliance serve` processes with TLS (their generated certificates), paired with a "
    "code. Throughput: a point of N MiB of new random data (N = 512 x scale) replicated by "
    '"replicate now", timed by the replicate job\'s start and end, against plain httpx '
    "streaming PUTs of the same new pack files (one after another on one keep-alive connection; "
    "and 3 at a time, as many as a copy's threads read ahead; ours has one put in flight to a "
    "peer) to a minimal uvicorn TLS app (same configuration and certificate type) that writes "
    "each body to a file with fsync; order rotating per repetition; before each transfer a "
    "`sync` and a wait until the three server processes are idle; MiB/s counts the new pack "
    "bytes. "
    "CPU: seconds of the client process (source / bench) and the server process (peer / sink). "
    "Incremental: 5 % of the tree added as a new random file and backed up with replication "
    "after backups on; bytes sent on the wire (the job's `bytes_sent`: request lines, headers, "
    "bodies) vs the sizes of the packs the backup added; RPO: backup job end to replicate job "
    "end (the point present at the peer)."
)


class PhaseError(Exception):
    pass


@dataclass
class Transfer:
    """One measured transfer of a point's new packs."""

    seconds: float
    pack_bytes: int
    packs: int
    requests: int
    client_cpu: float
    server_cpu: float

    @property
    def mib_s(self) -> float:
        return self.pack_bytes / MiB / self.seconds if self.seconds else 0.0


@dataclass
class Increment:
    """One incremental point replicated after its backup."""

    added_bytes: int  # the new random file
    new_packs: int
    new_pack_bytes: int
    sent: int  # bytes on the wire to the peer
    received: int
    requests: int
    rpo_seconds: float

    @property
    def ratio(self) -> float:
        return self.sent / self.new_pack_bytes if self.new_pack_bytes else 0.0


@dataclass
class ReplicationResult:
    scale: float
    repeat: int
    full_bytes: int = 0
    ours: list[Transfer] = field(default_factory=list)
    plain: list[Transfer] = field(default_factory=list)
    plain3: list[Transfer] = field(default_factory=list)  # as many in flight as ours
    increments: list[Increment] = field(default_factory=list)
    replica_check: str = "not run"
    load: list[tuple[float, float, float]] = field(default_factory=list)  # at start, at end
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    def median(self, which: str, attr: str) -> float | None:
        runs = getattr(self, which)
        return statistics.median(getattr(t, attr) for t in runs) if runs else None

    def best(self, which: str) -> float | None:
        """The fastest run's MiB/s (on a shared machine, the least disturbed one)."""
        runs: list[Transfer] = getattr(self, which)
        return max(t.mib_s for t in runs) if runs else None

    def ratio_to(self, which: str) -> float | None:
        ours, plain = self.median("ours", "mib_s"), self.median(which, "mib_s")
        return ours / plain if ours and plain else None

    def best_ratio_to(self, which: str) -> float | None:
        ours, plain = self.best("ours"), self.best(which)
        return ours / plain if ours and plain else None

    @property
    def ratio(self) -> float | None:
        """Ours against the plain transfer, one PUT after another (the target's)."""
        return self.ratio_to("plain")


# --- processes ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(
    pids: list[int], quiet: float = 0.05, window: float = 0.5, limit: float = 20.0
) -> float:
    """Wait until the services use under ``quiet`` CPU seconds in ``window`` seconds (what a
    backup leaves running behind it, catalog and index work, is done), at most ``limit``
    seconds; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        before = sum(_cpu_seconds(pid) for pid in pids)
        time.sleep(window)
        if sum(_cpu_seconds(pid) for pid in pids) - before < quiet:
            break
    return time.perf_counter() - started


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process this module started, by its pid (SIGTERM, then SIGKILL after 30 s)."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _child_env() -> dict[str, str]:
    # No APPLIANCE_* setting of the caller's leaks in; a weakened KDF (the tests') is kept.
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    if os.environ.get("APPLIANCE_TEST_WEAK_KDF"):
        env["APPLIANCE_TEST_WEAK_KDF"] = os.environ["APPLIANCE_TEST_WEAK_KDF"]
    env["APPLIANCE_PASSPHRASE"] = PASSPHRASE
    env["APPLIANCE_DEVICE_MONITOR"] = "false"
    return env


class Service:
    """``appliance serve`` with TLS as a child process on its own data dir and a free port."""

    def __init__(self, cli: Path, root: Path, logs: Path) -> None:
        self.cli = cli
        self.name = root.name
        self.data = root / "data"
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log_path = logs / f"replication-{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert_pem = ""
        self.token = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def store(self) -> Path:
        return self.data / "pools" / "default" / "store"

    def start(self, timeout: float = 120.0) -> None:
        env = _child_env()
        created = subprocess.run(
            [str(self.cli), "--data-dir", str(self.data), "admin", "create", "--name", ADMIN[0]],
            env={**env, "APPLIANCE_ADMIN_PASSWORD": ADMIN[1]},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if created.returncode != 0:
            raise PhaseError(f"admin create exited {created.returncode}: {created.stderr.strip()}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(str(self.cli), "--data-dir", str(self.data), "serve", "--tls"),
                    *("--host", "127.0.0.1", "--port", str(self.port), "--no-scheduler"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        cert = self.data / "tls" / "cert.pem"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PhaseError(f"{self.name} exited {self.proc.returncode}; see {self.log_path}")
            if cert.exists():
                self.cert_pem = cert.read_text()
                with contextlib.suppress(httpx.HTTPError, ValueError), self._client() as c:
                    if c.get("/api/health").status_code == 200:
                        break
            if time.monotonic() > deadline:
                raise PhaseError(f"{self.name} did not answer within {timeout:.0f} s")
            time.sleep(0.1)
        with self._client() as c:
            r = c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
            _expect(r, 200, f"{self.name}: login")
            r = c.post("/api/tokens", json={}, headers={"X-CSRF-Token": r.json()["csrf_token"]})
            _expect(r, 201, f"{self.name}: token")
            self.token = str(r.json()["token"])

    def _client(self, **kwargs: Any) -> httpx.Client:
        from api.peer_backend import pinned_context

        return httpx.Client(
            base_url=self.url, verify=pinned_context(self.cert_pem), timeout=120, **kwargs
        )

    def api(self) -> httpx.Client:
        return self._client(headers={"Authorization": f"Bearer {self.token}"})

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def sink_server(root: Path, logs: Path) -> Iterator[tuple[str, str, int, Path]]:
    """(url, certificate PEM, pid, folder) of ``https_sink.py`` on a free port; stopped by its
    pid on leaving. Its certificate is made like the appliance's (``ensure_certificate``)."""
    from api.tls import ensure_certificate

    cert, key = root / "tls" / "cert.pem", root / "tls" / "key.pem"
    ensure_certificate(cert, key, "127.0.0.1")
    folder = root / "objects"
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "replication-sink.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SINK), str(port), str(folder), str(cert), str(key)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise PhaseError(f"the HTTPS sink did not start on port {port}") from None
                time.sleep(0.1)
        yield f"https://127.0.0.1:{port}", cert.read_text(), proc.pid, folder
    finally:
        _stop(proc)


# --- the API ------------------------------------------------------------------------------------


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise PhaseError(f"{what}: {response.status_code} {response.text[:300]}")


def _wait_job(api: httpx.Client, job_id: str, timeout: float = 3600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in DONE:
            if job["state"] != "succeeded":
                raise PhaseError(f"job {job_id} ({job['kind']}) ended {job['state']}: {job}")
            return job
        if time.monotonic() > deadline:
            raise PhaseError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
        time.sleep(0.1)


def _at(job: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(str(job[key]))


def _backup(api: httpx.Client, asset: str) -> dict[str, Any]:
    r = api.post(f"/api/assets/{asset}/backup", json={})
    _expect(r, 202, "backup now")
    return _wait_job(api, str(r.json()["id"]))


def _pair(source: Service, peer: Service) -> str:
    """Pair as a user does; returns the peer's location id at the source."""
    with peer.api() as api:
        r = api.post("/api/replication/pairing-codes")
        _expect(r, 201, "pairing code")
        code = r.json()["code"]
    with source.api() as api:
        r = api.post("/api/peers", json={"address": peer.url, "code": code, "label": "dr"})
        _expect(r, 201, "pairing")
        return str(r.json()["id"])


def _set_replicate_new(api: httpx.Client, location: str, on: bool) -> None:
    _expect(api.patch(f"/api/peers/{location}", json={"replicate_new": on}), 200, "peer change")


# --- data and packs -----------------------------------------------------------------------------


def _write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            block = min(left, FILE_BYTES)
            f.write(rng.randbytes(block))
            left -= block


def _fresh_tree(tree: Path, size: int, seed: int) -> None:
    """Replace the tree's files by ``size`` bytes of new random data in files of 4 MiB."""
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    count = max(1, -(-size // FILE_BYTES))
    for n in range(count):
        part = min(FILE_BYTES, size - n * FILE_BYTES)
        _write_random(tree / f"bulk-{seed}-{n:04d}.bin", part, seed * 100_000 + n)


def _packs(store: Path) -> dict[str, int]:
    """The store's pack objects (``data/..``, ``meta/..``) and their sizes."""
    out = {}
    for folder in ("data", "meta"):
        for path in (store / folder).rglob("*"):
            if path.is_file() and ".tmp" not in path.name:
                out[path.relative_to(store).as_posix()] = path.stat().st_size
    return out


# --- measurement --------------------------------------------------------------------------------


def _ours(source: Service, peer: Service, location: str) -> Transfer:
    with source.api() as api:
        cpu0, server0 = _cpu_seconds(source.pid), _cpu_seconds(peer.pid)
        r = api.post(f"/api/peers/{location}/replicate")
        _expect(r, 202, "replicate now")
        job = _wait_job(api, str(r.json()["id"]))
        cpu1, server1 = _cpu_seconds(source.pid), _cpu_seconds(peer.pid)
    result = job["result"]
    seconds = (_at(job, "finished_at") - _at(job, "started_at")).total_seconds()
    return Transfer(
        seconds,
        int(result["bytes_copied"]),
        int(result["packs_copied"]),
        int(result["requests"]),
        cpu1 - cpu0,
        server1 - server0,
    )


def _plain(
    store: Path,
    new: dict[str, int],
    url: str,
    cert_pem: str,
    pid: int,
    folder: Path,
    rep: int,
    in_flight: int = 1,
) -> Transfer:
    """PUT each new pack file, streamed from its file, ``in_flight`` at a time (threads sharing
    one client and its keep-alive connections)."""
    from api.peer_backend import pinned_context

    with httpx.Client(base_url=url, verify=pinned_context(cert_pem), timeout=120) as client:

        def put(name: str, size: int) -> None:
            with open(store / name, "rb") as f:
                r = client.put(
                    f"/{rep}/{name}",
                    content=f,
                    headers={
                        "Content-Length": str(size),
                        "Content-Type": "application/octet-stream",
                    },
                )
            _expect(r, 201, f"plain PUT of {name}")

        client.put("/warm-up", content=b"x")  # the handshake, as the source's link opens first
        cpu0, server0 = _own_cpu(), _cpu_seconds(pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            for done in [pool.submit(put, n, s) for n, s in sorted(new.items())]:
                done.result()
        seconds = time.perf_counter() - started
        cpu1, server1 = _own_cpu(), _cpu_seconds(pid)
    for path in folder.iterdir():  # untimed: every run finds the sink empty
        path.unlink()
    return Transfer(seconds, sum(new.values()), len(new), len(new), cpu1 - cpu0, server1 - server0)


def _increment(source: Service, location: str, tree: Path, added: int, seed: int) -> Increment:
    with source.api() as api:
        _set_replicate_new(api, location, True)
        try:
            before = _packs(source.store)
            _write_random(tree / f"increment-{seed}.bin", added, seed)
            backup = _backup(api, "bulk")
            jobs = backup["result"].get("replication_jobs") or []
            if len(jobs) != 1:
                raise PhaseError(f"the backup queued {len(jobs)} replicate jobs: {backup}")
            job = _wait_job(api, str(jobs[0]))
        finally:
            _set_replicate_new(api, location, False)
    new = {n: s for n, s in _packs(source.store).items() if n not in before}
    result = job["result"]
    if result.get("replicated") != [backup["result"]["point"]]:
        raise PhaseError(f"the replicate job sent {result.get('replicated')}")
    return Increment(
        added,
        len(new),
        sum(new.values()),
        int(result["bytes_sent"]),
        int(result["bytes_received"]),
        int(result["requests"]),
        (_at(job, "finished_at") - _at(backup, "finished_at")).total_seconds(),
    )


def run(
    cli: Path,
    work: Path,
    *,
    scale: float,
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> ReplicationResult:
    """The phase (see the module doc); a failure is the result's ``problem``."""
    result = ReplicationResult(scale, repeat)
    base = work / "replication"
    shutil.rmtree(base, ignore_errors=True)
    try:
        _run(result, cli, base, work / "logs", log)
    except Exception as exc:  # reported in the table and by the exit status, not a traceback
        result.problem = f"replication phase failed: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _run(
    result: ReplicationResult, cli: Path, base: Path, logs: Path, log: Callable[[str], None]
) -> None:
    from appliance.locations.copy import COPY_THREADS

    result.full_bytes = max(FILE_BYTES, int(FULL_MIB * result.scale) * MiB)
    added = max(64 * 1024, int(result.full_bytes * INCREMENT_SHARE))
    tree = base / "tree"
    tree.mkdir(parents=True)
    result.load.append(os.getloadavg())
    source, peer = Service(cli, base / "source", logs), Service(cli, base / "peer", logs)
    try:
        started = time.perf_counter()
        peer.start()
        source.start()
        location = _pair(source, peer)
        with source.api() as api:
            _set_replicate_new(api, location, False)
            r = api.post("/api/assets", json={"name": "bulk", "kind": "files", "path": str(tree)})
            _expect(r, 201, "asset")
        log(f"replication: two appliances up and paired in {time.perf_counter() - started:.1f} s")
        with sink_server(base / "sink", logs) as (url, cert_pem, sink_pid, folder):
            for rep in range(result.repeat):
                _fresh_tree(tree, result.full_bytes, seed=rep + 1)
                before = _packs(source.store)
                with source.api() as api:
                    _backup(api, "bulk")
                new = {n: s for n, s in _packs(source.store).items() if n not in before}
                shift = rep % len(TRANSFERS)
                for which in TRANSFERS[shift:] + TRANSFERS[:shift]:
                    # No dirty page of the backup or of the transfer before is written back
                    # during this one (every fsync would wait behind it), and the work a
                    # backup leaves behind it is done: each transfer starts on a quiet machine.
                    os.sync()
                    _settle([source.pid, peer.pid, sink_pid])
                    if which == "ours":
                        t = _ours(source, peer, location)
                    else:
                        flight = COPY_THREADS if which == "plain3" else 1
                        t = _plain(source.store, new, url, cert_pem, sink_pid, folder, rep, flight)
                    getattr(result, which).append(t)
                    log(
                        f"[{rep + 1}] replication {which:<6} {t.seconds:6.2f} s  "
                        f"{t.mib_s:7.1f} MiB/s  {t.packs} packs  {t.requests} requests  "
                        f"CPU client {t.client_cpu:.1f} s, server {t.server_cpu:.1f} s"
                    )
                    if t.pack_bytes != sum(new.values()):
                        result.notes.append(
                            f"{which} run {rep + 1} moved {t.pack_bytes} pack bytes, the point "
                            f"added {sum(new.values())}"
                        )
                inc = _increment(source, location, tree, added, seed=1000 + rep)
                result.increments.append(inc)
                log(
                    f"[{rep + 1}] replication incremental: {inc.sent} bytes sent for "
                    f"{inc.new_pack_bytes} bytes of new packs ({inc.ratio:.3f}x), "
                    f"{inc.requests} requests, RPO {inc.rpo_seconds:.2f} s"
                )
        result.replica_check = _check_replica(source, peer)
        result.load.append(os.getloadavg())
    finally:
        source.stop()
        peer.stop()


def _check_replica(source: Service, peer: Service) -> str:
    """``OK`` when the peer's replica holds exactly the source's packs, else what differs."""
    # Beside each replica, ``<store id>.points/`` holds the point summaries.
    replicas = [p for p in (peer.data / "replicas").iterdir() if p.is_dir() and "." not in p.name]
    if len(replicas) != 1:
        return f"the peer holds {len(replicas)} replicas"
    here, there = _packs(source.store), _packs(replicas[0])
    if here == there:
        return "OK"
    return (
        f"MISMATCH: {len(set(here) - set(there))} packs missing at the peer, "
        f"{len(set(there) - set(here))} extra, "
        f"{sum(1 for n in here if n in there and here[n] != there[n])} of other sizes"
    )


# --- report -------------------------------------------------------------------------------------

THROUGHPUT_HEADERS = [
    "transfer",
    "runs",
    "wall s",
    "pack MiB",
    "packs",
    "MiB/s (best)",
    "requests",
    "client CPU s",
    "server CPU s",
    "MiB/s ours/this (best/best)",
]
INCREMENT_HEADERS = [
    "run",
    "added MiB",
    "new packs",
    "new pack bytes",
    "bytes sent",
    "sent/new packs",
    "requests",
    "RPO s",
]


def throughput_rows(result: ReplicationResult) -> list[list[str]]:
    rows = []
    for which in ("ours", "plain", "plain3"):
        runs: list[Transfer] = getattr(result, which)
        if not runs:
            continue
        ratio, best = result.ratio_to(which), result.best_ratio_to(which)
        rows.append(
            [
                LABELS[which],
                str(len(runs)),
                f"{statistics.median(t.seconds for t in runs):.2f}",
                f"{statistics.median(t.pack_bytes for t in runs) / MiB:.1f}",
                f"{statistics.median(t.packs for t in runs):.0f}",
                f"{statistics.median(t.mib_s for t in runs):.1f} ({result.best(which):.1f})",
                f"{statistics.median(t.requests for t in runs):.0f}",
                f"{statistics.median(t.client_cpu for t in runs):.1f}",
                f"{statistics.median(t.server_cpu for t in runs):.1f}",
                f"{ratio:.2f}x ({best:.2f}x)"
                if which != "ours" and ratio is not None and best is not None
                else "-",
            ]
        )
    return rows


def increment_rows(result: ReplicationResult) -> list[list[str]]:
    rows = [
        [
            str(n),
            f"{i.added_bytes / MiB:.1f}",
            str(i.new_packs),
            str(i.new_pack_bytes),
            str(i.sent),
            f"{i.ratio:.3f}x",
            str(i.requests),
            f"{i.rpo_seconds:.2f}",
        ]
        for n, i in enumerate(result.increments, 1)
    ]
    if len(result.increments) > 1:
        incs = result.increments
        rows.append(
            [
                "median",
                f"{incs[0].added_bytes / MiB:.1f}",
                f"{statistics.median(i.new_packs for i in incs):.0f}",
                f"{statistics.median(i.new_pack_bytes for i in incs):.0f}",
                f"{statistics.median(i.sent for i in incs):.0f}",
                f"{statistics.median(i.ratio for i in incs):.3f}x",
                f"{statistics.median(i.requests for i in incs):.0f}",
                f"{statistics.median(i.rpo_seconds for i in incs):.2f}",
            ]
        )
    return rows


def targets(result: ReplicationResult) -> list[tuple[str, str, str]]:
    out = []
    ratio = result.ratio
    label = f"replication MiB/s ≥ {RATIO_TARGET:g}x plain HTTPS PUTs"
    if ratio is None:
        out.append((label, "no data", "n/a"))
    else:
        shown = f"{ratio:.2f}x (best runs {result.best_ratio_to('plain') or 0:.2f}x)"
        out.append((label, shown, "PASS" if ratio >= RATIO_TARGET else "FAIL"))
    same = result.ratio_to("plain3")
    if same is not None:
        shown = f"{same:.2f}x (best runs {result.best_ratio_to('plain3') or 0:.2f}x)"
        out.append(("replication MiB/s vs plain PUTs, as many in flight", shown, "info"))
    label = f"incremental: bytes sent ≤ {BYTES_TARGET:g}x its new packs"
    if not result.increments:
        out.append((label, "no data", "n/a"))
    else:
        worst = max(i.ratio for i in result.increments)
        median = statistics.median(i.ratio for i in result.increments)
        verdict = "PASS" if worst <= BYTES_TARGET else "FAIL"
        out.append((label, f"{median:.3f}x (worst {worst:.3f}x)", verdict))
    if result.increments:
        rpo = [i.rpo_seconds for i in result.increments]
        out.append(
            (
                "RPO: backup end to the point present at the peer",
                f"{statistics.median(rpo):.2f} s median ({min(rpo):.2f} to {max(rpo):.2f})",
                "info",
            )
        )
    out.append(("the peer holds exactly the source's packs", result.replica_check, _ok(result)))
    return out


def _ok(result: ReplicationResult) -> str:
    if result.replica_check == "not run":
        return "n/a"
    return "PASS" if result.replica_check == "OK" else "FAIL"


def conditions(result: ReplicationResult) -> list[str]:
    lines = [
        f"scale {result.scale:g}: {result.full_bytes / MiB:.0f} MiB of new random data per "
        f"repetition, incremental {INCREMENT_SHARE:.0%} of it; {result.repeat} repetition(s), "
        "medians",
    ]
    if result.load:
        shown = ", ".join(" / ".join(f"{x:.1f}" for x in load) for load in result.load)
        lines.append(f"load average (1 / 5 / 15 min) at start and end: {shown}")
    for which in ("ours", "plain", "plain3"):
        runs: list[Transfer] = getattr(result, which)
        if runs:
            each = ", ".join(f"{t.mib_s:.0f}" for t in runs)
            lines.append(f"{LABELS[which]} MiB/s per repetition: {each}")
    # Each repetition's transfers ran within seconds of each other: their ratio is paired.
    paired = [o.mib_s / p.mib_s for o, p in zip(result.ours, result.plain, strict=False) if p.mib_s]
    if paired:
        each = ", ".join(f"{r:.2f}" for r in paired)
        lines.append(f"ours/plain per repetition: {each} (median {statistics.median(paired):.2f}x)")
    return lines + result.notes


Table = Callable[[list[str], list[list[str]]], str]


def render(
    result: ReplicationResult, text_table: Table, markdown_table: Table
) -> tuple[list[str], list[str]]:
    """Text and markdown lines of the phase's tables and targets (drawn by
    ``report.text_table`` and ``report.markdown_table``, passed in)."""
    text = ["", f"== {TITLE} ==", *conditions(result)]
    md = ["", f"### {TITLE}", "", METHOD, ""] + [f"- {line}" for line in conditions(result)]
    transfers, increments = throughput_rows(result), increment_rows(result)
    if transfers:
        text += [text_table(THROUGHPUT_HEADERS, transfers)]
        md += ["", markdown_table(THROUGHPUT_HEADERS, transfers)]
    if increments:
        text += ["", text_table(INCREMENT_HEADERS, increments)]
        md += ["", markdown_table(INCREMENT_HEADERS, increments)]
    if result.problem:
        text.append(f"  ! {result.problem}")
        md += ["", f"- {result.problem}"]
    checks = targets(result)
    text += ["", "== targets (replication) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md += ["", "### Targets (replication)", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md
