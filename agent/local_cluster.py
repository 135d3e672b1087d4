"""A cluster of devices of different speeds on one machine: a private broker and N agents.

    with LocalCluster(devices=4, model="vgg16-edgedi") as cluster:
        view = cluster.wait_ready_sync(timeout=120)
        ... connect a client to cluster.host, cluster.port ...

Each device is a real `edgedi agent` process (`python -m edgedi.agent.cli agent`)
with one torch thread, logging to a file in a temporary folder. The broker is a
private Mosquitto on a free loopback port when installed, else the embedded one.

Speeds, by the best means available (`Emulation.method` says which was used):

- **cgroup CPU quotas** (root and a writable cgroup CPU controller, v1
  `/sys/fs/cgroup/cpu/` or v2 `cpu.max`): each agent runs in its own group
  limited to a fraction of one core, e.g. 0.4/0.4/0.25/0.25 for four devices.
  That is real parallelism at controlled speeds: the agents together use less
  than the machine's cores, so none waits for another's CPU. The quota period
  is 5 ms rather than the kernel's 100 ms: a quota is enforced per period, so a
  throttled agent can stall for up to period − quota, and every exchange of a
  distributed job (scatter, gate rounds, gather) waits for the slowest answer.
- **`--slowdown`** otherwise: the agent sleeps after each compute step so it takes
  1/speed times longer, and announces a profile scaled to match. The agents
  then share the machine's cores, so the emulation is rougher.

What the planner is told must match: the agents' own start-up micro-benchmark
times operations of well under a millisecond, which a CPU quota does not slow
(they finish before the group is throttled), and it predicts a whole model 2-3x
faster than it runs. So, by default, the launcher measures one unthrottled core
once (`calibrate_profile`: the micro-benchmark, then scaled so that it predicts
the model's measured forward pass), times the same forward pass inside each
device's quota group (cgroup v1 moves one thread; the nominal quota is used under
v2), and gives each agent that profile divided by its measured speed, through
the agent's profile cache in its state folder.

Links, by `link`: `"loopback"` (default) puts everything on 127.0.0.1. `"100mbit"` or
`"1gbit"` builds an emulated LAN (`edgedi.agent.link_emulation`): the broker and each
agent in a network namespace of its own, every link shaped both ways at that rate,
the launcher's own clients (`host:port` from here) through a shaped link of their
own. The rate is measured once (`Links.measured_mbit`) for the output; the agents
measure their own link through the broker (`edgedi.agent.link_probe`) and announce
that, unless `link_mbit_s` / `link_latency_ms` are given, which they announce
instead. Each device's compute thread joins its quota group; the rest of the agent
(its event loop) runs in a second group of the same speed, so a busy compute
thread does not stall the device's messages for milliseconds; a leader's planning
process joins a third (`planner.cgroup_procs`), as a board would plan on another of
its cores instead of on its event loop's quota. Without root or
`ip`/`tc` the cluster falls back to loopback and `links.note` says why. With a
shaped link, the broker runs in its namespace from the start: its fault-injection
`restart()` would bring it back in the launcher's and is for loopback clusters.

Everything started here is stopped in `stop()` (also from `__exit__`, so on
Ctrl-C): agents get SIGTERM (they drain and announce `stopped`), then SIGKILL
after a grace period; the cgroups are removed; the broker is stopped; the emulated
network is removed; the log folder is deleted unless asked to keep it. Agents run
in their own process group, so a Ctrl-C in the terminal reaches only the launcher,
which stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal

from edgedi.agent.cluster_view import ClusterView, subscribe_view
from edgedi.agent.config import BrokerSettings
from edgedi.agent.connection import describe, session_settings, tls_context
from edgedi.agent.link_emulation import (
    LINK_RATES_MBIT,
    EmulatedNetwork,
    LinkEmulationError,
    LinkName,
    Links,
    detect,
)
from edgedi.broker.connection import MqttSession
from edgedi.broker.server import BrokerHandle, Preference, start_broker
from edgedi.broker.topics import DEFAULT_PREFIX, TopicRoot

__all__ = [
    "AgentProcess",
    "Calibration",
    "ClusterError",
    "CpuQuotas",
    "Emulation",
    "EmulationChoice",
    "LocalCluster",
    "calibrate_profile",
    "default_speeds",
]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EmulationMethod = Literal["cgroup-v1", "cgroup-v2", "paced", "slowdown", "none"]
EmulationChoice = Literal["auto", "quota", "paced", "slowdown", "none"]

# The relative speeds of a default cluster, repeated for more devices: two faster
# boards and two slower ones, like a Pi 4 / Pi 3 mix (EdgeDI rates them 1.5 : 1).
SPEED_PATTERN: Final = (0.4, 0.4, 0.25, 0.25)
# The agents together get at most this share of the machine's cores: the rest is for
# the broker, the client and the operating system, so no agent waits for a CPU.
CORE_BUDGET: Final = 0.65
# A short period keeps throttling stalls short (a throttled agent answers a gate round
# late by up to period - quota), a long one wastes less on throttling: measured here,
# 5 ms delivers 0.4 core as asked (2.5 ms: 0.29). Quotas below 1 ms are refused by
# the kernel, hence the smallest fraction.
QUOTA_PERIOD_US: Final = 5_000
MIN_CORE_FRACTION: Final = 0.2
_CGROUP_V1: Final = Path("/sys/fs/cgroup/cpu")
_CGROUP_V2: Final = Path("/sys/fs/cgroup")
_GROUP_PARENT: Final = "edgedi-local"
_STOP_GRACE_S: Final = 10.0
_KILL_WAIT_S: Final = 5.0


class ClusterError(RuntimeError):
    """The local cluster could not start or become ready (the message says why)."""


def default_speeds(count: int, cores: int | None = None) -> tuple[float, ...]:
    """Core fractions for `count` devices: the pattern 0.4/0.4/0.25/0.25, scaled down
    when needed so all together use at most `CORE_BUDGET` of the cores (each at least
    `MIN_CORE_FRACTION`), fastest first."""
    if count < 1:
        raise ValueError("a cluster needs at least one device")
    cores = cores or os.cpu_count() or 1
    speeds = [SPEED_PATTERN[position % len(SPEED_PATTERN)] for position in range(count)]
    budget = CORE_BUDGET * cores
    total = sum(speeds)
    if total > budget:
        speeds = [speed * budget / total for speed in speeds]
    return tuple(sorted((max(MIN_CORE_FRACTION, round(s, 3)) for s in speeds), reverse=True))


@dataclass(frozen=True)
class Emulation:
    """How the devices' speeds were made: the method and each device's speed.

    `speeds` are fractions of one core (quotas) or relative speeds with the fastest
    at 1.0 (slowdown). `note` says why a fallback was taken, if one was.
    """

    method: EmulationMethod
    speeds: tuple[float, ...]
    cores: int
    note: str = ""
    measured: tuple[float, ...] | None = None
    """Speeds measured on the model's forward pass, in the same unit (quota groups)."""

    @property
    def effective(self) -> tuple[float, ...]:
        return self.measured if self.measured is not None else self.speeds

    @property
    def loops_under_quotas(self) -> bool:
        """Whether the agents' event loops run under quotas of their speeds (paced
        devices keep them there only where the compute thread can leave: cgroup v1;
        the note of a paced emulation says why not)."""
        return self.method.startswith("cgroup") or (self.method == "paced" and not self.note)

    @property
    def slowdowns(self) -> tuple[float, ...]:
        """Each agent's `--slowdown`: relative to the fastest (slowdown), or to a whole
        core (paced, whose speeds are core fractions)."""
        if self.method == "paced":
            return tuple(1.0 / speed for speed in self.speeds)
        fastest = max(self.speeds)
        return tuple(fastest / speed for speed in self.speeds)

    @property
    def ideal_speedup(self) -> float:
        """Speedup over the fastest device alone if work split perfectly and cost nothing
        to move: the summed speed over the fastest, capped by the cores there are."""
        speeds = self.effective
        fastest = max(speeds)
        if self.method == "none":
            return float(min(len(speeds), self.cores))
        if self.method == "slowdown":
            # Each agent needs a whole core while it computes; speeds are relative.
            return min(sum(speed / fastest for speed in speeds), float(self.cores))
        return min(sum(speeds), float(self.cores)) / fastest

    def describe(self) -> str:
        count = len(self.speeds)
        if self.method in ("cgroup-v1", "cgroup-v2"):
            version = self.method.split("-")[1]
            shares = "/".join(f"{speed:g}" for speed in self.speeds)
            text = (
                f"{count} agent process(es), one torch thread each, speeds emulated with "
                f"cgroup {version} CPU quotas of {shares} of a core (real parallelism: "
                f"{sum(self.speeds):.2f} of this machine's {self.cores} cores)"
            )
            if self.measured is not None:
                measured = "/".join(f"{speed:.2f}" for speed in self.measured)
                text += f"; measured on the model: {measured} of a core"
        elif self.method == "paced":
            shares = "/".join(f"{speed:g}" for speed in self.speeds)
            text = (
                f"{count} agent process(es), one torch thread each, compute paced to "
                f"{shares} of a core (each step takes its CPU time / speed; real "
                f"parallelism: {sum(self.speeds):.2f} of this machine's {self.cores} "
                "cores)"
            )
            if self.loops_under_quotas:
                text += ", event loops under CPU quotas of the same speeds"
        elif self.method == "slowdown":
            factors = "/".join(f"{factor:.2g}x" for factor in self.slowdowns)
            text = (
                f"{count} agent process(es), one torch thread each, speeds emulated with "
                f"--slowdown (sleeping after each step: {factors} slower) while sharing "
                f"this machine's {self.cores} cores: a rough emulation"
            )
        else:
            text = (
                f"{count} agent process(es), one torch thread each, no speed emulation "
                f"(sharing this machine's {self.cores} cores)"
            )
        return text + (f"; {self.note}" if self.note else "")


