"""Change signals of file-tree backups, measured on real folders, and the ransomware warning
end to end: normal days, a simulated encryption, the hold on retention, the review."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, set_engine_env

from appliance.backup.signals import SignalCounter, gained_extension
from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput
from appliance.retention import HELD_CLEAN, HELD_SUSPICIOUS, RetentionRules

WORDS = ["invoice", "total", "customer", "report", "quarter", "summary", "order", "paid"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


class DayClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def next_day(self) -> None:
        self.now += timedelta(days=1)


def prose(seed: int, size: int) -> bytes:
    """Compressible text, different for each seed (no two files deduplicate)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(size // 8)).encode()[
        :size
    ]


def make_office(root: Path, files: int = 60) -> None:
    for i in range(files):
        folder = root / f"team{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"report{i}.docx").write_bytes(prose(i, 120_000))


def normal_day(root: Path, n: int) -> None:
    """A few files edited, one added."""
    for j in range(2):
        with open(root / "team0" / f"report{(4 * n + 4 * j) % 60}.docx", "ab") as f:
            f.write(prose(1000 * n + j, 10_000))
    (root / "team1" / f"notes{n}.txt").write_bytes(prose(5000 + n, 30_000))


def encrypt(root: Path, share: float = 0.9) -> int:
    """What ransomware does: most files rewritten with random bytes under a new extension."""
    done = 0
    for folder, _, names in os.walk(root):
        for name in sorted(names)[: int(len(names) * share)]:
            path = Path(folder) / name
            path.with_name(name + ".locked").write_bytes(os.urandom(path.stat().st_size))
            path.unlink()
            done += 1
    return done


@pytest.fixture
def clock() -> DayClock:
    return DayClock()


@pytest.fixture
def app(tmp_path: Path, clock: DayClock) -> Appliance:
    appliance, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE, clock=clock)
    return appliance


# --- the counter ----------------------------------------------------------------------------------


def test_gained_extension() -> None:
    assert gained_extension("a/report.docx.locked") == ("a/report.docx", ".locked")
    assert gained_extension("report.docx.LOCKED") == ("report.docx", ".locked")
    assert gained_extension("notes.txt") is None  # nothing gained: the stem has no extension
    assert gained_extension("a/.profile") is None
    assert gained_extension("x.tar.a-very-long-suffix-not-an-extension") is None


def test_counter_on_crafted_records() -> None:
    counter = SignalCounter("parent")

    def rec(path: str, chunk: str, size: int = 10) -> dict[str, object]:
        return {"path": path, "type": "file", "size": size, "chunks": [[chunk, size]]}

    counter.gone(rec("a/old-name.txt", "c1"))  # moved: same content under a new name
    counter.gone(rec("a/report.docx", "c2"))  # encrypted under a new extension
    counter.gone(rec("a/trash.tmp", "c3"))  # deleted
    counter.gone({"path": "a/dir", "type": "dir"})  # not a file: not counted
    counter.seen("a/new-name.txt", None, reused=False)
    counter.seen("a/report.docx.locked", None, reused=False)
    counter.seen("a/same.txt", rec("a/same.txt", "c4"), reused=True)
    counter.seen("a/edited.txt", rec("a/edited.txt", "c5"), reused=False)
    counter.seen("a/fresh.txt", None, reused=False)
    counter.seen("a/vanished.txt", None, reused=False)
    counter.done(rec("a/new-name.txt", "c1"), dropped=False)
    counter.done(rec("a/report.docx.locked", "zz"), dropped=False)
    counter.done(rec("a/edited.txt", "c6"), dropped=False)
    counter.done(rec("a/fresh.txt", "c7"), dropped=False)
    counter.done(rec("a/vanished.txt", "c8"), dropped=True)
    counter.data(1000, 900)
    assert counter.result() == {
        "parent": "parent",
        "files": 5,
        "files_before": 5,
        "new": 1,
        "changed": 1,
        "deleted": 1,
        "renamed": 2,
        "extensions": {".locked": 1},
        "new_data_bytes": 1000,
        "dense_bytes": 900,
    }


