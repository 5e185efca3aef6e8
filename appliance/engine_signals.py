"""The engine's ransomware work: judging a new point's signals and recording a person's review.

A mixin of :class:`appliance.engine.Appliance`. A file-tree backup counts its changes
(``appliance.backup.signals``) and, once its point is in the catalog, calls
:meth:`SignalsMixin.judge_point`: the signals are compared with the asset's own history
(``appliance.ransomware.judge``), stored with the point, and a suspicious point is announced to
``on_suspicious`` (asset, point id, reasons). The point's hold on retention follows from the
catalog (``appliance.retention.ransomware_holds``); a review (``review_point``) ends it or
confirms it.

``on_suspicious`` is called in the process that ran the backup. A backup job may run in an
isolated child (``appliance.isolation``): its result carries the reasons (``suspicion``) back to
the service, which is where alerts are raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from appliance.catalog.records import PointRecord
from appliance.ransomware import HISTORY_POINTS, is_history, judge

if TYPE_CHECKING:
    from appliance.engine import Appliance

#: Told of each suspicious point: (asset, point id, reasons in words).
SuspicionListener = Callable[[str, str, list[str]], None]

log = logging.getLogger(__name__)


class SignalsMixin:
    #: Set by whoever raises alerts in this process (None: nobody listens).
    on_suspicious: SuspicionListener | None = None

    @property
    def _signals_engine(self) -> Appliance:
        return cast("Appliance", self)

    def history_of(self, point: PointRecord) -> list[dict[str, Any]]:
        """Signals of the asset's clean points before ``point``, newest first."""
        catalog = self._signals_engine.catalog
        earlier = [
            p
            for p in catalog.newest_points(HISTORY_POINTS * 3 + 1, asset=point.asset)
            if p.id != point.id and p.created_at <= point.created_at
        ]
        return [
            p.signals
            for p in earlier
            if p.kind == point.kind and p.signals and is_history(p.suspicion, p.review)
        ][:HISTORY_POINTS]

    def judge_point(self, point: PointRecord, signals: dict[str, Any]) -> PointRecord:
        """Judge and record ``point``'s signals; announce it when it looks like an attack."""
        verdict = judge(signals, self.history_of(point))
        point = self._signals_engine.catalog.record_signals(point.id, signals, verdict.reasons)
        if verdict.suspicious and self.on_suspicious is not None:
            try:
                self.on_suspicious(point.asset, point.id, list(verdict.reasons))
            except Exception:  # an alert that fails must not fail the backup that was made
                log.exception("the ransomware warning of point %s was not raised", point.id)
        return point

    def review_point(self, point_id: str, by: str, verdict: str) -> PointRecord:
        """``by`` looked at a suspicious point: ``expected`` (retention goes on) or ``attack``
        (the hold stays)."""
        engine = self._signals_engine
        point = engine.point(point_id)
        return engine.catalog.review_point(point.id, by, engine.clock(), verdict)
