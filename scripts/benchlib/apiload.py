"""The API load phase: many clients poll the service while a backup runs.

Starts ``appliance serve --no-tls`` on a free 127.0.0.1 port with its own temporary data dir,
creates an admin (``appliance admin create``), signs in and creates an API token, and protects
the bench tree as an asset. Then:

1. a warm-up full backup (not measured: it fills the store, so the measured backups all find
   their chunks present and do the same work),
2. a full backup with no load, timed by the job's own ``started_at``/``finished_at``,
3. a full backup while ``clients`` asyncio clients (one ``httpx.AsyncClient`` each) loop over
   ``GET /api/jobs/{id}`` and ``GET /api/points?limit=50`` until the job ends (or
   ``max_seconds`` pass), each request's latency recorded,
4. another unloaded full backup; the unloaded duration is the mean of 2 and 4.

The slowdown is loaded / unloaded - 1. Only the server process started here is stopped (by its
pid) and only the temporary data dir made here is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx

P99_TARGET_MS = 100.0
_T = TypeVar("_T")

SLOWDOWN_TARGET = 0.10
ADMIN = ("bench", "bench-password-1")
PASSPHRASE = "bench api load passphrase"
DONE = ("succeeded", "failed", "cancelled", "interrupted")


class LoadError(Exception):
    pass


@dataclass
class LoadResult:
    clients: int = 0
    interval: float = 0.0  # seconds each client waits after each answer
    files: int = 0
    tree_mib: float = 0.0
    unloaded: list[float] = field(default_factory=list)  # seconds, before and after the load
    loaded: list[float] = field(default_factory=list)  # seconds, the backups under load
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    client_cpu: float | None = None  # CPU seconds of this (client) process during the load
    server_cpu: float | None = None  # CPU seconds of the server process (not its job children)
    #: CPU seconds of the server process over the k unloaded backups before the load: what the
    #: service spends running backups (dispatch, progress), to take off ``server_cpu``.
    server_cpu_unloaded: float | None = None
    problem: str | None = None  # the phase could not complete

    @property
    def unloaded_mean(self) -> float | None:
        return statistics.fmean(self.unloaded) if self.unloaded else None

    @property
    def loaded_mean(self) -> float | None:
        return statistics.fmean(self.loaded) if self.loaded else None

    @property
    def slowdown(self) -> float | None:
        base, loaded = self.unloaded_mean, self.loaded_mean
        if not base or loaded is None:
            return None
        return loaded / base - 1

    @property
    def rps(self) -> float | None:
        return self.requests / self.load_seconds if self.load_seconds else None

    @property
    def server_ms_per_request(self) -> float | None:
        if self.server_cpu is None or not self.requests:
            return None
        return self.server_cpu / self.requests * 1000

    @property
    def server_ms_per_request_net(self) -> float | None:
        """Server CPU per request once the cost of running the backups is taken off."""
        if self.server_cpu is None or self.server_cpu_unloaded is None or not self.requests:
            return None
        return max(0.0, self.server_cpu - self.server_cpu_unloaded) / self.requests * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(sorted_values: list[float], q: float) -> float:
    # Nearest-rank percentile.
    rank = max(1, int(-(-q * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _job_seconds(job: dict) -> float:
    if job["state"] != "succeeded":
        raise LoadError(f"backup job {job['id']} ended {job['state']}: {job.get('error')}")
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"])
    return (end - start).total_seconds()


class Server:
    """``appliance serve --no-tls`` as a child process with its own data dir."""

    def __init__(self, cli: Path, work: Path, log_path: Path) -> None:
        self.cli = cli
        work.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="api-load-", dir=work))
        self.data = self.tmp / "data"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
            "APPLIANCE_PASSPHRASE": PASSPHRASE,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        admin = subprocess.run(
            [str(self.cli), "--data-dir", str(self.data), "admin", "create", "--name", ADMIN[0]],
            env={**self.env, "APPLIANCE_ADMIN_PASSWORD": ADMIN[1]},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if admin.returncode != 0:
            raise LoadError(f"admin create exited {admin.returncode}: {admin.stderr.strip()}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(str(self.cli), "--data-dir", str(self.data), "serve", "--no-tls"),
                    *("--host", "127.0.0.1", "--port", str(self.port), "--no-scheduler"),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LoadError(f"the server exited {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LoadError(f"the server did not answer within {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _token(url: str) -> str:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
        if r.status_code != 200:
            raise LoadError(f"login: {r.status_code} {r.text[:200]}")
        csrf = r.json()["csrf_token"]
        r = c.post("/api/tokens", json={}, headers={"X-CSRF-Token": csrf})
        if r.status_code != 201:
            raise LoadError(f"token: {r.status_code} {r.text[:200]}")
        return str(r.json()["token"])


def _submit(api: httpx.Client, asset: str) -> str:
    r = api.post(f"/api/assets/{asset}/backup", json={"mode": "full"})
    if r.status_code != 202:
        raise LoadError(f"backup now: {r.status_code} {r.text[:200]}")
    return str(r.json()["id"])


def _wait(api: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] in DONE:
            return dict(job)
        if time.monotonic() > deadline:
            raise LoadError(f"backup job {job_id} still {job['state']} after {timeout:.0f} s")
        time.sleep(0.2)


class Conn:
    """One keep-alive HTTP/1.1 connection sending GETs, the way a load generator does it.

    The clients share the two cores with the server and the backup being measured; httpx spends
    about as much CPU per request as the server does, which would be charged to the backup's
    slowdown although a real appliance's clients run elsewhere. This writes one request and
    reads a ``Content-Length`` answer, nothing more.
    """

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            await self.connect()
        assert self.writer is not None and self.reader is not None
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise LoadError(f"{path}: answer without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _load(
    url: str,
    token: str,
    asset: str,
    clients: int,
    interval: float,
    runs: int,
    max_seconds: float,
    result: LoadResult,
    server_pid: int,
) -> tuple[list[str], list[float]]:
    """Connect the clients (one warm-up request each, not counted), then run ``runs`` full
    backups back to back while every client polls the running job and the points list.
    Returns the backups' job ids and the latencies (seconds)."""
    latencies: list[float] = []
    stop = asyncio.Event()
    address = httpx.URL(url)
    assert address.host == "127.0.0.1" and address.port is not None
    conns = [Conn(address.host, address.port, token) for _ in range(clients)]
    job_ids: list[str] = []
    try:
        warm = await asyncio.gather(*(c.get("/api/me") for c in conns), return_exceptions=True)
        failed = [w for w in warm if not isinstance(w, tuple) or w[0] != 200]
        if failed:
            raise LoadError(f"{len(failed)} of {clients} clients failed to connect: {failed[0]}")
        api = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

        async def submit() -> str:
            r = await api.post(f"/api/assets/{asset}/backup", json={"mode": "full"})
            if r.status_code != 202:
                raise LoadError(f"backup now: {r.status_code} {r.text[:200]}")
            job_ids.append(str(r.json()["id"]))
            return job_ids[-1]

        current = [f"/api/jobs/{await submit()}"]

        async def driver() -> None:
            # Backups one after the other, each started as soon as the previous one ended.
            while True:
                job = (await api.get(current[0])).json()
                if job["state"] in DONE:
                    if job["state"] != "succeeded":
                        raise LoadError(f"backup job {job['id']} ended {job['state']}")
                    if len(job_ids) >= runs:
                        return
                    current[0] = f"/api/jobs/{await submit()}"
                await asyncio.sleep(0.1)

        async def client(n: int, c: Conn) -> None:
            i = n  # clients start on different routes, and spread over the first interval
            if interval:
                await asyncio.sleep(interval * n / clients)
            while not stop.is_set():
                path = current[0] if i % 2 == 0 else "/api/points?limit=50"
                i += 1
                started = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(c.get(path), 30)
                    latencies.append(time.perf_counter() - started)
                    if status != 200:
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(f"{path}: {status} {body[:120]!r}")
                except (OSError, LoadError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    latencies.append(time.perf_counter() - started)
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{path}: {type(exc).__name__}: {exc}")
                    await c.close()
                    c.reader = c.writer = None
                if interval:
                    await asyncio.sleep(interval)

        started = time.perf_counter()
        server_cpu, client_cpu = _cpu_seconds(server_pid), time.process_time()
        tasks = [asyncio.create_task(client(n, c)) for n, c in enumerate(conns)]
        try:
            await asyncio.wait_for(driver(), max_seconds)
        except TimeoutError:
            raise LoadError(f"the loaded backups did not end within {max_seconds:.0f} s") from None
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await api.aclose()
        result.load_seconds = time.perf_counter() - started
        result.client_cpu = time.process_time() - client_cpu
        result.server_cpu = _cpu_seconds(server_pid) - server_cpu
        return job_ids, latencies
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def _run_coroutine(coroutine: Coroutine[object, object, _T]) -> _T:
    """``asyncio.run``, in a thread of its own when this thread already runs an event loop (a
    caller inside one, or Playwright's sync API in the same test process)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, coroutine).result()


def run(
    cli: Path,
    work: Path,
    tree: Path,
    *,
    files: int,
    tree_bytes: int,
    clients: int = 100,
    interval: float = 1.0,
    min_seconds: float = 30.0,
    max_seconds: float = 600.0,
    log=print,
) -> LoadResult:
    """Unloaded full backups until they add up to ``min_seconds`` (k of them), then k under
    load, then k unloaded again: a short backup measured once would be mostly noise."""
    result = LoadResult(
        clients=clients, interval=interval, files=files, tree_mib=tree_bytes / (1 << 20)
    )
    server = Server(cli, work, work / "logs" / "api-load-serve.log")
    try:
        server.start()
        token = _token(server.url)
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as api:
            r = api.post("/api/assets", json={"name": "tree", "kind": "files", "path": str(tree)})
            if r.status_code != 201:
                raise LoadError(f"create asset: {r.status_code} {r.text[:200]}")
            warm = _job_seconds(_wait(api, _submit(api, "tree"), max_seconds))
            log(f"api-load: warm-up full backup {warm:.1f} s (fills the store; not measured)")
            assert server.proc is not None
            cpu_before = _cpu_seconds(server.proc.pid)
            while not result.unloaded or sum(result.unloaded) < min_seconds:
                result.unloaded.append(_job_seconds(_wait(api, _submit(api, "tree"), max_seconds)))
            result.server_cpu_unloaded = _cpu_seconds(server.proc.pid) - cpu_before
            runs = len(result.unloaded)
            log(f"api-load: {runs} unloaded full backups, {_seconds(result.unloaded)}")
            job_ids, latencies = _run_coroutine(
                _load(
                    server.url,
                    token,
                    "tree",
                    clients,
                    interval,
                    runs,
                    max_seconds,
                    result,
                    server.proc.pid,
                )
            )
            result.loaded = [_job_seconds(_wait(api, j, max_seconds)) for j in job_ids]
            result.requests = len(latencies)
            if latencies:
                ordered = sorted(latencies)
                result.p50_ms = _percentile(ordered, 0.50) * 1000
                result.p99_ms = _percentile(ordered, 0.99) * 1000
                result.max_ms = ordered[-1] * 1000
            log(
                f"api-load: {runs} loaded full backups, {_seconds(result.loaded)}; "
                f"{result.requests} requests from {clients} clients, {result.errors} errors"
            )
            after = [_job_seconds(_wait(api, _submit(api, "tree"), max_seconds)) for _ in job_ids]
            result.unloaded += after
            log(f"api-load: {runs} unloaded full backups (after), {_seconds(after)}")
    except (LoadError, httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
        result.problem = (
            f"{type(exc).__name__}: {exc}" if not isinstance(exc, LoadError) else str(exc)
        )
    finally:
        server.stop()
    return result


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"mean {statistics.fmean(values):.2f} s, median {statistics.median(values):.2f}, "
        f"min {min(values):.2f}, max {max(values):.2f} ({len(values)} runs)"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def rows(result: LoadResult) -> list[list[str]]:
    slowdown = result.slowdown
    per_request = result.server_ms_per_request
    return [
        ["clients", f"{result.clients}, each waiting {result.interval:g} s after each answer"],
        ["backed-up tree", f"{result.files} files, {result.tree_mib:.0f} MiB (full mode)"],
        [
            "backups unloaded (before and after)",
            "-" if not result.unloaded else _seconds(result.unloaded),
        ],
        ["backups under load", "-" if not result.loaded else _seconds(result.loaded)],
        ["slowdown (means)", "-" if slowdown is None else f"{slowdown * 100:+.1f} %"],
        ["requests", f"{result.requests} in {result.load_seconds:.1f} s"],
        ["requests/s", "-" if result.rps is None else f"{result.rps:.0f}"],
        [
            "latency p50 / p99 / max",
            f"{_ms(result.p50_ms)} / {_ms(result.p99_ms)} / {_ms(result.max_ms)} ms",
        ],
        ["errors", str(result.errors)],
        [
            "CPU during the load: clients / server",
            "-"
            if result.client_cpu is None or result.server_cpu is None
            else f"{result.client_cpu:.1f} s / {result.server_cpu:.1f} s",
        ],
        [
            "server CPU per request (all / less the unloaded backups' own)",
            "-"
            if per_request is None
            else f"{per_request:.2f} ms / {_ms(result.server_ms_per_request_net)} ms",
        ],
    ]


def targets(result: LoadResult) -> list[tuple[str, str, str]]:
    p99, slowdown = result.p99_ms, result.slowdown
    ok_p99 = p99 is not None and p99 < P99_TARGET_MS and result.errors == 0
    ok_slow = slowdown is not None and slowdown < SLOWDOWN_TARGET
    p99_text = "error" if p99 is None else f"{p99:.1f} ms ({result.errors} errors)"
    slow_text = "error" if slowdown is None else f"{slowdown * 100:+.1f} %"
    return [
        (
            f"API p99 latency under {result.clients} clients < {P99_TARGET_MS:.0f} ms, no errors",
            p99_text,
            "PASS" if ok_p99 else "FAIL",
        ),
        (
            f"backup slowdown under API load < {SLOWDOWN_TARGET * 100:.0f} %",
            slow_text,
            "PASS" if ok_slow else "FAIL",
        ),
    ]


TITLE = "api-load: clients poll job status and list points while a full backup runs"
METHOD = (
    "`appliance serve --no-tls` on 127.0.0.1 (own data dir, scheduler off); each client is one "
    "keep-alive HTTP/1.1 connection (a minimal asyncio client, so that the load generator "
    "sharing the machine costs little CPU) with an API token looping `GET /api/jobs/{id}` and "
    "`GET /api/points?limit=50` (waiting `--api-interval` s after each answer; 0: back to "
    "back, where latency is bound to be clients / throughput); all clients run in one asyncio "
    "process on the same machine. After a warm-up full backup (which fills the store, so all "
    "measured backups find their chunks present), full backups run unloaded until they add up "
    "to `min_seconds` (k runs), then k back to back under the load, then k unloaded again; the "
    "slowdown compares the means. Durations are the jobs' `finished_at - started_at`."
)
