"""USB disks as appliance media: initialise one, mount and release it, and what the page shows.

A USB disk the appliance initialised carries an ext4 filesystem labelled with the medium's label
and a store of its own location (kind ``removable``, :mod:`hardware.usb_backend`) in ``store/``.
It is known by that filesystem's UUID: the media table's identity, the location's address, and
``<data dir>/media/<uuid>``, where it is mounted while the appliance uses it. It belongs to one
rotation set (:mod:`hardware.rotation`).

What the appliance remembers of each medium beyond the media table (its state, when it was
written, its set) lies in catalog settings documents: ``usb_rotation`` (the sets, which the user
edits), ``usb_media`` (one :class:`~hardware.rotation.MediumState` per disk, which the appliance
keeps) and ``usb_offered`` (USB disks seen that the appliance did not initialise: offered on the
page, never touched unasked). The documents are read, changed and written under one lock per
process.

The export that runs on insertion, and the udev handler, are in :mod:`hardware.usb_jobs`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from dataclasses import replace
from datetime import datetime
from typing import Any

from appliance.cli_locations import seed_from_location
from appliance.engine import Appliance, DataDir
from appliance.errors import Conflict, LocationUnavailable, NotFound
from hardware.eligibility import refusals
from hardware.hostfacts import host_facts
from hardware.mounts import (
    filesystem_uuid,
    flush,
    make_filesystem,
    mounted_at,
    unmount,
)
from hardware.records import BlockDevice, Inventory
from hardware.rotation import (
    DEFAULT_SET,
    SETS_KEY,
    MediumState,
    RotationSet,
    check_label,
    find_set,
    next_label,
    parse_set,
    parse_sets,
    rotation_status,
    sets_document,
    with_member,
)
from hardware.usb_backend import (
    STORE_FOLDER,
    close_open_backends,
    medium_devnodes,
    mount_medium,
    removable_options,
)

MEDIA_KEY = "usb_media"
OFFERED_KEY = "usb_offered"
_state_lock = threading.RLock()


def media_mountpoint(data_dir: str, fs_uuid: str) -> str:
    """Where the appliance mounts the medium ``fs_uuid``: ``<data dir>/media/<uuid>``."""
    return os.path.join(os.path.abspath(data_dir), "media", fs_uuid)


# --- settings documents -------------------------------------------------------------------------


def load_sets(app: Appliance) -> list[RotationSet]:
    return parse_sets(app.catalog.get_settings(SETS_KEY))


def configure_set(app: Appliance, name: str, **fields: Any) -> RotationSet:
    """Create or change the rotation set ``name``: ``assets``, ``keep_newest``, ``rotate_days``,
    ``verify`` (None leaves one unchanged). Its members are the disks initialised into it."""
    with _state_lock:
        sets = load_sets(app)
        current = find_set(sets, name) or RotationSet(name)
        document = {**current.to_dict(), **{k: v for k, v in fields.items() if v is not None}}
        document["members"] = list(current.members)
        changed = parse_set(document)
        kept = [s for s in sets if s.name.casefold() != name.casefold()]
        parse_sets(sets_document([*kept, changed]))  # still one set per name
        app.catalog.put_settings(SETS_KEY, sets_document([*kept, changed]))
        return changed


def medium_states(app: Appliance) -> dict[str, MediumState]:
    document = app.catalog.get_settings(MEDIA_KEY).get("media", {})
    return {k: MediumState.from_dict(v) for k, v in document.items()}


def _save_states(app: Appliance, states: dict[str, MediumState]) -> None:
    app.catalog.put_settings(MEDIA_KEY, {"media": {k: v.to_dict() for k, v in states.items()}})


def update_medium(app: Appliance, identity: str, **changes: Any) -> MediumState:
    """Change fields of the medium's state (:class:`MediumState`) and store it."""
    with _state_lock:
        states = medium_states(app)
        if identity not in states:
            raise NotFound(f"USB disk {identity} is not known", identity=identity)
        states[identity] = replace(states[identity], **changes)
        _save_states(app, states)
        return states[identity]


