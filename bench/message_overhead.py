"""What one MQTT message costs an agent's event loop in our own code, now and before.

    .venv/bin/python bench/message_overhead.py [--baseline REV] [--out FILE]

On the demo cluster every device's event loop runs under a CPU quota of its speed
(0.25-0.4 of a core), so each microsecond of Python per message costs it three or
four, and a resnet34 job moves some 250 messages (tile tasks and rows). This times,
on one core, the steps that are ours and not the MQTT client's:

- receiving: `MqttSession._dispatch` of a resnet34 rows message and of a tile task
  (topic matching against an agent's subscriptions, topic parsing, decoding, the
  structure check), with a handler that does nothing;
- topic matching alone: aiomqtt's `Topic.matches` over the agent's filters (what
  dispatch used until this bench was written) and our `filter_matches`;
- sending: the topic string of a rows message and encoding the message
  (`publication`).

With `--baseline REV` the same measurements run on the code of commit REV (a
temporary git worktree), in fresh processes alternating with the current code's;
steps REV lacks show as "-".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPEATS = 5  # medians of this many timing runs
ROOT_PREFIX, CLUSTER = "edgedi/v1", "default"


def _per_call_us(function: Callable[[], object], count: int) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(count):
            function()
        runs.append((time.perf_counter() - started) / count * 1e6)
    return sorted(runs)[REPEATS // 2]


async def _dispatch_us(session: Any, message: Any, count: int) -> float:
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(count):
            await session._dispatch(message)
        runs.append((time.perf_counter() - started) / count * 1e6)
    return sorted(runs)[REPEATS // 2]


def measure() -> dict[str, float | None]:
    """The figures for the edgedi this process imports (run in each process)."""
    import aiomqtt
    import numpy as np

    from edgedi.broker import topics
    from edgedi.broker.connection import MqttSession, SessionSettings
    from edgedi.broker.messages import RowsForward, TileRows, TileTask, encode
    from edgedi.broker.tensors import Tensor

    root = topics.TopicRoot(prefix=ROOT_PREFIX, cluster=CLUSTER)
    # The subscriptions of a worker agent (edgedi.agent.runtime._subscribe).
    own = "dev-3"
    wanted = [
        (topics.DEVICE_BIRTH, {}),
        (topics.DEVICE_STATE, {}),
        (topics.DEVICE_HEARTBEAT, {}),
        (topics.PLANNER_LEADER, {}),
        (topics.PLAN_CURRENT, {}),
        (topics.DEVICE_TASKS, {"device": own}),
        (topics.JOB_GATES, {}),
        (topics.DEVICE_PEER, {"target": own}),
        (topics.DEVICE_PARTIALS, {}),
        (topics.DEVICE_PROBE, {"device": own}),
        (topics.CONTROL_REBIRTH, {}),
    ]
    rows = TileRows(
        sender="dev-1",
        job_id="client-abc-0123456789abcdef",  # type: ignore[arg-type]
        epoch=1,
        segment=5,
        tile=1,
        device="dev-1",  # type: ignore[arg-type]
        rows=(10, 12),
        tensor=Tensor(np.zeros((1, 128, 2, 25), np.float32)),
    )
    task = TileTask(
        sender="dev-1",
        job_id="client-abc-0123456789abcdef",  # type: ignore[arg-type]
        epoch=1,
        plan_id="0123456789abcdef0123456789abcdef",
        device=own,  # type: ignore[arg-type]
        model="resnet34",
        model_digest="0123456789abcdef",
        input_size=200,
        segment=5,
        first_unit=6,
        last_unit=8,
        row_parts=((0, 10), (10, 20), (20, 25)),
        tile=1,
        input_rows=(8, 21),
        input_columns=(0, 25),
        output_rows=(10, 20),
        output_columns=(0, 25),
        tensor=None,
        deadline=time.time() + 60,
        peers=("dev-1", own, "dev-4"),  # type: ignore[arg-type]
        forward=(
            RowsForward(tile=0, device="dev-1", rows=(10, 12)),  # type: ignore[arg-type]
            RowsForward(tile=1, device=own, rows=(10, 20)),  # type: ignore[arg-type]
        ),
    )
    rows_topic = topics.DEVICE_PEER.topic(root, device="dev-1", target=own)
    task_topic = topics.DEVICE_TASKS.topic(root, device=own)

    async def received() -> tuple[float, float]:
        session = MqttSession(SessionSettings(client_id="bench"), root)

        async def nothing(_: object) -> None:
            return None

        for spec, parameters in wanted:
            await session.subscribe(spec, nothing, **parameters)
        as_message = {
            topic: aiomqtt.Message(topic, encode(m), qos=1, retain=False, mid=1, properties=None)
            for topic, m in ((rows_topic, rows), (task_topic, task))
        }
        return (
            await _dispatch_us(session, as_message[rows_topic], 2000),
            await _dispatch_us(session, as_message[task_topic], 2000),
        )

    rows_us, task_us = asyncio.run(received())
    filters = [spec.filter(root, **parameters) for spec, parameters in wanted]
    figures: dict[str, float | None] = {
        "dispatch_rows_us": rows_us,
        "dispatch_task_us": task_us,
        "match_aiomqtt_us": _per_call_us(
            lambda: [aiomqtt.Topic(rows_topic).matches(f) for f in filters], 2000
        ),
        "encode_rows_us": _per_call_us(
            lambda: topics.publication(root, topics.DEVICE_PEER, rows, device="dev-1", target=own),
            2000,
        ),
        "topic_us": _per_call_us(
            lambda: topics.DEVICE_PEER.topic(root, device="dev-1", target=own), 20000
        ),
        "match_ours_us": None,
    }
    try:
        from edgedi.broker.connection import filter_matches
    except ImportError:
        pass
    else:
        levels = [tuple(f.split("/")) for f in filters]
        figures["match_ours_us"] = _per_call_us(
            lambda: [filter_matches(lv, rows_topic.split("/")) for lv in levels], 20000
        )
    return figures


def _in_process(pythonpath: str | None) -> dict[str, float | None]:
    """`measure()` in a fresh process (on another checkout with `pythonpath`)."""
    environment = dict(os.environ)
    if pythonpath is not None:
        environment["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, __file__, "--emit-json"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, float | None] = json.loads(done.stdout)
    return figures


def _fastest(runs: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Per step, the fastest of the rounds (the machine is shared: noise only adds)."""
    return {
        key: min((v for run in runs if (v := run[key]) is not None), default=None)
        for key in runs[0]
    }


