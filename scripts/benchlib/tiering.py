"""The tiering phase: recovery points moved to a cold bucket, and a one-file recall from it.

Everything runs against a real S3 server on 127.0.0.1 started here: moto's, as the tests run it
(``tests/servers/s3_server.py``: archive-class objects thaw RESTORE_SECONDS after the restore is
asked), in a process of its own that is stopped by its pid at the end. Nothing else is talked to.

1. An appliance in a temporary data dir backs up the bench tree and the disk image in full
   (engine API, not measured): two points whose packs lie in the store's ``data/`` and ``meta/``.
2. Upload, each repetition (the order alternates): ``ours`` is ``Appliance.copy_point`` of both
   points to a new cold bucket location (``add_location("s3://BUCKET/store", kind="s3_bucket",
   options={..., "cold": True})``: data packs go to GLACIER, metadata stays STANDARD, each pack
   is checked after its upload, then index files and the manifest); ``boto3`` is plain
   ``upload_file`` of the same pack files, one after the other, to another new bucket, with a
   plain client (default ``TransferConfig``: multipart above 8 MiB, 10 threads). Both read the
   same files (page cache warm for both) and count the same pack bytes for MiB/s.
3. Requests are counted by a botocore ``before-send`` hook on every client (one count per HTTP
   request sent, retries included): ``tiering.s3.make_client`` is wrapped in this process only, so
   the backends the appliance opens carry the hook too.
4. Recall: with the home copy marked deleted (only the cold copy left, as
   ``tests/test_tiering_recall.py`` does), ``Appliance.prepare_read(point, subpath=FILE)`` for the
   tree's largest file and a file of median size; the bytes asked are the sum of the packs it asks
   to thaw. Then, once thawed, the file is restored from the bucket and compared with its source.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
RATIO_TARGET = 0.8
RESTORE_SECONDS = 1.0
REGION = "us-east-1"
CREDENTIALS = {"access_key_id": "bench", "secret_access_key": "bench-secret"}
PASSPHRASE = "bench tiering passphrase"
SERVER = Path(__file__).resolve().parents[2] / "tests" / "servers" / "s3_server.py"
# The benchmark starts the S3 server the way the tests do (tests/servers/listening.py).
sys.path.insert(0, str(SERVER.parents[1]))
from servers.listening import listening_process  # noqa: E402

TITLE = "tiering: points to a cold bucket (moto S3 on 127.0.0.1), one-file recall"
METHOD = (
    "`Appliance.copy_point` of the tree and image points to a cold `s3_bucket` location (data "
    "packs GLACIER, metadata STANDARD) vs plain boto3 `upload_file` of the same pack files "
    "(default TransferConfig, one file after another) to the same moto server "
    "(`tests/servers/s3_server.py`, a process of its own on 127.0.0.1, restores take "
    f"{RESTORE_SECONDS:g} s), in the same run, order alternating per repetition. MiB/s counts the "
    "pack bytes (the same for both; ours also writes config, keys, index files and manifests). "
    "Requests are counted by a botocore `before-send` hook on every client (each HTTP request "
    "sent, retries included). CPU: seconds of this process (client) and of the server process. "
    "Recall: `prepare_read(point, subpath=FILE)` with the home copy marked deleted; recalled = "
    "the sizes of the data packs it asks to thaw; the file is then restored from the bucket and "
    "compared with its source."
)


class PhaseError(Exception):
    pass


@dataclass
class Transfer:
    """One measured upload of the points' packs."""

    seconds: float
    pack_bytes: int
    requests: Counter[str]
    client_cpu: float
    server_cpu: float

    @property
    def mib_s(self) -> float:
        return self.pack_bytes / MiB / self.seconds if self.seconds else 0.0

    @property
    def per_gib(self) -> float:
        return sum(self.requests.values()) / (self.pack_bytes / GiB) if self.pack_bytes else 0.0


@dataclass
class Recall:
    """One single-file recall and restore."""

    what: str  # "largest file" / "median file"
    path: str
    size: int
    compressed: int  # stored (compressed, sealed) bytes of its distinct chunks
    packs: int = 0
    recalled: int = 0  # sizes of the data packs asked to thaw
    largest_pack: int = 0
    point_data: int = 0  # every data pack of the point
    point_all: int = 0  # every pack of the point
    requests: Counter[str] = field(default_factory=Counter)  # prepare_read's
    verify: str = "not run"

    @property
    def limit(self) -> int:
        return 2 * self.compressed + self.largest_pack

    @property
    def ok(self) -> bool:
        return 0 < self.recalled < self.limit


