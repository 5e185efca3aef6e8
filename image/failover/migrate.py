"""Moving a running failed-over VM onto local disks, so it no longer needs the backup.

For each disk, a local qcow2 file is added as a QMP block node and ``blockdev-mirror`` copies the
disk (overlay plus backing export) onto it while the guest runs. When every mirror job is ready,
``block-job-complete`` pivots the VM's devices onto the local nodes; the old overlay and NBD nodes
are deleted, the exports stop (releasing the store's shared lock) and the overlays are removed.
The session stays ``running``, with ``storage: local`` and ``local_disks`` in its details.

A migration is all or nothing: on any failure (or cancel) the mirror jobs are cancelled, the local
nodes and files removed, and the session is ``running`` from the backup again, as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from appliance.catalog.records import FailoverSessionRecord
from appliance.errors import Conflict
from image.failover.errors import FailoverFailed
from image.failover.records import now_iso
from image.failover.session import FailoverSession, ProgressCallback
from image.qemu import create_overlay_argv, run_tool
from image.qmp import QmpClient, QmpError


def migrate_to_local(
    session: FailoverSession,
    target_dir: str | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> FailoverSessionRecord:
    """Move the running VM's disks onto local qcow2 files; the backup is then not needed."""
    with session.lock:
        if session.state != "running":
            raise Conflict(f"failover session {session.id} is {session.state}, not running")
        if session.on_local_storage:
            raise Conflict(f"failover session {session.id} already runs on local storage")
        qmp = session.process.qmp
        if qmp is None:
            raise Conflict(f"failover session {session.id} has no QMP connection")
        target_dir = os.path.abspath(
            target_dir or os.path.join(session.manager.state_dir, "local", session.id)
        )
        os.makedirs(target_dir, exist_ok=True)
        session.update("migrating")
        jobs: list[str] = []
        targets: dict[str, str] = {}
        try:
            for i, disk in enumerate(session.disks):
                target = os.path.join(target_dir, f"{disk.name}.qcow2")
                if os.path.exists(target):
                    raise Conflict(f"{target} already exists")
                run_tool(create_overlay_argv(target, disk.size, None), "creating a local disk")
                targets[disk.name] = target
                qmp.blockdev_add(
                    {
                        "driver": "qcow2",
                        "node-name": f"m{i}",
                        "file": {"driver": "file", "filename": target},
                    }
                )
                qmp.blockdev_mirror(f"mirror{i}", f"d{i}", f"m{i}")
                jobs.append(f"mirror{i}")
            _wait_jobs_ready(session, qmp, jobs, progress, cancel)
            for job in jobs:
                qmp.block_job_complete(job)
            deadline = time.monotonic() + 60
            while any(j["device"] in jobs for j in qmp.query_block_jobs()):
                if time.monotonic() > deadline:
                    raise FailoverFailed("the mirror jobs did not complete within 60 s")
                time.sleep(0.05)
            failed = [
                e
                for e in qmp.poll_events()
                if e.get("event") == "BLOCK_JOB_COMPLETED" and e["data"].get("error")
            ]
            if failed:
                raise FailoverFailed(f"mirroring failed: {failed[0]['data']['error']}")
        except BaseException as exc:
            for job in jobs:
                with contextlib.suppress(QmpError):
                    qmp.block_job_cancel(job)
            for i in range(len(targets)):
                with contextlib.suppress(QmpError):
                    qmp.blockdev_del(f"m{i}")
            for target in targets.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            session.update("running")
            if isinstance(exc, QmpError):
                raise FailoverFailed(f"migration failed: {exc.message}") from exc
            raise
        # The VM's devices now use m<i>; the old overlay and NBD nodes are unused.
        for i in range(len(session.disks)):
            for node in (f"d{i}", f"d{i}-nbd"):
                with contextlib.suppress(QmpError):
                    qmp.blockdev_del(node)
        session.stop_exports()
        for disk in session.disks:
            disk.local_copy = targets[disk.name]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.overlay)
        return session.update(
            "running", storage="local", local_disks=targets, migrated_at=now_iso()
        )


def _wait_jobs_ready(
    session: FailoverSession,
    qmp: QmpClient,
    jobs: list[str],
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> None:
    while True:
        if cancel is not None and cancel.is_set():
            raise FailoverFailed("the migration was cancelled")
        if not session.qemu_alive():
            raise FailoverFailed("QEMU exited during the migration")
        if session.export_errors():
            raise FailoverFailed(session.export_errors()[0])
        running = {j["device"]: j for j in qmp.query_block_jobs() if j["device"] in jobs}
        if len(running) < len(jobs):
            raise FailoverFailed("a mirror job ended early (see the QEMU log)")
        done = sum(int(j.get("offset", 0)) for j in running.values())
        total = sum(int(j.get("len", 0)) for j in running.values())
        if progress is not None:
            progress({"phase": "mirroring", "bytes_done": done, "bytes_total": total})
        if all(j.get("ready") for j in running.values()):
            return
        time.sleep(0.2)
