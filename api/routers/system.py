"""The appliance OS from the page: the recovery key shown once, network, time, security updates.

The recovery key (the paper key that opens the store's copies when the appliance itself is lost)
is shown to an admin until one confirms having kept it; from then on the API answers 410 and only
the appliance's console prints it again (``appliance key export --paper``, with the data
directory and passphrase file the service uses: :func:`recovery_key_command`). Showing and
confirming are audited; the key itself is never logged.

Network, time and security updates are files of the appliance OS (:mod:`api.system_config`).
When the service runs from a checkout (``Settings.effective_os_root`` is None) the host's own
tools manage them, and these routes answer 409.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from api import system_config as osc
from api.deps import Admin, ServiceDep, Viewer
from api.errors import error_body
from api.schemas_system import (
    NetworkBody,
    NetworkPublic,
    RecoveryKeyConfirmed,
    RecoveryKeyPublic,
    SecurityUpdatesBody,
    SecurityUpdatesPublic,
    SystemPublic,
    TimeBody,
    TimePublic,
)
from api.service import Service
from appliance.errors import Conflict

router = APIRouter(tags=["system"])

#: Catalog settings: who confirmed keeping the recovery key, and when.
RECOVERY_KEY_SETTINGS = "recovery_key"
#: Catalog settings: the NTP switch where the OS cannot be asked (a test root).
TIME_SETTINGS = "system_time"
NO_STORE = {"Cache-Control": "no-store"}


def _root(service: Service, what: str) -> Path:
    root = service.settings.effective_os_root
    if root is None:
        raise Conflict(
            f"{what} settings are managed by the host's own tools when the appliance runs from "
            "a checkout"
        )
    return root


def recovery_key_command(service: Service) -> str:
    """The console command that prints the recovery key again, for this service's store."""
    s = service.settings
    passphrase = s.passphrase_file or s.generated_passphrase_path
    where = passphrase if passphrase.exists() else "<file holding the passphrase>"
    return f"appliance --data-dir {s.data_dir} --passphrase-file {where} key export --paper"


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _confirmation(service: Service) -> dict[str, str]:
    return {
        k: str(v)
        for k, v in service.app.catalog.get_settings(RECOVERY_KEY_SETTINGS).items()
        if k in ("confirmed_at", "confirmed_by")
    }


def recovery_key_gone(service: Service) -> JSONResponse | None:
    """The 410 every route that shows the recovery key answers once an admin confirmed keeping
    it (None before): the key was shown once, and after that only the console prints it."""
    confirmed = _confirmation(service)
    if not confirmed:
        return None
    at = confirmed.get("confirmed_at", "")
    when = datetime.fromisoformat(at).strftime("%Y-%m-%d %H:%M UTC") if at else "earlier"
    message = (
        f"the recovery key was shown once and {confirmed.get('confirmed_by', 'an admin')} "
        f"confirmed keeping it on {when}; the page no longer shows it. On the appliance's "
        f"console, `{recovery_key_command(service)}` prints it again (as root)"
    )
    return JSONResponse(
        error_body("recovery_key_confirmed", message, confirmed), status_code=410, headers=NO_STORE
    )


@router.get("/system", response_model=SystemPublic)
def get_system(principal: Viewer, service: ServiceDep) -> SystemPublic:
    root = service.settings.effective_os_root
    return SystemPublic(
        version=version("backup-appliance"),
        appliance_os=root is not None,
        hostname=osc.read_hostname(root),
        recovery_key_confirmed=bool(_confirmation(service)),
        first_pool_disks=[] if root is None else osc.read_first_pool(root),
    )


# --- the recovery key --------------------------------------------------------------------------


@router.get(
    "/system/recovery-key",
    response_model=RecoveryKeyPublic,
    responses={410: {"description": "confirmed already: only the console prints it now"}},
)
def get_recovery_key(
    principal: Admin, service: ServiceDep, response: Response
) -> RecoveryKeyPublic | JSONResponse:
    """The store's recovery key, until an admin confirms having kept it (then 410)."""
    gone = recovery_key_gone(service)
    if gone is not None:
        return gone
    repo = service.app.repo
    key = repo.key.recovery_key()
    service.app.catalog.audit(
        principal.name, "recovery_key.show", repo.store_id, principal.audit_details
    )
    response.headers.update(NO_STORE)
    return RecoveryKeyPublic(recovery_key=key, store_id=repo.store_id)


@router.post("/system/recovery-key/confirm", response_model=RecoveryKeyConfirmed)
def confirm_recovery_key(principal: Admin, service: ServiceDep) -> RecoveryKeyConfirmed:
    """Record that the key is kept safe: the page never shows it again. A second confirmation
    changes nothing and answers the first one."""
    confirmed = _confirmation(service)
    if not confirmed:
        confirmed = {"confirmed_at": service.now().isoformat(), "confirmed_by": principal.name}
        service.app.catalog.put_settings(RECOVERY_KEY_SETTINGS, confirmed)
        service.app.catalog.audit(
            principal.name,
            "recovery_key.confirm",
            service.app.repo.store_id,
            principal.audit_details,
        )
    return RecoveryKeyConfirmed(
        confirmed_at=datetime.fromisoformat(confirmed["confirmed_at"]),
        confirmed_by=confirmed["confirmed_by"],
    )


