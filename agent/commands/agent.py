"""`edgedi agent`: run this device's agent (worker; planner and coordinator when elected).

Settings come from `--config FILE` (YAML), `EDGEDI_*` environment variables and the
flags below (strongest); the connection flags are those of every command
(`edgedi.agent.connection`). `--check-config` validates them, prints one
`field.path: message` line per problem and exits 0 (valid) or 1, without connecting:
the Ansible role runs it on every rendered configuration before installing it.
SIGTERM or Ctrl-C stops the agent gracefully (drain, state `stopped`, disconnect).
An agent whose device id another live agent holds exits with status 78 (EX_CONFIG),
which the systemd unit does not restart (see edgedi.agent.identity).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from edgedi.agent.config import AgentSettings, ConfigError, load_settings
from edgedi.agent.connection import add_connection_arguments, connection_overrides, describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check-config", action="store_true", help="validate the settings and exit (0 or 1)"
    )
    parser.add_argument("--id", dest="device_id", metavar="ID", help="unique device name")
    add_connection_arguments(parser)
    parser.add_argument(
        "--link-mbit", type=float, metavar="MBIT", help="announced link bandwidth (Mbit/s)"
    )
    parser.add_argument(
        "--link-latency-ms", type=float, metavar="MS", help="announced one-way link latency"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads")
    parser.add_argument(
        "--slowdown", type=float, metavar="X", help="emulate a device X times slower"
    )
    parser.add_argument(
        "--candidate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="may this device be elected leader",
    )
    parser.add_argument("--priority", type=int, metavar="P", help="election rank (lower wins)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="models this device holds")
    parser.add_argument("--input-size", type=int, metavar="PX", help="image side length")
    parser.add_argument(
        "--profile-seconds", type=float, metavar="S", help="start-up benchmark budget"
    )
    parser.add_argument("--strategy", help="partitioning strategy (when leading)")
    parser.add_argument("--plan-model", help="model of the published plan (when leading)")
    parser.add_argument("--state-dir", type=Path, help="folder for the cached profile")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (see --metrics-host)",
    )
    parser.add_argument(
        "--metrics-host", metavar="ADDRESS", help="metrics listen address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--home-assistant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="publish (or, with --no-home-assistant, remove) Home Assistant MQTT discovery",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="log level"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device_id": args.device_id,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
        "broker": {
            **connection_overrides(args),
            "link_mbit_s": args.link_mbit,
            "link_latency_ms": args.link_latency_ms,
        },
        "compute": {
            "threads": args.threads,
            "slowdown": args.slowdown,
            "models": args.models,
            "input_size": args.input_size,
            "profile_seconds": args.profile_seconds,
        },
        "metrics": {"port": args.metrics_port, "host": args.metrics_host},
        "home_assistant": {"discovery": args.home_assistant},
        "planner": {
            "candidate": args.candidate,
            "priority": args.priority,
            "strategy": args.strategy,
            "model": args.plan_model,
        },
    }


def _check(settings: AgentSettings) -> list[str]:
    """Problems pydantic cannot see: names that must exist in the zoo and the planner."""
    from edgedi.models.specs import MODEL_NAMES, get_spec
    from edgedi.planner.strategies import strategy_names

    problems = []
    for position, name in enumerate(settings.compute.models):
        if name not in MODEL_NAMES:
            problems.append(
                f"compute.models.{position}: unknown model {name!r} "
                f"(known: {', '.join(MODEL_NAMES)})"
            )
        else:
            try:
                get_spec(name, settings.compute.input_size)
            except ValueError as error:
                problems.append(f"compute.input_size: {error}")
    if settings.planner.strategy not in strategy_names():
        problems.append(
            f"planner.strategy: unknown strategy {settings.planner.strategy!r} "
            f"(known: {', '.join(strategy_names())})"
        )
    model = settings.planner.model
    if model is not None and model not in settings.compute.models:
        problems.append(f"planner.model: {model!r} is not among compute.models")
    return problems


async def _serve(settings: AgentSettings) -> int:
    from edgedi.agent.identity import EXIT_DUPLICATE_ID, DuplicateDevice
    from edgedi.agent.runtime import Agent

    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    try:
        await agent.run()
    except DuplicateDevice as error:
        # A configuration error: systemd must not restart us (RestartPreventExitStatus=).
        logging.getLogger("edgedi.agent").error("%s", error)
        print(f"edgedi agent: {error}", file=sys.stderr)
        return EXIT_DUPLICATE_ID
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, _overrides(args))
    except ConfigError as error:
        for line in error.lines:
            print(line, file=sys.stderr)
        return 1
    problems = _check(settings)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return 1
    if args.check_config:
        source = args.config or "flags and environment"
        print(
            f"{source}: OK (device {settings.device_id}, broker "
            f"{describe(settings.broker)}, models "
            f"{', '.join(settings.compute.models)})"
        )
        return 0
    # The configured level, unless -v on the command line asked for more.
    level = min(logging.getLevelName(settings.log_level.upper()), logging.getLogger().level)
    logging.getLogger("edgedi").setLevel(level)
    return asyncio.run(_serve(settings))
