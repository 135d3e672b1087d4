"""Start a private MQTT broker: Mosquitto when the binary exists, else embedded amqtt.

- `start_broker(host, port, prefer)` — synchronous; returns a `BrokerHandle`
  (host, port, kind, `stop()`, usable as a context manager). `prefer="auto"` picks
  Mosquitto when installed, the embedded broker otherwise.
- `BrokerHandle.halt()` / `resume()` / `restart(down_s)` take the broker down and
  bring it back on the same host:port (fault injection: clients see a broker
  restart). Nothing survives it: retained messages and sessions are in memory only
  (except on NATS, whose retained messages live in JetStream's files).
- Mosquitto runs as a subprocess with the shipped `mosquitto.conf` template
  (TCP_NODELAY, no persistence, bounded queues; see the file for why).
- amqtt (MQTT 3.1.1 only, 3–4× slower for bulk data) runs either in-process on the
  caller's event loop (`EmbeddedBroker.start()`, async) or on a background thread
  with its own loop (`start_embedded_broker_thread`, for synchronous callers).
- NATS (`start_nats`: nats-server with JetStream and an `mqtt` block) and RabbitMQ
  (`start_rabbitmq`: a node of our own with the `rabbitmq_mqtt` plugin) run as
  subprocesses with their state in a temporary directory: the brokers a plant may
  already run, and cluster across machines. Never picked by `prefer="auto"`; see
  docs/brokers.md for what each supports.

`port=0` means any free port: found by binding port 0 and releasing it, so another
process may in principle take it first; a failed start on a chosen port is retried
with a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Any, Final, Literal, Self

from .errors import BrokerStartError

__all__ = [
    "BrokerHandle",
    "BrokerKind",
    "EmbeddedBroker",
    "EmbeddedBrokerThread",
    "MosquittoBroker",
    "Preference",
    "ProcessBroker",
    "broker_unavailable",
    "find_mosquitto",
    "find_nats_server",
    "find_rabbitmq_server",
    "free_port",
    "mosquitto_config",
    "probe_mqtt",
    "start_broker",
    "start_embedded_broker_thread",
    "start_mosquitto",
    "start_nats",
    "start_rabbitmq",
    "wait_until_listening",
]

logger = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt", "nats", "rabbitmq"]
Preference = Literal["auto", "mosquitto", "amqtt", "nats", "rabbitmq"]

# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_MOSQUITTO_FALLBACKS: Final = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_START_ATTEMPTS: Final = 3
_STOP_TIMEOUT_SECONDS: Final = 5.0


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# MQTT 3.1.1 CONNECT: protocol "MQTT", level 4, clean session, keepalive 10 s, empty
# client id (the broker assigns one); then DISCONNECT. The probe speaks MQTT rather
# than only opening a TCP connection, so it proves that the listener is an MQTT
# broker (not another process on the port), and it leaves no half-open connection
# behind (amqtt 0.12 never closes a connection that sends no CONNECT).
_PROBE_CONNECT: Final = bytes.fromhex("100c00044d5154540402000a0000")
_PROBE_DISCONNECT: Final = bytes.fromhex("e000")
_CONNACK_TYPE: Final = 0x20


def probe_mqtt(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an MQTT broker answers a CONNECT on host:port (any CONNACK counts)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(_PROBE_CONNECT)
            answer = b""
            while len(answer) < 4:
                chunk = connection.recv(4 - len(answer))
                if not chunk:
                    return False
                answer += chunk
            if answer[0] == _CONNACK_TYPE and answer[3] == 0:
                connection.sendall(_PROBE_DISCONNECT)
            return answer[0] == _CONNACK_TYPE and answer[1] == 2
    except OSError:
        return False


def wait_until_listening(
    host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None
) -> None:
    """Poll until an MQTT broker answers on host:port; `BrokerStartError` on timeout.

    `alive`, if given, is called between attempts and returns False once the server
    process has died (no point in waiting further).
    """
    deadline = time.monotonic() + timeout
    while not probe_mqtt(host, port, timeout=min(1.0, timeout)):
        if alive is not None and not alive():
            raise BrokerStartError(f"broker on {host}:{port} exited while starting")
        if time.monotonic() >= deadline:
            raise BrokerStartError(f"no MQTT broker answering on {host}:{port} after {timeout} s")
        time.sleep(0.02)


class BrokerHandle:
    """A running private broker."""

    kind: BrokerKind

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def stop(self) -> None:
        raise NotImplementedError

    def halt(self, *, graceful: bool = True) -> None:
        """End the broker but keep what `resume()` needs to start it again.

        `graceful=False` kills it outright (SIGKILL for Mosquitto) where that differs.
        """
        raise NotImplementedError

    def resume(self, startup_timeout: float = 10.0) -> None:
        """Start a halted broker again on the same host:port; `BrokerStartError` on failure."""
        raise NotImplementedError

    def restart(self, down_s: float = 0.0, *, graceful: bool = True) -> None:
        """`halt()`, stay down for `down_s` seconds, `resume()`: a broker restart."""
        self.halt(graceful=graceful)
        time.sleep(down_s)
        self.resume()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind} on {self.url})"


# --- Mosquitto --------------------------------------------------------------------------


def mosquitto_config(host: str, port: int, *, tcp_nodelay: bool = True) -> str:
    """The shipped `mosquitto.conf` template filled in for one listener."""
    template = resources.files(__package__).joinpath("mosquitto.conf").read_text()
    return Template(template).substitute(
        host=host, port=port, tcp_nodelay="true" if tcp_nodelay else "false"
    )


def _running(process: subprocess.Popen[bytes]) -> Callable[[], bool]:
    def alive() -> bool:
        return process.poll() is None

    return alive


class MosquittoBroker(BrokerHandle):
    """A Mosquitto subprocess with its own temporary config directory."""

    kind: BrokerKind = "mosquitto"

    def __init__(
        self,
        host: str,
        port: int,
        process: subprocess.Popen[bytes],
        directory: tempfile.TemporaryDirectory[str],
        log_path: Path | None,
        executable: str,
    ) -> None:
        super().__init__(host, port)
        self.process = process
        self._directory = directory
        self.log_path = log_path
        self._executable = executable

    @property
    def config_path(self) -> Path:
        return Path(self._directory.name) / "mosquitto.conf"

    def log_text(self) -> str:
        """What Mosquitto wrote to its log so far (empty when it logs to our stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after a grace period)."""
        self.halt()
        self._directory.cleanup()

    def halt(self, *, graceful: bool = True) -> None:
        """End the process (SIGTERM, or SIGKILL when not `graceful`); keep the config."""
        if self.process.poll() is None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=_STOP_TIMEOUT_SECONDS)

    def resume(self, startup_timeout: float = 10.0) -> None:
        """Run Mosquitto again with the same configuration (so the same port).

        Its log continues in the same file.
        """
        if self.process.poll() is None:
            raise BrokerStartError(f"mosquitto on {self.url} is still running")
        if not self.config_path.exists():
            raise BrokerStartError(f"mosquitto on {self.url} was stopped for good")
        self.process = _launch_mosquitto(self._executable, self.config_path, self.log_path)
        try:
            wait_until_listening(
                self.host, self.port, startup_timeout, alive=_running(self.process)
            )
        except BrokerStartError as error:
            self.halt()
            log = self.log_text().strip()[-2000:]
            raise BrokerStartError(f"{error}; mosquitto log: {log or '(empty)'}") from None
        logger.info("mosquitto listening again on %s", self.url)


def _launch_mosquitto(
    executable: str, config_path: Path, log_path: Path | None
) -> subprocess.Popen[bytes]:
    """Start the process; its output is appended to `log_path` (our stderr when None)."""
    with contextlib.ExitStack() as stack:
        log_file = None if log_path is None else stack.enter_context(log_path.open("ab"))
        try:
            return subprocess.Popen(
                [executable, "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else None,
                stderr=subprocess.STDOUT if log_file is not None else None,
            )
        except OSError as error:
            raise BrokerStartError(f"cannot run {executable}: {error}") from error


def start_mosquitto(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    binary: str | None = None,
    startup_timeout: float = 10.0,
    tcp_nodelay: bool = True,
    log_to_stderr: bool = False,
) -> MosquittoBroker:
    """Run Mosquitto on host:port (a free port when 0) and wait until it accepts.

    `tcp_nodelay=False` exists only to measure what Nagle costs. With
    `log_to_stderr` the broker's log goes to our stderr (the foreground CLI);
    otherwise to a file in its temporary directory (`MosquittoBroker.log_text()`).
    """
    executable = binary or find_mosquitto()
    if executable is None:
        raise BrokerStartError("the mosquitto binary is not installed")
    last_error: BrokerStartError | None = None
    for _attempt in range(_START_ATTEMPTS if port == 0 else 1):
        chosen = port or free_port(host)
        directory = tempfile.TemporaryDirectory(prefix="edgedi-mosquitto-")
        config_path = Path(directory.name) / "mosquitto.conf"
        config_path.write_text(mosquitto_config(host, chosen, tcp_nodelay=tcp_nodelay))
        log_path = None if log_to_stderr else Path(directory.name) / "mosquitto.log"
        try:
            process = _launch_mosquitto(executable, config_path, log_path)
        except BrokerStartError:
            directory.cleanup()
            raise
        broker = MosquittoBroker(host, chosen, process, directory, log_path, executable)
        try:
            wait_until_listening(host, chosen, startup_timeout, alive=_running(process))
        except BrokerStartError as error:
            log = broker.log_text().strip()
            broker.stop()
            last_error = BrokerStartError(f"{error}; mosquitto log: {log or '(empty)'}")
            continue
        logger.info("mosquitto listening on %s", broker.url)
        return broker
    assert last_error is not None
    raise last_error


# --- amqtt (embedded) -------------------------------------------------------------------


def _amqtt_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: no $SYS publisher (periodic noise) and no packet
        # logger (a log call per packet costs throughput).
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@functools.cache
def _tidy_broker_class() -> type[Any]:
    """amqtt's Broker, closing every client connection it was handed.

    Works around two amqtt 0.12 flaws. It leaves the socket of a connection that
    never sent CONNECT open (the garbage collector later reports it as a
    ResourceWarning at a random place): this subclass closes each connection when
    its handler ends. Its `shutdown()` can hang on a client's reader task: it keeps
    the client connections so that `EmbeddedBroker.stop()` can drop them first.
    Imported lazily: only the embedded path needs amqtt.
    """
    from amqtt.broker import Broker

    class SnapshotDict(dict[Any, Any]):
        """amqtt iterates its subscription table with awaits inside the loop (retained
        messages for a new client, every broadcast); another client subscribing
        meanwhile raised "dictionary changed size during iteration", which dropped the
        new client (its SUBACK never came: a 10 s stall) or a broadcast. Iterating a
        snapshot keeps both safe."""

        def __iter__(self) -> Any:
            return iter(list(super().__iter__()))

        def items(self) -> Any:
            return list(super().items())

    class TidyBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # setattr: mypy cannot see the type of the untyped base's attribute.
            setattr(self, "_subscriptions", SnapshotDict(getattr(self, "_subscriptions")))  # noqa: B009, B010
            self.connection_tasks: set[asyncio.Task[Any]] = set()
            self.connection_writers: set[asyncio.StreamWriter] = set()
            self.stopping = False

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            if self.stopping:  # the listener closes only late in shutdown(): refuse
                writer.transport.abort()
                return
            task = asyncio.current_task()
            if task is not None:
                self.connection_tasks.add(task)
            self.connection_writers.add(writer)
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                if task is not None:
                    self.connection_tasks.discard(task)
                self.connection_writers.discard(writer)
                writer.close()

    return TidyBroker


class EmbeddedBroker:
    """amqtt running on the current event loop (async start and stop)."""

    kind: BrokerKind = "amqtt"

    def __init__(self, host: str, port: int, broker: Any) -> None:
        self.host = host
        self.port = port
        self._broker = broker

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> EmbeddedBroker:
        """Start listening on host:port (a free port when 0); `BrokerStartError` on failure."""
        from amqtt.errors import BrokerError as AmqttBrokerError

        broker_class = _tidy_broker_class()
        last_error: Exception | None = None
        for _attempt in range(_START_ATTEMPTS if port == 0 else 1):
            chosen = port or free_port(host)
            broker = broker_class(_amqtt_config(host, chosen))
            try:
                await broker.start()
            except (AmqttBrokerError, OSError) as error:
                last_error = error
                continue
            logger.info("embedded amqtt broker listening on %s:%d", host, chosen)
            return cls(host, chosen, broker)
        raise BrokerStartError(f"embedded broker did not start on {host}: {last_error}")

    async def stop(self) -> None:
        """Drop every client connection and close the listener (within a few seconds).

        Clients see the connection drop as if the broker had died (no DISCONNECT:
        MQTT 3.1.1 has no server-side DISCONNECT anyway).
        """
        self._broker.stopping = True
        for writer in list(self._broker.connection_writers):
            writer.transport.abort()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_SECONDS):
                await self._broker.shutdown()
        except TimeoutError:
            logger.warning("embedded broker did not shut down within %s s", _STOP_TIMEOUT_SECONDS)
        connections = list(self._broker.connection_tasks)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        # Closed transports finish closing on the next loop iterations.
        for _ in range(3):
            await asyncio.sleep(0)


class EmbeddedBrokerThread(BrokerHandle):
    """amqtt on a daemon thread with its own event loop, for synchronous callers."""

    kind: BrokerKind = "amqtt"

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="edgedi-amqtt", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        broker = await EmbeddedBroker.start(self.host, self.port)
        self.port = broker.port
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await broker.stop()

    def _start(self, timeout: float) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerStartError(f"embedded broker not ready after {timeout} s")
        if self._error is not None:
            if isinstance(self._error, BrokerStartError):
                raise self._error
            raise BrokerStartError(f"embedded broker failed: {self._error}") from self._error

    def stop(self) -> None:
        """Shut the broker down and join its thread."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        self._thread.join(timeout=_STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            logger.warning("embedded broker thread did not stop within %s s", _STOP_TIMEOUT_SECONDS)

    def halt(self, *, graceful: bool = True) -> None:
        """Stop the broker (both ways are the same here: every connection is dropped)."""
        self.stop()

    def resume(self, startup_timeout: float = 10.0) -> None:
        """Start a new broker thread on the same host:port."""
        if self._thread.is_alive():
            raise BrokerStartError(f"the embedded broker on {self.url} is still running")
        self._ready = threading.Event()
        self._error = None
        self._loop = None
        self._stop_event = None
        self._thread = threading.Thread(target=self._main, name="edgedi-amqtt", daemon=True)
        self._start(startup_timeout)


