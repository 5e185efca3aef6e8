"""``appliance tier``: the tiering rules, the plan with its cost, and a run now.

Registered through the ``appliance.cli_plugins`` entry point; each command calls one work
function of :mod:`tiering.work`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.cli import emit, open_from_args, run_logged
from tiering.work import load_settings, preview, run_tiering, save_settings


def register(sub: Any) -> None:
    tier = sub.add_parser("tier", help="tiering to cold buckets: rules, plan, run")
    actions = tier.add_subparsers(dest="action", required=True)
    rules = actions.add_parser("rules", help="show the tiering settings, or set them")
    rules.add_argument(
        "--set", dest="file", help="a JSON settings document to store ('-': standard input)"
    )
    rules.set_defaults(func=cmd_rules)
    actions.add_parser("plan", help="what a run would do now, and its cost").set_defaults(
        func=cmd_plan
    )
    actions.add_parser("run", help="carry out the plan now, in this process").set_defaults(
        func=cmd_run
    )


def cmd_rules(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        if args.file:
            if args.file == "-":
                text = sys.stdin.read()
            else:
                with open(args.file) as f:
                    text = f.read()
            settings = save_settings(app, json.loads(text))
        else:
            settings = load_settings(app)
    document = settings.to_dict()
    emit(args, document, lambda: json.dumps(document, indent=2))
    return 0


def _plan_text(plan: dict[str, Any]) -> str:
    lines = []
    for problem in plan["problems"]:
        lines.append(f"! {problem}")
    for action in plan["copies"]:
        until = f", locked until {action['retain_until'][:10]}" if action["retain_until"] else ""
        lines.append(
            f"copy  {action['point']}  {action['asset']:16}  -> {action['location']} "
            f"({action['storage_class']}{until}; rule {action['rule']})"
        )
    for drop in plan["drops"]:
        lines.append(
            f"drop  {drop['point']}  {drop['asset']:16}  local copy (kept at {drop['kept_at']})"
        )
    if not plan["copies"] and not plan["drops"]:
        lines.append("nothing to do")
    cost = plan["cost"]
    lines.append(
        f"estimated: {cost['monthly_total']} {cost['currency']}/month of storage added, "
        f"{cost['uploads']} {cost['currency']} of uploads (prices as of {cost['as_of']})"
    )
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        plan = preview(app)
    emit(args, plan, lambda: _plan_text(plan))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the plan in this process (the service runs it as the ``tier`` job instead)."""
    result = run_logged(args, lambda app, log: run_tiering(app, log=log))
    emit(
        args,
        result,
        lambda: (
            result.get("waiting")
            or f"{len(result['copied'])} copied, {len(result['dropped'])} local copies dropped, "
            f"{len(result['failed'])} failed"
        ),
    )
    return 1 if result.get("failed") else 0
