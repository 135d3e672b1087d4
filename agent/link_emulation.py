"""Emulated Ethernet links on one machine: network namespaces, a bridge and `tc tbf`.

Every figure measured on loopback hides what a transfer costs on a real cluster
(Raspberry Pis on 100 Mbit/s or 1 Gbit/s Ethernet). This module builds that LAN
here, as root, out of kernel objects that all disappear with their namespaces:

    launcher (root namespace)          edgedi-<pid>-<tag>-hub
      edgedi-<tag> ---- veth ---- host   ┐
    edgedi-<pid>-<tag>-broker            │
      eth0         ---- veth ---- n0     ├─ bridge br0
    edgedi-<pid>-<tag>-dev-1             │
      eth0         ---- veth ---- n1     ┘

- One namespace per node (the broker, each device): a process started there sees
  only its `lo` and its `eth0`, with an address in a private 10.213.N.0/24.
- The bridge lives in a hub namespace of its own, not in the root one: the root
  namespace may pass bridged frames through its firewall (`bridge-nf-call-iptables`,
  set on this machine) and Docker-style FORWARD policies would then drop them.
- The launcher (the client that submits images, the observer) stays in the root
  namespace and reaches the bridge through one veth with the subnet's first
  address: existing clients connect unchanged. The subnet is the first 10.213.N.0/24
  that the root namespace has no route for, and nothing routes beyond it: traffic
  only ever goes between the namespaces created here.
- Every link is shaped in both directions with `tbf` at the same rate, on the egress
  of each veth end (node side: its upload; hub side: its download), the broker's and
  the launcher's too: the broker carries everyone's traffic, as a gateway does.
- No delay or loss is added: that would need `netem`, which this machine's kernel
  lacks (`EmulatedNetwork.netem` says whether it exists); links have LAN latency.

Names start with `edgedi-` and carry the launcher's pid (the root-side veth carries it
in its alias), so the leftovers of a launcher that died without cleaning up (SIGKILL,
power loss) are recognised and removed when the next network is created.
`remove()` deletes everything by name, so it also cleans up a half-built network.

    with EmulatedNetwork(100, ["broker", "dev-1"]) as network:
        with network.inside("broker"):
            server = socket.create_server((network.address("broker"), 0))
        command = [*network.exec_prefix("dev-1"), "python", ...]
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal

__all__ = [
    "LINK_RATES_MBIT",
    "EmulatedNetwork",
    "LinkEmulationError",
    "LinkName",
    "Links",
    "detect",
    "remove_stale",
]

logger = logging.getLogger(__name__)

LinkName = Literal["loopback", "100mbit", "1gbit"]
LINK_RATES_MBIT: Final[dict[str, int]] = {"100mbit": 100, "1gbit": 1000}

PREFIX: Final = "edgedi-"
_ALIAS_PREFIX: Final = "edgedi launcher "
_NAMESPACE_PATTERN: Final = re.compile(r"^edgedi-(\d+)-[0-9a-f]+-")
_SUBNET_BASE: Final = "10.213"
_HOST_NODE: Final = "host"
_NETNS_DIR: Final = "/run/netns"  # where `ip netns add` keeps its namespaces
# tbf lets a burst through at the veth's own speed (~15 Gbit/s): 1 ms of traffic at
# the link rate keeps that burst no faster than the link for more than a millisecond,
# and is still well above the timer granularity that a 1 Gbit/s rate needs (measured
# here: 95.8 of 100 and 958 of 1000 Mbit/s with TCP).
_BURST_SECONDS: Final = 0.001
# How long a packet may wait in a tbf queue before it is dropped: a switch port's
# buffer, small enough that a bulk transfer does not add much queueing delay.
_QUEUE_LATENCY: Final = "20ms"
# A rate measurement sends for this long, at most this multiple of what the rate
# allows in that time (so a link that is not shaped cannot make it move gigabytes).
_MEASURE_SECONDS: Final = 0.4
_MEASURE_BYTE_FACTOR: Final = 2.0
_MEASURE_TIMEOUT_S: Final = 5.0
_COMMAND_TIMEOUT_S: Final = 10.0
_CLONE_NEWNET: Final = 0x40000000
_SEARCH_PATH: Final = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class LinkEmulationError(RuntimeError):
    """An `ip` or `tc` command failed, or the network could not be built (says which)."""


@dataclass(frozen=True)
class Links:
    """What links a cluster got, for the people reading its output."""

    name: LinkName
    rate_mbit: int | None = None
    """The configured rate of every link, None on loopback."""
    measured_mbit: float | None = None
    """Measured once with TCP from a device to the broker."""
    netem: bool = False
    note: str = ""
    """Why a shaped link was asked for and not given, if it was not."""

    @property
    def label(self) -> str:
        return "loopback" if self.rate_mbit is None else f"tbf {self.rate_mbit} Mbit/s links"

    def describe(self) -> str:
        """One line: the rate, as configured and measured, and what is not emulated."""
        if self.rate_mbit is None:
            text = "loopback (no shaping)"
            return f"{text}; {self.note}" if self.note else text
        measured = (
            f", measured {self.measured_mbit:.1f} Mbit/s agent→broker"
            if self.measured_mbit is not None
            else ""
        )
        why = "netem is not used" if self.netem else "netem is unavailable on this kernel"
        return (
            f"tbf {self.rate_mbit} Mbit/s each way on every device's link (broker and client "
            f"too){measured}; no added latency or loss ({why})"
        )

    @property
    def caveat(self) -> str:
        """How these links differ from a real LAN, for the demo's honesty line."""
        if self.rate_mbit is None:
            return "the links are loopback, so a transfer costs far less than on a real LAN"
        return (
            f"the links are shaped to {self.rate_mbit} Mbit/s but add no latency or loss, "
            "so a message costs a little less than on a real LAN"
        )


