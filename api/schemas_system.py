"""Schemas of the system API (``api.routers.system``): the appliance OS as the page sees it.

The shapes are checked here (422); what a value means (an address inside its network, a known
time zone) is checked by :mod:`api.system_config` (400, in words, with the field).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from api.schemas import Request

#: One line of printable text: nothing in a request can add a line to an OS file.
Line = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,253}$")]


class SystemPublic(BaseModel):
    version: str
    #: The service runs on the appliance OS: the page manages its network, time and updates.
    appliance_os: bool
    hostname: str
    recovery_key_confirmed: bool
    #: The disks the installer suggests for the first pool (identities, ``GET /api/disks``).
    first_pool_disks: list[str]


class RecoveryKeyPublic(BaseModel):
    recovery_key: str
    store_id: str


class RecoveryKeyConfirmed(BaseModel):
    confirmed_at: datetime
    confirmed_by: str


class NetworkBody(Request):
    mode: Literal["dhcp", "static"]
    #: networkd ``Name=`` match; default: the first wired interface (``en*``/``eth*``).
    interface: Line | None = None
    #: With its prefix length: ``192.168.1.20/24``, ``2001:db8::20/64`` (static only).
    address: Line | None = None
    gateway: Line | None = None
    dns: list[Line] = Field(default_factory=list, max_length=8)


class NetworkPublic(BaseModel):
    mode: Literal["dhcp", "static"]
    interface: str
    address: str | None
    gateway: str | None
    dns: list[str]
    #: What failed while the running OS took the change in (the file is written in any case).
    apply_errors: list[str] = []


class TimeBody(Request):
    timezone: Line
    ntp: bool = True
    ntp_servers: list[Line] = Field(default_factory=list, max_length=16)


class TimePublic(BaseModel):
    timezone: str
    ntp: bool
    ntp_servers: list[str]
    #: The appliance's clock, in UTC.
    now: datetime
    apply_errors: list[str] = []


class SecurityUpdatesBody(Request):
    enabled: bool


class SecurityUpdatesPublic(BaseModel):
    enabled: bool