def find_medium(app: Appliance, name: str) -> MediumState:
    """A medium by filesystem UUID, label or UUID prefix (at least 4 characters)."""
    states = medium_states(app)
    exact = [s for s in states.values() if name in (s.identity, s.label)]
    if len(exact) == 1:
        return exact[0]
    prefixed = [s for s in states.values() if s.identity.startswith(name)]
    if len(prefixed) == 1 and len(name) >= 4:
        return prefixed[0]
    raise NotFound(f"no USB disk {name!r} is known", medium=name)


def set_of(app: Appliance, state: MediumState) -> RotationSet:
    """The medium's rotation set (the defaults when its set was deleted)."""
    sets = load_sets(app)
    return next((s for s in sets if state.identity in s.members), None) or RotationSet(
        state.set_name, (state.identity,)
    )


# --- initialise ---------------------------------------------------------------------------------


#: The smallest disk worth initialising (an ext4 journal and a store's metadata).
MIN_MEDIUM_BYTES = 32 << 20


def initialise_refusals(
    app: Appliance, device: BlockDevice, inventory: Inventory | None = None
) -> tuple[str, ...]:
    """Why ``device`` may not become a USB medium, in words (empty: it may). The disk rules of
    :mod:`hardware.eligibility` (mounted, a partition of it mounted, the system disk or the data
    directory's, held by another kernel device, read-only) over ``inventory`` (the scan it came
    from; the device alone if None), and those of media: a USB disk, of a useful size, holding
    the filesystem it held when scanned, not a medium already."""
    inventory = inventory or Inventory(block={device.identity: device})
    facts = host_facts(app.data_dir.path, min_size_bytes=MIN_MEDIUM_BYTES)
    found = list(refusals(device, inventory, facts))
    if not device.usb:
        found.insert(0, f"is not a USB disk (bus {device.bus or 'unknown'})")
    if not stat.S_ISBLK(_mode(device.devnode)):
        found.append("is not a block device here")
        return tuple(found)
    now_uuid = filesystem_uuid(device.devnode)
    if device.fs_uuid and now_uuid != device.fs_uuid:
        found.append("holds another filesystem than when it was scanned: scan again")
    states = medium_states(app)
    for uuid in sorted(u for u in {device.fs_uuid, now_uuid} if u):
        if uuid in states:
            found.append(f"is USB disk {states[uuid].label} already")
    return tuple(dict.fromkeys(found))


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def initialise_medium(
    app: Appliance,
    device: BlockDevice,
    label: str | None = None,
    rotation_set: str = DEFAULT_SET,
    *,
    inventory: Inventory | None = None,
) -> MediumState:
    """Make ``device`` a USB medium of ``rotation_set`` (see the module doc): refuse a disk that
    is not eligible, make ext4 labelled ``label`` (default ``appl-<set>-<n>``), add its location
    and record it, and unmount it: it is safe to remove when this returns. Erases the disk."""
    found = initialise_refusals(app, device, inventory)
    if found:
        raise Conflict(
            f"cannot initialise {device.devnode}: {'; '.join(found)}",
            device=device.identity,
            refusals=list(found),
        )
    with _state_lock:
        states = medium_states(app)
        label = check_label(label or next_label(rotation_set, [s.label for s in states.values()]))
        if any(s.label.casefold() == label.casefold() for s in states.values()):
            raise Conflict(f"a USB disk is labelled {label} already", label=label)
        parse_set({"name": rotation_set})  # a valid name, before the disk is erased
    fs_uuid = make_filesystem([device.devnode], "ext4", label)
    mountpoint = media_mountpoint(app.data_dir.path, fs_uuid)
    mount_medium(fs_uuid, mountpoint, label)
    try:
        os.makedirs(os.path.join(mountpoint, STORE_FOLDER), mode=0o700, exist_ok=True)
        location = app.add_location(
            fs_uuid,
            kind="removable",
            label=label,
            offsite=True,
            options=removable_options(mountpoint, label),
        )
        app.catalog.ensure_media(fs_uuid, "usb", label, location.id)
        now = app.clock()
        with _state_lock:
            sets = with_member(load_sets(app), rotation_set, fs_uuid)
            app.catalog.put_settings(SETS_KEY, sets_document(sets))
            states = medium_states(app)
            states[fs_uuid] = MediumState(
                fs_uuid,
                label,
                (find_set(sets, rotation_set) or RotationSet(rotation_set)).name,
                location.id,
                "in",
                initialised_at=now,
                inserted_at=now,
                serial=device.serial,
                model=device.model,
            )
            _save_states(app, states)
        withdraw_offer(app, device.identity)
    finally:
        unmount(mountpoint)  # add_location closed the backend it opened: nothing holds the disk
    return update_medium(app, fs_uuid, state="safe_to_remove")


