"""Tests for smartdns.node.lifecycle: start in order, reload in order, stop in reverse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smartdns.config.model import Config
from smartdns.errors import SmartDNSError
from smartdns.node.lifecycle import Component, Lifecycle

CONFIG = Config(path=Path("smartdns.yaml"))


class Recorder(Component):
    """Appends "<step> <name>" to a shared journal; fails the steps named in `fail`."""

    def __init__(self, name: str, journal: list[str], fail: frozenset[str] = frozenset()) -> None:
        self.name = name
        self._journal = journal
        self._fail = fail

    async def _step(self, step: str) -> None:
        await asyncio.sleep(0)  # a real await between steps
        self._journal.append(f"{step} {self.name}")
        if step in self._fail:
            raise SmartDNSError(f"{self.name} cannot {step}")

    async def start(self, config: Config) -> None:
        await self._step("start")

    async def reload(self, config: Config) -> None:
        await self._step("reload")

    async def stop(self) -> None:
        await self._step("stop")


def components(journal: list[str], **fail: str) -> list[Component]:
    return [
        Recorder(name, journal, frozenset(fail.get(name, "").split()))
        for name in ("database", "snapshot", "listeners")
    ]


def test_starts_in_order_reloads_in_order_stops_in_reverse() -> None:
    journal: list[str] = []
    lifecycle = Lifecycle(components(journal))

    async def run() -> None:
        await lifecycle.start(CONFIG)
        await lifecycle.reload(CONFIG)
        await lifecycle.stop()
        await lifecycle.stop()  # a second stop has nothing left to stop

    asyncio.run(run())
    assert journal == [
        "start database",
        "start snapshot",
        "start listeners",
        "reload database",
        "reload snapshot",
        "reload listeners",
        "stop listeners",
        "stop snapshot",
        "stop database",
    ]


def test_failed_start_stops_what_came_up_in_reverse_and_raises() -> None:
    journal: list[str] = []
    lifecycle = Lifecycle(components(journal, listeners="start"))
    with pytest.raises(SmartDNSError, match="listeners cannot start"):
        asyncio.run(lifecycle.start(CONFIG))
    assert journal == [
        "start database",
        "start snapshot",
        "start listeners",
        "stop snapshot",
        "stop database",
    ]


def test_failed_reload_leaves_the_later_components_alone() -> None:
    journal: list[str] = []
    lifecycle = Lifecycle(components(journal, snapshot="reload"))

    async def run() -> None:
        await lifecycle.start(CONFIG)
        journal.clear()
        with pytest.raises(SmartDNSError, match="snapshot cannot reload"):
            await lifecycle.reload(CONFIG)

    asyncio.run(run())
    assert journal == ["reload database", "reload snapshot"]


def test_stop_goes_on_past_failures_and_raises_the_first(caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []
    lifecycle = Lifecycle(components(journal, listeners="stop", snapshot="stop"))

    async def run() -> None:
        await lifecycle.start(CONFIG)
        journal.clear()
        with pytest.raises(SmartDNSError, match="listeners cannot stop"):
            await lifecycle.stop()

    asyncio.run(run())
    assert journal == ["stop listeners", "stop snapshot", "stop database"]
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failures == [
        "stopping the listeners failed: listeners cannot stop",
        "stopping the snapshot failed: snapshot cannot stop",
    ]


def test_cancelled_stop_still_stops_the_rest_then_propagates() -> None:
    journal: list[str] = []

    class Cancelled(Recorder):
        async def stop(self) -> None:
            journal.append("stop listeners")
            raise asyncio.CancelledError

    lifecycle = Lifecycle([*components(journal)[:2], Cancelled("listeners", journal)])

    async def run() -> None:
        await lifecycle.start(CONFIG)
        journal.clear()
        with pytest.raises(asyncio.CancelledError):
            await lifecycle.stop()

    asyncio.run(run())
    assert journal == ["stop listeners", "stop snapshot", "stop database"]
