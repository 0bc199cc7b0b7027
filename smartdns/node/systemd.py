"""sd_notify: READY=1 / RELOADING=1 / STOPPING=1 to $NOTIFY_SOCKET; a no-op when it is unset."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable


def notify(*states: str) -> None:
    """Send `states` (e.g. "READY=1") as one datagram. Failures are ignored: systemd
    notification must never take the server down."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), path)
    except OSError:
        pass


def reloading() -> None:
    """RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload expects (systemd 253+)."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec when systemd asked this process for keep-alive pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def keep_watchdog(healthy: Callable[[], bool]) -> asyncio.Task[None]:
    """A task sending WATCHDOG=1 at half the interval while `healthy()`; a stalled loop or
    dead listeners stop the pings and systemd restarts the service."""

    async def ping() -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            if healthy():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())
