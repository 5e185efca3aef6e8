"""Protection policies at work: what backing up an asset means, and the ``policy_backup`` job.

An asset's ``source`` in the catalog is the path of a file tree (``files`` assets) or, for a
``vm`` asset, a JSON object ``{"disks": [paths...], "vm_spec": path or null}`` (the VM definition
file is read at each backup, so a changed definition is recorded with the next point).

``policy_backup`` is the job the scheduler and "run now" submit for each asset of a policy (a
policy covers one or more assets; each gets its own job, so one failing does not hide the
others): it backs up the asset ``asset`` with the mode it was given (else the policy's own) and,
when it succeeded and the policy has retention rules, queues a ``prune`` job for the asset with
those rules. The prune is
a separate job because it needs the store exclusively, which a backup (holding it shared, like
every other backup running beside it) cannot take.
"""

from __future__ import annotations

from typing import Any

from appliance.catalog.records import AssetRecord
from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JobContext, JobKind, register_job_kind, work_of
from appliance.retention import RetentionRules
from appliance.vmspec import parse_vm_source

POLICY_JOB_KIND = "policy_backup"
RETENTION_KEYS = tuple(
    f"keep_{p}" for p in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
)


def backup_job_for(asset: AssetRecord, mode: str) -> tuple[str, dict[str, Any]]:
    """The job kind and parameters that back up ``asset`` once."""
    if asset.source.startswith("client://"):
        raise InvalidInput(
            f"asset {asset.name} is backed up by its host's client (appliance-client backup); "
            "the appliance cannot start it"
        )
    if asset.source.startswith(("ssh://", "libvirt://")):
        kind = "backup_ssh" if asset.source.startswith("ssh://") else "backup_libvirt"
        return kind, {"source": asset.source, "asset": asset.name, "mode": mode}
    if asset.kind == "files":
        if not asset.source:
            raise InvalidInput(f"asset {asset.name} has no source path")
        return "backup_files", {"source": asset.source, "asset": asset.name, "mode": mode}
    disks, spec = parse_vm_source(asset.source)
    if not disks:
        raise InvalidInput(f"asset {asset.name} names no disk image")
    params: dict[str, Any] = {"disks": disks, "asset": asset.name, "mode": mode}
    if spec:
        params["vm"] = spec
    return "backup_image", params


def retention_rules(document: dict[str, Any]) -> RetentionRules:
    """A policy's retention document ``{"keep_daily": 7, ...}`` as rules (validated)."""
    unknown = set(document) - set(RETENTION_KEYS)
    if unknown:
        raise InvalidInput(f"unknown retention rule(s): {', '.join(sorted(unknown))}")
    values: dict[str, int] = {}
    for key, value in document.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"retention rule {key} must be a whole number >= 0")
        values[key] = value
    return RetentionRules(**values)


def _policy_backup(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    policy = app.catalog.get_policy(p["policy"])
    if p["asset"] not in policy.assets:
        raise InvalidInput(
            f"policy {policy.name} no longer covers {p['asset']}", policy=policy.name
        )
    asset = app.catalog.get_asset(p["asset"])
    mode = p.get("mode") or policy.mode
    kind, params = backup_job_for(asset, mode)
    result = dict(work_of(kind)(app, params, ctx))
    rules = retention_rules(policy.retention)
    if p.get("apply_retention", True) and not rules.empty():
        prune = ctx.submit(
            "prune",
            {"asset": asset.name, "rules": dict(policy.retention), "policy": policy.name},
        )
        ctx.log("info", f"retention of policy {policy.name}: prune job {prune.id} queued")
        result["prune_job"] = prune.id
    return result


def _policy_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(f"asset:{p['asset']}", True), ("store", False)]


def register_policy_jobs() -> None:
    """Make ``policy_backup`` known to the job runner (before it starts: it re-queues
    interrupted jobs only of kinds it knows)."""
    register_job_kind(
        POLICY_JOB_KIND,
        JobKind(
            _policy_backup,
            _policy_resources,
            True,
            lambda p: f"backup of {p['asset']} by policy {p['policy']}",
            isolated=True,
        ),
    )