# --- mount and release --------------------------------------------------------------------------


def medium_present(identity: str) -> bool:
    """Whether a disk with the medium's filesystem is attached now."""
    return bool(medium_devnodes(identity))


def attach_medium(app: Appliance, identity: str) -> str:
    """Mount the medium (if it is not mounted) and return its mountpoint;
    :class:`LocationUnavailable` when it is not plugged in."""
    state = medium_states(app).get(identity)
    label = state.label if state is not None else identity
    mountpoint = media_mountpoint(app.data_dir.path, identity)
    mount_medium(identity, mountpoint, label)
    return mountpoint


def release_medium(app: Appliance, identity: str, *, lazy: bool = False) -> None:
    """Close what is still open on the medium (a reader held elsewhere: an eject or a pull wins
    over it), flush it and unmount it. ``lazy``: the disk is gone already (the kernel lets go
    once nothing uses it)."""
    mountpoint = media_mountpoint(app.data_dir.path, identity)
    close_open_backends(mountpoint)
    if mounted_at(mountpoint) is None:
        return
    if not lazy:
        flush(mountpoint)
    unmount(mountpoint, lazy=lazy)


def eject(app: Appliance, medium: str) -> MediumState:
    """Flush and unmount a medium on request: it is safe to remove afterwards (an export running
    on it fails its next write and waits for the disk)."""
    state = find_medium(app, medium)
    release_medium(app, state.identity)
    if state.state == "out":
        return state
    return update_medium(app, state.identity, state="safe_to_remove")


# --- offered disks ------------------------------------------------------------------------------


def offer_disk(app: Appliance, device: BlockDevice) -> bool:
    """Remember a USB disk the appliance did not initialise, for the page (nothing is done to
    the disk); True when it was not offered yet. False, and nothing remembered, when its
    filesystem is a medium by now: discovery can see the filesystem an initialisation made
    before the initialisation has recorded the medium, and hand it over after."""
    with _state_lock:
        if device.fs_uuid is not None and device.fs_uuid in medium_states(app):
            return False
        offered = app.catalog.get_settings(OFFERED_KEY).get("offered", {})
        new = device.identity not in offered
        offered[device.identity] = {
            "identity": device.identity,
            "devnode": device.devnode,
            "serial": device.serial,
            "vendor": device.vendor,
            "model": device.model,
            "size_bytes": device.size_bytes,
            "fs_type": device.fs_type,
            "fs_label": device.fs_label,
            "fs_uuid": device.fs_uuid,
            "seen_at": app.clock().isoformat(),
        }
        app.catalog.put_settings(OFFERED_KEY, {"offered": offered})
        return new


def withdraw_offer(app: Appliance, identity: str) -> None:
    with _state_lock:
        offered = app.catalog.get_settings(OFFERED_KEY).get("offered", {})
        if offered.pop(identity, None) is not None:
            app.catalog.put_settings(OFFERED_KEY, {"offered": offered})


