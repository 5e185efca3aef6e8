"""`appliance demo seed`: a new data directory gets the demo VM, and "Fail over" proves its boot.

The seed runs through the real CLI (in process) into a temp data directory; the failover boots
the seeded point with real QEMU (TCG here) using the boot proof the seed configured, as the page's
button does. The test guest image is the cached one the failover tests build.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, set_engine_env

from appliance.cli import main
from appliance.engine import Appliance
from hardware.tape.deck import open_deck
from hardware.tape.demo import DEMO_BARCODES, DEMO_POOL, demo_library_dir, seed_demo_tape
from hardware.tape.jobs import backup_to_tape
from hardware.tape.library import registered
from image.demo_vm import DEMO_ASSET, DEMO_PROOF, seed_marker_path
from image.failover import FailoverManager, asset_failover_settings
from image.testguest import MARKER

DEMO_TAPE_STEPS = ["tape_library", "tape_registered", "tape_media", "tape_pool"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)
    monkeypatch.delenv("APPLIANCE_PASSPHRASE_FILE", raising=False)


def _seed(data_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code = main(["--data-dir", str(data_dir), "--json", "demo", "seed", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    result: dict = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.qemu
@pytest.mark.slow
def test_seed_makes_a_demo_vm_that_fails_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("QEMU missing: run scripts/setup (apt-get install -y qemu-system-x86)")
    data_dir = tmp_path / "data"
    first = _seed(data_dir, capsys)
    assert first["created"] == [
        "disk",
        "vm_spec",
        "asset",
        "proof",
        "point",
        "verified",
        *DEMO_TAPE_STEPS,
    ]
    # The disk is outside the data directory: the API refuses VM disks inside it.
    assert first["disk"] == str(tmp_path / "data-demo-vm" / "demo-vm.raw")
    assert os.path.isfile(first["disk"])
    assert os.path.isfile(seed_marker_path(str(data_dir)))

    # Done once: the next start returns at once, without opening the store.
    started = time.monotonic()
    again = _seed(data_dir, capsys)
    assert again["created"] == [] and again["point"] == first["point"]
    assert time.monotonic() - started < 1.0
    # Forced, every step is checked again and none is repeated.
    forced = _seed(data_dir, capsys, "--force")
    assert forced["created"] == [] and forced["point"] == first["point"]

    # The store was created as `serve` creates it: the generated passphrase opens it.
    passphrase = (data_dir / "secrets" / "passphrase").read_text().rstrip("\n")
    app = Appliance.open(str(data_dir), passphrase=passphrase)
    try:
        asset = app.catalog.get_asset(DEMO_ASSET)
        assert asset.kind == "vm" and first["disk"] in asset.source
        points = app.catalog.list_points(asset=DEMO_ASSET)
        assert [p.id for p in points] == [first["point"]]
        assert points[0].kind == "image" and points[0].verify_status == "ok"
        settings = asset_failover_settings(app.catalog, DEMO_ASSET)
        assert settings["proof"]["serial"] == MARKER
        assert settings["proof"]["http_port"] == DEMO_PROOF["http_port"]
        assert settings["network"]["port_forwards"] == [[0, 80]]
        # The Tape screen is populated: the demo library, its blank tapes, the weekly pool.
        assert [p.name for p in app.catalog.list_tape_pools()] == [DEMO_POOL]
        assert {m.barcode for m in app.catalog.list_tape_media()} == set(DEMO_BARCODES)

        # What the page's "Fail over" runs: the asset's configured proof, nothing passed in.
        manager = FailoverManager(app, accel="tcg")
        try:
            record = manager.start(DEMO_ASSET)
            assert record.state == "running"
            assert record.point_id == first["point"]
            assert set(record.details["checks"]) == {"serial", "http"}
            assert 0 < record.details["rto_seconds"] < 180
            manager.stop(record.id, grace=0)
            manager.discard(record.id)
        finally:
            manager.shutdown(grace=0)
    finally:
        app.close()


@pytest.mark.qemu
@pytest.mark.slow
def test_seed_without_qemu_names_the_packages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no QEMU tool can be found
    data_dir = tmp_path / "data"
    code = main(["--data-dir", str(data_dir), "demo", "seed"])
    _out, err = capsys.readouterr()
    assert code == 2
    assert "demo_unavailable" in err and "apt-get install -y qemu-system-x86 qemu-utils" in err
    assert not os.path.exists(seed_marker_path(str(data_dir)))
    passphrase = (data_dir / "secrets" / "passphrase").read_text().rstrip("\n")
    with Appliance.open(str(data_dir), passphrase=passphrase) as app:
        assert DEMO_ASSET not in [a.name for a in app.catalog.list_assets()]


def test_the_demo_tape_library_is_seeded_once_and_takes_a_backup(tmp_path: Path) -> None:
    """The tape part alone (no QEMU needed): made, registered and recorded as an administrator
    would; a second seed changes nothing; a tape backup of a point to the pool runs at once."""
    app, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE, pack_size=256 * 1024)
    with app:
        assert seed_demo_tape(app) == DEMO_TAPE_STEPS
        assert seed_demo_tape(app) == []
        root = demo_library_dir(str(tmp_path / "data"))
        assert registered(app.catalog) == [{"name": "demo", "path": str(root)}]
        media = app.catalog.list_tape_media()
        assert [(m.barcode, m.state, m.place, m.slot) for m in media] == [
            (b, "blank", "library", n) for n, b in enumerate(DEMO_BARCODES, start=1)
        ]
        pool = app.catalog.get_tape_pool(DEMO_POOL)
        assert (pool.schedule, pool.schedule_drive) == ("0 3 * * 6", "virtual:demo-drive0")
        assert pool.points_rule == {"rule": "newest"}
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.txt").write_text("demo")
        point = app.backup_files(str(src), "docs").point.id
        deck = open_deck(app.catalog, "virtual:demo-drive0")
        result = backup_to_tape(app, deck, DEMO_POOL, pool.points_rule)
        assert result["points_written"] == [point] and result["tapes"] == ["DEMO01L8"]