def start_embedded_broker_thread(
    host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 10.0
) -> EmbeddedBrokerThread:
    """Start amqtt on a background thread; returns once it listens."""
    handle = EmbeddedBrokerThread(host, port)
    handle._start(startup_timeout)
    return handle


# --- NATS (MQTT interface) and RabbitMQ (MQTT plugin) ------------------------------------
#
# Both are brokers an operator may already run, and both cluster across machines (the
# scale-out path when one broker is not enough). Tests and `bench/broker_hop.py` start a
# private one of each, with its state in a temporary directory, the same way as Mosquitto.

_NATS_FALLBACKS: Final = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server")
# Debian's /usr/sbin/rabbitmq-server switches to the `rabbitmq` user, who cannot write our
# temporary directory; the script it wraps runs a node as whoever calls it.
_RABBITMQ_FALLBACKS: Final = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "/usr/local/lib/rabbitmq/bin/rabbitmq-server",
)
# An Erlang node takes seconds to boot, more on a loaded machine.
_RABBITMQ_STARTUP_SECONDS: Final = 90.0

# NATS: JetStream holds the MQTT retained messages and sessions, so it is required, and
# JetStream wants a `server_name`. `max_payload` is raised from NATS's 1 MB to edgedi's
# own ceiling (tensors of a tile; 64 MB is NATS's hard upper bound).
_NATS_CONFIG: Final = Template(
    """\
server_name: $name
listen: "$client_address"
max_payload: 64MB
max_pending: 128MB
jetstream {
  store_dir: "$store"
}
mqtt {
  listen: "$mqtt_address"
}
"""
)

