"""Agentless SFTP pulls against a real OpenSSH server on loopback (``sshd_support``).

The "host" is a folder of this machine served by sshd; the appliance pulls it with its own key
after pinning the host key, and the points restore with the ordinary restore. Covered: a full pull
restoring byte-identical (files, symlinks, an empty folder, a hardlink stored as two files, a
non-UTF-8 name), an incremental reading only the changed file, excludes, a symlink out of the root
stored and not followed, refusals (unpinned host, changed host key, key not authorised, bad roots),
and a connection killed mid-backup: a clear error, a store that verifies, a rerun that completes
without reading again what was stored.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from engine_support import compare_trees, new_appliance, random_bytes, set_engine_env, snapshot
from sshd_support import TestSshd

from appliance.engine import Appliance
from appliance.errors import InvalidInput, SourceError
from appliance.sources import sftp
from appliance.sources.ssh_identity import (
    HostKey,
    appliance_identity,
    pin_host_key,
    scan_host_key,
)

MiB = 1 << 20
NON_UTF8 = b"caf\xe9 \xff.txt"
BASE_TIME = 1_700_000_000  # whole seconds: SFTP v3 carries no sub-second mtimes


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance", pack_size=1 * MiB)
    yield appliance
    appliance.close()


@pytest.fixture
def sshd(tmp_path: Path, app: Appliance) -> Iterator[TestSshd]:
    ident = appliance_identity(app.data_dir.path)
    server = TestSshd(tmp_path / "sshd", ident.public_line).start()
    yield server
    server.stop()


def pin(app: Appliance, server: TestSshd) -> HostKey:
    key = scan_host_key("127.0.0.1", server.port)
    pin_host_key(app.data_dir.path, "127.0.0.1", server.port, key)
    return key


def pull(app: Appliance, server: TestSshd, root: Path, **kwargs: Any) -> Any:
    return sftp.backup_sftp(
        app,
        host="127.0.0.1",
        port=server.port,
        user=server.user,
        path=str(root),
        asset=kwargs.pop("asset", "web1"),
        **kwargs,
    )


def settle_times(root: Path) -> None:
    """Whole-second mtimes everywhere (deepest first, so folders keep theirs)."""
    entries: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        entries.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
    for i, path in enumerate(sorted(entries, key=lambda p: -p.count(b"/"))):
        t = (BASE_TIME + i) * 1_000_000_000
        os.utime(path, ns=(t, t), follow_symlinks=False)
    t = BASE_TIME * 1_000_000_000
    os.utime(root, ns=(t, t))


def host_tree(root: Path) -> Path:
    (root / "docs" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "cache").mkdir()
    (root / "small.txt").write_bytes(b"hello from the host\n")
    (root / "empty.bin").write_bytes(b"")
    (root / "big.bin").write_bytes(random_bytes(3 * MiB, 1))
    (root / "docs" / "text.txt").write_bytes(b"line of text\n" * 50_000)
    (root / "docs" / "deeper" / "zeros.bin").write_bytes(bytes(2 * MiB))
    (root / "docs" / "mode.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "docs" / "mode.sh", 0o750)
    (root / "cache" / "junk.dat").write_bytes(b"cached")
    (root / "scratch.tmp").write_bytes(b"temporary")
    (root / os.fsdecode(NON_UTF8)).write_bytes(b"latin-1 name")
    os.link(root / "small.txt", root / "hard.txt")
    os.symlink("small.txt", root / "link_rel")
    os.symlink("/etc", root / "escape_abs")  # points out of the root: stored, never followed
    os.symlink("../../../..", root / "escape_up")
    settle_times(root)
    return root


def without_link_groups(tree: dict[bytes, Any]) -> dict[bytes, Any]:
    return {k: dataclasses.replace(v, link_group=None) for k, v in tree.items()}


def test_full_then_incremental_pull_restores_identical(
    app: Appliance, sshd: TestSshd, tmp_path: Path
) -> None:
    root = host_tree(tmp_path / "host")
    pin(app, sshd)

    full = pull(app, sshd, root)
    stats = full.stats
    assert full.point.kind == "files"
    assert app.manifest(full.point.id)["source"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{root}"
    assert stats["symlinks"] == 3 and stats["hardlinks"] == 0  # SFTP cannot see hardlinks
    assert stats["files"] == 10 and stats["files_read"] == 10 and stats["files_reused"] == 0
    assert full.warnings == []

    target = tmp_path / "restored"
    app.restore(full.point.id, str(target), workers=2)
    expected = without_link_groups(snapshot(root))
    compare_trees(expected, snapshot(target))
    # The hardlinked pair comes back as two files with the same content.
    assert os.stat(target / "hard.txt").st_ino != os.stat(target / "small.txt").st_ino
    assert os.readlink(target / "escape_abs") == "/etc"
    assert os.readlink(target / "escape_up") == "../../../.."
    assert (target / os.fsdecode(NON_UTF8)).read_bytes() == b"latin-1 name"

    # Change 4 KiB in the middle of big.bin (new mtime second): only it is read again.
    with open(root / "big.bin", "r+b") as f:
        f.seek(MiB + 12345)
        f.write(random_bytes(4096, 2))
    t = (BASE_TIME + 500) * 1_000_000_000
    os.utime(root / "big.bin", ns=(t, t))
    started = time.perf_counter()
    incr = pull(app, sshd, root)
    incr_s = time.perf_counter() - started
    assert incr.point.mode == "incremental"
    assert incr.stats["files_read"] == 1 and incr.stats["files_reused"] == 9
    assert incr.stats["bytes_read"] == 3 * MiB
    # Roughly the changed chunks alone (file chunks average about 1 MiB) plus tree blobs.
    assert incr.stats["new_bytes"] < 2.5 * MiB, incr.stats
    print(
        f"incremental pull (1 changed file of 10): {incr_s:.2f} s, new {incr.stats['new_bytes']} B"
    )

    target2 = tmp_path / "restored2"
    app.restore(incr.point.id, str(target2), workers=2)
    compare_trees(without_link_groups(snapshot(root)), snapshot(target2))
    assert app.verify().ok


def test_excludes_and_escaping_symlinks(app: Appliance, sshd: TestSshd, tmp_path: Path) -> None:
    root = host_tree(tmp_path / "host")
    pin(app, sshd)
    outcome = pull(app, sshd, root, excludes=("*.tmp", "cache", "docs/deeper"))
    target = tmp_path / "restored"
    app.restore(outcome.point.id, str(target), workers=1)
    names = sorted(p.name for p in target.iterdir())
    assert "scratch.tmp" not in names and "cache" not in names
    assert (target / "docs").is_dir() and not (target / "docs" / "deeper").exists()
    # The symlinks out of the root are links in the point, nothing behind them was read.
    assert (target / "escape_abs").is_symlink() and (target / "escape_up").is_symlink()
    assert outcome.stats["files"] == 7  # 10 minus junk.dat, scratch.tmp, zeros.bin


def test_unpinned_host_is_refused(app: Appliance, sshd: TestSshd, tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    offered = scan_host_key("127.0.0.1", sshd.port)
    with pytest.raises(sftp.HostKeyNotPinned) as caught:
        pull(app, sshd, tmp_path / "host")
    assert offered.fingerprint in caught.value.message
    assert caught.value.details["offered"] == offered.fingerprint


def test_changed_host_key_is_refused_naming_both(
    app: Appliance, sshd: TestSshd, tmp_path: Path
) -> None:
    (tmp_path / "host").mkdir()
    old = pin(app, sshd)
    sshd.restart(new_key=True)
    new = HostKey(*sshd.host_public_line())
    assert new.fingerprint != old.fingerprint
    with pytest.raises(sftp.HostKeyMismatch) as caught:
        pull(app, sshd, tmp_path / "host")
    assert old.fingerprint in caught.value.message and new.fingerprint in caught.value.message
    assert caught.value.code == "ssh_host_key_mismatch"


def test_key_not_authorised_names_the_key_to_add(sshd: TestSshd, tmp_path: Path) -> None:
    other, _ = new_appliance(tmp_path / "other")
    try:
        (tmp_path / "host").mkdir()
        pin(other, sshd)
        with pytest.raises(sftp.SshAuthRefused) as caught:
            pull(other, sshd, tmp_path / "host")
        line = appliance_identity(other.data_dir.path).public_line
        assert "authorized_keys" in caught.value.message and line in caught.value.message
    finally:
        other.close()


def test_bad_roots_and_unreachable(app: Appliance, sshd: TestSshd, tmp_path: Path) -> None:
    pin(app, sshd)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SourceError, match="does not exist"):
        pull(app, sshd, tmp_path / "missing")
    with pytest.raises(SourceError, match="is not a folder"):
        pull(app, sshd, tmp_path / "file")
    for bad in ("relative/path", "/srv/../etc", "/srv/./x"):
        with pytest.raises(InvalidInput):
            sftp.backup_sftp(
                app, host="127.0.0.1", port=sshd.port, user=sshd.user, path=bad, asset="a"
            )
    closed = sshd.port
    sshd.stop()
    with pytest.raises(sftp.SshUnreachable):
        sftp.connect_sftp(app.data_dir.path, "127.0.0.1", closed, sshd.user, str(tmp_path))


def test_connection_killed_mid_backup(app: Appliance, sshd: TestSshd, tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    for i in range(12):
        (root / f"part{i:02d}.bin").write_bytes(random_bytes(2 * MiB, 100 + i))
    settle_times(root)
    pin(app, sshd)
    killed: list[int] = []

    def progress(update: dict[str, Any]) -> None:
        if not killed and update["bytes_read"] >= 8 * MiB:
            killed.append(sshd.kill_sessions())

    with pytest.raises(sftp.SftpConnectionLost) as caught:
        pull(app, sshd, root, progress=progress)
    assert killed and killed[0] >= 1
    assert "lost" in caught.value.message and "run the backup again" in caught.value.message
    assert caught.value.code == "sftp_connection_lost"
    assert app.verify().ok

    rerun = pull(app, sshd, root)
    assert rerun.stats["files"] == 12 and rerun.stats["bytes_read"] == 24 * MiB
    # The packs indexed before the drop are not stored again.
    assert rerun.stats["new_bytes"] < 20 * MiB, rerun.stats
    target = tmp_path / "restored"
    app.restore(rerun.point.id, str(target), workers=2)
    compare_trees(snapshot(root), snapshot(target))
    assert app.verify().ok


def test_pull_speed_on_loopback(app: Appliance, sshd: TestSshd, tmp_path: Path) -> None:
    """Numbers for docs/sources.md: large files (MiB/s, against the same folder backed up
    locally) and many small files (files/s), full and unchanged incremental."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(8):
        (big / f"data{i}.bin").write_bytes(os.urandom(8 * MiB))
    small = tmp_path / "small"
    small.mkdir()
    for i in range(1000):
        (small / f"small{i:04d}.txt").write_bytes(f"small file {i}\n".encode() * 20)
    settle_times(big)
    settle_times(small)
    pin(app, sshd)
    timings = {}
    for name, root in (("big", big), ("small", small)):
        for mode in ("full", "incremental"):
            started = time.perf_counter()
            outcome = pull(app, sshd, root, asset=name, mode=mode)
            timings[name, mode] = time.perf_counter() - started
        assert outcome.stats["files_read"] == 0
    started = time.perf_counter()
    app.backup_files(str(big), "local-copy", mode="full")
    local_s = time.perf_counter() - started
    print(
        f"\nSFTP full pull of 64 MiB in 8 files: {timings['big', 'full']:.2f} s "
        f"({64 / timings['big', 'full']:.0f} MiB/s; the same folder locally {local_s:.2f} s, "
        f"{64 / local_s:.0f} MiB/s); unchanged incremental {timings['big', 'incremental']:.2f} s"
        f"\nSFTP full pull of 1000 small files: {timings['small', 'full']:.2f} s "
        f"({1000 / timings['small', 'full']:.0f} files/s); unchanged incremental "
        f"{timings['small', 'incremental']:.2f} s"
    )


