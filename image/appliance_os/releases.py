"""Releases side by side: read a release bundle, install it beside the others, switch between them.

A release bundle is a plain ``.tar`` (its wheels are compressed already) holding exactly::

    release.json      {"version", "built", "wheels": {filename: sha256}, "python": "3.11"}
    CHANGELOG.md      what changed, shown on the page
    wheels/*.whl      the project's wheel and every dependency's

An uploaded bundle is hostile until proven otherwise: :func:`read_bundle` accepts regular files
with exactly those names only (no links, devices, absolute or ``..`` names, duplicates), within
size limits, and every wheel must hash to what ``release.json`` says. Extraction writes the
members itself, never through ``tarfile.extractall``, so a name can never reach outside the
release's folder.

Installing is one function (:func:`install_release`) used by the image build, ``scripts/install``
and upgrades. The release's folder ``releases/<version>`` is built in place (a virtual
environment's scripts name its absolute path, so it cannot be built elsewhere and renamed) and
is *complete* once its ``release.json`` exists: that file is written last, by an atomic rename.
A folder without it is the leftover of an interrupted install; installing again starts it over,
and :func:`prune` removes it. Installing a complete release again changes nothing.

``current`` and ``previous`` are relative symlinks (``releases/<version>``), so they stay right
inside the image build's root and in tests; each is replaced atomically (a new link renamed over
the old one), so the service never sees a missing ``current``.

Standard library only: this runs in the image build's root and on a bare Debian box.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from appliance.errors import InvalidInput
from image.appliance_os.layout import Layout

PROJECT = "backup-appliance"
#: The project wheel's file name starts with this, then ``<version>-``.
PROJECT_WHEEL_PREFIX = "backup_appliance-"
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
RELEASE_FILE = "release.json"
CHANGELOG_FILE = "CHANGELOG.md"
WHEELS_DIR = "wheels"
MAX_MEMBERS = 512
MAX_WHEEL_BYTES = 256 << 20
MAX_TEXT_BYTES = 1 << 20
#: The whole bundle, unpacked (a release is ~100 MB).
MAX_TOTAL_BYTES = 1 << 30
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+!-]{1,200}\.whl$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Release:
    """A validated bundle (or an installed release's ``release.json``)."""

    version: str
    built: str
    python: str
    #: wheel file name -> sha256 (hex)
    wheels: dict[str, str]
    changelog: str
    source: Path


@dataclass(frozen=True)
class InstalledRelease:
    version: str
    built: str
    path: Path


def check_version(version: object) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise InvalidInput(
            f"release version {version!r} is not 1 to 64 letters, digits and . + _ - "
            "starting with a letter or digit"
        )
    return version


def _member_kind(name: str) -> str:
    """``release``, ``changelog`` or ``wheel`` for an allowed member name; raises otherwise."""
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise InvalidInput(f"the bundle holds {name!r}: names must be relative, without '..'")
    parts = [p for p in path.parts if p != "."]
    if parts == [RELEASE_FILE]:
        return "release"
    if parts == [CHANGELOG_FILE]:
        return "changelog"
    if len(parts) == 2 and parts[0] == WHEELS_DIR and _WHEEL_NAME.match(parts[1]):
        return "wheel"
    raise InvalidInput(
        f"the bundle holds {name!r}; a release bundle holds only release.json, CHANGELOG.md "
        "and wheels/*.whl"
    )


def parse_release_document(document: Any) -> tuple[str, str, str, dict[str, str]]:
    """(version, built, python, wheels) of a ``release.json``; raises InvalidInput in words."""
    if not isinstance(document, dict):
        raise InvalidInput("release.json is not a JSON object")
    version = check_version(document.get("version"))
    built, python, wheels = document.get("built"), document.get("python"), document.get("wheels")
    if not isinstance(built, str) or not isinstance(python, str):
        raise InvalidInput('release.json needs "built" and "python" as text')
    if not isinstance(wheels, dict) or not wheels:
        raise InvalidInput('release.json needs "wheels": {file name: sha256}')
    for name, digest in wheels.items():
        if not _WHEEL_NAME.match(name) or not isinstance(digest, str) or not _SHA256.match(digest):
            raise InvalidInput(f"release.json lists {name!r} without a valid sha256")
    if not any(name.startswith(f"{PROJECT_WHEEL_PREFIX}{version}-") for name in wheels):
        raise InvalidInput(f"the bundle has no {PROJECT} wheel of version {version}")
    return version, built, python, dict(wheels)


def _hash_stream(stream: IO[bytes], limit: int, name: str) -> str:
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"{name} in the bundle is larger than {limit} bytes")
        digest.update(chunk)
    return digest.hexdigest()


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(
            f"{path.name} is not a release bundle (an uncompressed .tar): {exc}"
        ) from exc


