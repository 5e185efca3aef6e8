"""Job kinds of the remote sources: an SFTP pull (``backup_ssh``). The libvirt kind lives in
``image`` and is registered by the service."""

from __future__ import annotations

from typing import Any

from appliance.engine import Appliance
from appliance.job_context import JobView
from appliance.job_kinds import asset_backup
from appliance.jobs import JobKind, register_job_kind
from appliance.sources import hosts


def backup_ssh(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    from appliance.sources.sftp import backup_sftp

    user, address, port, path = hosts.parse_ssh_source(p["source"])
    host = hosts.host_for_source(app.catalog, "ssh", address, port) or {}
    ctx.log("info", f"pulling {path} from {user}@{address}:{port} as {p['asset']}")
    with hosts.contact(app.catalog, host, app.clock):
        outcome = backup_sftp(
            app,
            host=address,
            port=port,
            user=user,
            path=path,
            asset=p["asset"],
            mode=p.get("mode", "incremental"),
            excludes=tuple(host.get("excludes", ())),
            one_file_system=bool(host.get("one_file_system", False)),
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
    for warning in outcome.warnings[:100]:
        ctx.log("warning", f"{warning['path']}: {warning['message']}")
    return {
        "point": outcome.point.id,
        "mode": outcome.point.mode,
        "stats": outcome.stats,
        "warnings": len(outcome.warnings),
        "suspicion": list(outcome.point.suspicion),
    }


def register_source_jobs() -> None:
    register_job_kind(
        "backup_ssh",
        JobKind(backup_ssh, asset_backup, True, lambda p: f"backup of {p['asset']} over SSH"),
    )
