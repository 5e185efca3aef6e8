"""Release bundles and releases side by side (``image.appliance_os.releases``).

Bundles here are made by hand with a tiny but real project wheel (pip installs it), so every
hostile variant can be built exactly: names with ``..`` or absolute, links, unlisted or missing
wheels, wrong hashes, bad versions. Installing runs the real ``python -m venv`` and
``pip install --no-index``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import InvalidInput
from image.appliance_os import releases
from image.appliance_os.layout import Layout
from image.appliance_os.releases import (
    install_release,
    installed_releases,
    prune,
    read_bundle,
    switch_to,
)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def project_wheel(version: str) -> tuple[str, bytes]:
    """A minimal, installable ``backup-appliance`` wheel of ``version``."""
    info = f"backup_appliance-{version}.dist-info"
    files = {
        "appliance_release_probe.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: backup-appliance\nVersion: {version}\n"
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    record += f"{info}/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return f"backup_appliance-{version}-py3-none-any.whl", buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_bundle(
    path: Path,
    version: str = "1.0",
    *,
    document: dict[str, Any] | None = None,
    extra: dict[str, bytes] | None = None,
    links: dict[str, str] | None = None,
    hard_links: dict[str, str] | None = None,
    listed_only: dict[str, str] | None = None,
) -> Path:
    name, data = project_wheel(version)
    wheels = {name: data}
    doc: dict[str, Any] = {
        "version": version,
        "built": "2026-12-06T00:00:00+00:00",
        "python": "3.11",
        "wheels": {n: hashlib.sha256(d).hexdigest() for n, d in wheels.items()},
    }
    doc["wheels"].update(listed_only or {})
    doc.update(document or {})
    with tarfile.open(path, "w") as archive:
        _add(archive, "release.json", json.dumps(doc).encode())
        _add(archive, "CHANGELOG.md", f"## {version}\n\n- a change\n".encode())
        for wheel, content in wheels.items():
            _add(archive, f"wheels/{wheel}", content)
        for member, content in (extra or {}).items():
            _add(archive, member, content)
        for kind, mapping in ((tarfile.SYMTYPE, links), (tarfile.LNKTYPE, hard_links)):
            for member, target in (mapping or {}).items():
                info = tarfile.TarInfo(member)
                info.type = kind
                info.linkname = target
                archive.addfile(info)
    return path


def test_a_good_bundle_is_read(tmp_path: Path) -> None:
    release = read_bundle(make_bundle(tmp_path / "b.tar", "1.0+g1234"))
    assert release.version == "1.0+g1234"
    assert list(release.wheels) == ["backup_appliance-1.0+g1234-py3-none-any.whl"]
    assert release.changelog.startswith("## 1.0+g1234")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"extra": {"../evil.whl": b"x"}}, "without '..'"),
        ({"extra": {"wheels/../../evil.whl": b"x"}}, "without '..'"),
        ({"extra": {"/etc/cron.d/evil": b"x"}}, "without '..'"),
        ({"extra": {"install.sh": b"x"}}, "holds only release.json"),
        ({"links": {"wheels/evil-1-py3-none-any.whl": "/etc/shadow"}}, "not a regular file"),
        ({"hard_links": {"wheels/evil-1-py3-none-any.whl": "release.json"}}, "not a regular"),
        ({"extra": {"release.json": b"{}"}}, "twice"),
        ({"extra": {"wheels/other-1-py3-none-any.whl": b"x"}}, "not listed"),
        ({"listed_only": {"other-1-py3-none-any.whl": "0" * 64}}, "missing"),
        ({"document": {"version": "../1.0"}}, "release version"),
        ({"document": {"version": "1.0 beta"}}, "release version"),
        ({"document": {"version": ""}}, "release version"),
        ({"document": {"version": "2.0"}}, "no backup-appliance wheel of version 2.0"),
        ({"document": {"wheels": "all of them"}}, "wheels"),
        ({"document": {"built": 5}}, "built"),
    ],
)
def test_hostile_or_broken_bundles_are_refused(
    tmp_path: Path, kwargs: dict[str, Any], words: str
) -> None:
    bundle = make_bundle(tmp_path / "b.tar", **kwargs)
    with pytest.raises(InvalidInput) as caught:
        read_bundle(bundle)
    assert words in str(caught.value)
    layout = Layout(tmp_path / "root")
    with pytest.raises(InvalidInput):
        install_release(layout, bundle, python=Path(sys.executable))
    assert not layout.root.exists()  # refused before anything was written


def test_a_wheel_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    name, _ = project_wheel("1.0")
    bundle = make_bundle(tmp_path / "b.tar", document={"wheels": {name: "ab" * 32}})
    with pytest.raises(InvalidInput, match="does not match its sha256"):
        read_bundle(bundle)


def test_oversized_members_and_non_tars_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(tmp_path / "b.tar")
    monkeypatch.setattr(releases, "MAX_WHEEL_BYTES", 100)
    with pytest.raises(InvalidInput, match="larger than 100 bytes"):
        read_bundle(bundle)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidInput, match="not a release bundle"):
        read_bundle(junk)


def test_install_is_idempotent_and_releases_sit_side_by_side(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    python = Path(sys.executable)
    assert install_release(layout, make_bundle(tmp_path / "1.tar", "1.0"), python=python) == "1.0"
    venv_python = layout.venv("1.0") / "bin" / "python"
    assert venv_python.exists()
    marker = layout.venv("1.0") / "marker"
    marker.write_text("kept")
    assert install_release(layout, tmp_path / "1.tar", python=python) == "1.0"
    assert marker.read_text() == "kept"  # a complete release is left as it is
    assert (layout.release("1.0") / "CHANGELOG.md").read_text().startswith("## 1.0")
    assert not (layout.release("1.0") / "wheels").exists()

    # An interrupted install (no release.json yet) is started over, and is not listed.
    leftover = layout.release("2.0")
    (leftover / "venv").mkdir(parents=True)
    (leftover / "venv" / "junk").write_text("half")
    assert [r.version for r in installed_releases(layout)] == ["1.0"]
    install_release(layout, make_bundle(tmp_path / "2.tar", "2.0"), python=python)
    assert not (leftover / "venv" / "junk").exists()
    assert {r.version for r in installed_releases(layout)} == {"1.0", "2.0"}
    code = "import appliance_release_probe as p; print(p.VERSION)"
    out = subprocess.run(
        [str(layout.venv("2.0") / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "2.0"


def _fake_release(layout: Layout, version: str, built: str) -> None:
    folder = layout.release(version)
    folder.mkdir(parents=True)
    (folder / "release.json").write_text(json.dumps({"version": version, "built": built}))


def test_switch_to_is_atomic_and_keeps_previous(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    _fake_release(layout, "1.0", "2026-01-01")
    _fake_release(layout, "2.0", "2026-02-01")
    with pytest.raises(InvalidInput, match="not installed"):
        switch_to(layout, "3.0")
    switch_to(layout, "1.0")
    assert (layout.current_version(), layout.previous_version()) == ("1.0", None)
    switch_to(layout, "2.0")
    assert (layout.current_version(), layout.previous_version()) == ("2.0", "1.0")
    assert str(layout.current.readlink()) == "releases/2.0"  # relative: right in any root

    seen: set[str | None] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(layout.current_version())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(300):
            switch_to(layout, "1.0" if i % 2 == 0 else "2.0")
    finally:
        stop.set()
        watcher.join()
    assert seen <= {"1.0", "2.0"}, "a reader saw no current release"
    assert None not in seen


def test_prune_keeps_current_previous_and_the_newest(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    for i in range(1, 6):
        _fake_release(layout, f"{i}.0", f"2026-0{i}-01")
    switch_to(layout, "1.0")
    switch_to(layout, "2.0")  # previous = 1.0, the oldest two are protected
    (layout.releases / "6.0").mkdir()  # an interrupted install
    removed = prune(layout, keep=2)
    assert sorted(removed) == ["3.0", "6.0"]
    assert sorted(r.version for r in installed_releases(layout)) == ["1.0", "2.0", "4.0", "5.0"]


def test_bundle_versions_are_pep440_local_versions() -> None:
    from datetime import UTC, datetime

    from image.appliance_os.bundle import default_version, with_version

    now = datetime(2026, 12, 6, 17, 40, tzinfo=UTC)
    assert default_version("0.1.0", "abc1234", False, now) == "0.1.0+gabc1234"
    assert default_version("0.1.0", "abc1234", True, now) == "0.1.0+gabc1234.d202612061740"
    assert default_version("0.1.0", None, True, now) == "0.1.0+d202612061740"
    pyproject = '[project]\nname = "x"\nversion = "0.1.0"\n\n[tool.mypy]\npython_version = "3.11"\n'
    changed = with_version(pyproject, "0.1.0+gabc1234")
    assert 'version = "0.1.0+gabc1234"' in changed and 'python_version = "3.11"' in changed
    releases.check_version("0.1.0+gabc1234.d202612061740")
