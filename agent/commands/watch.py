"""`edgedi watch`: results and membership changes of a cluster as they happen.

    edgedi watch --broker 127.0.0.1:1883 [--cluster default]

One line per event, until Ctrl-C: device births, state changes (online, offline,
stopped; a late Will of an old session is shown as ignored), leader changes, new
plans, and every job result (label, confidence, latency, devices; or the error).
The retained records come first, so the opening lines describe the cluster as it
is; after that only changes print. Watching never disturbs the cluster: it only
subscribes. A subscription the broker refuses ends it at once with "not
authorised for TOPIC" (exit status 1); when no retained record at all comes
within `--wait` seconds, a line on stderr says so (an empty cluster, or an
account that may not read it) and watching goes on. Connection flags: every
command's (`edgedi.agent.connection`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

from edgedi.agent.commands.observer import (
    add_connection_arguments,
    missing_records,
    observer_session,
    refusal,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--heartbeats", action="store_true", help="also print every heartbeat (noisy)"
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=2.0,
        metavar="S",
        help="say so when no retained record came within S seconds (default 2)",
    )


def _stamp() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _emit(line: str) -> None:
    print(f"{_stamp()} {line}")
    sys.stdout.flush()


def result_line(result: object) -> str:
    """One line for a `JobResult` (shared with the tests)."""
    from edgedi.broker.messages import JobResult

    assert isinstance(result, JobResult)
    if result.status != "ok":
        return f"result  {result.job_id}: ERROR {result.error}"
    label = result.class_name or f"class {result.label}"
    confidence = (
        result.probabilities[result.label]
        if result.label is not None and result.probabilities
        else float("nan")
    )
    total = result.latency_ms.get("total", float("nan"))
    return (
        f"result  {result.job_id}: {label} p={confidence:.2f} in {total:.1f} ms on "
        f"{','.join(result.devices)} [{result.strategy}, epoch {result.epoch}]"
    )


async def _watch(args: argparse.Namespace) -> int:
    from edgedi.agent.cluster_view import ClusterView, subscribe_view
    from edgedi.broker.connection import Received
    from edgedi.broker.errors import BrokerError
    from edgedi.broker.messages import Heartbeat
    from edgedi.broker.topics import (
        DEVICE_BIRTH,
        DEVICE_HEARTBEAT,
        JOB_RESULT,
        PLAN_CURRENT,
        PLANNER_LEADER,
    )

    observer = observer_session(args, "watch")
    if observer is None:
        return 2
    session, root, address, _ = observer
    view = ClusterView()

    def on_lines(lines: list[str]) -> None:
        for line in lines:
            _emit(line)

    async def on_result(received: Received) -> None:
        _emit(result_line(received.message))

    async def on_heartbeat(received: Received) -> None:
        beat = received.message
        assert isinstance(beat, Heartbeat)
        _emit(
            f"beat    {beat.device}: load {beat.load:.2f}, {beat.busy_tiles} tile(s), "
            f"#{beat.sequence}"
        )

    await subscribe_view(session, view, heartbeats=False, on_lines=on_lines)
    await session.subscribe(JOB_RESULT, on_result)
    if args.heartbeats:
        await session.subscribe(DEVICE_HEARTBEAT, on_heartbeat)
    async with asyncio.TaskGroup() as group:
        runner = group.create_task(session.run(), name="watch-session")
        try:
            await session.wait_connected(10.0)
            problem = refusal(session)
        except BrokerError as error:
            problem = str(error)
        if problem is not None:
            print(f"broker {address}: {problem}", file=sys.stderr)
            session.request_stop()
            await runner
            return 1
        _emit(f"watching {root.base}/ on {address} (Ctrl-C to stop)")
        try:
            loop = asyncio.get_running_loop()
            stop_at = None if args.duration is None else loop.time() + args.duration
            first = args.wait if stop_at is None else min(args.wait, args.duration)
            await asyncio.sleep(max(0.0, first))
            if not (view.devices or view.leader or view.plan):
                for line in missing_records(
                    observer, (DEVICE_BIRTH, PLANNER_LEADER, PLAN_CURRENT), args.wait
                ):
                    print(line, file=sys.stderr)
                sys.stderr.flush()
            if stop_at is not None:
                await asyncio.sleep(max(0.0, stop_at - loop.time()))
            else:
                await asyncio.Event().wait()
        finally:
            session.request_stop()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_watch(args))
    except KeyboardInterrupt:
        return 0
