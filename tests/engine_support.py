"""Helpers shared by the engine's functional tests (store, backup, restore, maintenance, CLI).

Plain functions and classes rather than fixtures, so that test modules import them by name
without shadowing fixtures; each test module has its own small autouse fixture calling
:func:`set_engine_env`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.engine import Appliance

PASSPHRASE = "correct horse battery staple"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = str(REPO_ROOT / ".venv" / "bin" / "appliance")
#: Small packs make even tiny test stores span many packs (multi-pack paths, GC repacking).
SMALL_PACKS = 64 * 1024


def set_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weak Argon2 (fast key wrapping) and the data directory's own SQLite catalog."""
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    monkeypatch.delenv("APPLIANCE_PASSPHRASE", raising=False)
    monkeypatch.delenv("APPLIANCE_RECOVERY_KEY", raising=False)


class StepClock:
    """A clock that advances by ``step`` on every call: points get distinct, ordered times."""

    def __init__(
        self,
        start: datetime = datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
        step: timedelta = timedelta(minutes=1),
    ) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def new_appliance(path: Path, **store_config: Any) -> tuple[Appliance, str]:
    """A fresh appliance in ``path`` with a stepping clock; returns (appliance, recovery key)."""
    return Appliance.init(str(path), PASSPHRASE, clock=StepClock(), **store_config)


def random_bytes(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=64).digest()
        counter += 1
    return bytes(out[:size])


def fast_random(size: int) -> bytes:
    return os.urandom(size)


def text_bytes(size: int) -> bytes:
    line = b"the quick brown fox jumps over the lazy dog; backup appliances love text\n"
    return (line * (size // len(line) + 1))[:size]


def digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def xattrs_of(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        out[name] = base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
    return out


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    content: str | None
    target: str | None
    xattrs: tuple[tuple[str, str], ...]
    link_group: str | None


def snapshot(root: str | Path) -> dict[bytes, Entry]:
    """Everything a restore must reproduce, keyed by relative path (bytes: any name).

    Hardlinked files share a ``link_group`` (the first path of the inode in walk order), so two
    trees compare equal only if the same names share an inode in both.
    """
    root_b = os.fsencode(str(root))
    out: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], str] = {}

    def visit(rel: bytes) -> None:
        full = os.path.join(root_b, rel) if rel else root_b
        st = os.lstat(full)
        mode = st.st_mode
        content = target = group = None
        if stat.S_ISDIR(mode):
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
            target = os.fsdecode(os.readlink(full))
        elif stat.S_ISREG(mode):
            kind = "file"
            content = digest(full)
            if st.st_nlink > 1:
                group = inodes.setdefault((st.st_dev, st.st_ino), os.fsdecode(rel))
        else:
            kind = "special"
        out[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(mode),
            uid=st.st_uid,
            gid=st.st_gid,
            # A symlink's own mtime is restored too (utime without following).
            mtime_ns=st.st_mtime_ns,
            content=content,
            target=target,
            xattrs=tuple(xattrs_of(os.fsdecode(full)).items()),
            link_group=group,
        )
        if kind == "dir":
            for name in sorted(os.listdir(full)):
                visit(os.path.join(rel, name) if rel else name)

    visit(b"")
    return out


def compare_trees(
    expected: dict[bytes, Entry], actual: dict[bytes, Entry], *, ignore_root: bool = False
) -> None:
    """Assert two snapshots are equal, naming the first differing path and field."""
    exp = {k: v for k, v in expected.items() if not (ignore_root and k == b"")}
    act = {k: v for k, v in actual.items() if not (ignore_root and k == b"")}
    assert sorted(exp) == sorted(act)
    for path, entry in exp.items():
        other = act[path]
        for field_name in entry.__dataclass_fields__:
            assert getattr(other, field_name) == getattr(entry, field_name), (
                f"{path!r}: {field_name} differs"
            )


def run_cli(
    *args: str,
    data_dir: Path,
    passphrase: str | None = PASSPHRASE,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``appliance --data-dir DATA ARGS`` with stdin not a terminal."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("APPLIANCE_PASSPHRASE", "APPLIANCE_RECOVERY_KEY", "APPLIANCE_CATALOG_URL")
    }
    environment["APPLIANCE_TEST_WEAK_KDF"] = "1"
    if passphrase is not None:
        environment["APPLIANCE_PASSPHRASE"] = passphrase
    environment.update(env or {})
    proc = subprocess.run(
        [CLI, "--data-dir", str(data_dir), *args],
        input=input_bytes if input_bytes is not None else b"",
        capture_output=True,
        env=environment,
        timeout=120,
        check=False,
    )
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        raise AssertionError(
            f"appliance {' '.join(args)} exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc


def store_size(data_dir: Path) -> int:
    """Bytes of the pack files of a data directory's store."""
    store = data_dir / "pools" / "default" / "store"
    return sum(
        p.stat().st_size
        for sub in ("data", "meta")
        for p in (store / sub).rglob("*")
        if p.is_file()
    )


def pack_files(data_dir: Path) -> list[Path]:
    store = data_dir / "pools" / "default" / "store"
    return sorted(p for sub in ("data", "meta") for p in (store / sub).rglob("*") if p.is_file())


def write_sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse file of ``size`` bytes holding ``pieces`` (offset -> bytes), holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


def store_digest(path: str) -> str:
    """A hash of every file under ``path`` (names and bytes): equal before and after means
    nothing in the store was written."""
    digest = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(full.encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