# --- cgroups ----------------------------------------------------------------------------


class CpuQuotas:
    """CPU-quota cgroups for the agents, one per device, under `<controller>/edgedi-local/`.

    Groups are named `<launcher pid>-<device>`; groups of launchers that died
    without cleaning up are removed when a new one starts.
    """

    def __init__(self, version: Literal[1, 2], base: Path) -> None:
        self.version = version
        self.parent = base / _GROUP_PARENT
        self.groups: list[Path] = []

    @classmethod
    def detect(cls) -> tuple[CpuQuotas | None, str]:
        """A usable quota controller, or None and why not."""
        if os.geteuid() != 0:
            return None, "not running as root, so no cgroup CPU quotas"
        if (_CGROUP_V1 / "cpu.cfs_quota_us").exists():
            quotas = cls(1, _CGROUP_V1)
        elif "cpu" in _read(_CGROUP_V2 / "cgroup.controllers").split():
            quotas = cls(2, _CGROUP_V2)
        else:
            return None, "no cgroup CPU controller found"
        try:
            quotas._prepare_parent()
        except OSError as error:
            return None, f"the cgroup CPU controller is not writable ({error.strerror})"
        return quotas, ""

    def _prepare_parent(self) -> None:
        self.parent.mkdir(exist_ok=True)
        if self.version == 2:
            # Let the children of our parent group have CPU limits of their own.
            for directory in (self.parent.parent, self.parent):
                control = directory / "cgroup.subtree_control"
                if "cpu" not in _read(control).split():
                    control.write_text("+cpu")
        # A quota caps a device's speed but does not guarantee it: other work on the
        # machine (a test run, a build) would slow the emulated devices below their
        # quotas. A high weight lets the devices take their quotas first.
        weight = ("cpu.shares", "8192") if self.version == 1 else ("cpu.weight", "800")
        with contextlib.suppress(OSError):
            (self.parent / weight[0]).write_text(weight[1])
        self._remove_stale()
        probe = self.create(f"probe-{uuid.uuid4().hex[:8]}", 0.5)
        self.remove(probe)

    def _remove_stale(self) -> None:
        for group in self.parent.iterdir():
            owner = group.name.split("-", 1)[0]
            if group.is_dir() and owner.isdigit() and not _pid_alive(int(owner)):
                with contextlib.suppress(OSError):
                    group.rmdir()

    def create(self, name: str, cores: float | None, period_us: int = QUOTA_PERIOD_US) -> Path:
        """A group limited to `cores` of one core, or not limited (None); OSError when
        the kernel refuses."""
        group = self.parent / f"{os.getpid()}-{name}"
        group.mkdir()
        self.groups.append(group)
        quota = None if cores is None else max(1000, int(period_us * cores))
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(-1 if quota is None else quota))
        else:
            (group / "cpu.max").write_text(f"{'max' if quota is None else quota} {period_us}")
        return group

    def add(self, group: Path, pid: int) -> None:
        (group / "cgroup.procs").write_text(str(pid))

    @contextlib.contextmanager
    def joined(self, group: Path) -> Iterator[None]:
        """Run the calling thread (only it) inside `group` for the block (v1 only)."""
        if self.version != 1:
            raise OSError(errno.ENOTSUP, "moving one thread needs cgroup v1")
        thread = threading.get_native_id()
        home = _CGROUP_V1 / _own_cpu_group(thread).lstrip("/")
        (group / "tasks").write_text(str(thread))
        try:
            yield
        finally:
            (home / "tasks").write_text(str(thread))

    def remove(self, group: Path) -> bool:
        """Delete an (emptied) group; False if it is still busy after a few tries."""
        for _attempt in range(50):
            try:
                group.rmdir()
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno != errno.EBUSY:
                    logger.warning("could not remove cgroup %s: %s", group, error)
                    return False
                time.sleep(0.02)  # exited processes leave the group a moment later
                continue
            break
        else:
            logger.warning("cgroup %s still has processes; left in place", group)
            return False
        if group in self.groups:
            self.groups.remove(group)
        return True

    def remove_all(self) -> None:
        for group in list(self.groups):
            self.remove(group)
        with contextlib.suppress(OSError):  # still holds another launcher's groups
            self.parent.rmdir()


