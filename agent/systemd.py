"""A dependency-free sd_notify client: readiness, status and the watchdog.

Under systemd (`Type=notify`), the agent tells the service manager when it is
ready (`READY=1`), what it is doing (`STATUS=...`), that it is still alive
(`WATCHDOG=1`) and that it is shutting down (`STOPPING=1`). The protocol is one
datagram of newline-separated `KEY=value` assignments sent to the AF_UNIX socket
named by `$NOTIFY_SOCKET`; a name starting with `@` is in the abstract namespace.

Outside systemd (tests, the demo, a terminal) `$NOTIFY_SOCKET` is unset and every
function here is a no-op, so callers never need to ask whether they are supervised.
The environment is read when a function is called, never at import time, and is
passed in explicitly by tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future

__all__ = ["notify", "watchdog_interval", "watchdog_loop"]

logger = logging.getLogger(__name__)


def _socket_address(name: str) -> str | None:
    """Translate `$NOTIFY_SOCKET` into an AF_UNIX address, or None if unusable."""
    if name.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of a path on disk.
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # systemd >= 253 also offers `vsock:CID:PORT` (for VMs); the unit only
    # allows AF_UNIX/AF_INET(6), so it cannot be used from inside it anyway.
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STATUS=connected", "WATCHDOG=1") to systemd.

    Returns True when the datagram was sent, False when not running under
    systemd or when sending failed. Never raises for a missing or broken socket:
    losing a notification must not stop the agent (a missed watchdog ping is
    exactly what the watchdog is there to notice).
    """
    if not state:
        raise ValueError("sd_notify state must not be empty")
    environ = os.environ if environ is None else environ
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = _socket_address(name)
    if address is None:
        logger.warning("unsupported NOTIFY_SOCKET %r; systemd notifications disabled", name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Non-blocking: this is called from the event loop, and a full
            # receive queue on systemd's side must not stall the agent.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as error:
        logger.warning("sd_notify %r to %s failed: %s", state.split("\n", 1)[0], name, error)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (`WatchdogSec=`), or None if there is none.

    `$WATCHDOG_PID`, when set, names the process the watchdog is meant for; any
    other process (a forked worker, say) gets None so that it does not ping on
    the main process's behalf.
    """
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("ignoring malformed WATCHDOG_PID %r", pid)
            return None
    try:
        microseconds = int(usec)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC %r", usec)
        return None
    if microseconds <= 0:
        return None
    return microseconds / 1_000_000


def _nothing() -> None:
    """The compute thread's liveness probe: returns at once."""


async def watchdog_loop(compute: Executor, environ: Mapping[str, str] | None = None) -> None:
    """Ping the systemd watchdog at half its interval while the agent is alive.

    Alive means two things, neither of which is the broker: this coroutine gets to
    run (the event loop is not blocked), and `compute`, the agent's single compute
    thread, has taken the last no-op handed to it within one watchdog interval (it
    queues behind the tile steps already submitted, each far shorter). A hung loop
    or thread stops the pings and systemd restarts the agent. A lost broker does
    not: reconnecting is the connection loop's job, and withholding the pings would
    make systemd restart every agent of a fleet at the same moment, then have them
    all reconnect at once when the broker returns. The outage shows in `STATUS=`.

    Returns at once when there is no watchdog (not under systemd, or no
    `WatchdogSec=`); otherwise runs until cancelled.
    """
    interval = watchdog_interval(environ)
    if interval is None:
        return
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping
    # is then not yet fatal.
    period = interval / 2
    logger.info("systemd watchdog enabled: %.1f s, pinging every %.1f s", interval, period)
    probe: Future[None] | None = None
    probe_sent_at = 0.0
    was_alive = True
    while True:
        now = time.monotonic()
        if probe is None or probe.done():
            probe, probe_sent_at = compute.submit(_nothing), now
        stalled_s = now - probe_sent_at
        alive = stalled_s < interval
        if alive:
            notify("WATCHDOG=1", environ)
        if alive != was_alive:
            if alive:
                logger.info("compute thread responsive again; systemd watchdog pings resumed")
            else:
                logger.error(
                    "compute thread stuck for %.1f s; withholding systemd watchdog pings "
                    "(restart in at most %.1f s)",
                    stalled_s,
                    interval,
                )
            was_alive = alive
        await asyncio.sleep(period)