# --- network -----------------------------------------------------------------------------------


def _network_public(config: osc.NetworkConfig, errors: list[str] | None = None) -> NetworkPublic:
    return NetworkPublic(
        mode=config.mode,
        interface=config.interface,
        address=config.address,
        gateway=config.gateway,
        dns=list(config.dns),
        apply_errors=errors or [],
    )


@router.get("/system/network", response_model=NetworkPublic)
def get_network(principal: Viewer, service: ServiceDep) -> NetworkPublic:
    return _network_public(osc.read_network(_root(service, "network")))


@router.put("/system/network", response_model=NetworkPublic)
def put_network(body: NetworkBody, principal: Admin, service: ServiceDep) -> NetworkPublic:
    """Write the networkd file; on the running OS ``networkctl reload`` takes it in (a new
    address moves the page: the reply may not arrive)."""
    root = _root(service, "network")
    interface = body.interface or osc.default_interface(osc.interface_names(root))
    config = osc.check_network(
        osc.NetworkConfig(body.mode, interface, body.address, body.gateway, tuple(body.dns))
    )
    osc.write_network(root, config)
    service.app.catalog.audit(
        principal.name,
        "network.update",
        config.interface,
        {
            "mode": config.mode,
            "address": config.address,
            "gateway": config.gateway,
            "dns": list(config.dns),
            **principal.audit_details,
        },
    )
    errors = osc.apply_live(root, [["networkctl", "reload"]])
    return _network_public(config, errors)


# --- time --------------------------------------------------------------------------------------


def _ntp(service: Service, root: Path) -> bool:
    live = osc.live_ntp(root)
    if live is not None:
        return live
    return bool(service.app.catalog.get_settings(TIME_SETTINGS).get("ntp", True))


@router.get("/system/time", response_model=TimePublic)
def get_time(principal: Viewer, service: ServiceDep) -> TimePublic:
    root = _root(service, "time")
    return TimePublic(
        timezone=osc.read_timezone(root),
        ntp=_ntp(service, root),
        ntp_servers=list(osc.read_ntp_servers(root)),
        now=service.now(),
    )


@router.put("/system/time", response_model=TimePublic)
def put_time(body: TimeBody, principal: Admin, service: ServiceDep) -> TimePublic:
    """Set the OS time zone (the appliance's schedules follow it) and the time servers."""
    root = _root(service, "time")
    config = osc.check_time(
        osc.TimeConfig(body.timezone, body.ntp, tuple(body.ntp_servers)), _zones()
    )
    osc.write_timezone(root, config.timezone)
    osc.write_ntp_servers(root, config.ntp_servers)
    service.app.catalog.put_settings(TIME_SETTINGS, {"ntp": config.ntp})
    # One time zone for the box: the schedules would otherwise run in another one than the clock
    # the admin reads on the console.
    service.apply_settings({**service.settings_document(), "timezone": config.timezone})
    service.app.catalog.audit(
        principal.name,
        "time.update",
        "appliance",
        {
            "timezone": config.timezone,
            "ntp": config.ntp,
            "ntp_servers": list(config.ntp_servers),
            **principal.audit_details,
        },
    )
    errors = osc.apply_live(
        root,
        [
            ["timedatectl", "set-timezone", config.timezone],
            ["timedatectl", "set-ntp", "true" if config.ntp else "false"],
            ["systemctl", "try-restart", "systemd-timesyncd.service"],
        ],
    )
    return TimePublic(
        timezone=config.timezone,
        ntp=config.ntp,
        ntp_servers=list(config.ntp_servers),
        now=service.now(),
        apply_errors=errors,
    )


# --- security updates --------------------------------------------------------------------------


@router.get("/system/security-updates", response_model=SecurityUpdatesPublic)
def get_security_updates(principal: Viewer, service: ServiceDep) -> SecurityUpdatesPublic:
    return SecurityUpdatesPublic(
        enabled=osc.read_security_updates(_root(service, "security update"))
    )


@router.put("/system/security-updates", response_model=SecurityUpdatesPublic)
def put_security_updates(
    body: SecurityUpdatesBody, principal: Admin, service: ServiceDep
) -> SecurityUpdatesPublic:
    """Turn Debian's unattended security upgrades on or off (APT reads the file daily)."""
    osc.write_security_updates(_root(service, "security update"), body.enabled)
    service.app.catalog.audit(
        principal.name,
        "security_updates.update",
        "appliance",
        {"enabled": body.enabled, **principal.audit_details},
    )
    return SecurityUpdatesPublic(enabled=body.enabled)
