"""Build a release bundle (an upgrade, and the image's first release) from a checkout.

The checkout's tracked files (``git ls-files``; without ``.git``, the tree less virtual
environments and caches) are copied to a temporary folder, the copy's ``pyproject.toml`` gets
the release's version, and ``pip wheel`` builds the project's wheel and every dependency's
(this reaches the package index). The bundle is the ``.tar`` that
:func:`image.appliance_os.releases.read_bundle` accepts; its version is the one written in the
project wheel's name, so it always equals what the installed release reports
(``importlib.metadata``).

The default version is the project's plus a PEP 440 local part: ``0.1.0+g<short hash>``, and
``.d<UTC yyyymmddHHMM>`` when the tree has uncommitted changes, so two builds of different
code never share a version.

``wheelhouse``: dependency wheels kept between builds (filled on first use); only the project
wheel is built again (``--no-deps``). Tests make several versions quickly this way.

Standard library only, like :mod:`image.appliance_os.releases`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from image.appliance_os.releases import (
    CHANGELOG_FILE,
    PROJECT_WHEEL_PREFIX,
    RELEASE_FILE,
    WHEELS_DIR,
    check_version,
    read_bundle,
)

IGNORED = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
    "dist",
    "node_modules",
    ".coverage",
)
_VERSION_LINE = re.compile(r'^version\s*=\s*"[^"]*"\s*$', re.MULTILINE)
#: Written into a wheelhouse once every dependency wheel is in it.
WHEELHOUSE_MARKER = ".complete"


def _git(checkout: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def project_version(pyproject: str) -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    if match is None:
        raise ValueError("pyproject.toml has no version line")
    return match.group(1)


def default_version(base: str, short_hash: str | None, dirty: bool, now: datetime) -> str:
    """``base+g<hash>[.d<yyyymmddHHMM>]``: the local part tells builds of other code apart."""
    local = [f"g{short_hash}"] if short_hash else []
    if dirty or not short_hash:
        local.append(f"d{now.astimezone(UTC):%Y%m%d%H%M}")
    return f"{base}+{'.'.join(local)}"


def with_version(pyproject: str, version: str) -> str:
    changed, count = _VERSION_LINE.subn(f'version = "{version}"', pyproject, count=1)
    if count != 1:
        raise ValueError("pyproject.toml has no version line")
    return changed


def copy_checkout(checkout: Path, target: Path) -> None:
    """The files of the checkout that belong in a release: tracked ones when it is a git tree."""
    if (checkout / ".git").exists():
        listed = _git(checkout, "ls-files", "-z").split("\0")
        for name in filter(None, listed):
            source = checkout / name
            if not source.is_file():  # deleted but not yet committed
                continue
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    else:
        shutil.copytree(
            checkout,
            target,
            ignore=shutil.ignore_patterns(*IGNORED),
            symlinks=True,
            dirs_exist_ok=True,
        )


def _pip_wheel(python: Path, *args: str) -> None:
    argv = [str(python), "-m", "pip", "wheel", "--disable-pip-version-check", *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"pip wheel failed (exit {result.returncode}):\n{tail}")


def _python_version(python: Path) -> str:
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _build_wheels(python: Path, source: Path, wheels: Path, wheelhouse: Path | None) -> None:
    if wheelhouse is None:
        _pip_wheel(python, str(source), "-w", str(wheels))
        return
    wheelhouse.mkdir(parents=True, exist_ok=True)
    if not (wheelhouse / WHEELHOUSE_MARKER).exists():
        _pip_wheel(python, str(source), "-w", str(wheelhouse))
        (wheelhouse / WHEELHOUSE_MARKER).write_text("")
    _pip_wheel(python, "--no-deps", str(source), "-w", str(wheels))
    for wheel in wheelhouse.glob("*.whl"):
        if not wheel.name.startswith(PROJECT_WHEEL_PREFIX):
            shutil.copy2(wheel, wheels / wheel.name)


def build_bundle(
    checkout: Path,
    out: Path,
    *,
    version: str | None = None,
    python: Path,
    changelog: Path | None = None,
    wheelhouse: Path | None = None,
) -> Path:
    """Build the release bundle of ``checkout`` at ``out`` (a ``.tar``); returns ``out``."""
    checkout, out = Path(checkout).resolve(), Path(out)
    pyproject = (checkout / "pyproject.toml").read_text()
    if version is None:
        git = (checkout / ".git").exists()
        short_hash = _git(checkout, "rev-parse", "--short", "HEAD").strip() if git else None
        dirty = bool(_git(checkout, "status", "--porcelain").strip()) if git else True
        version = default_version(project_version(pyproject), short_hash, dirty, datetime.now(UTC))
    check_version(version)
    with tempfile.TemporaryDirectory(prefix="appliance-bundle-") as temporary:
        work = Path(temporary)
        source, staged = work / "source", work / "bundle"
        source.mkdir()
        copy_checkout(checkout, source)
        (source / "pyproject.toml").write_text(with_version(pyproject, version))
        wheels = staged / WHEELS_DIR
        wheels.mkdir(parents=True)
        _build_wheels(python, source, wheels, Path(wheelhouse) if wheelhouse else None)
        # The wheel's name carries the version as pip normalises it (PEP 440): that one is what
        # the installed release reports, so the bundle takes it.
        project = [w.name for w in wheels.glob(f"{PROJECT_WHEEL_PREFIX}*.whl")]
        if len(project) != 1:
            raise RuntimeError(f"expected one project wheel, found {project}")
        version = check_version(project[0][len(PROJECT_WHEEL_PREFIX) :].split("-", 1)[0])
        log = Path(changelog) if changelog else checkout / CHANGELOG_FILE
        (staged / CHANGELOG_FILE).write_text(log.read_text() if log.is_file() else "")
        document = {
            "version": version,
            "built": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": _python_version(python),
            "wheels": {w.name: sha256_file(w) for w in sorted(wheels.glob("*.whl"))},
        }
        (staged / RELEASE_FILE).write_text(json.dumps(document, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
            for name in (RELEASE_FILE, CHANGELOG_FILE):
                archive.add(staged / name, arcname=name, recursive=False)
            for wheel in sorted(wheels.glob("*.whl")):
                archive.add(wheel, arcname=f"{WHEELS_DIR}/{wheel.name}", recursive=False)
        read_bundle(partial)  # what was built must be what an appliance accepts
        os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m image.appliance_os.bundle", description="Build a release bundle (.tar)."
    )
    parser.add_argument("--out", type=Path, required=True, help="the bundle file to write")
    parser.add_argument("--version", help="the release version (default: from pyproject + git)")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--python", type=Path, default=Path(sys.executable))
    parser.add_argument("--changelog", type=Path)
    parser.add_argument("--wheelhouse", type=Path, help="reuse dependency wheels kept here")
    args = parser.parse_args(argv)
    out = build_bundle(
        args.checkout,
        args.out,
        version=args.version,
        python=args.python,
        changelog=args.changelog,
        wheelhouse=args.wheelhouse,
    )
    print(f"{out}: {read_bundle(out).version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
