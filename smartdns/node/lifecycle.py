"""The node's lifecycle: an ordered list of components, started in order, reloaded in order,
stopped in reverse collecting errors. Both the single process and the workers build theirs.

Knows nothing of DNS; a component is anything with `start`, `reload` and `stop`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from smartdns.config.model import Config

log = logging.getLogger(__name__)


class Component:
    """One part of the running node. Every step is a no-op unless overridden.

    `start` may raise to fail start-up (what it opened it closes itself; the components
    started before it are stopped in reverse). `reload` gets the new, valid Config and raises
    SmartDNSError to fail the reload before changing anything of its own; the components
    after it then keep the running configuration. `stop` releases what `start` took.
    """

    name = "component"  # for the log line when stopping it fails

    async def start(self, config: Config) -> None:
        """Take what this component needs and begin its work."""

    async def reload(self, config: Config) -> None:
        """Apply a new configuration, or raise SmartDNSError leaving the old one in place."""

    async def stop(self) -> None:
        """Release what `start` took."""


class Announcer(Protocol):
    """How a process tells whoever supervises it (systemd, or the main process for a worker)
    where it is: ready to serve, reloading, reloaded, stopping."""

    def ready(self) -> None: ...

    def reloading(self) -> None: ...

    def reloaded(self, ok: bool) -> None: ...

    async def stopping(self) -> None: ...


class Lifecycle:
    """Runs `components` through start, reload and stop; only started ones are reloaded or
    stopped, so a start that fails half-way stops exactly what came up."""

    def __init__(self, components: Sequence[Component]) -> None:
        self._components = tuple(components)
        self._started: list[Component] = []

    @property
    def components(self) -> tuple[Component, ...]:
        """In start order; stopped in reverse."""
        return self._components

    async def start(self, config: Config) -> None:
        """Start each component in order; on a failure stop the started ones, then re-raise."""
        try:
            for component in self._components:
                await component.start(config)
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise

    async def reload(self, config: Config) -> None:
        """Reload each started component in order; the first failure ends the reload."""
        for component in self._started:
            await component.reload(config)

    async def stop(self) -> None:
        """Stop the started components in reverse order. Each is stopped even when one before
        it fails (each failure is logged); the first failure is raised at the end."""
        first: BaseException | None = None
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except BaseException as error:  # the rest still stop; the first is re-raised below
                if isinstance(error, Exception):
                    log.error("stopping the %s failed: %s", component.name, error)
                first = first or error
        if first is not None:
            raise first
