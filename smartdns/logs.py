"""Logging set-up and the warn-once helper. Log lines carry counts, never a client or a name."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, Final

WARN_INTERVAL_S: Final = 60.0
_QUIET_LIBRARIES: Final = ("aiosqlite", "asyncio", "aiohttp", "aiohttp.access", "hpack")
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup(level: str, process: str = "") -> None:
    """Log to stderr; without timestamps under systemd, where journald adds its own.
    `process` ("worker 1") tells the lines of worker processes apart."""
    under_journald = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = f"%(levelname)s {process + ' ' if process else ''}%(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    # Libraries log their arguments at debug level (aiosqlite: SQL parameters, that is
    # registered addresses; aiohttp.access: peer addresses; hpack: every header it encodes
    # or decodes; serve.h2_hpack decodes DoH's without it, but a path or user agent must
    # never reach a log should that change). Only their warnings may pass.
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(_LEVELS[level])


class WarnOnce:
    """A warning logged at most once per interval; occurrences in between are counted and
    reported with the next line. `detail` must never carry a client address or a name."""

    __slots__ = ("_last", "_log", "_message", "_suppressed")

    def __init__(self, logger_name: str, message: str) -> None:
        self._log = logging.getLogger(logger_name)
        self._message = message
        self._last = -WARN_INTERVAL_S
        self._suppressed = 0

    def warn(self, detail: str) -> None:
        now = time.monotonic()
        if now - self._last < WARN_INTERVAL_S:
            self._suppressed += 1
            return
        self._log.warning(
            "%s (%s; %d more since the last report)", self._message, detail, self._suppressed
        )
        self._last = now
        self._suppressed = 0


def guard_loop_exceptions(loop: asyncio.AbstractEventLoop) -> None:
    """Replace the loop's default exception handler, whose message formats the failing
    callback with its arguments (a datagram handler's arguments hold a client address):
    log the exception type and the kind of context only, at most once per interval."""
    warning = WarnOnce("smartdns.loop", "unexpected error in the event loop")

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        warning.warn(type(error).__name__ if error is not None else "no exception")

    loop.set_exception_handler(handler)
