"""Change signals of a file-tree backup: how the tree changed against its parent point.

Ransomware leaves marks a backup sees anyway: many files changed at once, files renamed with one
new extension (``report.docx`` -> ``report.docx.locked``), and new data that does not compress
(encrypted bytes look random). :class:`SignalCounter` counts them while the backup merge-joins
the source with the parent's records, so the cost is a few dictionary operations per file that
was read, none per file reused, and no extra read of either tree:

- ``seen`` (walk order, right after the cursor looked the path up) classifies a regular file as
  unchanged (reused), changed (re-read), new, or renamed with one new extension: the same name
  without its last extension just went (``x.docx`` gone, ``x.docx.locked`` new). Canonical
  order puts ``x.docx`` right before ``x.docx.locked``, so a short window of the paths just
  gone is enough;
- ``gone`` is called by the parent's cursor for each parent record it passes without a match:
  a file that is no longer there;
- ``done`` (once the file's content is known, as it goes into the tree) counts it; a new file
  whose content (size and chunk IDs) is that of a file gone is a *moved* file, matched over the
  whole tree at the end, up to :data:`MAX_FINGERPRINTS` files on each side (beyond that, moves
  are counted as deletions and new files, which only makes the signal louder).

A backup without a parent (a first or full backup) counts every file as new and nothing else.

The store counts the new data that does not compress where blobs are sealed
(``BlobWriter.dense_bytes``); :meth:`SignalCounter.data` adds it here.

The result (:meth:`SignalCounter.result`) is plain JSON, stored with the point; judging it
against the asset's history is :mod:`appliance.ransomware`'s business.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

Record = dict[str, Any]

#: Content fingerprints kept per side (new files, files gone) for rename matching.
MAX_FINGERPRINTS = 250_000
#: Paths just gone that the extension rule looks back at.
RECENT_GONE = 4096
#: Extensions reported in the result (the most frequent).
TOP_EXTENSIONS = 5
#: Longest extension counted as one (".locked", ".encrypted"; not a whole name after a dot).
MAX_EXTENSION = 16


_NEW = "new"
_CHANGED = "changed"


def fingerprint(record: Record) -> int | None:
    """A cheap content key of a file record: its size and chunk list. None for empty files
    (all alike: matching them says nothing about a rename)."""
    chunks = record.get("chunks")
    size = record.get("size", 0)
    if not size or not chunks:
        return None
    return hash((size, len(chunks), chunks[0][0], chunks[-1][0]))


def gained_extension(path: str) -> tuple[str, str] | None:
    """(the path without its last extension, that extension) when the name has one."""
    head, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or not ext or len(ext) > MAX_EXTENSION or "." not in stem:
        # "x.docx.locked" gains ".locked"; "notes.txt" has no extension to have gained.
        return None
    return (f"{head}/{stem}" if head else stem), "." + ext.lower()


class SignalCounter:
    """Counts one file-tree backup's changes against its parent (see the module)."""

    def __init__(self, parent: str | None) -> None:
        self.parent = parent
        self.files = 0
        self.new = 0
        self.changed = 0
        self.unchanged = 0
        self.gone_files = 0
        self.renamed = 0
        self.extensions: Counter[str] = Counter()
        self.data_bytes = 0
        self.dense_bytes = 0
        # A path a worker reads -> _NEW, _CHANGED, or the extension it gained.
        self._pending: dict[str, str] = {}
        self._recent: OrderedDict[str, int | None] = OrderedDict()  # paths just gone
        self._gone_prints: dict[int, int] = {}
        self._new_prints: dict[int, int] = {}

    # --- the backup's hooks ---------------------------------------------------------------------

    def seen(self, path: str, prev: Record | None, reused: bool) -> None:
        """A regular file the walk listed; ``prev``: the parent's record of the same path. Called
        right after the cursor looked ``path`` up, so the parent's files just before it have just
        gone by: the extension rule is decided here, in walk order."""
        if reused:
            self.files += 1
            self.unchanged += 1
            return
        if prev is not None and prev.get("type") == "file":
            self._pending[path] = _CHANGED
            return
        if self.parent is None:
            return  # nothing to compare with: every file is new (counted by ``done``)
        gained = gained_extension(path) if self._recent else None
        if gained is not None and gained[0] in self._recent:
            before = self._recent.pop(gained[0])
            if before is not None and self._gone_prints.get(before):
                self._gone_prints[before] -= 1  # matched here: not again by content
            self._pending[path] = gained[1]
        else:
            self._pending[path] = _NEW

    def gone(self, prev: Record) -> None:
        """A parent record the cursor passed without a match."""
        if prev.get("type") != "file":
            return
        self.gone_files += 1
        print_ = fingerprint(prev)
        self._recent[prev["path"]] = print_
        if len(self._recent) > RECENT_GONE:
            self._recent.popitem(last=False)
        if print_ is not None and len(self._gone_prints) < MAX_FINGERPRINTS:
            self._gone_prints[print_] = self._gone_prints.get(print_, 0) + 1

    def done(self, record: Record, dropped: bool) -> None:
        """A file read by a worker, as it goes into the tree (``dropped``: it is left out)."""
        if self.parent is None:
            if not dropped:
                self.files += 1
                self.new += 1
            return
        kind = self._pending.pop(record["path"], None)
        if kind is None or dropped:
            return
        self.files += 1
        if kind == _CHANGED:
            self.changed += 1
        elif kind == _NEW:
            self.new += 1
            print_ = fingerprint(record)
            if print_ is not None and len(self._new_prints) < MAX_FINGERPRINTS:
                self._new_prints[print_] = self._new_prints.get(print_, 0) + 1
        else:
            self.renamed += 1
            self.extensions[kind] += 1

    def data(self, data_bytes: int, dense_bytes: int) -> None:
        """New file data written, and how much of it does not compress."""
        self.data_bytes += data_bytes
        self.dense_bytes += dense_bytes

    # --- the result -------------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        moved = sum(min(n, self._gone_prints.get(p, 0)) for p, n in self._new_prints.items())
        renamed = self.renamed + moved
        return {
            "parent": self.parent,
            "files": self.files,
            "files_before": self.unchanged + self.changed + self.gone_files,
            "new": self.new - moved,
            "changed": self.changed,
            "deleted": self.gone_files - renamed,
            "renamed": renamed,
            "extensions": dict(self.extensions.most_common(TOP_EXTENSIONS)),
            "new_data_bytes": self.data_bytes,
            "dense_bytes": self.dense_bytes,
        }