# RabbitMQ: the MQTT plugin on its own listener; AMQP only on loopback (the node needs
# one); anonymous MQTT clients log in as the default guest user (loopback only unless
# `loopback_users` says otherwise); retained messages in memory, like Mosquitto's here.
_RABBITMQ_CONFIG: Final = Template(
    """\
listeners.tcp.default = $amqp_address
mqtt.listeners.tcp.default = $mqtt_address
mqtt.allow_anonymous = true
mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_ets
log.console = true
log.console.level = warning
log.file = false
"""
)


def find_nats_server() -> str | None:
    """Path of the nats-server binary, or None when it is not installed."""
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in _NATS_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_rabbitmq_server() -> str | None:
    """Path of a `rabbitmq-server` script that runs a node as the caller, or None.

    None too when the installation lacks the MQTT plugin.
    """
    candidates = [path for path in _RABBITMQ_FALLBACKS if os.access(path, os.X_OK)]
    found = shutil.which("rabbitmq-server")
    if found and not found.startswith(("/usr/sbin", "/sbin")):
        candidates.append(found)
    for candidate in candidates:
        root = Path(os.path.realpath(candidate)).parent.parent
        plugin_folders = [root / "plugins", *root.glob("lib/rabbitmq_server-*/plugins")]
        if any(any(folder.glob("rabbitmq_mqtt-*")) for folder in plugin_folders):
            return candidate
    return None