def _own_cpu_group(thread: int) -> str:
    """The v1 cpu cgroup of one of our threads, e.g. `/` or `/user.slice`."""
    for line in _read(Path(f"/proc/self/task/{thread}/cgroup")).splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "/"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the profile the agents announce ------------------------------------------------------

ProfileTable = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Calibration:
    """One unthrottled core of this machine, as the planner should see it."""

    table: ProfileTable
    """Per cost class `(seconds_per_mac, seconds_fixed)`, calibrated."""
    measured_forward_s: float
    """Mean time of the model's whole forward pass on one thread."""
    predicted_forward_s: float
    """What the uncalibrated micro-benchmark profile predicted for it."""

    @property
    def factor(self) -> float:
        return self.measured_forward_s / self.predicted_forward_s

    def describe(self, model: str) -> str:
        return (
            f"one core of this machine runs {model} in {self.measured_forward_s * 1000:.3g} ms "
            f"(the agents' micro-benchmark profile predicts {self.predicted_forward_s * 1000:.3g}"
            f" ms: calibrated x{self.factor:.2f})"
        )


def forward_seconds(
    network: torch.nn.Module, image: torch.Tensor, repeats: int, min_seconds: float = 0.3
) -> float:
    """Mean time of `network(image)` on the calling thread, after one warm-up call.

    At least `repeats` runs and `min_seconds` in all: under a CPU quota a short run
    can finish before the group is throttled, so only a mean over many quota
    periods shows the speed the quota allows.
    """
    import torch

    runs = 0
    with torch.inference_mode():
        network(image)  # first-call allocations
        started = time.perf_counter()
        while runs < max(1, repeats) or time.perf_counter() - started < min_seconds:
            network(image)
            runs += 1
        return (time.perf_counter() - started) / runs