@dataclass
class TieringResult:
    scale: float
    repeat: int
    server: str = ""
    points: list[str] = field(default_factory=list)  # descriptions
    packs: dict[str, int] = field(default_factory=dict)  # "data"/"meta" -> count
    pack_bytes: int = 0
    ours: list[Transfer] = field(default_factory=list)
    boto3: list[Transfer] = field(default_factory=list)
    recalls: list[Recall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    def median(self, which: str, attr: str) -> float | None:
        runs = getattr(self, which)
        return statistics.median(getattr(t, attr) for t in runs) if runs else None

    @property
    def ratio(self) -> float | None:
        ours, theirs = self.median("ours", "mib_s"), self.median("boto3", "mib_s")
        return ours / theirs if ours and theirs else None


# --- requests ---------------------------------------------------------------------------------


class RequestCounter:
    """Counts the HTTP requests of every client it is attached to, by operation. Thread-safe
    (boto3's transfers and the multipart uploads use threads). Only this process's clients: the
    worker processes a restore forks are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._sent)
        return client

    def _sent(self, event_name: str = "", **_: Any) -> None:  # must return None: not a reply
        with self._lock:
            self.ops[event_name.rsplit(".", 1)[-1]] += 1

    def take(self) -> Counter[str]:
        with self._lock:
            out, self.ops = self.ops, Counter()
        return out


@contextlib.contextmanager
def counting_backends(counter: RequestCounter) -> Iterator[None]:
    """Every client ``tiering.s3`` makes in this process carries ``counter``'s hook."""
    import tiering.s3 as s3mod

    original = s3mod.make_client

    def make_client(**options: Any) -> Any:
        return counter.attach(original(**options))

    s3mod.make_client = make_client
    try:
        yield
    finally:
        s3mod.make_client = original


# --- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[tuple[str, int]]:
    """(endpoint, pid) of a moto S3 server on 127.0.0.1, stopped by its pid on leaving."""
    try:
        import moto  # noqa: F401
    except ImportError as exc:
        raise PhaseError("moto's server is not installed: pip install -e '.[dev]'") from exc
    if not SERVER.exists():
        raise PhaseError(f"{SERVER} is missing")
    port = _free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log, "wb") as out,
        listening_process(
            [sys.executable, str(SERVER), str(port), str(RESTORE_SECONDS)],
            port,
            stdout=out,
            what=f"the S3 server (see {log})",
            error=PhaseError,
        ) as process,
    ):
        yield f"http://127.0.0.1:{port}", process.pid


def _plain_client(endpoint: str) -> Any:
    """A boto3 client as anyone would make one: every setting at its default."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


# --- measurement ------------------------------------------------------------------------------


def _bundled_packs(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """Pack object name -> the bundle object holding it, from the bucket's bundle directories."""
    from appliance.locations.bundles import parse_directory

    holder: dict[str, str] = {}
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/bundles/"
    )
    for page in pages:
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) + 1 :]
            if not name.endswith(".json"):
                continue
            data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            directory = parse_directory(name, data)
            for pack, _offset, _length in directory.packs:
                holder[pack] = directory.bundle
    return holder


def _pack_files(store: Path) -> list[tuple[Path, str]]:
    out = []
    for folder in ("data", "meta"):
        for path in sorted((store / folder).rglob("*")):
            if path.is_file():
                out.append((path, path.relative_to(store).as_posix()))
    return out