def broker_unavailable(kind: BrokerKind) -> str | None:
    """Why a private broker of `kind` cannot be started here, or None when it can."""
    if kind == "mosquitto" and find_mosquitto() is None:
        return "the mosquitto binary is not installed"
    if kind == "nats" and find_nats_server() is None:
        return "nats-server is not installed (Debian package nats-server)"
    if kind == "rabbitmq" and find_rabbitmq_server() is None:
        return "no RabbitMQ with the rabbitmq_mqtt plugin is installed (package rabbitmq-server)"
    return None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProcessBroker(BrokerHandle):
    """A broker subprocess (NATS or RabbitMQ) in a process group of its own, with its
    configuration and state in a temporary directory; its output goes to a log file there.

    `halt()` ends the process group and keeps the directory, so `resume()` starts the same
    broker again on the same port. NATS keeps its retained messages across that restart
    (JetStream's files); RabbitMQ, with its in-memory retained store, does not.
    """

    def __init__(
        self,
        kind: BrokerKind,
        host: str,
        port: int,
        command: list[str],
        environment: dict[str, str] | None,
        directory: tempfile.TemporaryDirectory[str],
        startup_timeout: float,
    ) -> None:
        super().__init__(host, port)
        self.kind = kind
        self._command = command
        self._environment = environment
        self._directory = directory
        self._startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def folder(self) -> Path:
        return Path(self._directory.name)

    @property
    def log_path(self) -> Path:
        return self.folder / "broker.log"

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _launch(self, startup_timeout: float) -> None:
        with self.log_path.open("ab") as log:
            try:
                self.process = subprocess.Popen(
                    self._command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment,
                    cwd=self.folder,
                    start_new_session=True,
                )
            except OSError as error:
                raise BrokerStartError(f"cannot run {self._command[0]}: {error}") from error
        try:
            wait_until_listening(
                self.host, self.port, startup_timeout, alive=_running(self.process)
            )
        except BrokerStartError as error:
            self.halt(graceful=False)
            log_tail = self.log_text().strip()[-2000:]
            raise BrokerStartError(f"{error}; {self.kind} log: {log_tail or '(empty)'}") from None
        logger.info("%s listening on %s", self.kind, self.url)

    def halt(self, *, graceful: bool = True) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(timeout=_STOP_TIMEOUT_SECONDS * 3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT_SECONDS)
        # Whatever the broker left in its group (an Erlang VM behind its start script).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def resume(self, startup_timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            raise BrokerStartError(f"{self.kind} on {self.url} is still running")
        if not self.folder.exists():
            raise BrokerStartError(f"{self.kind} on {self.url} was stopped for good")
        self._launch(max(startup_timeout, self._startup_timeout))

    def stop(self) -> None:
        self.halt()
        self._directory.cleanup()