def _connection_environment(broker: BrokerSettings) -> dict[str, str]:
    """The account and TLS settings of `broker` as an agent reads them from its environment."""
    values = {
        "USERNAME": broker.username,
        "PASSWORD": broker.password,
        "TLS": "true" if broker.tls else None,
        "TLS_CA_FILE": broker.tls_ca_file,
        "TLS_CERTFILE": broker.tls_certfile,
        "TLS_KEYFILE": broker.tls_keyfile,
    }
    return {f"EDGEDI_BROKER__{k}": str(v) for k, v in values.items() if v is not None}


def calibrate_profile(
    model: str,
    input_size: int,
    budget_s: float = 2.0,
    repeats: int = 5,
    *,
    network: torch.nn.Module | None = None,
) -> Calibration:
    """Measure one thread here: the agents' micro-benchmark, calibrated on `model`.

    Blocking, and uses torch in this process with one thread (the caller sets
    `torch.set_num_threads(1)` first); run it before the agents start so that
    nothing competes with it.
    """
    import torch

    from edgedi.agent.device import measure_profile
    from edgedi.models.specs import get_spec
    from edgedi.models.zoo import build_model
    from edgedi.planner.profiles import DeviceProfile, TimeModel
    from edgedi.planner.strategies import get_strategy

    raw = measure_profile(budget_s, 1)
    if network is None:
        network = build_model(model, input_size, seed=0).eval()
    measured = forward_seconds(network, torch.randn(1, 1, input_size, input_size), repeats)
    profile = DeviceProfile(
        device="calibration",
        time_models={
            name: TimeModel(seconds_per_mac=a, seconds_fixed=b)  # type: ignore[misc]
            for name, (a, b) in raw.items()
        },
        memory_bytes=1 << 40,
        bandwidth=1e12,
    )
    plan = get_strategy("single").plan(
        get_spec(model, input_size), [profile], leader="calibration", plan_id="calibration"
    )
    predicted = max(plan.predicted_latency_s, 1e-9)
    factor = measured / predicted
    table = {name: (a * factor, b * factor) for name, (a, b) in raw.items()}
    return Calibration(table, measured, predicted)