def _empty_bucket(client: Any, bucket: str) -> None:
    """Delete what a measured run left (the bucket has no versioning): each run finds the server
    holding the same, so a later run is not slowed by what earlier ones stored."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _measure(server_pid: int, run: Callable[[], int], counter: RequestCounter) -> Transfer:
    counter.take()
    cpu0, server0 = _own_cpu(), _cpu_seconds(server_pid)
    started = time.perf_counter()
    pack_bytes = run()
    seconds = time.perf_counter() - started
    return Transfer(
        seconds,
        pack_bytes,
        counter.take(),
        _own_cpu() - cpu0,
        _cpu_seconds(server_pid) - server0,
    )


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pick_files(tree: Path) -> list[tuple[str, str, int]]:
    sizes = [
        (p.stat().st_size, p.relative_to(tree).as_posix())
        for p in tree.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    sizes.sort()
    largest = sizes[-1]
    median = sizes[len(sizes) // 2]
    return [("largest file", largest[1], largest[0]), ("median file", median[1], median[0])]


def _recall(
    app: Any,
    point: str,
    what: str,
    rel: str,
    size: int,
    tree: Path,
    work: Path,
    counter: RequestCounter,
    endpoint: str,
    thawed: set[str],
) -> Recall:
    """Recall and restore one file; ``thawed``: the cold objects earlier recalls asked for (the
    ones this one asks are added)."""
    from appliance.point_packs import data_blobs, point_packs
    from appliance.store import format as fmt
    from appliance.store.packs import pack_object_name

    repo = app.repo
    manifest = app.manifest(point)
    ids = set(data_blobs(repo, manifest, rel))
    compressed = sum(e.length for e in repo.index.lookup_many(ids).values())
    everything = point_packs(repo, manifest)
    sizes = {p: repo.backend.stat(pack_object_name(p, k)).size for p, k in everything.packs.items()}
    result = Recall(what, rel, size, compressed)
    result.point_all = sum(sizes.values())
    result.point_data = sum(
        s for p, s in sizes.items() if everything.packs[p] == fmt.PACK_KIND_DATA
    )
    mine = point_packs(repo, manifest, rel)
    mine_data = [p for p, k in mine.packs.items() if k == fmt.PACK_KIND_DATA]
    counter.take()
    status = app.prepare_read(point, subpath=rel)
    result.requests = counter.take()
    result.packs, result.recalled = status.packs, status.bytes
    result.largest_pack = max((sizes[p] for p in mine_data), default=0)
    if status.packs != len(mine_data):
        result.verify = f"asked {status.packs} packs, the file needs {len(mine_data)}"
        return result
    # What the bucket was asked: of the point's cold objects (data packs on their own, and
    # bundles of small packs), exactly those holding the file's packs (and those of earlier
    # recalls) carry a restore header.
    location = app.find_location(status.location_id)
    bucket, _, prefix = location.address[len("s3://") :].partition("/")
    client = _plain_client(endpoint)
    try:
        holder = _bundled_packs(client, bucket, prefix)
        objects = {
            holder.get(pack_object_name(p, k), pack_object_name(p, k))
            for p, k in everything.packs.items()
            if k == fmt.PACK_KIND_DATA
        }
        thawed.update(
            holder.get(
                pack_object_name(p, fmt.PACK_KIND_DATA), pack_object_name(p, fmt.PACK_KIND_DATA)
            )
            for p in mine_data
        )
        asked = {
            name
            for name in objects
            if client.head_object(Bucket=bucket, Key=f"{prefix}/{name}").get("Restore")
        }
    finally:
        client.close()
    if asked != thawed:
        result.verify = (
            f"{len(asked)} objects have a restore asked, {len(thawed)} expected "
            f"({len(asked - thawed)} not needed)"
        )
        return result
    deadline = time.monotonic() + 60
    while not status.done:
        if time.monotonic() > deadline:
            result.verify = "the recall did not complete in 60 s"
            return result
        time.sleep(0.2)
        status = app.prepare_read(point, subpath=rel)
    target = work / "restore" / uuid.uuid4().hex[:8]
    app.restore(point, str(target), subpath=rel)
    restored = target / Path(rel).name
    same = restored.is_file() and _file_hash(restored) == _file_hash(tree / rel)
    result.verify = "OK" if same else "MISMATCH"
    shutil.rmtree(target, ignore_errors=True)
    return result


def run(
    work: Path,
    tree: Path,
    image: Path,
    *,
    scale: float,
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> TieringResult:
    """The phase (see the module doc); a failure is the result's ``problem``."""
    result = TieringResult(scale, repeat)
    base = work / "tiering"
    shutil.rmtree(base, ignore_errors=True)
    try:
        _run(result, base, tree, image, log)
    except Exception as exc:  # reported in the table and by the exit status, not a traceback
        result.problem = f"tiering phase failed: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _run(
    result: TieringResult, base: Path, tree: Path, image: Path, log: Callable[[str], None]
) -> None:
    import moto

    from appliance.catalog.records import home_location_id
    from appliance.engine import Appliance

    result.server = f"moto {moto.__version__} (ThreadedMotoServer)"
    app, _recovery = Appliance.init(str(base / "app"), PASSPHRASE)
    try:
        started = time.perf_counter()
        points = [
            app.backup_files(str(tree), "tree", mode="full").point.id,
            app.backup_image([str(image)], "vm", mode="full").point.id,
        ]
        log(f"tiering: backed up tree and image in {time.perf_counter() - started:.1f} s")
        store = Path(app.data_dir.store_path)
        files = _pack_files(store)
        result.pack_bytes = sum(p.stat().st_size for p, _ in files)
        result.packs = Counter(key.split("/", 1)[0] for _, key in files)
        result.points = [f"{p[:12]} ({app.manifest(p)['kind']})" for p in points]
        counter = RequestCounter()
        with moto_server(base.parent / "logs" / "tiering-s3.log") as (endpoint, pid):
            admin = _plain_client(endpoint)
            admin.create_bucket(Bucket="bench-warmup")
            admin.put_object(Bucket="bench-warmup", Key="x", Body=b"x" * 1024)
            options = {"endpoint_url": endpoint, "region": REGION, **CREDENTIALS, "cold": True}
            kept: list[tuple[str, str]] = []  # (location id, bucket) of the latest ours run

            def ours(rep: int) -> Transfer:
                bucket = f"bench-ours-{rep}"
                admin.create_bucket(Bucket=bucket)
                label = f"cold{rep}"
                location = app.add_location(
                    f"s3://{bucket}/store", kind="s3_bucket", label=label, options=dict(options)
                )

                def copy() -> int:
                    return sum(int(app.copy_point(p, label)["bytes_copied"]) for p in points)

                measured = _measure(pid, copy, counter)
                # Only the latest run's copies stay (the recall reads them); the earlier ones
                # are marked deleted and emptied.
                for old, old_bucket in kept:
                    for p in points:
                        app.catalog.set_copy(p, old, "deleted")
                    _empty_bucket(admin, old_bucket)
                kept[:] = [(location.id, bucket)]
                return measured

            def plain(rep: int) -> Transfer:
                bucket = f"bench-boto3-{rep}"
                admin.create_bucket(Bucket=bucket)
                client = counter.attach(_plain_client(endpoint))

                def upload() -> int:
                    for path, key in files:
                        client.upload_file(str(path), bucket, f"store/{key}")
                    return result.pack_bytes

                try:
                    return _measure(pid, upload, counter)
                finally:
                    client.close()
                    _empty_bucket(admin, bucket)

            with counting_backends(counter):
                for rep in range(result.repeat):
                    order = ["boto3", "ours"] if rep % 2 == 0 else ["ours", "boto3"]
                    for which in order:
                        t = plain(rep) if which == "boto3" else ours(rep)
                        getattr(result, which).append(t)
                        log(
                            f"[{rep + 1}] tiering {which:<6} {t.seconds:6.2f} s  "
                            f"{t.mib_s:7.1f} MiB/s  {sum(t.requests.values())} requests  "
                            f"CPU client {t.client_cpu:.1f} s, server {t.server_cpu:.1f} s"
                        )
                        if t.pack_bytes != result.pack_bytes:
                            result.notes.append(
                                f"{which} run {rep + 1} moved {t.pack_bytes} pack bytes, the "
                                f"store holds {result.pack_bytes}"
                            )
                # Only the cold copies are left: every read must come from a bucket.
                app.catalog.set_copy(points[0], home_location_id(app.repo.store_id), "deleted")
                thawed: set[str] = set()
                for what, rel, size in _pick_files(tree):
                    recall = _recall(
                        app, points[0], what, rel, size, tree, base, counter, endpoint, thawed
                    )
                    result.recalls.append(recall)
                    log(
                        f"tiering recall {what}: {rel} ({size / MiB:.2f} MiB), "
                        f"{recall.packs} pack(s), {recall.recalled / MiB:.1f} MiB, "
                        f"restore {recall.verify}"
                    )
            admin.close()
    finally:
        app.close()


