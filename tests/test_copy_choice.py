"""The pure rule that orders a point's copies for a read (appliance.locations.choice)."""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.locations.choice import CopyOption, order_copies

T1 = datetime(2026, 12, 1, tzinfo=UTC)
T2 = datetime(2026, 12, 3, tzinfo=UTC)


def c(
    name: str,
    *,
    state: str = "present",
    access: str = "random",
    online: bool = True,
    verified: datetime | None = None,
) -> CopyOption:
    return CopyOption(f"id-{name}", name, state, access, online, verified)


def names(copies: list[CopyOption]) -> list[str]:
    return [x.location_name for x in copies]


def test_online_before_offline_and_random_before_cold_before_sequential() -> None:
    copies = [
        c("tape", access="sequential"),
        c("bucket", access="cold"),
        c("usb", online=False),
        c("pool"),
    ]
    assert names(order_copies(copies)) == ["pool", "bucket", "tape", "usb"]


def test_verified_before_unverified_newest_verification_first() -> None:
    copies = [c("a"), c("b", verified=T1), c("c", verified=T2)]
    assert names(order_copies(copies)) == ["c", "b", "a"]


def test_archived_copies_come_after_every_readable_one() -> None:
    copies = [c("glacier", state="archived", access="cold"), c("tape", access="sequential")]
    assert names(order_copies(copies)) == ["tape", "glacier"]


def test_incomplete_lost_and_deleted_copies_are_never_read() -> None:
    copies = [c(s, state=s) for s in ("copying", "recalling", "lost", "deleted")] + [c("ok")]
    assert names(order_copies(copies)) == ["ok"]


def test_a_named_location_goes_first_or_alone() -> None:
    copies = [c("pool", verified=T2), c("usb", access="random", verified=T1)]
    assert names(order_copies(copies, named="usb")) == ["usb", "pool"]
    assert names(order_copies(copies, named="id-usb", only=True)) == ["usb"]
    assert order_copies(copies, named="nowhere", only=True) == []


def test_ties_are_broken_by_name_so_the_order_is_stable() -> None:
    assert names(order_copies([c("b"), c("a")])) == ["a", "b"]