def _checked_members(archive: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, str]]:
    members: list[tuple[tarfile.TarInfo, str]] = []
    seen: set[str] = set()
    total = 0
    for info in archive:
        if len(members) >= MAX_MEMBERS:
            raise InvalidInput(f"the bundle holds more than {MAX_MEMBERS} files")
        if info.isdir() and info.name.rstrip("/") in (WHEELS_DIR, "."):
            continue
        if not info.isreg():
            raise InvalidInput(f"the bundle holds {info.name!r}, which is not a regular file")
        kind = _member_kind(info.name)
        normal = str(PurePosixPath(info.name))
        if normal in seen:
            raise InvalidInput(f"the bundle holds {normal!r} twice")
        seen.add(normal)
        limit = MAX_WHEEL_BYTES if kind == "wheel" else MAX_TEXT_BYTES
        if info.size > limit:
            raise InvalidInput(f"{normal} in the bundle is larger than {limit} bytes")
        total += info.size
        if total > MAX_TOTAL_BYTES:
            raise InvalidInput(f"the bundle unpacks to more than {MAX_TOTAL_BYTES} bytes")
        members.append((info, kind))
    return members


def read_bundle(path: Path) -> Release:
    """Validate the bundle at ``path`` (a ``.tar``, or a folder laid out the same way)."""
    path = Path(path)
    if path.is_dir():
        return _read_bundle_dir(path)
    with _open_tar(path) as archive:
        members = _checked_members(archive)
        texts: dict[str, bytes] = {}
        hashes: dict[str, str] = {}
        for info, kind in members:
            stream = archive.extractfile(info)
            if stream is None:  # pragma: no cover - isreg() was checked
                raise InvalidInput(f"{info.name} in the bundle cannot be read")
            with stream:
                if kind == "wheel":
                    hashes[PurePosixPath(info.name).name] = _hash_stream(
                        stream, MAX_WHEEL_BYTES, info.name
                    )
                else:
                    texts[kind] = stream.read(MAX_TEXT_BYTES + 1)
    return _release_of(path, texts, hashes)


def _read_bundle_dir(path: Path) -> Release:
    texts: dict[str, bytes] = {}
    for kind, name in (("release", RELEASE_FILE), ("changelog", CHANGELOG_FILE)):
        file = path / name
        if file.is_file() and not file.is_symlink():
            texts[kind] = file.read_bytes()[: MAX_TEXT_BYTES + 1]
    hashes: dict[str, str] = {}
    wheels = path / WHEELS_DIR
    for file in sorted(wheels.iterdir()) if wheels.is_dir() else []:
        if file.is_symlink() or not file.is_file() or not _WHEEL_NAME.match(file.name):
            raise InvalidInput(f"{file} is not a wheel file")
        with file.open("rb") as stream:
            hashes[file.name] = _hash_stream(stream, MAX_WHEEL_BYTES, file.name)
    return _release_of(path, texts, hashes)


def _release_of(source: Path, texts: dict[str, bytes], hashes: dict[str, str]) -> Release:
    if "release" not in texts:
        raise InvalidInput("the bundle has no release.json")
    try:
        document = json.loads(texts["release"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"release.json is not valid JSON: {exc}") from exc
    version, built, python, wheels = parse_release_document(document)
    missing = sorted(set(wheels) - set(hashes))
    extra = sorted(set(hashes) - set(wheels))
    if missing or extra:
        raise InvalidInput(
            "the bundle's wheels do not match release.json"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; not listed: {', '.join(extra)}" if extra else "")
        )
    for name, digest in wheels.items():
        if hashes[name] != digest:
            raise InvalidInput(f"{name} does not match its sha256 in release.json")
    changelog = texts.get("changelog", b"").decode("utf-8", errors="replace")
    return Release(version, built, python, wheels, changelog, source)


# --- installing -----------------------------------------------------------------------------


def is_complete(layout: Layout, version: str) -> bool:
    folder = layout.release(version)
    return not folder.is_symlink() and (folder / RELEASE_FILE).is_file()


def _unpack(release: Release, target: Path) -> None:
    """Write the bundle's members under ``target`` (names were checked by :func:`read_bundle`)."""
    wheels = target / WHEELS_DIR
    wheels.mkdir(parents=True)
    if release.source.is_dir():
        for name in release.wheels:
            shutil.copyfile(release.source / WHEELS_DIR / name, wheels / name)
    else:
        with _open_tar(release.source) as archive:
            for info, kind in _checked_members(archive):
                if kind != "wheel":
                    continue
                name = PurePosixPath(info.name).name
                stream = archive.extractfile(info)
                if stream is None:  # pragma: no cover - isreg() was checked
                    raise InvalidInput(f"{info.name} in the bundle cannot be read")
                with stream, (wheels / name).open("xb") as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
    # The bundle may have changed since it was read: install only what was validated.
    for name, digest in release.wheels.items():
        with (wheels / name).open("rb") as stream:
            if _hash_stream(stream, MAX_WHEEL_BYTES, name) != digest:
                raise InvalidInput(f"{name} changed while the release was installed")


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-20:]
        raise InvalidInput(f"{what} failed (exit {result.returncode}): " + "\n".join(detail))


