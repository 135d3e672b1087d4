"""`edgedi status`: the cluster now — devices, leader, plan in force — then exit.

    edgedi status --broker 127.0.0.1:1883 [--cluster default] [--json]

Connects, collects the retained records (births, states, the leader record, the
plan) and a round of heartbeats for `--wait` seconds (default 1.2: heartbeats come
every second), prints them and exits: 0 when a leader and a plan are known, 1
otherwise (nothing there, the broker unreachable, or a subscription refused:
"not authorised for TOPIC"). A retained record that never came is named on
stderr, with the reminder that the account may not be authorised to read it.
Connection flags: every command's (`edgedi.agent.connection`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from edgedi.agent.commands.observer import (
    add_connection_arguments,
    missing_records,
    observer_session,
    refusal,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--wait", type=float, default=1.2, metavar="S", help="collect for S seconds (default 1.2)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _candidate(candidate: bool | None, priority: int | None) -> str:
    if candidate is None:
        return "-"
    if not candidate:
        return "no"
    return f"yes (priority {priority})" if priority else "yes"


def _offset(seconds: float | None) -> str:
    """A device's clock against the leader's, as the device estimates it."""
    return "-" if seconds is None else f"{seconds:+.3f} s"


def render(document: dict[str, Any], plan_lines: list[str]) -> list[str]:
    """The human-readable status from `ClusterView.to_json()` and the plan's lines."""
    devices = document["devices"]
    lines = [f"devices ({len(devices)}):"]
    if devices:
        rows = [["device", "state", "session", "cores", "candidate", "load", "clock", "models"]]
        for device in devices:
            candidate = device["candidate"]
            rows.append(
                [
                    device["device"],
                    device["status"],
                    str(device["session"]) if device["session"] is not None else "-",
                    str(device["cores"]) if device["cores"] is not None else "-",
                    _candidate(candidate, device["priority"]),
                    f"{device['load']:.2f}" if device["load"] is not None else "-",
                    _offset(device.get("clock_offset_s")),
                    ", ".join(device["models"]) or "-",
                ]
            )
        lines += ["  " + line for line in _table(rows)]
        lines.append("  (clock: the device's clock minus the leader's, from heartbeat round trips)")
    leader = document["leader"]
    lines.append(
        f"leader: {leader['device']} (epoch {leader['epoch']}, session {leader['session']})"
        if leader is not None
        else "leader: none recorded"
    )
    if plan_lines:
        lines += ["plan in force:", *("  " + line for line in plan_lines)]
    else:
        lines.append("plan in force: none published")
    return lines


async def _collect(args: argparse.Namespace) -> int:
    from edgedi.agent.cluster_view import ClusterView, describe_plan, subscribe_view
    from edgedi.broker.errors import BrokerError
    from edgedi.broker.topics import DEVICE_BIRTH, PLAN_CURRENT, PLANNER_LEADER

    observer = observer_session(args, "status")
    if observer is None:
        return 2
    session, root, address, _ = observer
    view = ClusterView()
    await subscribe_view(session, view, heartbeats=True)
    async with asyncio.TaskGroup() as group:
        runner = group.create_task(session.run(), name="status-session")
        try:
            await session.wait_connected(10.0)
            refused = refusal(session)
            if refused is None:
                await asyncio.sleep(max(0.0, args.wait))
        except BrokerError as error:
            print(f"broker {address}: {error}", file=sys.stderr)
            return 1
        finally:
            session.request_stop()
            await runner
    if refused is not None:
        print(f"broker {address}: {refused}", file=sys.stderr)
        return 1
    absent = [
        spec
        for spec, seen in (
            (DEVICE_BIRTH, view.devices),
            (PLANNER_LEADER, view.leader),
            (PLAN_CURRENT, view.plan),
        )
        if not seen
    ]
    for line in missing_records(observer, absent, args.wait):
        print(line, file=sys.stderr)
    document = view.to_json()
    document["broker"] = f"{address}"
    document["topic_root"] = root.base
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        plan = view.plan.plan if view.plan is not None else None
        print(f"cluster {root.base} on {address}")
        for line in render(document, describe_plan(plan) if plan is not None else []):
            print(line)
    return 0 if view.leader is not None and view.plan is not None else 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_collect(args))
