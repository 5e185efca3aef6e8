"""The machines around the appliance: add a host (client, SSH or libvirt), pin its SSH key,
protect its folders or VMs, back it up now, start a restore its client pulls.

``appliance.sources.hosts`` keeps the records; this router only checks, calls and audits.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import shlex
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Request, Response, status
from pydantic import Field

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.identity import certificate_fingerprint
from api.schemas import JobPublic
from api.schemas import Request as RequestModel
from api.security import CLIENT_ROLE, digest, new_api_token
from api.service import Service
from api.views import job_public
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.sources import hosts as records
from appliance.sources import ssh_identity as ssh

router = APIRouter(tags=["hosts"])


class HostCreate(RequestModel):
    name: str = Field(min_length=1, max_length=63)
    kind: str = Field(pattern="^(client|ssh|libvirt)$")
    address: str | None = Field(default=None, max_length=253)
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default="root", max_length=32)
    #: ssh: the folders to pull (one asset each, ``<host>-<n>`` unless one folder: ``<host>``).
    paths: list[str] = Field(default_factory=list, max_length=32)
    excludes: list[str] = Field(default_factory=list, max_length=256)
    one_file_system: bool = False
    #: client: the asset its token may add points to (default: the host's name).
    asset: str | None = Field(default=None, max_length=120)
    #: client: it also sends block devices, to a second asset (kind ``vm``): ``<asset>-disks``.
    disks: bool = False


class HostTrust(RequestModel):
    fingerprint: str = Field(min_length=10, max_length=100)


class VmProtect(RequestModel):
    domain: str = Field(min_length=1, max_length=200)
    asset: str | None = Field(default=None, max_length=120)
    allow_offline: bool = False


class HostRestoreCreate(RequestModel):
    point: str = Field(min_length=1, max_length=64)
    path: str = Field(default="", max_length=4096)
    target: str = Field(min_length=1, max_length=4096)


def _public(host: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in host.items() if k not in ("token_id", "offered_key")}
    offered = host.get("offered_key")
    if offered:
        shown["offered_fingerprint"] = ssh.HostKey(*offered).fingerprint
    return shown


def _spki_pin(cert_path: str) -> str:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def install_command(service: Service, request: Request, token: str) -> str:
    """What the page offers to paste on the host (as root): fetch the client over the pinned
    connection, install its four libraries, enroll with the certificate's fingerprint."""
    base = str(request.base_url).rstrip("/")
    settings = service.settings
    if not settings.tls:
        return "# the appliance serves plain HTTP here; the client needs HTTPS (turn TLS on)"
    fingerprint = certificate_fingerprint(settings.cert_path)
    pin = _spki_pin(str(settings.cert_path))
    q = shlex.quote
    return (
        f"curl -fsS -k --pinnedpubkey {q(pin)} -H {q('Authorization: Bearer ' + token)} "
        f"-o /usr/local/bin/appliance-client {q(base + '/api/client/appliance-client.pyz')} && "
        "chmod 755 /usr/local/bin/appliance-client && "
        "python3 -m pip install --quiet httpx zstandard blake3 pyfastcdc && "
        f"appliance-client enroll --server {q(base)} --fingerprint {q(fingerprint)} "
        f"--token {q(token)}"
    )


@router.get("/hosts")
def list_hosts(principal: Viewer, service: ServiceDep) -> list[dict[str, Any]]:
    return [_public(h) for h in records.list_hosts(service.app.catalog)]


@router.get("/hosts/ssh-key")
def appliance_ssh_key(principal: Viewer, service: ServiceDep) -> dict[str, str]:
    """The appliance's public key, for ``authorized_keys`` on SSH and libvirt hosts."""
    ident = ssh.appliance_identity(service.app.data_dir.path)
    return {"public_key": ident.public_line, "fingerprint": ident.fingerprint}


