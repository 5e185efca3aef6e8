"""The ransomware verdict and the retention hold: pure functions on crafted histories."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.ransomware import judge, needs_hold
from appliance.retention import (
    HELD_CLEAN,
    HELD_SUSPICIOUS,
    RetentionRules,
    apply_retention,
    ransomware_holds,
)

MiB = 1024 * 1024


def signals(
    *,
    files_before: int = 1000,
    changed: int = 0,
    deleted: int = 0,
    renamed: int = 0,
    new: int = 0,
    extensions: dict[str, int] | None = None,
    new_data: int = 50 * MiB,
    dense: int = 0,
    parent: str | None = "p0",
) -> dict[str, Any]:
    return {
        "parent": parent,
        "files": files_before + new - deleted,
        "files_before": files_before,
        "new": new,
        "changed": changed,
        "deleted": deleted,
        "renamed": renamed,
        "extensions": extensions or {},
        "new_data_bytes": new_data,
        "dense_bytes": dense,
    }


def normal_days(n: int = 7) -> list[dict[str, Any]]:
    """A week of ordinary days: about 2% of 1000 files changed, 10% of new data dense."""
    return [signals(changed=15 + 3 * (i % 3), deleted=2, new=5, dense=5 * MiB) for i in range(n)]


def test_a_normal_day_against_a_normal_history_is_clean() -> None:
    verdict = judge(signals(changed=25, deleted=3, new=8, dense=6 * MiB), normal_days())
    assert not verdict.suspicious
    assert verdict.reasons == []


def test_mass_change_against_a_quiet_history_is_suspicious_with_numbers() -> None:
    verdict = judge(signals(changed=830, dense=int(45.5 * MiB)), normal_days())
    assert verdict.suspicious
    assert verdict.reasons == [
        "83% of files changed against a usual 2%",
        "91% of new data does not compress against a usual 10%",
    ]


def test_files_gaining_one_extension_is_suspicious_even_without_history() -> None:
    verdict = judge(signals(renamed=412, extensions={".locked": 412}, parent="p0"), [])
    assert verdict.suspicious
    assert "412 files gained the extension .locked" in verdict.reasons


def test_an_extension_the_history_gains_in_such_numbers_is_usual() -> None:
    history = [signals(renamed=300, extensions={".bak": 300}) for _ in range(5)]
    verdict = judge(signals(renamed=310, extensions={".bak": 310}), history)
    assert not any("extension" in reason for reason in verdict.reasons)


def test_a_few_renames_are_not_an_attack() -> None:
    verdict = judge(signals(renamed=19, extensions={".old": 19}), normal_days())
    assert not verdict.suspicious


def test_first_backup_raises_nothing() -> None:
    first = signals(files_before=0, new=5000, parent=None, dense=40 * MiB)
    assert judge(first, []) == judge(first, normal_days())
    assert not judge(first, []).suspicious


def test_short_history_needs_change_and_dense_data_together() -> None:
    reorganised = signals(changed=700, dense=2 * MiB)  # a big tidy-up of text files
    assert not judge(reorganised, normal_days(2)).suspicious
    encrypted = signals(changed=700, dense=48 * MiB)
    verdict = judge(encrypted, normal_days(2))
    assert verdict.suspicious
    assert verdict.reasons == [
        "70% of files changed (no history yet to compare with)",
        "96% of new data does not compress",
    ]


def test_dense_data_alone_is_never_suspicious() -> None:
    film_day = signals(changed=10, new=1, new_data=4000 * MiB, dense=3990 * MiB)
    assert not judge(film_day, normal_days()).suspicious


def test_a_busy_asset_has_a_higher_bar() -> None:
    busy = [signals(changed=400 + 20 * i) for i in range(6)]  # 40-50% of files change daily
    assert not judge(signals(changed=550), busy).suspicious
    assert judge(signals(changed=990), busy).suspicious


def test_small_trees_are_not_judged_on_change_rate() -> None:
    tiny = signals(files_before=10, changed=10, dense=40 * MiB)
    assert not judge(tiny, normal_days()).suspicious


def test_only_the_last_ten_points_count() -> None:
    old_busy = [signals(changed=900) for _ in range(20)]
    recent_quiet = normal_days(10)
    assert judge(signals(changed=800), recent_quiet + old_busy).suspicious


# --- the hold on retention ----------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    id: str
    created_at: datetime
    suspicion: list[str] = field(default_factory=list)
    review: dict[str, Any] | None = None


T0 = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)


def day(n: int, **kw: Any) -> P:
    return P(f"d{n}", T0 + timedelta(days=n), **kw)


def test_needs_hold_until_found_expected() -> None:
    assert not needs_hold([], None)
    assert needs_hold(["x"], None)
    assert needs_hold(["x"], {"verdict": "attack", "by": "ann", "at": "t"})
    assert not needs_hold(["x"], {"verdict": "expected", "by": "ann", "at": "t"})


def test_prune_keeps_the_suspicious_point_and_the_last_clean_one_before_it() -> None:
    points = [day(n) for n in range(1, 8)] + [day(8, suspicion=["83% of files changed"])]
    holds = ransomware_holds(points)
    assert holds == {"d8": HELD_SUSPICIOUS, "d7": HELD_CLEAN}
    decision = apply_retention(points, RetentionRules(keep_last=1), holds)
    assert decision.held == holds
    assert set(decision.keep) == {"d8", "d7"}
    assert "held" in decision.keep["d7"]
    assert decision.remove == ["d6", "d5", "d4", "d3", "d2", "d1"]


def test_later_points_do_not_push_the_clean_point_out() -> None:
    # The attack goes on: more suspicious points follow; keep_last=2 would keep only them.
    points = [day(n) for n in range(1, 5)] + [
        day(n, suspicion=["412 files gained the extension .locked"]) for n in range(5, 8)
    ]
    decision = apply_retention(points, RetentionRules(keep_last=2), ransomware_holds(points))
    assert set(decision.keep) == {"d7", "d6", "d5", "d4"}
    assert decision.held["d4"] == HELD_CLEAN


def test_a_point_confirmed_as_an_attack_still_holds() -> None:
    review = {"verdict": "attack", "by": "ann", "at": "2026-03-09T08:00:00+00:00"}
    points = [day(1), day(2), day(3, suspicion=["x"], review=review), day(4)]
    decision = apply_retention(points, RetentionRules(keep_last=1), ransomware_holds(points))
    assert set(decision.keep) == {"d4", "d3", "d2"}


def test_after_a_review_as_expected_retention_goes_on() -> None:
    review = {"verdict": "expected", "by": "ann", "at": "2026-03-09T08:00:00+00:00"}
    points = [day(1), day(2), day(3, suspicion=["x"], review=review), day(4)]
    assert ransomware_holds(points) == {}
    decision = apply_retention(points, RetentionRules(keep_last=1), ransomware_holds(points))
    assert decision.remove == ["d3", "d2", "d1"]
    assert decision.held == {}


def test_a_suspicious_first_point_holds_itself_only() -> None:
    points = [day(1, suspicion=["x"]), day(2)]
    assert ransomware_holds(points) == {"d1": HELD_SUSPICIOUS}