# --- real backups ----------------------------------------------------------------------------------


def test_signals_of_a_normal_incremental(app: Appliance, clock: DayClock, tmp_path: Path) -> None:
    src = tmp_path / "office"
    make_office(src)
    first = app.backup_files(str(src), "office").point
    assert first.signals["parent"] is None
    assert first.signals["new"] == 60
    assert first.signals["dense_bytes"] == 0  # prose compresses
    clock.next_day()
    normal_day(src, 1)
    (src / "team2" / "report2.docx").rename(src / "team2" / "renamed.docx")
    (src / "team3" / "report3.docx").unlink()
    point = app.backup_files(str(src), "office").point
    s = point.signals
    assert s["parent"] == first.id
    assert (s["files_before"], s["files"]) == (60, 60)
    assert (s["new"], s["changed"], s["deleted"], s["renamed"]) == (1, 2, 1, 1)
    assert s["new_data_bytes"] > 0 and s["dense_bytes"] == 0
    assert point.suspicion == [] and app.point(point.id).signals == s


def test_simulated_encryption_is_suspicious_and_holds_the_last_clean_point(
    app: Appliance, clock: DayClock, tmp_path: Path
) -> None:
    src = tmp_path / "office"
    make_office(src)
    announced: list[tuple[str, str, list[str]]] = []
    app.on_suspicious = lambda asset, point, reasons: announced.append((asset, point, reasons))
    clean = []
    for n in range(6):  # a first backup, then five ordinary days
        if n:
            clock.next_day()
            normal_day(src, n)
        point = app.backup_files(str(src), "office").point
        assert point.suspicion == [], f"day {n} raised {point.suspicion}"
        clean.append(point.id)

    clock.next_day()
    encrypted = encrypt(src)
    attacked = app.backup_files(str(src), "office").point
    assert attacked.signals["renamed"] == encrypted
    assert attacked.signals["extensions"] == {".locked": encrypted}
    assert attacked.signals["dense_bytes"] == attacked.signals["new_data_bytes"] > 0
    assert attacked.suspicion[0].endswith("of files changed against a usual 3%")
    assert f"{encrypted} files gained the extension .locked" in attacked.suspicion
    assert "100% of new data does not compress" in attacked.suspicion
    assert announced == [("office", attacked.id, attacked.suspicion)]

    # Retention keeping one point would drop every clean day: the hold keeps the last one.
    decision = app.prune("office", RetentionRules(keep_last=1))
    assert decision.held == {attacked.id: HELD_SUSPICIOUS, clean[-1]: HELD_CLEAN}
    assert sorted(decision.remove) == sorted(clean[:-1])
    assert {p.id for p in app.catalog.list_points(asset="office")} == {attacked.id, clean[-1]}

    # "It is an attack": the hold stays.
    app.review_point(attacked.id, "admin", "attack")
    assert app.prune("office", RetentionRules(keep_last=1)).remove == []

    # "It was expected": the suspicion is cleared and retention goes on.
    reviewed = app.review_point(attacked.id, "admin", "expected")
    assert reviewed.review is not None and reviewed.review["verdict"] == "expected"
    assert reviewed.review["at"] == clock.now.isoformat()
    clock.next_day()
    normal_day(src, 7)
    after = app.backup_files(str(src), "office").point
    assert after.suspicion == []
    assert app.prune("office", RetentionRules(keep_last=1)).remove == [attacked.id, clean[-1]]


def test_review_checks_its_input(app: Appliance, tmp_path: Path) -> None:
    src = tmp_path / "office"
    make_office(src, files=3)
    point = app.backup_files(str(src), "office").point
    with pytest.raises(Conflict, match="not suspicious"):
        app.review_point(point.id, "admin", "expected")
    with pytest.raises(InvalidInput):
        app.catalog.review_point(point.id, "admin", app.clock(), "maybe")
