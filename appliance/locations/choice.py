"""Which copy of a point a read uses: a pure rule, tested with explicit cases.

A restore, a download, a verify or a failover reads one point. Its copies are ordered:

1. the location the user named, if any (and only it, when the user insists: ``only=True``);
2. copies that can be read now: state ``present``, location online. An ``archived`` copy (a cold
   object that needs a thaw) and copies on offline locations come after every readable one;
3. by access: random (a pool, a disk) before cold (a bucket) before sequential (a tape);
4. verified copies before unverified ones, the most recently verified first;
5. then by location name, so the order is stable.

Copies in state ``copying``, ``recalling`` (not complete yet), ``lost`` or ``deleted`` are never
read. The reader tries the copies in this order and falls back to the next when one fails mid-
read, saying so in the job log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

#: Copy states a read may use; archived copies need a warm-up first.
READABLE_STATES = ("present", "archived")
ACCESS_RANK = {"random": 0, "cold": 1, "sequential": 2}


@dataclass(frozen=True)
class CopyOption:
    """A copy of a point at a location, as the choice sees it."""

    location_id: str
    location_name: str
    state: str
    access: str
    online: bool
    verified_at: datetime | None = None


def order_copies(
    copies: Iterable[CopyOption], *, named: str | None = None, only: bool = False
) -> list[CopyOption]:
    """The copies a read may use, best first (see the module doc). ``named`` is a location id
    or name; with ``only`` nothing else is returned."""
    usable = [c for c in copies if c.state in READABLE_STATES]
    if named is not None and only:
        usable = [c for c in usable if named in (c.location_id, c.location_name)]

    def key(c: CopyOption) -> tuple[int, int, int, int, float, str]:
        chosen = 0 if named is not None and named in (c.location_id, c.location_name) else 1
        ready = 0 if c.state == "present" and c.online else 1
        verified = c.verified_at.timestamp() if c.verified_at is not None else float("-inf")
        return (
            chosen,
            ready,
            ACCESS_RANK.get(c.access, len(ACCESS_RANK)),
            0 if c.verified_at is not None else 1,
            -verified,
            c.location_name,
        )

    return sorted(usable, key=key)
