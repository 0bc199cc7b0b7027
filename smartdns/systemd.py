"""sd_notify: READY=1 / RELOADING=1 / STOPPING=1 to $NOTIFY_SOCKET; a no-op when it is unset."""

from __future__ import annotations

import os
import socket
import time


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