@router.post("/hosts", status_code=status.HTTP_201_CREATED)
def add_host(
    body: HostCreate, request: Request, principal: Admin, service: ServiceDep
) -> dict[str, Any]:
    app = service.app
    catalog = app.catalog
    name = records.check_host_name(body.name)
    now = service.now().isoformat()
    record: dict[str, Any] = {
        "name": name,
        "kind": body.kind,
        "created_at": now,
        "last_contact": None,
    }
    answer: dict[str, Any] = {}
    if body.kind == "client":
        asset = body.asset or name
        assets = [(asset, "files", f"backed up by {name}'s client")]
        if body.disks:
            assets.append((f"{asset}-disks", "vm", f"{name}'s block devices, sent by its client"))
        for asset_name, kind, description in assets:
            try:
                existing = catalog.get_asset(asset_name)
            except NotFound:
                catalog.add_asset(asset_name, kind, f"client://{name}/", description)
                continue
            if existing.kind != kind:
                raise Conflict(
                    f"asset {asset_name} already exists for {existing.kind} points, not {kind}",
                    asset=asset_name,
                )
        user = records.host_user(name)
        try:
            catalog.get_user(user)
            raise Conflict(f"user {user} already exists", user=user)
        except NotFound:
            catalog.add_user(user, CLIENT_ROLE, records.NO_PASSWORD)
        token = new_api_token()
        token_record = catalog.add_token(
            user, digest(token), ["client", *(records.asset_scope(a) for a, _, _ in assets)]
        )
        record.update(assets=[a for a, _, _ in assets], token_id=token_record.id)
        records.add_host(catalog, record)
        answer = {"token": token, "install_command": install_command(service, request, token)}
    else:
        if not body.address:
            raise InvalidInput("an SSH or libvirt host needs its address")
        address = ssh.check_host(body.address)
        ssh.check_user(body.user)
        offered = ssh.scan_host_key(address, body.port)
        paths = [p for p in body.paths if p]
        for path in paths:
            if not path.startswith("/") or "/../" in path + "/" or "\0" in path:
                raise InvalidInput(f"{path[:200]!r} is not an absolute folder path")
        record.update(
            address=address,
            port=body.port,
            user=body.user,
            trusted=False,
            offered_key=[offered.key_type, offered.key_b64],
            assets=[],
            excludes=body.excludes,
            one_file_system=body.one_file_system,
            paths=paths,
        )
        records.add_host(catalog, record)
        answer = {
            "appliance_key": ssh.appliance_identity(app.data_dir.path).public_line,
            "offered_fingerprint": offered.fingerprint,
        }
    catalog.audit(principal.name, "host.add", name, {"kind": body.kind, **principal.audit_details})
    return {"host": _public(records.get_host(catalog, name)), **answer}


@router.post("/hosts/{name}/trust")
def trust_host(name: str, body: HostTrust, principal: Admin, service: ServiceDep) -> dict[str, Any]:
    """Pin the host key that was offered when the host was added, if the operator confirms
    its fingerprint; then the host's folders become assets."""
    app = service.app
    host = records.get_host(app.catalog, name)
    offered = host.get("offered_key")
    if host["kind"] == "client" or not offered:
        raise Conflict(f"host {name} has no host key waiting to be trusted")
    key = ssh.HostKey(*offered)
    if body.fingerprint.strip() != key.fingerprint:
        raise InvalidInput(
            f"the fingerprint does not match the key {host['address']} offered ({key.fingerprint})"
        )
    ssh.pin_host_key(app.data_dir.path, host["address"], host["port"], key, replace=True)
    assets = list(host.get("assets", []))
    if host["kind"] == "ssh":
        for n, path in enumerate(host.get("paths", [])):
            asset = name if len(host["paths"]) == 1 else f"{name}-{n + 1}"
            source = records.ssh_source(host["user"], host["address"], host["port"], path)
            with contextlib.suppress(Conflict):
                app.catalog.add_asset(asset, "files", source, f"{path} on {name}, over SSH")
            if asset not in assets:
                assets.append(asset)
    host = records.update_host(
        app.catalog,
        name,
        trusted=True,
        offered_key=None,
        fingerprint=key.fingerprint,
        assets=assets,
    )
    app.catalog.audit(principal.name, "host.trust", name, {"fingerprint": key.fingerprint})
    return _public(host)


@router.delete("/hosts/{name}", status_code=status.HTTP_204_NO_CONTENT)
def remove_host(name: str, principal: Admin, service: ServiceDep) -> Response:
    """Forget the host: a client's token is revoked and its user disabled. Its assets and
    points stay (delete them on their own)."""
    catalog = service.app.catalog
    host = records.remove_host(catalog, name)
    if host["kind"] == "client":
        user = records.host_user(name)
        catalog.revoke_tokens(user)
        catalog.update_user(user, disabled=True)
    catalog.audit(principal.name, "host.remove", name, principal.audit_details)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/hosts/{name}/backup", response_model=list[JobPublic], status_code=202)
def backup_host(name: str, principal: Operator, service: ServiceDep) -> list[JobPublic]:
    """Back up every asset of an SSH or libvirt host now (one job each)."""
    from appliance.policies import backup_job_for

    app = service.app
    host = records.get_host(app.catalog, name)
    if host["kind"] == "client":
        raise Conflict(f"{name} is backed up by its client; run appliance-client backup there")
    if not host.get("trusted"):
        raise Conflict(f"confirm {name}'s host key first")
    jobs = []
    for asset in host.get("assets", []):
        kind, params = backup_job_for(app.catalog.get_asset(asset), "incremental")
        jobs.append(job_public(service.jobs.submit(kind, params)))
    app.catalog.audit(principal.name, "host.backup", name, {"jobs": [j.id for j in jobs]})
    return jobs


# --- VMs of a libvirt host -----------------------------------------------------------------------