def _side_by_side(
    revision: str | None, rounds: int
) -> tuple[dict[str, float | None], dict[str, float | None] | None]:
    """Now (and the code of `revision`), alternating, `rounds` fresh processes each."""
    if revision is None:
        return _fastest([_in_process(None) for _ in range(rounds)]), None
    repository = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="message-overhead-") as folder:
        checkout = Path(folder) / "checkout"
        subprocess.run(
            ["git", "-C", str(repository), "worktree", "add", "--detach", "-q", str(checkout),
             revision],
            check=True,
        )  # fmt: skip
        try:
            path = Path(folder) / "path"
            path.mkdir()
            (path / "edgedi").symlink_to(checkout)
            now, before = [], []
            for _ in range(rounds):
                now.append(_in_process(None))
                before.append(_in_process(str(path)))
            return _fastest(now), _fastest(before)
        finally:
            subprocess.run(
                ["git", "-C", str(repository), "worktree", "remove", "--force", str(checkout)],
                check=False,
            )


ROWS = (
    ("dispatch_rows_us", "receive a rows message (16 KB of resnet34 rows): `_dispatch`"),
    ("dispatch_task_us", "receive a tile task: `_dispatch`"),
    ("match_aiomqtt_us", "match a topic against 11 filters with aiomqtt's `Topic.matches`"),
    ("match_ours_us", "match a topic against 11 filters with `filter_matches`"),
    ("topic_us", "the topic string of a rows message"),
    ("encode_rows_us", "encode a rows message with its topic (`publication`)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="also measure the code of this commit")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side (default 3)")
    parser.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if arguments.emit_json:
        print(json.dumps(measure()))
        return
    started = time.monotonic()
    now, before = _side_by_side(arguments.baseline, arguments.rounds)

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    command = "python bench/message_overhead.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Our code's cost per MQTT message on an agent's event loop",
        "",
        f"Command: `{command.strip()}` ({time.monotonic() - started:.0f} s)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical cores (shared); Python "
        f"{platform.python_version()}; one core, microseconds per call: per process the "
        f"median of {REPEATS} timing runs, then the fastest of {arguments.rounds} fresh "
        "processes per side, the sides alternating. A device at a fraction f of a core "
        "pays about 1/f times these on its event loop (the demo's loops run under quotas "
        "of 0.25-0.4).",
        "",
    ]
    if before is None:
        lines += ["| step | µs |", "|---|---:|"]
        lines += [f"| {label} | {shown(now[key])} |" for key, label in ROWS]
    else:
        lines += [
            f"| step | µs at {arguments.baseline} | µs now |",
            "|---|---:|---:|",
        ]
        lines += [f"| {label} | {shown(before[key])} | {shown(now[key])} |" for key, label in ROWS]
    text = "\n".join(lines) + "\n"
    print(text)
    if arguments.out is not None:
        arguments.out.write_text(text)


if __name__ == "__main__":
    main()