# --- running ip and tc ------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """Path of `ip`, `tc` or `nsenter`: Debian installs them in /usr/sbin, often not on PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SEARCH_PATH:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(*arguments: str) -> str:
    """Run an `ip` / `tc` command; its stdout, or `LinkEmulationError` with its stderr."""
    executable = _tool(arguments[0])
    if executable is None:
        raise LinkEmulationError(f"`{arguments[0]}` is not installed (package iproute2)")
    command = [executable, *arguments[1:]]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=True
        )
    except subprocess.CalledProcessError as error:
        message = (error.stderr or error.stdout or "").strip()
        raise LinkEmulationError(
            f"`{' '.join(arguments)}` failed (exit {error.returncode}): {message}"
        ) from None
    except subprocess.TimeoutExpired:
        raise LinkEmulationError(
            f"`{' '.join(arguments)}` did not finish within {_COMMAND_TIMEOUT_S:.0f} s"
        ) from None
    return completed.stdout


def _namespaces() -> list[str]:
    names = []
    for line in _run("ip", "netns", "list").splitlines():
        if line.strip():
            names.append(line.split()[0])
    return names


def _root_links() -> dict[str, str]:
    """Our links in the root namespace, name → alias."""
    links = json.loads(_run("ip", "-j", "link", "show") or "[]")
    return {
        link["ifname"]: link.get("ifalias", "")
        for link in links
        if link.get("ifname", "").startswith(PREFIX)
    }


def _delete_namespace(name: str) -> None:
    with contextlib.suppress(LinkEmulationError):  # already gone
        _run("ip", "netns", "delete", name)


