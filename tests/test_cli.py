"""The ``appliance`` command line, run as a subprocess exactly as an operator or a script would."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_support import (
    PASSPHRASE,
    compare_trees,
    digest,
    run_cli,
    snapshot,
    text_bytes,
)

from appliance.store.crypto import MasterKey

KiB, MiB = 1 << 10, 1 << 20
RECOVERY_KEY = re.compile(r"\b[A-Z2-7]{6}(?:-[A-Z2-7]{1,6}){10,}\b")


@dataclass
class Site:
    data_dir: Path
    source: Path
    disk: Path
    recovery_key: str
    files_point: str
    image_point: str
    state: dict


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """An appliance initialised and given one files point and one image point via the CLI."""
    base = tmp_path_factory.mktemp("cli")
    data_dir = base / "appliance"
    init = run_cli("init", data_dir=data_dir)
    text = init.stdout.decode()
    match = RECOVERY_KEY.search(text)
    assert match, text
    assert "Recovery key" in text

    source = base / "src"
    (source / "docs").mkdir(parents=True)
    (source / "docs" / "report.txt").write_bytes(text_bytes(300 * KiB))
    (source / "photo.bin").write_bytes(os.urandom(700 * KiB))
    os.symlink("docs/report.txt", source / "latest")
    backup = run_cli("--json", "backup", "files", str(source), "--asset", "docs", data_dir=data_dir)
    files_doc = json.loads(backup.stdout)

    disk = base / "vm-disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(os.urandom(256 * KiB))
    image = run_cli(
        "--json", "--workers", "2", "backup", "image", str(disk), "--asset", "vm", data_dir=data_dir
    )
    image_doc = json.loads(image.stdout)
    return Site(
        data_dir=data_dir,
        source=source,
        disk=disk,
        recovery_key=match.group(0),
        files_point=files_doc["point"]["id"],
        image_point=image_doc["point"]["id"],
        state=snapshot(source),
    )


def test_init_prints_a_working_recovery_key(site: Site) -> None:
    key = MasterKey.from_recovery_key(site.recovery_key)  # the checksum holds
    assert len(key.material) == 64
    again = run_cli("init", data_dir=site.data_dir, check=False)
    assert again.returncode == 2 and b"store_exists" in again.stderr


def test_init_json(tmp_path: Path) -> None:
    document = json.loads(run_cli("--json", "init", data_dir=tmp_path / "a").stdout)
    assert set(document) >= {"data_dir", "store", "store_id", "recovery_key"}
    assert RECOVERY_KEY.fullmatch(document["recovery_key"])
    assert (Path(document["store"]) / "config").is_file()


def test_backup_json_documents(site: Site) -> None:
    points = json.loads(run_cli("--json", "points", data_dir=site.data_dir).stdout)
    # --json also works after the subcommand, as the README shows.
    assert json.loads(run_cli("points", "--json", data_dir=site.data_dir).stdout) == points
    by_id = {p["id"]: p for p in points}
    assert set(by_id) == {site.files_point, site.image_point}
    files, image = by_id[site.files_point], by_id[site.image_point]
    assert (files["asset"], files["kind"], files["mode"]) == ("docs", "files", "full")
    assert (image["asset"], image["kind"], image["mode"]) == ("vm", "image", "full")
    assert files["file_count"] == 2
    assert files["logical_bytes"] == 1000 * KiB
    assert image["logical_bytes"] == 4 * MiB
    table = run_cli("points", "--asset", "vm", data_dir=site.data_dir).stdout.decode()
    assert site.image_point in table and site.files_point not in table


def test_incremental_backup_json(site: Site, tmp_path: Path) -> None:
    out = run_cli(
        "--json", "backup", "files", str(site.source), "--asset", "docs", data_dir=site.data_dir
    )
    document = json.loads(out.stdout)
    assert document["point"]["mode"] == "incremental"
    assert document["point"]["parent_id"] == site.files_point
    assert document["stats"]["files_read"] == 0 and document["stats"]["bytes_read"] == 0
    assert document["warnings"] == []


def test_restore_files_and_tar(site: Site, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    out = run_cli("--json", "restore", site.files_point, str(target), data_dir=site.data_dir)
    assert json.loads(out.stdout)["files"] == 2
    compare_trees(site.state, snapshot(target))

    one = tmp_path / "one"
    run_cli("restore", site.files_point, str(one), "--path", "docs", data_dir=site.data_dir)
    assert os.listdir(one) == ["docs"]
    assert digest(one / "docs" / "report.txt") == digest(site.source / "docs" / "report.txt")

    streamed = run_cli("restore", site.files_point, "-", data_dir=site.data_dir)
    with tarfile.open(fileobj=io.BytesIO(streamed.stdout), mode="r:") as tar:
        names = sorted(tar.getnames())
        assert names == [".", "docs", "docs/report.txt", "latest", "photo.bin"]
        member = tar.extractfile("photo.bin")
        assert member is not None
        assert member.read() == (site.source / "photo.bin").read_bytes()
        assert tar.getmember("latest").linkname == "docs/report.txt"


def test_restore_image(site: Site, tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    out = run_cli("--json", "restore", site.image_point, str(target), data_dir=site.data_dir)
    assert json.loads(out.stdout)["disks"] == [str(target)]
    assert digest(target) == digest(site.disk)


def test_restore_of_an_unknown_point(site: Site, tmp_path: Path) -> None:
    proc = run_cli(
        "--json",
        "restore",
        "ffffffffffffffff",
        str(tmp_path / "x"),
        data_dir=site.data_dir,
        check=False,
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "not_found"
    assert b"error [not_found]" in proc.stderr


def test_verify_exits_zero(site: Site) -> None:
    whole = run_cli("--json", "verify", data_dir=site.data_dir)
    report = json.loads(whole.stdout)
    assert report["ok"] is True and report["coverage"] == 1.0
    assert report["packs_checked"] == report["packs_total"] > 0
    one = run_cli("verify", site.image_point, data_dir=site.data_dir)
    assert one.returncode == 0 and b"OK" in one.stdout
    budget = json.loads(
        run_cli("--json", "verify", "--max-bytes", "1K", data_dir=site.data_dir).stdout
    )
    # The budget stops the run once 1 KiB is checked: not every pack is read again.
    assert budget["ok"] is True and budget["bytes_checked"] >= 1024
    assert 1 <= budget["packs_checked"] < budget["packs_total"]


def test_key_export(site: Site, tmp_path: Path) -> None:
    key_file = json.loads(run_cli("key", "export", data_dir=site.data_dir).stdout)
    assert key_file["kdf"] == "argon2id" and key_file["version"] == 1
    assert {"salt", "nonce", "wrapped", "store_id"} <= set(key_file)
    paper = run_cli("key", "export", "--paper", data_dir=site.data_dir).stdout.decode().strip()
    assert paper == site.recovery_key
    output = tmp_path / "key.json"
    run_cli("key", "export", "--output", str(output), data_dir=site.data_dir)
    assert json.loads(output.read_text())["wrapped"] == key_file["wrapped"]
    assert output.stat().st_mode & 0o777 == 0o600


def test_key_recover_sets_a_new_passphrase(site: Site) -> None:
    wrong = run_cli("points", data_dir=site.data_dir, passphrase="new secret", check=False)
    assert wrong.returncode == 2 and b"wrong_passphrase" in wrong.stderr
    recovered = run_cli(
        "--json",
        "key",
        "recover",
        data_dir=site.data_dir,
        passphrase="new secret",
        env={"APPLIANCE_RECOVERY_KEY": site.recovery_key.lower().replace("-", " ")},
    )
    assert json.loads(recovered.stdout)["key_file"].startswith("keys/")
    points = json.loads(
        run_cli("--json", "points", data_dir=site.data_dir, passphrase="new secret").stdout
    )
    assert {p["id"] for p in points} >= {site.files_point, site.image_point}
    # The old passphrase keeps working too.
    assert run_cli("points", data_dir=site.data_dir, passphrase=PASSPHRASE).returncode == 0


def test_key_recover_with_a_typo_is_refused(site: Site) -> None:
    key = site.recovery_key
    typo = ("B" if key[0] != "B" else "C") + key[1:]
    proc = run_cli(
        "key",
        "recover",
        data_dir=site.data_dir,
        passphrase="other",
        env={"APPLIANCE_RECOVERY_KEY": typo},
        check=False,
    )
    assert proc.returncode == 2 and b"wrong_passphrase" in proc.stderr
    assert b"checksum" in proc.stderr


def test_catalog_rebuild_after_losing_the_catalog(site: Site) -> None:
    before = json.loads(run_cli("--json", "points", data_dir=site.data_dir).stdout)
    (site.data_dir / "catalog.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (site.data_dir / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    result = json.loads(run_cli("--json", "catalog", "rebuild", data_dir=site.data_dir).stdout)
    assert result["points"] == len(before) and result["added"] == len(before)
    assert result["damaged"] == 0
    after = json.loads(run_cli("--json", "points", data_dir=site.data_dir).stdout)

    def essentials(points: list[dict]) -> list[tuple]:
        keys = ("id", "asset", "kind", "mode", "created_at", "parent_id", "logical_bytes")
        return sorted(tuple(p[k] for k in keys) for p in points)

    assert essentials(after) == essentials(before)


def test_passphrase_required_without_a_terminal(site: Site) -> None:
    proc = run_cli("--json", "points", data_dir=site.data_dir, passphrase=None, check=False)
    assert proc.returncode == 2
    assert b"error [passphrase_required]" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "passphrase_required"


def test_passphrase_file(site: Site, tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text(PASSPHRASE + "\n")
    proc = run_cli(
        "--passphrase-file", str(path), "points", data_dir=site.data_dir, passphrase=None
    )
    assert site.files_point in proc.stdout.decode()


def test_no_store_here(tmp_path: Path) -> None:
    proc = run_cli("points", data_dir=tmp_path / "empty", check=False)
    assert proc.returncode == 2 and b"store_not_found" in proc.stderr
