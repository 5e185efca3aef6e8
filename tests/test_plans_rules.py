"""Recovery plans: the pure rules (validation, whole-plan memory admission, test networks,
the total RTO) and the job kinds' resources, tested directly."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.errors import InvalidInput
from image.failover.admission import QEMU_OVERHEAD_MIB
from image.failover.plan_rules import (
    check_plan_memory,
    network_for_test_run,
    parse_plan_groups,
    plan_total_rto,
)
from image.failover.plans import plan_failover_resources, plan_test_resources

KINDS = {"dc": "vm", "db": "vm", "app": "vm", "docs": "files"}


def _groups(*groups: list[str], **group: Any) -> list[dict[str, Any]]:
    return [{"vms": [{"asset": a} for a in names], **group} for names in groups]


def test_groups_are_normalised_in_order_with_proof_by_default() -> None:
    raw = [
        {"vms": [{"asset": "dc"}]},
        {
            "vms": [
                {"asset": "db", "network": {"mode": "isolated", "port_forwards": [[0, 5432]]}},
                {"asset": "app", "point": "abc123"},
            ],
            "after": "delay",
            "delay_seconds": 30,
        },
    ]
    groups = parse_plan_groups(raw, KINDS)
    assert [[vm["asset"] for vm in g["vms"]] for g in groups] == [["dc"], ["db", "app"]]
    assert groups[0] == {
        "vms": [{"asset": "dc", "network": None, "point": None}],
        "after": "proof",
        "delay_seconds": 0,
    }
    assert groups[1]["after"] == "delay" and groups[1]["delay_seconds"] == 30
    # The network is passed through as given (the failover manager reads it).
    assert groups[1]["vms"][0]["network"] == {"mode": "isolated", "port_forwards": [[0, 5432]]}
    assert groups[1]["vms"][1]["point"] == "abc123"


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([], "at least one group"),
        ("dc", "groups are a list"),
        ([{"vms": []}], "group 1 has no VMs"),
        (_groups(["dc"], ["ghost"]), "group 2: asset ghost does not exist"),
        (_groups(["docs"]), "docs is a folder asset"),
        (_groups(["dc", "db"], ["app", "dc"]), "dc is in group 1 and group 2"),
        (_groups(["dc", "dc"]), "dc is listed twice in group 1"),
        (_groups(["dc"], after="later"), "'after' must be proof or delay"),
        (_groups(["dc"], after="delay"), "the delay must be a whole number"),
        (_groups(["dc"], after="delay", delay_seconds=-1), "not -1"),
        (_groups(["dc"], after="delay", delay_seconds=1.5), "not 1.5"),
        (_groups(["dc"], after="delay", delay_seconds=86_401), "from 0 to 86400"),
        ([{"vms": [{"asset": "dc"}], "colour": 1}], "unknown field(s) colour"),
        ([{"vms": [{"asset": "dc", "network": {"mode": "wormhole"}}]}], "network of dc"),
        ([{"vms": [{"asset": "dc", "network": "br0"}]}], "must be an object"),
        ([{"vms": [{"asset": "dc", "point": ""}]}], "must be a point ID"),
        ([{"vms": ["dc"]}], "a VM is an object"),
    ],
)
def test_bad_plans_are_refused_saying_what_is_wrong(groups: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_plan_groups(groups, KINDS)
    assert message in caught.value.message


def test_the_whole_plan_must_fit_before_anything_boots() -> None:
    vms = [("dc", 256), ("app", 512)]
    need = 256 + 512 + 2 * QEMU_OVERHEAD_MIB
    # Exactly enough: admitted.
    assert check_plan_memory(vms, need + 512 + 100, 512, 100) is None
    reason = check_plan_memory(vms, need + 512 + 100 - 1, 512, 100)
    assert reason is not None
    assert f"needs {need} MiB for its 2 VMs (dc 256 MiB, app 512 MiB" in reason
    assert f"only {need - 1} MiB can be given" in reason
    assert "512 MiB reserved" in reason and "100 MiB promised to running failovers" in reason
    # Each VM alone would fit: the plan is refused as a whole all the same.
    assert check_plan_memory([("dc", 256)], need, 0, 0) is None
    one = check_plan_memory([("dc", 4096)], 1000, 512, 0)
    assert one is not None and "its 1 VM (" in one and "only 488 MiB" in one


def test_a_test_run_is_always_isolated_keeping_the_forwards() -> None:
    bridged = {"mode": "bridged", "bridge": "br0"}
    assert network_for_test_run(bridged, None) == {"mode": "isolated", "port_forwards": []}
    configured = {"mode": "isolated", "port_forwards": [[0, 80]]}
    assert network_for_test_run(None, configured) == configured
    assert network_for_test_run({"mode": "nat", "port_forwards": [[8080, 80]]}, configured) == {
        "mode": "isolated",
        "port_forwards": [[8080, 80]],
    }


def test_total_rto_is_click_to_last_proof() -> None:
    assert plan_total_rto(100.0, [109.5, 121.25]) == 21.25
    assert plan_total_rto(100.0, [109.5, None]) is None
    assert plan_total_rto(100.0, []) is None


def test_a_test_run_holds_its_vms_and_a_failover_holds_none() -> None:
    params = {"plan": "p1", "assets": ["db", "dc", "db"]}
    assert plan_failover_resources(params) == [("plan:p1", True), ("store", False)]
    assert plan_test_resources(params) == [
        ("plan:p1", True),
        ("asset:db", True),
        ("asset:dc", True),
        ("store", False),
    ]
    with pytest.raises(InvalidInput):
        plan_failover_resources({})
