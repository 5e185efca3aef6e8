"""Free space: a pool too full for a backup or a copy refuses it *before* anything is written.

A filesystem that runs out of space mid-write leaves a backup half done (the store stays
consistent, but the job fails late and the disk is full for everything else). So every write
that adds data to a local filesystem -- a backup into the home pool, a copy to a pool directory,
a block pool or a removable disk -- first asks :func:`check_free_space`, which refuses with
:class:`StoreFull` and a message that says what to do when less than the reserve is free.

The reserve is a pure function of the filesystem's size (:func:`reserve_bytes`): 2 % of it, and
at least 1 GiB on disks large enough for that to be at most 5 % of them (20 GiB and up; a small
disk, such as a test's loop device, keeps 5 %). The decision is :func:`space_decision`, tested
with explicit numbers; only :func:`filesystem_space` touches the disk (``statvfs``; free is what
``f_bavail`` says, the bytes a write may use).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from appliance.errors import StoreFull

GIB = 1 << 30
#: The reserve: this fraction of the filesystem always stays free ...
RESERVE_FRACTION = 0.02
#: ... and at least this much, where it is no more than :data:`RESERVE_SMALL_FRACTION` of it.
RESERVE_FLOOR = GIB
RESERVE_SMALL_FRACTION = 0.05


def reserve_bytes(total_bytes: int) -> int:
    """The bytes that must stay free on a filesystem of ``total_bytes``."""
    if total_bytes <= 0:
        return 0
    floor = min(RESERVE_FLOOR, math.ceil(total_bytes * RESERVE_SMALL_FRACTION))
    return max(math.ceil(total_bytes * RESERVE_FRACTION), floor)


@dataclass(frozen=True)
class SpaceDecision:
    """Whether a write may start, and why not."""

    ok: bool
    free_bytes: int
    total_bytes: int
    reserve_bytes: int
    needed_bytes: int
    #: Empty when ``ok``; otherwise the sentence a user reads.
    message: str = ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def space_decision(
    what: str, free_bytes: int, total_bytes: int, needed_bytes: int = 0
) -> SpaceDecision:
    """May a write of about ``needed_bytes`` (0: unknown, only the reserve counts) start on
    ``what`` (a pool's name, for the message) with ``free_bytes`` of ``total_bytes`` free?"""
    reserve = reserve_bytes(total_bytes)
    ok = free_bytes - max(0, needed_bytes) >= reserve
    message = ""
    if not ok:
        wanted = f"{_human(needed_bytes)} more and " if needed_bytes > 0 else ""
        message = (
            f"{what} is full: {_human(max(0, free_bytes))} of {_human(total_bytes)} free, and "
            f"{wanted}a reserve of {_human(reserve)} must stay free; nothing was written. "
            "Free space (prune old points, then run garbage collection) or use another pool."
        )
    return SpaceDecision(ok, free_bytes, total_bytes, reserve, max(0, needed_bytes), message)


def filesystem_space(path: str) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding ``path`` (free: what a write may use)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_free_space(path: str, what: str, needed_bytes: int = 0) -> SpaceDecision:
    """Refuse (:class:`StoreFull`, with the decision's message) a write to ``path`` that would
    eat into the reserve. A ``path`` that cannot be looked at is left to the write itself to
    report (an unmounted location is *unavailable*, which its backend says better)."""
    try:
        free, total = filesystem_space(path)
    except OSError:
        return SpaceDecision(True, 0, 0, 0, needed_bytes)
    decision = space_decision(what, free, total, needed_bytes)
    if not decision.ok:
        raise StoreFull(
            decision.message,
            location=what,
            free_bytes=decision.free_bytes,
            reserve_bytes=decision.reserve_bytes,
        )
    return decision


def local_root(backend: object) -> str | None:
    """The folder a backend writes to when it is on a local filesystem (a directory backend,
    seen through the retry and rate-limit wrappers, which keep theirs as ``backend``); None for
    the others (a bucket, a peer)."""
    seen = 0
    while seen < 8:
        root = getattr(backend, "root", None)
        if isinstance(root, str):
            return root
        inner = getattr(backend, "backend", None)
        if inner is None:
            return None
        backend, seen = inner, seen + 1
    return None
