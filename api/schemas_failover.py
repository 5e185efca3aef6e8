"""Schemas of the failover API: failovers, boot tests, failback and their settings. Shared
types (``Request``, names) come from :mod:`api.schemas`."""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from api.schemas import AbsolutePath, Request

Port = Annotated[int, Field(ge=0, le=65535)]


class PortForward(Request):
    #: 0: the appliance picks a free port.
    host: Port = 0
    guest: Annotated[int, Field(ge=1, le=65535)]


class FailoverNetwork(Request):
    #: isolated: user-mode networking, only the forwarded TCP ports reach the guest (test boots);
    #: nat: the guest reaches out through the appliance, forwards listen on ``address``;
    #: bridged: the VM joins a host bridge with its original MAC (a real failover).
    mode: Literal["isolated", "nat", "bridged"] = "isolated"
    port_forwards: list[PortForward] = Field(default_factory=list, max_length=32)
    bridge: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None
    #: nat only: the appliance's IPv4 address the forwards listen on (default 127.0.0.1).
    address: IPv4Address | None = None


class FailoverCreate(Request):
    #: The recovery point to boot; default: the newest verified VM image point.
    point: str | None = Field(default=None, max_length=64)
    #: Default: the asset's configured network, else isolated without forwards.
    network: FailoverNetwork | None = None
    #: Read the point from this location's copy first (id or label); default: the best copy.
    location: str | None = Field(default=None, min_length=1, max_length=255)


class BootTestCreate(Request):
    point: str | None = Field(default=None, max_length=64)
    #: Read the point from this location's copy first (id or label); default: the best copy.
    location: str | None = Field(default=None, min_length=1, max_length=255)


class FailoverStop(Request):
    #: Also delete the session's overlays (its changes are lost).
    discard: bool = False


class FailoverMigrate(Request):
    #: Where the local disks go (default: the session's directory).
    target_dir: AbsolutePath | None = None


class FailbackCreate(Request):
    #: Record the overlay's changes as a new recovery point.
    new_point: bool = True
    #: "original" (the disk images the point came from) or a new image file's path.
    write_to: Annotated[str, StringConstraints(pattern=r"^(original|/[^\x00]*)$")] | None = None
    format: Literal["raw", "qcow2"] = "raw"


class FailoverProof(Request):
    """What proves a failover's boot; every check given must pass (none: the screen stopped
    changing for 5 s)."""

    #: A regular expression the serial console must print.
    serial: str | None = Field(default=None, max_length=500)
    #: A guest TCP port that must accept a connection.
    tcp: Annotated[int, Field(ge=1, le=65535)] | None = None
    #: A guest HTTP port whose ``http_path`` must answer 2xx (and contain ``http_expect``).
    http_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    http_path: str = Field(default="/", max_length=500, pattern=r"^/")
    http_expect: str | None = Field(default=None, max_length=500)
    #: The QEMU guest agent must answer a ping.
    agent: bool = False
    #: The console screenshot must stop changing for this many seconds.
    screen_stable: float | None = Field(default=None, gt=0, le=600)
    timeout: float = Field(default=180.0, gt=0, le=3600)
    #: The guest's LAN address for TCP/HTTP checks of a bridged failover.
    address: str | None = Field(default=None, max_length=255)


class FailoverSettingsUpdate(Request):
    """An asset's failover settings; a part left out keeps its stored value."""

    proof: FailoverProof | None = None
    network: FailoverNetwork | None = None


class FailoverSettingsPublic(BaseModel):
    asset: str
    #: The stored boot proof (empty: the generic "screen stopped changing" check).
    proof: dict[str, Any]
    #: The stored network (empty: isolated, without port forwards).
    network: dict[str, Any]


class FailoverSessionPublic(BaseModel):
    id: str
    asset: str
    point_id: str
    state: str
    purpose: str
    started_at: datetime
    #: Seconds from the click to the boot proof (None until proven).
    rto_seconds: float | None
    accel: str | None
    #: "backup" while the disks come from the store's export, "local" after a migration.
    storage: str
    #: Host port of each forwarded guest port of an isolated failover: ``{"80": 40123}``.
    ports: dict[str, int]
    error: str | None
    live: bool
    details: dict[str, Any]


class FailoverDetail(FailoverSessionPublic):
    #: The tail of the guest's serial console.
    serial_log: str
    #: While the VM runs here: its address and where its forwards listen
    #: (``image.failover.addresses``); None otherwise.
    addresses: dict[str, Any] | None = None


class BridgePortPublic(BaseModel):
    name: str
    up: bool
    #: "tap" for a VM's tap device, "" for a network card, else the link's kind.
    kind: str


class BridgePublic(BaseModel):
    name: str
    up: bool
    mac: str
    mtu: int
    #: The links enslaved to the bridge (its network cards and the VMs' taps).
    ports: list[BridgePortPublic]
    #: The appliance's own addresses on the bridge.
    addresses: list[str]
    #: qemu-bridge-helper's access list (/etc/qemu/bridge.conf) lets VMs join it.
    helper_allowed: bool


class HostAddressPublic(BaseModel):
    interface: str
    address: str


class HostNetworkPublic(BaseModel):
    """The appliance's bridges (what a bridged failover can join) and its IPv4 addresses
    (where NAT forwards can listen), read from the host (``ip -j``) at each request."""

    bridges: list[BridgePublic]
    addresses: list[HostAddressPublic]
    #: Why the host's network could not be read (then nothing is listed).
    error: str | None
