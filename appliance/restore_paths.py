"""The paths a manifest names, checked before a restore uses them.

A manifest is untrusted input (it may come from a damaged or hostile medium): every path is
checked by :func:`safe_relative_path` (no absolute paths, ``..``, empty or ``.`` components, NUL
bytes) and every record by :func:`check_record` (only files, directories and links are
restored), before anything is written. Also here: selecting one path of a point and mapping its
hardlinks whose first name lies outside the selection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from appliance.backup.tree import Record, iter_tree
from appliance.errors import NotFound, UnsafeRestorePath
from appliance.store.repository import Repository

ALLOWED_TYPES = frozenset({"file", "dir", "symlink", "hardlink"})


# --- manifest checks -------------------------------------------------------------------------------


def safe_relative_path(path: object) -> str:
    """Return ``path`` if it is a safe relative path of a manifest, else raise."""
    if not isinstance(path, str):
        raise UnsafeRestorePath(f"manifest path {path!r} is not a string")
    if path == "":
        return path
    if "\x00" in path or path.startswith("/"):
        raise UnsafeRestorePath(f"refusing absolute or NUL path {path!r}", path=path)
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeRestorePath(f"refusing path {path!r} (empty, . or .. component)", path=path)
    return path


def check_record(record: Record) -> Record:
    safe_relative_path(record.get("path"))
    kind = record.get("type")
    if kind not in ALLOWED_TYPES:
        raise UnsafeRestorePath(
            f"refusing entry {record.get('path')!r} of type {kind!r} (only files, directories "
            "and links are restored)",
            path=record.get("path"),
        )
    if kind == "hardlink":
        safe_relative_path(record.get("target"))
    return record


def select_records(records: Iterator[Record], subpath: str | None) -> Iterator[tuple[str, Record]]:
    """Records under ``subpath`` with their path relative to the restore target."""
    if not subpath:
        for record in records:
            yield check_record(record)["path"], record
        return
    prefix = safe_relative_path(subpath.strip("/"))
    parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    found = False
    for record in records:
        check_record(record)
        path = record["path"]
        if path == prefix or path.startswith(prefix + "/"):
            found = True
            yield (path[len(parent) + 1 :] if parent else path), record
    if not found:
        raise NotFound(f"{subpath} is not in this recovery point", path=subpath)


def relocate(path: str, subpath: str | None) -> str | None:
    """``path`` relative to the restore target, or None if it lies outside ``subpath``."""
    if not subpath:
        return path
    prefix = safe_relative_path(subpath.strip("/"))
    if not (path == prefix or path.startswith(prefix + "/")):
        return None
    parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    return path[len(parent) + 1 :] if parent else path


def detached_hardlinks(
    repo: Repository, manifest: dict[str, Any], subpath: str | None
) -> tuple[dict[str, str], dict[str, Record]]:
    """Hardlinks of a restored subtree whose first name (the file record) lies outside it.

    Returns ``firsts`` (first name -> target-relative path of the first link to it within the
    subtree) and ``stand_ins`` (that path -> the first name's record): that link is restored as
    the file itself and the other links to the same first name point at it, so no name of the
    subtree is lost.
    """
    firsts: dict[str, str] = {}
    if not subpath:
        return firsts, {}
    for rel, record in select_records(iter_tree(repo, manifest), subpath):
        if record["type"] == "hardlink" and relocate(record["target"], subpath) is None:
            firsts.setdefault(record["target"], rel)
    stand_ins: dict[str, Record] = {}
    if firsts:
        for record in iter_tree(repo, manifest):
            if record.get("path") in firsts and check_record(record)["type"] == "file":
                stand_ins[firsts[record["path"]]] = record
    return firsts, stand_ins


def hardlink_target(
    rel: str, record: Record, subpath: str | None, firsts: dict[str, str]
) -> str | None:
    """Target-relative path a hardlink points at; None if it is restored as a file or lost."""
    relocated = relocate(record["target"], subpath)
    if relocated is not None:
        return relocated
    first = firsts.get(record["target"])
    return None if first is None or first == rel else first
