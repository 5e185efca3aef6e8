"""The ransomware warning: a point's change signals judged against the asset's own history.

Pure functions of signals (``appliance.backup.signals``) and history; no clock, no catalog.

Three measures of a point against its parent:

- **change rate**: files changed, deleted or renamed, as a share of the files the parent had;
- **one new extension**: the most files that gained the same new extension
  (``report.docx`` -> ``report.docx.locked``);
- **dense share**: the share of the new file data that zstd cannot shrink by
  ``DENSE_RATIO`` (3 %): encrypted data looks random.

The usual value of a measure is the median over the asset's last :data:`HISTORY_POINTS` points
with signals (a point still suspicious, or confirmed as an attack, is not part of the history);
its spread is the median absolute deviation. The rules, each a jump well above the usual:

1. **Extension**: at least :data:`EXTENSION_MIN_FILES` files, and at least
   :data:`EXTENSION_MIN_SHARE` of the parent's files, gained one new extension that the history
   did not see gained in such numbers. Suspicious on its own, even on a first comparison: a normal
   day renames a few files, not a fifth of them to one new extension.
2. **Change**: with a history of at least :data:`MIN_HISTORY` points, the change rate is at least
   ``max(CHANGE_FLOOR, usual + CHANGE_MARGIN + 3 * spread)``; suspicious on its own. With a
   shorter history, only a change rate of at least :data:`CHANGE_NO_HISTORY` *together with*
   a dense jump counts (rule 3), so a first week's reorganisation raises nothing.
3. **Dense**: at least :data:`DENSE_MIN_BYTES` of new data, and a dense share of at least
   ``max(DENSE_FLOOR, usual + DENSE_MARGIN + 3 * spread)`` (``DENSE_NO_HISTORY`` without a
   history). Never suspicious on its own: a day that adds a film is all dense data. It is named
   among the reasons when rule 1 or 2 holds, and makes rule 2 hold without a history.

A tree with fewer than :data:`MIN_FILES` files in its parent is never judged on change rate
(three files of five changed is a normal day on a small folder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

HISTORY_POINTS = 10
MIN_HISTORY = 3
MIN_FILES = 20
CHANGE_FLOOR = 0.30
CHANGE_MARGIN = 0.25
CHANGE_NO_HISTORY = 0.50
EXTENSION_MIN_FILES = 20
EXTENSION_MIN_SHARE = 0.20
DENSE_MIN_BYTES = 4 * 1024 * 1024
DENSE_FLOOR = 0.50
DENSE_MARGIN = 0.30
DENSE_NO_HISTORY = 0.80

Signals = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    suspicious: bool
    reasons: list[str] = field(default_factory=list)


def change_rate(signals: Signals) -> float | None:
    """Files changed, deleted or renamed per file the parent had; None without a parent (or a
    parent too small to say)."""
    before = int(signals.get("files_before", 0) or 0)
    if signals.get("parent") is None or before < MIN_FILES:
        return None
    touched = sum(int(signals.get(k, 0) or 0) for k in ("changed", "deleted", "renamed"))
    return touched / before


def dense_share(signals: Signals) -> float | None:
    """The share of new file data that does not compress; None under ``DENSE_MIN_BYTES``."""
    total = int(signals.get("new_data_bytes", 0) or 0)
    if total < DENSE_MIN_BYTES:
        return None
    return int(signals.get("dense_bytes", 0) or 0) / total


def top_extension(signals: Signals) -> tuple[str, int] | None:
    gained = {str(k): int(v) for k, v in (signals.get("extensions") or {}).items()}
    if not gained:
        return None
    ext = max(gained, key=lambda k: (gained[k], k))
    return ext, gained[ext]


def _usual(values: Sequence[float]) -> tuple[float, float]:
    """(median, median absolute deviation)."""
    mid = median(values)
    return mid, median(abs(v - mid) for v in values)


def _percent(share: float) -> str:
    if 0 < share < 0.01:
        return "under 1%"
    return f"{round(share * 100)}%"


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def judge(signals: Signals, history: Sequence[Signals]) -> Verdict:
    """Clean or suspicious, with the reasons in words (see the module's rules). ``history``: the
    signals of the asset's earlier clean points, newest first (only the first
    :data:`HISTORY_POINTS` count)."""
    history = list(history)[:HISTORY_POINTS]
    reasons: list[str] = []
    alarm = False

    past_rates = [r for r in map(change_rate, history) if r is not None]
    rate = change_rate(signals)
    change_hit = False
    if rate is not None:
        if len(past_rates) >= MIN_HISTORY:
            usual, spread = _usual(past_rates)
            if rate >= max(CHANGE_FLOOR, usual + CHANGE_MARGIN + 3 * spread):
                change_hit = alarm = True
                reasons.append(
                    f"{_percent(rate)} of files changed against a usual {_percent(usual)}"
                )
        elif rate >= CHANGE_NO_HISTORY:
            change_hit = True
            reasons.append(f"{_percent(rate)} of files changed (no history yet to compare with)")

    top = top_extension(signals)
    before = int(signals.get("files_before", 0) or 0)
    if top is not None and top[1] >= EXTENSION_MIN_FILES and top[1] >= EXTENSION_MIN_SHARE * before:
        ext, count = top
        usual_count = max(
            (int((h.get("extensions") or {}).get(ext, 0)) for h in history), default=0
        )
        if count > 4 * usual_count:
            alarm = True
            reasons.append(f"{_files(count)} gained the extension {ext}")

    share = dense_share(signals)
    if share is not None:
        past_shares = [s for s in map(dense_share, history) if s is not None]
        if len(past_shares) >= MIN_HISTORY:
            usual, spread = _usual(past_shares)
            if share >= max(DENSE_FLOOR, usual + DENSE_MARGIN + 3 * spread):
                reasons.append(
                    f"{_percent(share)} of new data does not compress against a usual "
                    f"{_percent(usual)}"
                )
                alarm = alarm or change_hit
        elif share >= DENSE_NO_HISTORY:
            reasons.append(f"{_percent(share)} of new data does not compress")
            alarm = alarm or change_hit

    return Verdict(True, reasons) if alarm else Verdict(False)


def needs_hold(suspicion: Sequence[str], review: Mapping[str, Any] | None) -> bool:
    """A point holds retention while it is suspicious and no person has called it expected."""
    return bool(suspicion) and (review or {}).get("verdict") != "expected"


def is_history(suspicion: Sequence[str], review: Mapping[str, Any] | None) -> bool:
    """Whether a point's signals are part of its asset's usual (clean, or found expected)."""
    return not needs_hold(suspicion, review)