def _store_profile(state_dir: Path, table: ProfileTable) -> None:
    """Leave `table` where the agent looks for its cached profile (one torch thread)."""
    from edgedi.agent.device import store_profile  # torch: only when a cluster starts

    state_dir.mkdir(parents=True, exist_ok=True)
    store_profile(state_dir, table, threads=1)


# --- the cluster ------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """One agent subprocess."""

    device_id: str
    speed: float
    process: subprocess.Popen[bytes]
    log_path: Path
    cgroup: Path | None = None
    command: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


class LocalCluster:
    """A private broker and N local agent processes of different speeds (module docstring)."""

    def __init__(
        self,
        devices: int = 4,
        *,
        speeds: Sequence[float] | None = None,
        model: str = "vgg16-edgedi",
        models: Sequence[str] | None = None,
        input_size: int = 200,
        strategy: str | None = None,
        emulation: EmulationChoice = "auto",
        cluster: str = "default",
        topic_prefix: str = DEFAULT_PREFIX,
        profile_seconds: float = 2.0,
        calibrate: bool = True,
        calibration: Calibration | None = None,
        link_mbit_s: float | None = None,
        link_latency_ms: float | None = None,
        link: LinkName = "loopback",
        quota_period_us: int = QUOTA_PERIOD_US,
        broker: Preference = "auto",
        log_dir: Path | None = None,
        extra_agent_args: Sequence[str] = (),
        connection: BrokerSettings | None = None,
    ) -> None:
        cores = os.cpu_count() or 1
        chosen = tuple(speeds) if speeds is not None else default_speeds(devices, cores)
        if len(chosen) != devices or any(speed <= 0 for speed in chosen):
            raise ValueError(f"need {devices} positive speeds, got {chosen}")
        self.speeds = chosen
        self.cores = cores
        self.model = model
        self.models = tuple(models) if models is not None else (model,)
        self.input_size = input_size
        self.strategy = strategy
        self.emulation_choice = emulation
        self.root = TopicRoot(topic_prefix, cluster)
        self.profile_seconds = profile_seconds
        self.calibrate = calibrate
        self.calibration: Calibration | None = calibration
        """Given: reused (several clusters of one benchmark plan from one measurement)."""
        self.link_mbit_s = link_mbit_s
        self.link_latency_ms = link_latency_ms
        self.link: LinkName = link
        self.links: Links | None = None
        self._network: EmulatedNetwork | None = None
        self.quota_period_us = quota_period_us
        self.broker_preference: Preference = broker
        self.connection = connection
        """An existing broker to run on instead of a private one: its address, account
        and TLS settings go to every agent and to the observers (`cluster`/`topic_root`
        are this cluster's, from the arguments above)."""
        self.extra_agent_args = tuple(extra_agent_args)
        self.device_ids = tuple(f"dev-{position + 1}" for position in range(devices))
        self.agents: list[AgentProcess] = []
        self.broker: BrokerHandle | None = None
        self.emulation: Emulation | None = None
        self._quotas: CpuQuotas | None = None
        self._groups: dict[str, Path] = {}
        self._loop_groups: dict[str, Path] = {}
        self._plan_groups: dict[str, Path] = {}
        self._own_log_dir = log_dir is None
        # Only a name until `start()` creates it: constructing starts nothing.
        self.log_dir = log_dir or Path(tempfile.gettempdir()) / (
            f"edgedi-cluster-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._stopped = False

    # --- addresses --------------------------------------------------------------------

    @property
    def host(self) -> str:
        if self.connection is not None:
            return self.connection.host
        if self.broker is None:
            raise ClusterError("the cluster is not started")
        return self.broker.host

    @property
    def port(self) -> int:
        if self.connection is not None:
            return self.connection.port
        if self.broker is None:
            raise ClusterError("the cluster is not started")
        return self.broker.port

    def connection_settings(self) -> BrokerSettings:
        """How a client reaches this cluster (edgedi.agent.connection)."""
        base = self.connection or BrokerSettings(host=self.host, port=self.port)  # type: ignore[call-arg]
        return base.model_copy(
            update={"cluster": self.root.cluster, "topic_root": self.root.prefix}
        )

    @property
    def broker_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def fastest(self) -> str:
        """The fastest device (the first of equals): what `single` should pick."""
        speeds = self.emulation.effective if self.emulation is not None else self.speeds
        best = max(range(len(speeds)), key=lambda position: (speeds[position], -position))
        return self.device_ids[best]

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and the agents (returns at once; see `wait_ready`)."""
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.emulation = self._choose_emulation()
        if self._quotas is not None:
            for device, speed in zip(self.device_ids, self.speeds, strict=True):
                try:
                    # Paced: the compute thread keeps its own pace (agent.pacing) and
                    # must not also be throttled; its loop is, as under quotas.
                    compute_speed = None if self.emulation.method == "paced" else speed
                    self._groups[device] = self._quotas.create(
                        device, compute_speed, self.quota_period_us
                    )
                    if self._quotas.version == 1:
                        # The agent's own threads (its event loop) get a group of the
                        # same speed; its compute thread joins the device's group.
                        self._loop_groups[device] = self._quotas.create(
                            f"{device}-loop", speed, self.quota_period_us
                        )
                    # A leader plans in a process of its own, as a board would on
                    # another of its cores: not on its event loop's quota.
                    self._plan_groups[device] = self._quotas.create(
                        f"{device}-plan", speed, self.quota_period_us
                    )
                except OSError as error:
                    raise ClusterError(
                        f"cannot create the CPU quota group of {device}: {error}"
                    ) from None
        if self.calibrate:
            self._calibrate()
        if self.connection is not None and self.link != "loopback":
            raise ClusterError("emulated links need the cluster's own broker, not an existing one")
        self.links = self._start_network()
        if self.connection is not None:
            logger.info("existing broker on %s", describe(self.connection))
        elif self._network is None:
            self.broker = start_broker("127.0.0.1", 0, self.broker_preference)
        else:
            with self._network.inside("broker"):
                self.broker = start_broker(
                    self._network.address("broker"), 0, self.broker_preference
                )
        if self.broker is not None:
            logger.info("private %s broker on %s", self.broker.kind, self.broker_address)
        for position, device in enumerate(self.device_ids):
            self.agents.append(self._spawn(position, device))

    def _start_network(self) -> Links:
        """The emulated LAN of `link`, built and measured, or loopback (and why)."""
        if self.link == "loopback":
            return Links("loopback")
        why = detect()
        if why:
            note = f"asked for {self.link} links, but {why}: loopback instead"
            logger.warning("%s", note)
            return Links("loopback", note=note)
        rate = LINK_RATES_MBIT[self.link]
        self._network = EmulatedNetwork(rate, ("broker", *self.device_ids))
        try:
            self._network.create()
            measured = self._network.measure_mbit(self.device_ids[0], "broker")
        except LinkEmulationError as error:
            raise ClusterError(f"cannot build the {self.link} links: {error}") from None
        logger.info("links: %d Mbit/s configured, %.1f measured", rate, measured)
        return Links(self.link, rate, measured, self._network.netem)

    def _choose_emulation(self) -> Emulation:
        choice = self.emulation_choice
        if choice == "none":
            return Emulation("none", self.speeds, self.cores)
        if choice == "paced":
            quotas, why = CpuQuotas.detect()
            if quotas is not None and quotas.version == 1:
                self._quotas = quotas
                return Emulation("paced", self.speeds, self.cores)
            why = why or "moving the compute thread out of the quota group needs cgroup v1"
            return Emulation("paced", self.speeds, self.cores, f"{why}: event loops unthrottled")
        note = ""
        if choice in ("auto", "quota"):
            quotas, why = CpuQuotas.detect()
            if quotas is not None:
                self._quotas = quotas
                method: EmulationMethod = "cgroup-v1" if quotas.version == 1 else "cgroup-v2"
                return Emulation(method, self.speeds, self.cores)
            if choice == "quota":
                raise ClusterError(f"CPU quotas are not available: {why}")
            note = f"{why}, so --slowdown instead"
        fastest = max(self.speeds)
        relative = tuple(speed / fastest for speed in self.speeds)
        return Emulation("slowdown", relative, self.cores, note)

    def _command(self, position: int, device: str) -> list[str]:
        assert self.emulation is not None
        network = self._network
        command = [
            *(network.exec_prefix(device) if network is not None else ()),
            sys.executable,
            "-m",
            "edgedi.agent.cli",
            "agent",
            "--broker",
            self.broker_address,
            "--id",
            device,
            "--cluster",
            self.root.cluster,
            "--topic-root",
            self.root.prefix,
            "--threads",
            "1",
            "--models",
            *self.models,
            "--plan-model",
            self.model,
            "--input-size",
            str(self.input_size),
            "--profile-seconds",
            f"{self.profile_seconds:g}",
            *(() if self.link_mbit_s is None else ("--link-mbit", f"{self.link_mbit_s:g}")),
            *(
                ()
                if self.link_latency_ms is None
                else ("--link-latency-ms", f"{self.link_latency_ms:g}")
            ),
            # The fastest device first in rank: it leads, and `single` is it alone.
            "--priority",
            str(position),
            "--log-level",
            "info",
        ]
        if self.strategy is not None:
            command += ["--strategy", self.strategy]
        if self.emulation.method in ("slowdown", "paced"):
            command += ["--slowdown", f"{self.emulation.slowdowns[position]:.4f}"]
        if self.calibration is not None:
            command += ["--state-dir", str(self._state_dir(device))]
        return command + list(self.extra_agent_args)

    def _calibrate(self) -> None:
        import torch

        from edgedi.models.zoo import build_model

        assert self.emulation is not None
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            network = build_model(self.model, self.input_size, seed=0).eval()
            calibration = self.calibration or calibrate_profile(
                self.model, self.input_size, self.profile_seconds, network=network
            )
            self.calibration = calibration
            logger.info("%s", calibration.describe(self.model))
            if (
                self._quotas is None
                or self._quotas.version != 1
                or self.emulation.method == "paced"  # exact by construction
            ):
                return
            image = torch.randn(1, 1, self.input_size, self.input_size)
            measured = []
            for device in self.device_ids:
                with self._quotas.joined(self._groups[device]):
                    seconds = forward_seconds(network, image, 3)
                measured.append(calibration.measured_forward_s / seconds)
            # Devices with the same quota are the same device: their differences are
            # noise, and must not make the planner prefer one of them.
            by_quota: dict[float, list[float]] = {}
            for speed, value in zip(self.speeds, measured, strict=True):
                by_quota.setdefault(speed, []).append(value)
            averaged = tuple(
                round(sum(by_quota[speed]) / len(by_quota[speed]), 3) for speed in self.speeds
            )
            self.emulation = dataclasses.replace(self.emulation, measured=averaged)
        finally:
            torch.set_num_threads(previous)

    def _state_dir(self, device: str) -> Path:
        return self.log_dir / f"{device}-state"

    def _spawn(self, position: int, device: str) -> AgentProcess:
        command = self._command(position, device)
        if self.calibration is not None:
            assert self.emulation is not None
            # A quota of s cores makes the device 1/s times slower than one core; with
            # --slowdown the agent scales the cached profile itself.
            quota = self.emulation.method.startswith("cgroup")
            divisor = self.emulation.effective[position] if quota else 1.0
            _store_profile(
                self._state_dir(device),
                {
                    name: (a / divisor, b / divisor)
                    for name, (a, b) in self.calibration.table.items()
                },
            )
        group = self._groups.get(device)
        loop_group = self._loop_groups.get(device)
        environment = dict(os.environ)
        # One thread per library pool too: a device here is a single core's worth.
        environment.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        if group is not None and loop_group is not None:
            environment["EDGEDI_COMPUTE__CGROUP_TASKS"] = str(group / "tasks")
        plan_group = self._plan_groups.get(device)
        if plan_group is not None:
            environment["EDGEDI_PLANNER__CGROUP_PROCS"] = str(plan_group / "cgroup.procs")
        if self.connection is not None:
            # The environment, not flags: a password on a command line is in `ps`.
            environment.update(_connection_environment(self.connection))
        log_path = self.log_dir / f"{device}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                process_group=0,
            )
        if group is not None and self._quotas is not None:
            try:
                # Within milliseconds of the start: the interpreter is still loading.
                self._quotas.add(loop_group or group, process.pid)
            except OSError as error:
                process.kill()
                process.wait()
                raise ClusterError(f"cannot put {device} in its CPU quota group: {error}") from None
        logger.info("started %s (pid %d, speed %g)", device, process.pid, self.speeds[position])
        return AgentProcess(device, self.speeds[position], process, log_path, group, command)

    # --- fault injection (benchmarks and tests) -----------------------------------------

    def agent(self, device: str) -> AgentProcess:
        for agent in self.agents:
            if agent.device_id == device:
                return agent
        raise ClusterError(f"no device {device} in this cluster")

    def kill(self, device: str) -> None:
        """SIGKILL one agent: no drain, no goodbye (the broker publishes its Will)."""
        agent = self.agent(device)
        with contextlib.suppress(ProcessLookupError):
            agent.process.kill()
        agent.process.wait(timeout=_KILL_WAIT_S)

    def freeze(self, device: str) -> None:
        """SIGSTOP one agent: it stalls with its connection open (a hung device)."""
        self.agent(device).process.send_signal(signal.SIGSTOP)

    def thaw(self, device: str) -> None:
        self.agent(device).process.send_signal(signal.SIGCONT)

    def restart(self, device: str) -> None:
        """Start a killed agent again, as systemd's Restart= would (same settings)."""
        agent = self.agent(device)
        if agent.running:
            raise ClusterError(f"{device} is still running")
        position = self.device_ids.index(device)
        self.agents[self.agents.index(agent)] = self._spawn(position, device)

    def failed_agents(self) -> list[AgentProcess]:
        return [agent for agent in self.agents if not agent.running]

    def _failure_report(self, agents: Sequence[AgentProcess], lines: int = 25) -> str:
        parts = []
        for agent in agents:
            code = agent.process.poll()
            status = "running" if code is None else f"exit status {code}"
            parts.append(
                f"--- {agent.device_id} ({status}), last lines of {agent.log_path}:\n"
                f"{agent.log_tail(lines)}"
            )
        return "\n".join(parts)

    async def wait_ready(self, timeout: float = 120.0) -> ClusterView:  # noqa: ASYNC109
        """Until every agent is online, a leader is elected and its plan covers them all.

        Raises `ClusterError` (with the end of the relevant agents' logs) when an
        agent exits or `timeout` runs out.
        """
        if self.broker is None and self.connection is None:
            raise ClusterError("the cluster is not started")
        view = ClusterView()
        broker = self.connection_settings()
        settings = session_settings(broker, f"observer-{uuid.uuid4().hex[:12]}")
        session = MqttSession(settings, self.root, tls_context=tls_context(broker))
        await subscribe_view(session, view)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(session.run(), name="cluster-observer")
            try:
                while True:
                    failed = self.failed_agents()
                    if failed:
                        raise ClusterError(
                            f"{len(failed)} agent(s) exited while the cluster was starting:\n"
                            + self._failure_report(failed)
                        )
                    missing = view.missing_for(self.device_ids)
                    if not missing and session.connected.is_set():
                        return view
                    if loop.time() >= give_up:
                        waiting = [
                            agent
                            for agent in self.agents
                            if agent.device_id not in view.online()
                            or (view.leader is None and agent.device_id == self.device_ids[0])
                        ] or self.agents[:1]
                        raise ClusterError(
                            f"the cluster was not ready after {timeout:.0f} s: "
                            f"{'; '.join(missing)}\n" + self._failure_report(waiting)
                        )
                    await asyncio.sleep(0.1)
            finally:
                session.request_stop()
                await runner

    def wait_ready_sync(self, timeout: float = 120.0) -> ClusterView:
        return asyncio.run(self.wait_ready(timeout))

    def stop(self, *, keep_logs: bool = False) -> None:
        """Stop agents, remove their cgroups, stop the broker, remove the network (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._stop_agents()
        finally:
            if self._quotas is not None:
                self._quotas.remove_all()
            try:
                if self.broker is not None:
                    self.broker.stop()
            finally:
                if self._network is not None:
                    self._network.remove()
            if self._own_log_dir and not keep_logs:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def _stop_agents(self) -> None:
        for agent in self.agents:
            if agent.running:
                with contextlib.suppress(ProcessLookupError):
                    agent.process.send_signal(signal.SIGCONT)  # a frozen agent cannot drain
                    agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for agent in self.agents:
            try:
                agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not stop within %.0f s; killing it", agent.device_id, _STOP_GRACE_S
                )
                agent.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    agent.process.wait(timeout=_KILL_WAIT_S)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
