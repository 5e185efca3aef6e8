"""The ``backup_libvirt`` job kind: one protected VM of a libvirt host (asset source
``libvirt://USER@HOST:PORT/DOMAIN-UUID``); the service registers it at start-up."""

from __future__ import annotations

from typing import Any

from appliance.engine import Appliance
from appliance.job_context import JobView
from appliance.job_kinds import asset_backup
from appliance.jobs import JobKind, register_job_kind
from appliance.sources import hosts
from image.libvirt.backup import backup_domain
from image.libvirt.host import LibvirtHost


def backup_libvirt(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    user, address, port, domain = hosts.parse_libvirt_source(p["source"])
    host = hosts.host_for_source(app.catalog, "libvirt", address, port) or {}
    vm = host.get("vms", {}).get(domain, {})
    ctx.log("info", f"backing up VM {vm.get('name', domain)} of {user}@{address}:{port}")
    with hosts.contact(app.catalog, host, app.clock):
        outcome = backup_domain(
            app,
            LibvirtHost(app.data_dir.path, address, port, user),
            domain,
            p["asset"],
            mode=p.get("mode", "incremental") if p.get("mode") != "differential" else "full",
            allow_offline=bool(vm.get("allow_offline", False)),
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
    for warning in outcome.warnings[:100]:
        ctx.log("warning", str(warning.get("message", warning)))
    return {
        "point": outcome.point.id,
        "mode": outcome.point.mode,
        "stats": outcome.stats,
        "warnings": len(outcome.warnings),
    }


def register_libvirt_jobs() -> None:
    register_job_kind(
        "backup_libvirt",
        JobKind(backup_libvirt, asset_backup, True, lambda p: f"backup of VM {p['asset']}"),
    )