def _libvirt(service: Service, name: str) -> tuple[dict[str, Any], Any]:
    from image.libvirt import LibvirtHost

    host = records.get_host(service.app.catalog, name)
    if host["kind"] != "libvirt":
        raise Conflict(f"{name} is not a libvirt host")
    if not host.get("trusted"):
        raise Conflict(f"confirm {name}'s host key first")
    return host, LibvirtHost(service.app.data_dir.path, host["address"], host["port"], host["user"])


@router.get("/hosts/{name}/vms")
def list_vms(name: str, principal: Viewer, service: ServiceDep) -> list[dict[str, Any]]:
    """The host's VMs (asked of libvirt now), whether each can be backed up live and, if not,
    why, and the asset of those protected."""
    from image.libvirt import list_domains

    host, conn = _libvirt(service, name)
    protected = host.get("vms", {})
    answer = []
    for info in list_domains(conn):
        shown = info.to_dict()
        shown["asset"] = protected.get(info.uuid, {}).get("asset")
        shown["allow_offline"] = protected.get(info.uuid, {}).get("allow_offline", False)
        answer.append(shown)
    records.touch(service.app.catalog, name, service.now())
    return answer


@router.post("/hosts/{name}/vms", status_code=status.HTTP_201_CREATED)
def protect_vm(name: str, body: VmProtect, principal: Admin, service: ServiceDep) -> dict[str, Any]:
    """Protect a VM of the host: it becomes an asset (kind ``vm``) backed up by the
    ``backup_libvirt`` job (policies, schedules and "Back up now" work as for other assets). A VM
    that cannot be backed up live is refused with its reason unless ``allow_offline`` (shut
    down, copied, started again at each backup)."""
    from image.libvirt.inventory import find_domain

    host, conn = _libvirt(service, name)
    info = find_domain(conn, body.domain)
    if info.reason is not None and not body.allow_offline:
        raise Conflict(
            f"{info.name} cannot be backed up live: {info.reason}. Allow the offline backup "
            "(shut down, copy, start) to protect it anyway.",
            reason=info.reason,
        )
    asset = body.asset or f"{name}-{info.name}"
    source = records.libvirt_source(host["user"], host["address"], host["port"], info.uuid)
    catalog = service.app.catalog
    try:
        existing = catalog.get_asset(asset)
        if existing.source != source:
            raise Conflict(f"asset {asset} already exists for something else", asset=asset)
    except NotFound:
        catalog.add_asset(asset, "vm", source, f"VM {info.name} on {name}")
    vms = dict(host.get("vms", {}))
    vms[info.uuid] = {"name": info.name, "asset": asset, "allow_offline": body.allow_offline}
    assets = sorted({*host.get("assets", []), asset})
    records.update_host(catalog, name, vms=vms, assets=assets)
    catalog.audit(principal.name, "host.protect_vm", name, {"domain": info.name, "asset": asset})
    return {
        "asset": asset,
        "domain": info.name,
        "uuid": info.uuid,
        "live": info.reason is None,
        "reason": info.reason,
    }


# --- restores a client pulls ---------------------------------------------------------------------


@router.post("/hosts/{name}/restores", status_code=status.HTTP_201_CREATED)
def start_client_restore(
    name: str, body: HostRestoreCreate, principal: Operator, service: ServiceDep
) -> dict[str, Any]:
    """A restore of a point of this client host's assets, waiting for the host to pull it
    (``appliance-client restore``) within a day."""
    app = service.app
    host = records.get_host(app.catalog, name)
    if host["kind"] != "client":
        raise Conflict("only a client host pulls restores; restore SSH hosts' points as usual")
    point = app.catalog.get_point(body.point)
    if point.asset not in host.get("assets", []):
        raise InvalidInput(f"point {body.point} is not of an asset of {name}")
    if point.kind != "files":
        raise InvalidInput(
            f"point {body.point} holds disks, not files: the client pulls files only; "
            "download its disks from the point or fail it over on the appliance"
        )
    if not body.target.startswith("/") or "\0" in body.target:
        raise InvalidInput("the target is an absolute folder on the host")
    now = service.now()
    grant = {
        "id": secrets.token_hex(8),
        "point": point.id,
        "path": body.path.strip("/"),
        "target": body.target,
        "created_at": now.isoformat(),
        "expires_at": (now + timedelta(days=1)).isoformat(),
        "state": "waiting",
        "by": principal.name,
    }
    restores = [*[r for r in host.get("restores", []) if _live(r, now)][-49:], grant]
    records.update_host(app.catalog, name, restores=restores)
    app.catalog.audit(
        principal.name, "host.restore", name, {"point": point.id, "target": body.target}
    )
    return grant


def _live(grant: dict[str, Any], now: datetime) -> bool:
    return grant["state"] != "waiting" or datetime.fromisoformat(
        grant["expires_at"]
    ) > now.astimezone(UTC)