def offered_disks(app: Appliance) -> list[dict[str, Any]]:
    """USB disks plugged in that are not appliance media: the page offers to initialise them."""
    offered = app.catalog.get_settings(OFFERED_KEY).get("offered", {})
    return sorted(offered.values(), key=lambda d: d["seen_at"])


# --- what the page shows ------------------------------------------------------------------------


def media_overview(app: Appliance) -> list[dict[str, Any]]:
    """Every medium: its state, whether it is mounted now and safe to remove, its copies."""
    out = []
    for state in sorted(medium_states(app).values(), key=lambda s: s.label):
        mounted = mounted_at(media_mountpoint(app.data_dir.path, state.identity)) is not None
        copies = app.catalog.copies_at(state.location_id, state="present")
        out.append(
            {
                **state.to_dict(),
                "mounted": mounted,
                # Mounted again since (a restore read from it): not safe until ejected.
                "safe_to_remove": state.state == "safe_to_remove" and not mounted,
                "points": len(copies),
            }
        )
    return out


def rotation_overview(app: Appliance, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each rotation set: its settings, which disk is in, which are out, which are overdue."""
    states = medium_states(app)
    when = now or app.clock()
    return [
        {**rset.to_dict(), "status": rotation_status(rset, states, when).to_dict()}
        for rset in load_sets(app)
    ]


# --- a fresh appliance from a medium ------------------------------------------------------------


def filesystem_label(devnode: str) -> str | None:
    done = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "LABEL", devnode],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def seed_from_medium(data_dir: str, fs_uuid: str) -> dict[str, Any]:
    """Mount the medium under ``data_dir`` and, when the data directory has no store yet, make
    its pool belong to the medium's store (:func:`seed_from_location`: the same passphrase opens
    it). Returns the mountpoint, the label and whether it seeded."""
    devices = medium_devnodes(fs_uuid)
    if not devices:
        raise LocationUnavailable(f"no disk with filesystem {fs_uuid} is plugged in")
    label = filesystem_label(devices[0]) or fs_uuid[:8]
    mountpoint = media_mountpoint(data_dir, fs_uuid)
    mount_medium(fs_uuid, mountpoint, label)
    options = removable_options(mountpoint, label)
    seeded = seed_from_location(
        DataDir(os.path.abspath(data_dir)).path, fs_uuid, "removable", options
    )
    return {"mountpoint": mountpoint, "label": label, "seeded": seeded}


def adopt_medium(
    app: Appliance, fs_uuid: str, label: str, rotation_set: str = DEFAULT_SET
) -> dict[str, Any]:
    """Add the points a medium holds to the catalog as copies there (``adopt_location``), and
    the medium to the media and ``rotation_set``; the medium is unmounted afterwards."""
    mountpoint = attach_medium(app, fs_uuid)
    try:
        adopted = app.adopt_location(
            fs_uuid, kind="removable", options=removable_options(mountpoint, label)
        )
        location = app.catalog.update_location(adopted["location"], label=label)
        app.catalog.ensure_media(fs_uuid, "usb", label, location.id)
        now = app.clock()
        with _state_lock:
            sets = with_member(load_sets(app), rotation_set, fs_uuid)
            app.catalog.put_settings(SETS_KEY, sets_document(sets))
            states = medium_states(app)
            previous = states.get(fs_uuid)
            states[fs_uuid] = replace(
                previous or MediumState(fs_uuid, label, rotation_set, location.id),
                label=label,
                set_name=(find_set(sets, rotation_set) or RotationSet(rotation_set)).name,
                location_id=location.id,
                state="in",
                initialised_at=(previous.initialised_at if previous else None) or now,
                inserted_at=now,
            )
            _save_states(app, states)
    finally:
        release_medium(app, fs_uuid)
    update_medium(app, fs_uuid, state="safe_to_remove")
    return {**adopted, "label": label}
