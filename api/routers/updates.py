"""Upgrades from an uploaded release bundle, with automatic rollback, and the version's changelog.

``GET /api/system/release`` tells the page which release runs, which one it falls back to, the
running release's changelog and the upgrade's state (``<data>/upgrades/state.json``, written by
:mod:`image.appliance_os.upgrade`).

``POST /api/system/update`` takes a bundle as the raw request body (``application/x-tar``; the
page sends the file itself, so it can show the upload's progress). The body is written to
``<data>/upgrades/incoming`` as it arrives and validated with
:func:`image.appliance_os.releases.read_bundle`; a bad one is answered 400 and deleted. The
upgrade itself restarts this service, so it cannot run in it: the launcher starts it as a
transient systemd unit, outside the service's cgroup (``service.update_launcher`` replaces the
launcher in tests). In a checkout (no appliance OS) updates come from git, and the route says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from anyio import to_thread
from fastapi import APIRouter, Request, status

import api
from api.deps import Admin, ServiceDep, Viewer
from api.limits import MAX_BUNDLE_BYTES
from api.schemas_updates import ReleasePublic, SystemReleasePublic, UpgradeStatePublic
from api.service import Service
from appliance.errors import Conflict, InvalidInput
from image.appliance_os.layout import Layout
from image.appliance_os.releases import CHANGELOG_FILE, installed_releases, read_bundle
from image.appliance_os.upgrade import mark_not_started, mark_queued, read_state, upgrades_dir

router = APIRouter(tags=["updates"])

#: Bytes gathered before one write to disk (a thread hop per network chunk would cost more).
WRITE_BATCH = 4 << 20
IN_A_CHECKOUT = "updates from the page need the appliance OS; in a checkout, git pull and restart"
UNIT = "appliance-upgrade"

#: (bundle, os root, data dir) -> None; starts the upgrade and returns at once.
Launcher = Callable[[Path, Path, Path], None]


def upgrade_command(python: str, bundle: Path, root: Path, data_dir: Path) -> list[str]:
    """The transient unit that upgrades: outside the service's cgroup, so that restarting the
    service does not kill it (``--collect``: a failed run does not block the next one)."""
    return [
        "systemd-run",
        f"--unit={UNIT}",
        "--collect",
        python,
        "-m",
        "image.appliance_os.upgrade",
        "--root",
        str(root),
        "--data-dir",
        str(data_dir),
        "apply",
        str(bundle),
    ]


def launch_with_systemd(bundle: Path, root: Path, data_dir: Path) -> None:
    argv = upgrade_command(sys.executable, bundle, root, data_dir)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise Conflict(f"the upgrade could not be started: {result.stderr.strip()}")


def _launcher(service: Service) -> Launcher:
    launcher: Launcher = getattr(service, "update_launcher", None) or launch_with_systemd
    return launcher


def running_version() -> str:
    try:
        return version("backup-appliance")
    except PackageNotFoundError:
        return "0"


def _changelog(layout: Layout | None) -> str | None:
    if layout is not None:
        path = layout.current / CHANGELOG_FILE
    else:  # a checkout: the repository's, next to the packages
        path = Path(api.__file__).resolve().parent.parent / CHANGELOG_FILE
    try:
        return path.read_text()
    except OSError:
        return None


def _layout(service: Service) -> Layout | None:
    root = service.settings.effective_os_root
    return None if root is None else Layout(root)


def release_document(service: Service) -> SystemReleasePublic:
    layout = _layout(service)
    releases = installed_releases(layout) if layout is not None else []
    return SystemReleasePublic(
        version=running_version(),
        previous_version=layout.previous_version() if layout is not None else None,
        releases=[ReleasePublic(version=r.version, built=r.built) for r in releases],
        changelog=_changelog(layout),
        updates_from_page=layout is not None,
        upgrade=UpgradeStatePublic.of(read_state(service.settings.data_dir)),
    )


@router.get("/system/release", response_model=SystemReleasePublic)
def get_release(principal: Viewer, service: ServiceDep) -> SystemReleasePublic:
    """The running release, the previous one, the changelog, and the upgrade's state."""
    return release_document(service)


def _write_batch(path: Path, chunks: list[bytes]) -> None:
    with path.open("ab") as out:
        out.writelines(chunks)


def _accept_bundle(incoming: Path, final_dir: Path) -> tuple[Path, str]:
    """Validate the uploaded file; keep it under its version's name, or delete it and raise."""
    try:
        release = read_bundle(incoming)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    final = final_dir / f"{release.version}.tar"
    os.replace(incoming, final)
    return final, release.version


@router.post(
    "/system/update",
    response_model=UpgradeStatePublic,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def post_update(
    request: Request, principal: Admin, service: ServiceDep
) -> UpgradeStatePublic:
    """Upload a release bundle (the body) and start the upgrade: 202 with the upgrade's state
    (poll ``GET /api/system/release``); 400 for a bundle that is not valid (nothing is kept);
    409 in a checkout or while an upgrade runs."""
    layout = _layout(service)
    if layout is None:
        raise Conflict(IN_A_CHECKOUT)
    data_dir = service.settings.data_dir
    if read_state(data_dir)["running"]:
        raise Conflict("an upgrade is already running; wait for it to end")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BUNDLE_BYTES:
        raise InvalidInput(f"a release bundle is at most {MAX_BUNDLE_BYTES} bytes")
    incoming_dir = upgrades_dir(data_dir) / "incoming"
    incoming_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    incoming = incoming_dir / f"upload-{uuid.uuid4().hex}.partial"
    size, batch, batched = 0, [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BUNDLE_BYTES:
                raise InvalidInput(f"a release bundle is at most {MAX_BUNDLE_BYTES} bytes")
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                await to_thread.run_sync(_write_batch, incoming, batch)
                batch, batched = [], 0
        await to_thread.run_sync(_write_batch, incoming, batch)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
    if size == 0:
        incoming.unlink(missing_ok=True)
        raise InvalidInput("send the release bundle (.tar) as the request body")
    bundle, new_version = await to_thread.run_sync(_accept_bundle, incoming, incoming_dir)
    old_version = layout.current_version()
    state = mark_queued(data_dir, old_version, new_version)
    catalog = service.app.catalog
    try:
        await to_thread.run_sync(_launcher(service), bundle, layout.root, data_dir)
    except BaseException as exc:
        mark_not_started(data_dir, str(exc) or type(exc).__name__)
        raise
    await to_thread.run_sync(
        catalog.audit,
        principal.name,
        "system.update",
        new_version,
        {"from": old_version, "bytes": size, **principal.audit_details},
    )
    return UpgradeStatePublic.of(state)