# --- report -----------------------------------------------------------------------------------

UPLOAD_HEADERS = [
    "uploader",
    "runs",
    "wall s",
    "pack MiB",
    "MiB/s",
    "requests",
    "requests/GiB",
    "client CPU s",
    "server CPU s",
    "MiB/s ours/boto3",
]
RECALL_HEADERS = [
    "file",
    "size",
    "compressed",
    "packs asked",
    "recalled MiB",
    "limit MiB",
    "point data MiB",
    "point MiB",
    "recalled/point",
    "recall requests",
    "restore",
]


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _ops(requests: Counter[str]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(requests.items(), key=lambda i: -i[1]))


def upload_rows(result: TieringResult) -> list[list[str]]:
    rows = []
    for which in ("ours", "boto3"):
        runs: list[Transfer] = getattr(result, which)
        if not runs:
            continue
        seconds = statistics.median(t.seconds for t in runs)
        mib_s = statistics.median(t.mib_s for t in runs)
        requests = statistics.median(sum(t.requests.values()) for t in runs)
        per_gib = statistics.median(t.per_gib for t in runs)
        ratio = result.ratio
        rows.append(
            [
                which,
                str(len(runs)),
                f"{seconds:.2f}",
                f"{runs[0].pack_bytes / MiB:.1f}",
                f"{mib_s:.1f}",
                f"{requests:.0f}",
                f"{per_gib:.0f}",
                f"{statistics.median(t.client_cpu for t in runs):.1f}",
                f"{statistics.median(t.server_cpu for t in runs):.1f}",
                f"{ratio:.2f}x" if which == "ours" and ratio is not None else "-",
            ]
        )
    return rows


