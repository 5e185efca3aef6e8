"""The machines around the appliance that it protects: hosts, kept in the catalog's settings.

A host is one of three kinds:

- ``client``: a Linux host running ``appliance-client``. It has a system user ``host-<name>``
  (role ``client``, no password) whose one token carries the scopes ``client`` and
  ``asset:<asset>``: it can open upload sessions for its own assets and nothing else.
- ``ssh``: a host the appliance pulls over SFTP with its own key; its host key is pinned in the
  appliance's known_hosts when the operator confirms the fingerprint.
- ``libvirt``: a KVM host reached over SSH the same way; its chosen VMs are assets.

Records are plain dicts in the settings document :data:`HOSTS_KEY` (``{"hosts": {name: {...}}}``).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from appliance.errors import Conflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from appliance.catalog import Catalog

HOSTS_KEY = "source_hosts"
KINDS = ("client", "ssh", "libvirt")
CLIENT_ROLE = "client"
#: The password hash of a host's system user: not an argon2 hash, so no password matches it.
NO_PASSWORD = "!host-account"
_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{0,62}$")
_LOCK = threading.Lock()


def check_host_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"{name[:64]!r} is not a host name here: lower-case letters, digits, '.' and '-', "
            "at most 63 characters"
        )
    return name


def host_user(name: str) -> str:
    return f"host-{name}"


def asset_scope(asset: str) -> str:
    return f"asset:{asset}"


def list_hosts(catalog: Catalog) -> list[dict[str, Any]]:
    hosts = catalog.get_settings(HOSTS_KEY).get("hosts", {})
    return [dict(hosts[name]) for name in sorted(hosts)]


def get_host(catalog: Catalog, name: str) -> dict[str, Any]:
    hosts = catalog.get_settings(HOSTS_KEY).get("hosts", {})
    if name not in hosts:
        raise NotFound(f"no host {name[:64]} is added", host=name)
    return dict(hosts[name])


def add_host(catalog: Catalog, record: dict[str, Any]) -> dict[str, Any]:
    check_host_name(record["name"])
    if record.get("kind") not in KINDS:
        raise InvalidInput(f"a host is one of {', '.join(KINDS)}")
    with _LOCK:
        hosts = dict(catalog.get_settings(HOSTS_KEY).get("hosts", {}))
        if record["name"] in hosts:
            raise Conflict(f"host {record['name']} is already added", host=record["name"])
        hosts[record["name"]] = record
        catalog.put_settings(HOSTS_KEY, {"hosts": hosts})
    return record


def update_host(catalog: Catalog, name: str, **changes: Any) -> dict[str, Any]:
    with _LOCK:
        hosts = dict(catalog.get_settings(HOSTS_KEY).get("hosts", {}))
        if name not in hosts:
            raise NotFound(f"no host {name[:64]} is added", host=name)
        hosts[name] = {**hosts[name], **changes}
        catalog.put_settings(HOSTS_KEY, {"hosts": hosts})
        return dict(hosts[name])


def remove_host(catalog: Catalog, name: str) -> dict[str, Any]:
    with _LOCK:
        hosts = dict(catalog.get_settings(HOSTS_KEY).get("hosts", {}))
        if name not in hosts:
            raise NotFound(f"no host {name[:64]} is added", host=name)
        record = hosts.pop(name)
        catalog.put_settings(HOSTS_KEY, {"hosts": hosts})
    return dict(record)


def host_of_user(catalog: Catalog, user: str) -> dict[str, Any] | None:
    for host in list_hosts(catalog):
        if host.get("kind") == "client" and host_user(host["name"]) == user:
            return host
    return None


def touch(catalog: Catalog, name: str, when: datetime, **extra: Any) -> None:
    """Record the host's last contact (at most one write a minute per host)."""
    try:
        host = get_host(catalog, name)
    except NotFound:
        return
    last = host.get("last_contact")
    if last and not extra and when.isoformat()[:16] == str(last)[:16]:
        return
    update_host(catalog, name, last_contact=when.isoformat(), **extra)


@contextlib.contextmanager
def contact(
    catalog: Catalog, host: dict[str, Any], clock: Callable[[], datetime]
) -> Iterator[None]:
    """Record the outcome of talking to ``host`` (a backup): its last contact, and its last
    error or none. ``host`` may be ``{}`` (a source no host record names any more)."""
    try:
        yield
    except Exception as exc:
        if host:
            touch(catalog, host["name"], clock(), last_error=str(exc)[:300])
        raise
    if host:
        touch(catalog, host["name"], clock(), last_error=None)


def ssh_source(user: str, address: str, port: int, path: str) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"ssh://{user}@{shown}:{port}{path}"


def parse_ssh_source(source: str) -> tuple[str, str, int, str]:
    """``ssh://USER@HOST:PORT/PATH`` as (user, host, port, path)."""
    rest = source.removeprefix("ssh://")
    user, _, rest = rest.partition("@")
    where, slash, path = rest.partition("/")
    host, _, port = where.rpartition(":")
    if not (user and host and port.isdigit() and slash):
        raise InvalidInput(f"{source[:200]!r} is not ssh://user@host:port/path")
    return user, host.removeprefix("[").removesuffix("]"), int(port), "/" + path


def host_for_source(catalog: Catalog, kind: str, address: str, port: int) -> dict[str, Any] | None:
    for host in list_hosts(catalog):
        if host.get("kind") == kind and host.get("address") == address and host.get("port") == port:
            return host
    return None


def libvirt_source(user: str, address: str, port: int, domain_uuid: str) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"libvirt://{user}@{shown}:{port}/{domain_uuid}"


def parse_libvirt_source(source: str) -> tuple[str, str, int, str]:
    """``libvirt://USER@HOST:PORT/DOMAIN`` as (user, host, port, domain UUID or name)."""
    user, host, port, path = parse_ssh_source("ssh://" + source.removeprefix("libvirt://"))
    domain = path.strip("/")
    if not domain or "/" in domain:
        raise InvalidInput(f"{source[:200]!r} is not libvirt://user@host:port/domain")
    return user, host, port, domain
