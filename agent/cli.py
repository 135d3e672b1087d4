"""The `edgedi` command line: one console script, one module per subcommand.

Each subcommand lives in `edgedi.agent.commands.<name>` and exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when
their subcommand runs, so `edgedi --help` stays fast and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence

# name -> (module, one-line help). Order is the order `edgedi --help` shows.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("models", "list the model zoo: parameters, GFLOPs, largest activation"),
    "verify": ("verify", "check that partitioned execution equals the whole forward pass"),
    "data": ("data", "generate or inspect NEU-CLS-like defect images"),
    "train": ("train", "train a zoo model on defect images (resumable checkpoints)"),
    "eval": ("eval", "accuracy, per-class precision/recall and confusion matrix of a checkpoint"),
    "broker": ("broker", "run a private MQTT broker (Mosquitto, or embedded amqtt)"),
    "plan": ("plan", "plan a model on a cluster and compare the partitioning strategies"),
    "agent": ("agent", "run this device's agent: worker, and planner/coordinator when elected"),
    "infer": ("infer", "classify images on a running cluster and print the results"),
    "demo": ("demo", "the main job: local agents of different speeds, a defect stream, speedup"),
    "watch": ("watch", "print results and membership changes of a cluster as they happen"),
    "status": ("status", "print a cluster's devices, leader and plan in force, then exit"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgedi",
        description="Distributed CNN inference on clusters of small devices over MQTT.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Parse only up to the subcommand; the subcommand's own parser takes the rest.
    known, rest = top.parse_known_args(argv)
    module_name, help_text = SUBCOMMANDS[known.command]
    module = importlib.import_module(f"edgedi.agent.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"edgedi {known.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: then
    # `kill -INT` could not stop a backgrounded demo, whose clean-up (namespaces,
    # qdiscs, cgroups) runs on KeyboardInterrupt. Interrupts always interrupt.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    level = logging.WARNING - 10 * min(known.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = module.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