def _delete_link(name: str) -> None:
    with contextlib.suppress(LinkEmulationError):  # already gone (its peer's namespace went)
        _run("ip", "link", "delete", name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces and root links of launchers that are no longer running.

    Returns what was removed. Another live launcher's network is left alone.
    """
    removed = []
    for name in _namespaces():
        match = _NAMESPACE_PATTERN.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            removed.append(name)
    for name, alias in _root_links().items():
        owner = alias.removeprefix(_ALIAS_PREFIX)
        if alias.startswith(_ALIAS_PREFIX) and owner.isdigit() and not _pid_alive(int(owner)):
            _delete_link(name)
            removed.append(name)
    if removed:
        logger.info("removed leftovers of an earlier run: %s", ", ".join(removed))
    return removed


def detect() -> str:
    """Why emulated links cannot be built here, or "" when they can.

    Checks root, the tools, and then the kernel by building a throwaway namespace
    with a bridge, a veth pair and a tbf qdisc (a missing module fails there, with
    the kernel's message).
    """
    if os.geteuid() != 0:
        return "not running as root, so no network namespaces"
    missing = [tool for tool in ("ip", "tc") if _tool(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (package iproute2)"
    probe = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}-probe"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", probe, "link", "add", "end0", "type", "veth", "peer", "name", "end1")
        _run("ip", "-n", probe, "link", "set", "end0", "master", "br0")
        _run("ip", "-n", probe, "link", "set", "end1", "up")
        _run("tc", "-n", probe, "qdisc", "add", "dev", "end1", "root", *_tbf(100))
    except LinkEmulationError as error:
        return f"this kernel cannot build emulated links: {error}"
    finally:
        _delete_namespace(probe)
    return ""


def _tbf(rate_mbit: int) -> list[str]:
    burst = max(int(rate_mbit * 1e6 / 8 * _BURST_SECONDS), 2 * 1514)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", _QUEUE_LATENCY]


# --- entering a namespace from Python ------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    # os.setns arrives with Python 3.12; until then, libc's.
    return ctypes.CDLL(None, use_errno=True)


def _setns(descriptor: int) -> None:
    if _libc().setns(descriptor, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def _entered(namespace: str) -> Iterator[None]:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"{_NETNS_DIR}/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


# --- the network ----------------------------------------------------------------------------


class EmulatedNetwork:
    """Namespaces for `nodes`, joined by shaped veths to a bridge (module docstring).

    `create()` builds it (removing stale leftovers of dead launchers first),
    `remove()` deletes all of it; used as a context manager, both happen.
    """

    def __init__(self, rate_mbit: int, nodes: Sequence[str]) -> None:
        if rate_mbit <= 0:
            raise ValueError("a link rate must be positive")
        if len(set(nodes)) != len(nodes) or _HOST_NODE in nodes:
            raise ValueError(f"node names must be distinct and not {_HOST_NODE!r}: {nodes}")
        if len(nodes) > 250:
            raise ValueError("at most 250 nodes share one /24")
        self.rate_mbit = rate_mbit
        self.nodes = tuple(nodes)
        tag = uuid.uuid4().hex[:6]
        self._prefix = f"{PREFIX}{os.getpid()}-{tag}-"
        self.host_link = f"{PREFIX}{tag}"
        self.subnet = ""
        self.netem = False

    # --- names and addresses ------------------------------------------------------------

    def namespace(self, node: str) -> str:
        self._check(node)
        return f"{self._prefix}{node}"

    @property
    def hub(self) -> str:
        return f"{self._prefix}hub"

    def address(self, node: str) -> str:
        """The node's IPv4 address (`"host"`: the launcher's, in the root namespace)."""
        if not self.subnet:
            raise LinkEmulationError("the network is not created")
        position = 1 if node == _HOST_NODE else self.nodes.index(self._check(node)) + 2
        return f"{self.subnet}.{position}"

    @property
    def host_address(self) -> str:
        return self.address(_HOST_NODE)

    def exec_prefix(self, node: str) -> list[str]:
        """Prepend to a command to run it in the node's namespace.

        `nsenter --net` enters only the network namespace and execs the command in
        place (no fork), so the pid that `Popen` returns is the command's own:
        signals and cgroup placement reach it. `ip netns exec` (used where nsenter
        is missing) also mounts a sysfs of its own over /sys, which hides
        /sys/fs/cgroup: an agent's compute thread could not join its CPU quota
        group and shared its event loop's.
        """
        nsenter = _tool("nsenter")
        if nsenter is not None:
            return [nsenter, f"--net={_NETNS_DIR}/{self.namespace(node)}", "--"]
        ip = _tool("ip")
        if ip is None:
            raise LinkEmulationError("`ip` is not installed (package iproute2)")
        return [ip, "netns", "exec", self.namespace(node)]

    @contextlib.contextmanager
    def inside(self, node: str) -> Iterator[None]:
        """Run the calling thread (only it) in the node's namespace for the block.

        Sockets it opens there stay in that namespace afterwards, and threads and
        processes it starts meanwhile are born there: a broker started in the block
        listens on the node's address.
        """
        with _entered(self.namespace(node)):
            yield

    def _check(self, node: str) -> str:
        if node not in self.nodes:
            raise LinkEmulationError(f"no node {node!r} in this network ({', '.join(self.nodes)})")
        return node

    # --- building and removing ----------------------------------------------------------

    def create(self) -> None:
        """Build the network; on any failure, remove what was built and raise."""
        try:
            remove_stale()
            self.subnet = self._free_subnet()
            self._build()
        except BaseException:
            self.remove()
            raise
        logger.info(
            "emulated network %s.0/24: %d nodes at %d Mbit/s (hub %s)",
            self.subnet,
            len(self.nodes),
            self.rate_mbit,
            self.hub,
        )

    def _build(self) -> None:
        hub = self.hub
        shape = _tbf(self.rate_mbit)
        _run("ip", "netns", "add", hub)
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        for position, node in enumerate(self.nodes):
            namespace = self.namespace(node)
            port = f"n{position}"
            _run("ip", "netns", "add", namespace)
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            _run(
                "ip", "-n", hub, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", namespace,
            )  # fmt: skip
            self._attach(port)
            _run("ip", "-n", namespace, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")
            _run(
                "tc", "-n", namespace, "qdisc", "add", "dev", "eth0", "root", *_tbf(self.rate_mbit)
            )
        _run(
            "ip", "link", "add", self.host_link, "type", "veth",
            "peer", "name", _HOST_NODE, "netns", hub,
        )  # fmt: skip
        _run("ip", "link", "set", self.host_link, "alias", f"{_ALIAS_PREFIX}{os.getpid()}")
        self._attach(_HOST_NODE)
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_link)
        _run("ip", "link", "set", self.host_link, "up")
        _run("tc", "qdisc", "add", "dev", self.host_link, "root", *shape)
        self.netem = self._has_netem()

    def _attach(self, port: str) -> None:
        """Put a hub-side veth end on the bridge and shape its egress (the node's download)."""
        _run("ip", "-n", self.hub, "link", "set", port, "master", "br0")
        _run("ip", "-n", self.hub, "link", "set", port, "up")
        _run("tc", "-n", self.hub, "qdisc", "add", "dev", port, "root", *_tbf(self.rate_mbit))

    def _has_netem(self) -> bool:
        try:
            _run("tc", "-n", self.hub, "qdisc", "add", "dev", "lo", "root", "netem")
        except LinkEmulationError:
            return False
        _run("tc", "-n", self.hub, "qdisc", "del", "dev", "lo", "root")
        return True

    @staticmethod
    def _free_subnet() -> str:
        """The first 10.213.N that the root namespace has no route into."""
        routes = _run("ip", "-4", "route", "show", "table", "all")
        used = {int(found) for found in re.findall(rf"\b{_SUBNET_BASE}\.(\d+)\.", routes)}
        for third in range(256):
            if third not in used:
                return f"{_SUBNET_BASE}.{third}"
        raise LinkEmulationError(f"every {_SUBNET_BASE}.N.0/24 is routed already")

    def remove(self) -> None:
        """Delete the root-side link and every namespace of this network (idempotent).

        By name, not by a record of what was built: a network interrupted while
        being built is removed as completely as a finished one. Deleting a
        namespace deletes its interfaces, their veth peers and their qdiscs.
        """
        _delete_link(self.host_link)
        for name in _namespaces():
            if name.startswith(self._prefix):
                _delete_namespace(name)

    def __enter__(self) -> EmulatedNetwork:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    # --- measuring --------------------------------------------------------------------

    def measure_mbit(self, sender: str, receiver: str, seconds: float = _MEASURE_SECONDS) -> float:
        """The TCP throughput from `sender` to `receiver`, in Mbit/s.

        One connection for `seconds` (and at most twice the bytes the rate allows
        in that time), timed at the receiver from its first byte to the end.
        """
        try:
            received, elapsed = self._transfer(sender, receiver, seconds)
        except OSError as error:
            raise LinkEmulationError(f"measuring {sender} → {receiver}: {error}") from None
        return received * 8 / max(elapsed, 1e-9) / 1e6

    def _transfer(self, sender: str, receiver: str, seconds: float) -> tuple[int, float]:
        with self.inside(receiver):
            server = socket.create_server((self.address(receiver), 0))
        with self.inside(sender):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with server, client:
            server.settimeout(_MEASURE_TIMEOUT_S)
            client.settimeout(_MEASURE_TIMEOUT_S)
            outcome: list[tuple[int, float]] = []
            thread = threading.Thread(
                target=_receive, args=(server, outcome), name="link-measure", daemon=True
            )
            thread.start()
            client.connect(server.getsockname())
            budget = int(self.rate_mbit * 1e6 / 8 * seconds * _MEASURE_BYTE_FACTOR)
            chunk = bytes(1 << 16)
            sent = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and sent < budget:
                client.sendall(chunk)
                sent += len(chunk)
            client.shutdown(socket.SHUT_WR)
            thread.join(_MEASURE_TIMEOUT_S)
        if not outcome:
            raise LinkEmulationError(f"no rate measured from {sender} to {receiver}")
        return outcome[0]


def _receive(server: socket.socket, outcome: list[tuple[int, float]]) -> None:
    """Read one connection to its end; record (bytes, seconds since the first byte)."""
    try:
        connection, _address = server.accept()
    except OSError as error:
        logger.warning("link measurement: no connection (%s)", error)
        return
    with connection:
        connection.settimeout(_MEASURE_TIMEOUT_S)
        received = 0
        first = None
        try:
            while data := connection.recv(1 << 16):
                if first is None:
                    first = time.perf_counter()
                received += len(data)
        except OSError as error:
            logger.warning("link measurement interrupted: %s", error)
            return
    if first is not None:
        outcome.append((received, time.perf_counter() - first))