def install_release(
    layout: Layout, bundle: Path, *, python: Path = Path("/usr/bin/python3")
) -> str:
    """Install the bundle as ``releases/<version>`` beside the others; returns the version.

    A complete release of that version is left as it is (idempotent); a leftover of an
    interrupted install is removed and the install starts over.
    """
    release = read_bundle(Path(bundle))
    version = release.version
    if is_complete(layout, version):
        return version
    target = layout.release(version)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    layout.releases.mkdir(parents=True, exist_ok=True)
    target.mkdir()
    _unpack(release, target)
    venv = target / "venv"
    _run([str(python), "-m", "venv", str(venv)], f"creating the virtual environment {venv}")
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--find-links",
            str(target / WHEELS_DIR),
            f"{PROJECT}=={version}",
        ],
        f"installing {PROJECT} {version}",
    )
    # The wheels are in the venv now; a bundle is ~100 MB, kept twice it would fill small disks.
    shutil.rmtree(target / WHEELS_DIR)
    (target / CHANGELOG_FILE).write_text(release.changelog)
    document = {
        "version": version,
        "built": release.built,
        "python": release.python,
        "wheels": release.wheels,
    }
    partial = target / f"{RELEASE_FILE}.partial"
    partial.write_text(json.dumps(document, indent=2) + "\n")
    # A power cut right after the switch must not leave a release with empty files behind.
    os.sync()
    os.replace(partial, target / RELEASE_FILE)  # the release is complete from here on
    _fsync_dir(target)
    return version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_installed(layout: Layout, version: str) -> InstalledRelease | None:
    if not is_complete(layout, version):
        return None
    try:
        document = json.loads((layout.release(version) / RELEASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    built = document.get("built") if isinstance(document, dict) else None
    return InstalledRelease(version, str(built or ""), layout.release(version))


def installed_releases(layout: Layout) -> list[InstalledRelease]:
    """The complete releases, newest build first."""
    if not layout.releases.is_dir():
        return []
    found = []
    for entry in layout.releases.iterdir():
        if VERSION_PATTERN.match(entry.name):
            release = read_installed(layout, entry.name)
            if release is not None:
                found.append(release)
    return sorted(found, key=lambda r: (r.built, r.version), reverse=True)


def _replace_link(link: Path, version: str) -> None:
    temporary = link.with_name(f".{link.name}.new")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(Path("releases") / version)
    os.replace(temporary, link)


def switch_to(layout: Layout, version: str) -> None:
    """Point ``current`` at ``version`` (atomically); ``previous`` becomes the old current."""
    check_version(version)
    if not is_complete(layout, version):
        raise InvalidInput(f"release {version} is not installed")
    old = layout.current_version()
    if old == version:
        return
    # previous first: a crash between the two renames leaves previous == current, harmless.
    if old is not None:
        _replace_link(layout.previous, old)
    _replace_link(layout.current, version)
    _fsync_dir(layout.opt)


def prune(layout: Layout, keep: int = 2) -> list[str]:
    """Remove all but the newest ``keep`` releases (never current or previous) and leftovers of
    interrupted installs; returns the versions removed."""
    if not layout.releases.is_dir():
        return []
    protected = {layout.current_version(), layout.previous_version()}
    complete = [r.version for r in installed_releases(layout)]
    kept = set(complete[:keep]) | protected
    removed = []
    for entry in sorted(layout.releases.iterdir()):
        if entry.name in kept or entry.is_symlink() or not entry.is_dir():
            continue
        shutil.rmtree(entry)
        removed.append(entry.name)
    return removed