def _start_process_broker(
    make: Callable[[Path, int], tuple[list[str], dict[str, str] | None]],
    kind: BrokerKind,
    host: str,
    port: int,
    startup_timeout: float,
) -> ProcessBroker:
    """Write a configuration with `make(folder, port)` and start it; retried on a fresh
    port when `port` is 0 (another process may take a free port first)."""
    last_error: BrokerStartError | None = None
    for _attempt in range(_START_ATTEMPTS if port == 0 else 1):
        chosen = port or free_port(host)
        directory = tempfile.TemporaryDirectory(prefix=f"edgedi-{kind}-")
        command, environment = make(Path(directory.name), chosen)
        broker = ProcessBroker(kind, host, chosen, command, environment, directory, startup_timeout)
        try:
            broker._launch(startup_timeout)
        except BrokerStartError as error:
            broker.stop()
            last_error = error
            continue
        return broker
    assert last_error is not None
    raise last_error


def start_nats(
    host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 10.0
) -> ProcessBroker:
    """Run nats-server with JetStream and its MQTT listener on host:port (free when 0)."""
    executable = find_nats_server()
    if executable is None:
        raise BrokerStartError("the nats-server binary is not installed")

    def make(folder: Path, chosen: int) -> tuple[list[str], dict[str, str] | None]:
        config = folder / "nats.conf"
        config.write_text(
            _NATS_CONFIG.substitute(
                name=f"edgedi-{chosen}",
                client_address=_address(host, -1),  # any free port: only MQTT is used
                store=folder / "jetstream",
                mqtt_address=_address(host, chosen),
            )
        )
        return [executable, "-c", str(config)], None

    return _start_process_broker(make, "nats", host, port, startup_timeout)