# --- pure parts ------------------------------------------------------------------------------


def test_listed_names_from_a_hostile_host() -> None:
    assert sftp.listed_name(b".") is None and sftp.listed_name(b"..") is None
    assert sftp.listed_name(b"plain") == "plain"
    assert sftp.listed_name(NON_UTF8) == os.fsdecode(NON_UTF8)
    fs = sftp.SftpFS(cast(Any, None), cast(Any, None), b"/srv", "u@h:22")
    for raw in (b"a/b", b"../../etc", b"nul\0byte", b""):
        marker = sftp.listed_name(raw)
        assert marker is not None and marker.startswith("\0") and "/" not in marker
        with pytest.raises(OSError) as caught:
            fs._remote(f"dir/{marker}")
        assert caught.value.errno == errno.EINVAL and repr(raw) in str(caught.value)
    assert fs._remote("") == b"/srv" and fs._remote("a/b") == b"/srv/a/b"
    assert fs._remote(os.fsdecode(NON_UTF8)) == b"/srv/" + NON_UTF8


def test_root_rules_and_source_string() -> None:
    assert sftp.remote_root("/srv//www/") == b"/srv/www" and sftp.remote_root("/") == b"/"
    for bad in ("srv", "/a/../b", "/a/./b", "/a\0b"):
        with pytest.raises(InvalidInput):
            sftp.remote_root(bad)
    assert sftp.sftp_source("web1", 22, "root", "/srv/") == "ssh://root@web1:22/srv"
    assert sftp.sftp_source("fd00::1", 2222, "bk", "/") == "ssh://bk@[fd00::1]:2222/"