def recall_rows(result: TieringResult) -> list[list[str]]:
    return [
        [
            f"{r.what} ({r.path})",
            _size(r.size),
            _size(r.compressed),
            str(r.packs),
            f"{r.recalled / MiB:.2f}",
            f"{r.limit / MiB:.2f}",
            f"{r.point_data / MiB:.1f}",
            f"{r.point_all / MiB:.1f}",
            f"{r.recalled / r.point_data:.1%}" if r.point_data else "-",
            str(sum(r.requests.values())),
            r.verify,
        ]
        for r in result.recalls
    ]


def targets(result: TieringResult) -> list[tuple[str, str, str]]:
    out = []
    ratio = result.ratio
    label = f"copy MiB/s ≥ {RATIO_TARGET:g}x boto3 upload_file"
    if ratio is None:
        out.append((label, "no data", "n/a"))
    else:
        out.append((label, f"{ratio:.2f}x", "PASS" if ratio >= RATIO_TARGET else "FAIL"))
    for r in result.recalls:
        out.append(
            (
                f"{r.what} recall < 2x compressed + one pack",
                f"{_size(r.recalled)} (limit {_size(r.limit)}: 2 x {_size(r.compressed)} + "
                f"{_size(r.largest_pack)}, the largest pack asked)",
                "PASS" if r.ok else "FAIL",
            )
        )
    return out


def conditions(result: TieringResult) -> list[str]:
    lines = [
        f"server: {result.server}, 127.0.0.1, restores take {RESTORE_SECONDS:g} s",
        f"points: {', '.join(result.points)}; {result.packs.get('data', 0)} data + "
        f"{result.packs.get('meta', 0)} meta packs, {result.pack_bytes / MiB:.1f} MiB",
        f"scale {result.scale:g}, {result.repeat} repetition(s), medians",
    ]
    for which in ("ours", "boto3"):
        runs: list[Transfer] = getattr(result, which)
        if runs:
            lines.append(f"{which} requests (run 1): {_ops(runs[0].requests)}")
    for r in result.recalls:
        lines.append(f"{r.what} recall requests: {_ops(r.requests)}")
    return lines + result.notes


Table = Callable[[list[str], list[list[str]]], str]


def render(
    result: TieringResult, text_table: Table, markdown_table: Table
) -> tuple[list[str], list[str]]:
    """Text and markdown lines of the phase's tables and targets (the tables drawn by
    ``report.text_table`` and ``report.markdown_table``, passed in)."""
    text = ["", f"== {TITLE} ==", *conditions(result)]
    md = ["", f"### {TITLE}", "", METHOD, ""] + [f"- {line}" for line in conditions(result)]
    uploads, recalls = upload_rows(result), recall_rows(result)
    if uploads:
        text += [text_table(UPLOAD_HEADERS, uploads)]
        md += ["", markdown_table(UPLOAD_HEADERS, uploads)]
    if recalls:
        text += ["", text_table(RECALL_HEADERS, recalls)]
        md += ["", markdown_table(RECALL_HEADERS, recalls)]
    if result.problem:
        text.append(f"  ! {result.problem}")
        md += ["", f"- {result.problem}"]
    checks = targets(result)
    text += ["", "== targets (tiering) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md += ["", "### Targets (tiering)", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md