def start_rabbitmq(
    host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = _RABBITMQ_STARTUP_SECONDS
) -> ProcessBroker:
    """Run a RabbitMQ node of our own (not the machine's) with the MQTT plugin on
    host:port (free when 0): its own node name, ports, database, plugins file and
    Erlang cookie, all in a temporary directory."""
    executable = find_rabbitmq_server()
    if executable is None:
        raise BrokerStartError("no rabbitmq-server with the rabbitmq_mqtt plugin is installed")

    def make(folder: Path, chosen: int) -> tuple[list[str], dict[str, str] | None]:
        config = folder / "rabbitmq.conf"
        config.write_text(
            _RABBITMQ_CONFIG.substitute(
                amqp_address=_address(host, free_port(host)),
                mqtt_address=_address(host, chosen),
            )
        )
        plugins = folder / "enabled_plugins"
        plugins.write_text("[rabbitmq_mqtt].\n")
        home = folder / "home"  # the node's Erlang cookie lands here
        home.mkdir(exist_ok=True)
        environment = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": f"edgedi-{chosen}@localhost",
            "RABBITMQ_DIST_PORT": str(free_port(host)),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        }
        return [executable], environment

    return _start_process_broker(make, "rabbitmq", host, port, startup_timeout)


def start_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    prefer: Preference = "auto",
    *,
    startup_timeout: float = 10.0,
) -> BrokerHandle:
    """Start a private broker and return once it accepts connections.

    `prefer="mosquitto"` fails (`BrokerStartError`) when the binary is missing;
    `"auto"` falls back to the embedded amqtt broker then. `"nats"` and `"rabbitmq"`
    start a private NATS server or RabbitMQ node (their MQTT interface); they are
    never picked by `"auto"`.
    """
    if prefer == "nats":
        return start_nats(host, port, startup_timeout=startup_timeout)
    if prefer == "rabbitmq":
        return start_rabbitmq(
            host, port, startup_timeout=max(startup_timeout, _RABBITMQ_STARTUP_SECONDS)
        )
    if prefer == "amqtt" or (prefer == "auto" and find_mosquitto() is None):
        return start_embedded_broker_thread(host, port, startup_timeout=startup_timeout)
    return start_mosquitto(host, port, startup_timeout=startup_timeout)
