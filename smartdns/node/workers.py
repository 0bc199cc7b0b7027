"""Worker processes for `server.workers` > 1: spawn, supervise, reload, stop, add up stats.

The main process owns the sync API and the workers; each worker is `smartdns serve` with an
inherited control socket (SMARTDNS_WORKER_FD) and binds every listen address itself with
SO_REUSEPORT. Workers report `ready`, `reloaded` and aggregate `stats` as JSON lines; the
main process sends `apply` with a registration write's generation and each worker answers
`applied` once that write is in its answers (read-your-writes, SPEC 4). Any end of the
control socket (EOF, reset, any socket error) tells a worker that its parent is gone, and the
kernel kills a worker whose main process died (`parent_death`). Nothing here sees a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from smartdns.config.model import Config
from smartdns.core.counters import Authorization, Metrics, Outcome, StatusClass, Transport
from smartdns.errors import SmartDNSError
from smartdns.node.components import cancel_tasks
from smartdns.node.lifecycle import Component
from smartdns.node.metrics import TlsSample, WorkerSample
from smartdns.node.parent_death import PARENT_PID_ENV
from smartdns.node.tls_stats import TlsTotals, tls_report
from smartdns.serve.encrypted import EncryptedListeners
from smartdns.serve.pipeline import Pipeline
from smartdns.upstream.forwarder import ForwarderStats

log = logging.getLogger(__name__)

CONTROL_FD_ENV: Final = "SMARTDNS_WORKER_FD"
INDEX_ENV: Final = "SMARTDNS_WORKER_INDEX"
STATS_INTERVAL_S: Final = 1.0
START_TIMEOUT_S: Final = 30.0
RELOAD_TIMEOUT_S: Final = 15.0
RESTART_DELAY_S: Final = 1.0
KILLED_EXIT_S: Final = 5.0  # a worker killed for not confirming a change is gone within this
MAX_CRASHES: Final = 5  # within CRASH_WINDOW_S: the slot is given up and reported
CRASH_WINDOW_S: Final = 60.0
_CACHE_FIELDS: Final = ("hits", "misses", "stale_served", "evictions", "entries")
_FORWARDER_FIELDS: Final = tuple(f.name for f in fields(ForwarderStats))
_MAX_LINE_BYTES: Final = 1 << 20


# --- worker side ---------------------------------------------------------------------------


class WorkerLink:
    """A worker's end of the control socket."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self._reader = reader
        self._writer = writer

    @staticmethod
    def inherited() -> tuple[int, int] | None:
        """(worker index, control fd) when this process is a worker, else None."""
        fd = os.environ.get(CONTROL_FD_ENV)
        if fd is None:
            return None
        return int(os.environ.get(INDEX_ENV, "0")), int(fd)

    @classmethod
    async def connect(cls, index: int, fd: int) -> WorkerLink:
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_MAX_LINE_BYTES)
        return cls(index, reader, writer)

    def send(self, event: str, **data: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(json.dumps({"event": event, **data}).encode() + b"\n")

    async def serve_parent(self, apply: Callable[[int], Awaitable[None]]) -> None:
        """Answer the main process until it closes its end (EOF) or the socket fails (an
        OSError: a main process killed with our reports unread resets it, and a write to a
        closed peer breaks the connection too): each `apply` is confirmed with `applied` once
        `apply(generation)` returns."""
        confirming: set[asyncio.Task[None]] = set()
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if message.get("event") == "apply":
                    task = asyncio.get_running_loop().create_task(
                        self._confirm(apply, int(message["generation"]))
                    )
                    confirming.add(task)
                    task.add_done_callback(confirming.discard)
        finally:
            await cancel_tasks(*confirming)

    async def _confirm(self, apply: Callable[[int], Awaitable[None]], generation: int) -> None:
        try:
            await apply(generation)
        except SmartDNSError as error:  # unconfirmed: the main process restarts this worker
            log.error("registration change not applied: %s", type(error).__name__)
            return
        self.send("applied", generation=generation)

    def close(self) -> None:
        self._writer.close()


class WorkerReports(Component):
    """A worker's statistics to the main process every STATS_INTERVAL_S, and a last report
    when stopped; early in the order, so the last one counts the queries drained after it."""

    name = "worker reports"

    def __init__(
        self,
        link: WorkerLink,
        metrics: Metrics,
        pipeline: Pipeline,
        encrypted: Callable[[], EncryptedListeners | None] = lambda: None,
    ) -> None:
        self._link = link
        self._metrics = metrics
        self._pipeline = pipeline
        self._encrypted = encrypted  # the DoT and DoH listeners, while they run
        self._task: asyncio.Task[None] | None = None

    async def start(self, config: Config) -> None:
        self._task = every(STATS_INTERVAL_S, self.report)

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        self.report()
        self._link.close()

    def report(self) -> None:
        """Send the statistics now (also every STATS_INTERVAL_S)."""
        settings = self._pipeline.settings
        message = stats_message(
            self._metrics, settings.forwarder.stats, settings.cache, self._encrypted()
        )
        self._link.send("stats", **message)


class WorkerAnnouncer:
    """A worker's `ready` and `reloaded` to the main process, and from then on its answers
    to `apply` (with `apply`); the main process going away (its end of the control socket
    closed) calls `stop`."""

    def __init__(
        self,
        link: WorkerLink,
        stop: Callable[[], None],
        apply: Callable[[int], Awaitable[None]],
        report: Callable[[], None] = lambda: None,
    ) -> None:
        self._link = link
        self._stop = stop
        self._apply = apply
        self._report = report  # the first statistics, so the node's READY=1 comes with them
        self._parent_watch: asyncio.Task[None] | None = None

    def ready(self) -> None:
        self._report()
        self._link.send("ready")
        self._parent_watch = asyncio.get_running_loop().create_task(self._stop_when_parent_gone())

    def reloading(self) -> None:
        pass

    def reloaded(self, ok: bool) -> None:
        self._link.send("reloaded", ok=ok)

    async def stopping(self) -> None:
        await cancel_tasks(self._parent_watch)
        self._parent_watch = None

    async def _stop_when_parent_gone(self) -> None:
        """Every way the control socket ends means the main process is gone: a worker
        without it would go on answering from registrations nobody updates any more."""
        try:
            await self._link.serve_parent(self._apply)
        except (ValueError, KeyError):
            log.error("unreadable control message from the main process; stopping")
        except OSError as error:
            log.error(
                "control socket to the main process failed (%s); stopping", type(error).__name__
            )
        else:
            log.error("the main process closed the control socket; stopping")
        self._stop()


def stats_message(
    metrics: Metrics,
    forwarder: ForwarderStats,
    cache: Any,
    encrypted: EncryptedListeners | None = None,
) -> dict[str, Any]:
    """A worker's counters as JSON-able data: aggregate numbers only, labels from enums."""
    return {
        "tls": None if encrypted is None else tls_report(encrypted),
        "queries": [[t.value, o.value, n] for (t, o), n in metrics.queries.items()],
        "authorizations": {a.value: n for a, n in metrics.authorizations.items()},
        "doh_responses": {c.value: n for c, n in metrics.doh_responses.items()},
        "forwarder": {name: getattr(forwarder, name) for name in _FORWARDER_FIELDS},
        "cache": {
            "hits": cache.hits,
            "misses": cache.misses,
            "stale_served": cache.stale_served,
            "evictions": cache.evictions,
            "entries": len(cache),
        },
    }


# --- main side -----------------------------------------------------------------------------


@dataclass
class CacheTotals:
    """The workers' caches added up; satisfies metrics.CacheStatsLike."""

    hits: int = 0
    misses: int = 0
    stale_served: int = 0
    evictions: int = 0
    entries: int = 0

    def __len__(self) -> int:
        return self.entries


@dataclass
class _Totals:
    queries: Counter[tuple[Transport, Outcome]] = field(default_factory=Counter)
    authorizations: Counter[Authorization] = field(default_factory=Counter)
    doh_responses: Counter[StatusClass] = field(default_factory=Counter)
    forwarder: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    tls: TlsTotals = field(default_factory=TlsTotals)

    def add(self, message: dict[str, Any], *, gauges: bool = True) -> None:
        """`gauges` False for a process that exited (see TlsTotals.add)."""
        self.tls.add(message.get("tls"), gauges=gauges)
        for transport, outcome, count in message.get("queries", []):
            self.queries[Transport(transport), Outcome(outcome)] += int(count)
        for authorization, count in message.get("authorizations", {}).items():
            self.authorizations[Authorization(authorization)] += int(count)
        for status_class, count in message.get("doh_responses", {}).items():
            self.doh_responses[StatusClass(status_class)] += int(count)
        self.forwarder.update({k: int(v) for k, v in message.get("forwarder", {}).items()})
        self.cache.update({k: int(v) for k, v in message.get("cache", {}).items()})


@dataclass
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reloaded: asyncio.Future[bool] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    given_up: bool = False
    writer: asyncio.StreamWriter | None = None  # to the current process's control socket
    confirming: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # by generation
    unconfirmed: int = 0  # processes restarted for not confirming a change in time
    restarting: bool = False  # the current process is being killed for that


class Supervisor:
    """Runs `count` workers for the config at `config_path` and keeps them running."""

    def __init__(self, config_path: Path, count: int, metrics: Metrics) -> None:
        self._config_path = config_path
        self._slots = [_Slot(index) for index in range(count)]
        self._metrics = metrics
        self._retired = _Totals()  # counters of worker processes that have exited
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._start_failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.all_gave_up = asyncio.Event()
        self.forwarder = ForwarderStats()
        self.cache = CacheTotals()
        self.tls = TlsTotals()

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each has its listeners up. A worker that exits
        during start-up (port taken, database unusable) fails the whole start."""
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            task = loop.create_task(self._keep_running(slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        all_ready = loop.create_task(self._all_ready())
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.wait({all_ready, self._start_failed}, return_when="FIRST_COMPLETED")
        except TimeoutError:
            await self.stop(0.0)
            raise SmartDNSError(f"workers not ready within {START_TIMEOUT_S:g} s") from None
        finally:
            all_ready.cancel()
        if self._start_failed.done():
            await self.stop(0.0)
            self._start_failed.result()  # raises the worker's start-up failure
        self._started = True

    async def _all_ready(self) -> None:
        await asyncio.gather(*(slot.ready.wait() for slot in self._slots))

    async def reload(self) -> bool:
        """SIGHUP every running worker and wait for each to report its reload."""
        waiting: list[asyncio.Future[bool]] = []
        loop = asyncio.get_running_loop()
        for slot in self._running():
            assert slot.process is not None
            slot.reloaded = loop.create_future()
            waiting.append(slot.reloaded)
            slot.process.send_signal(signal.SIGHUP)
        try:
            async with asyncio.timeout(RELOAD_TIMEOUT_S):
                results = await asyncio.gather(*waiting)
        except TimeoutError:
            log.error("workers did not confirm the reload within %g s", RELOAD_TIMEOUT_S)
            return False
        return all(results)

    async def stop(self, drain_s: float) -> None:
        """SIGTERM every worker, give them `drain_s` (+ slack) to drain, then kill."""
        self._stopping = True
        for slot in self._running():
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGTERM)
        for slot in self._slots:
            process = slot.process
            if process is None or process.returncode is not None:
                continue
            try:
                async with asyncio.timeout(drain_s + 5.0):
                    await process.wait()
            except TimeoutError:
                log.error("worker %d did not stop in time; killing it", slot.index)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def all_ready(self) -> bool:
        return all(slot.ready.is_set() for slot in self._slots)

    async def apply(self, generation: int, timeout_s: float) -> None:
        """Return once every serving worker confirms that the write at `generation` is in
        its answers, or after `timeout_s`: a worker that has not confirmed by then is counted
        and restarted (a new process loads everything from the database at start)."""
        loop = asyncio.get_running_loop()
        waiting: dict[int, asyncio.Future[None]] = {}
        for slot in self._running():
            if not slot.ready.is_set() or slot.writer is None or slot.restarting:
                continue  # starting: its first load reads the database after this write
            future = slot.confirming.get(generation)
            if future is None:
                future = slot.confirming[generation] = loop.create_future()
                line = json.dumps({"event": "apply", "generation": generation}) + "\n"
                slot.writer.write(line.encode())
            waiting[slot.index] = future
        if not waiting:
            return
        await asyncio.wait(waiting.values(), timeout=timeout_s)
        silent = [self._slots[index] for index, future in waiting.items() if not future.done()]
        for slot in silent:
            self._restart_unconfirmed(slot, timeout_s)
        # Returned only once they are gone: the caller's 200 says the write is in every answer,
        # and a killed worker answers no more (its successor loads everything first).
        dying = [slot.process.wait() for slot in silent if slot.process is not None]
        if dying:
            async with asyncio.timeout(KILLED_EXIT_S):
                await asyncio.gather(*dying)

    def _restart_unconfirmed(self, slot: _Slot, timeout_s: float) -> None:
        if slot.restarting or slot.process is None or slot.process.returncode is not None:
            return  # being killed already (for another write), or gone
        slot.restarting = True
        slot.unconfirmed += 1
        log.error(
            "worker %d did not confirm a registration change within %g s; restarting it",
            slot.index,
            timeout_s,
        )
        with contextlib.suppress(ProcessLookupError):
            slot.process.kill()

    def samples(self) -> list[WorkerSample]:
        """Per worker: up, queries answered by its current process, restarts, and restarts
        for not confirming a registration change."""
        return [
            WorkerSample(
                slot.index,
                slot.ready.is_set(),
                sum(count for *_, count in slot.stats.get("queries", [])),
                slot.restarts,
                slot.unconfirmed,
            )
            for slot in self._slots
        ]

    def _running(self) -> list[_Slot]:
        return [s for s in self._slots if s.process is not None and s.process.returncode is None]

    # one slot ------------------------------------------------------------------------------

    async def _keep_running(self, slot: _Slot) -> None:
        """Run the slot's worker; restart it when it dies, unless it keeps crashing."""
        while not self._stopping:
            status = await self._run_once(slot)
            if self._stopping:
                return
            if not self._started:
                if not self._start_failed.done():
                    self._start_failed.set_exception(
                        SmartDNSError(
                            f"worker {slot.index} exited during start-up (status {status})"
                        )
                    )
                return
            now = time.monotonic()
            slot.crashes.append(now)
            while slot.crashes and now - slot.crashes[0] > CRASH_WINDOW_S:
                slot.crashes.popleft()
            if len(slot.crashes) >= MAX_CRASHES:
                slot.given_up = True
                log.error(
                    "worker %d exited %d times within %g s (last status %s); not restarting it",
                    slot.index,
                    len(slot.crashes),
                    CRASH_WINDOW_S,
                    status,
                )
                if all(other.given_up for other in self._slots):
                    self.all_gave_up.set()
                return
            log.warning("worker %d exited (status %s); restarting it", slot.index, status)
            await asyncio.sleep(RESTART_DELAY_S)
            slot.restarts += 1

    async def _run_once(self, slot: _Slot) -> int | None:
        parent_end, child_end = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env[CONTROL_FD_ENV] = str(child_end.fileno())
        env[INDEX_ENV] = str(slot.index)
        env[PARENT_PID_ENV] = str(os.getpid())
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smartdns",
                "serve",
                "--config",
                str(self._config_path),
                pass_fds=(child_end.fileno(),),
                env=env,
                # Its own session: a terminal's Ctrl-C reaches the main process only, which
                # then stops the workers in order (systemd still signals the whole cgroup).
                start_new_session=True,
            )
        finally:
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end, limit=_MAX_LINE_BYTES)
        slot.writer = writer
        try:
            while line := await reader.readline():
                self._on_message(slot, line)
        except (ValueError, asyncio.LimitOverrunError):
            log.error("worker %d sent an unreadable control message; stopping it", slot.index)
            slot.process.kill()
        except ConnectionError:
            # Killed with our `apply` lines unread, its socket resets rather than closes.
            pass
        finally:
            slot.writer = None
            writer.close()
            status = await slot.process.wait()
            slot.ready.clear()
            slot.restarting = False
            for future in slot.confirming.values():
                future.cancel()  # gone: its successor loads everything, nothing to wait for
            slot.confirming.clear()
            if slot.reloaded is not None and not slot.reloaded.done():
                slot.reloaded.set_result(False)
            slot.stats.get("cache", {}).pop("entries", None)  # a gauge: gone with the process
            self._retired.add(slot.stats, gauges=False)
            slot.stats = {}
            self._recount()
        return status

    def _on_message(self, slot: _Slot, line: bytes) -> None:
        message = json.loads(line)
        event = message.get("event")
        if event == "ready":
            slot.ready.set()
        elif event == "reloaded" and slot.reloaded is not None and not slot.reloaded.done():
            slot.reloaded.set_result(bool(message.get("ok")))
        elif event == "applied":
            future = slot.confirming.pop(int(message["generation"]), None)
            if future is not None and not future.done():
                future.set_result(None)
        elif event == "stats":
            slot.stats = message
            self._recount()

    def _recount(self) -> None:
        """Totals = retired processes + the latest report of each running one. The main
        process's Metrics.queries is rewritten in place: the sync API renders that object."""
        totals = _Totals()
        totals.queries.update(self._retired.queries)
        totals.authorizations.update(self._retired.authorizations)
        totals.doh_responses.update(self._retired.doh_responses)
        totals.forwarder.update(self._retired.forwarder)
        totals.cache.update(self._retired.cache)
        totals.tls = self._retired.tls.counters()
        for slot in self._slots:
            totals.add(slot.stats)
        queries = self._metrics.queries
        queries.clear()
        queries.update(totals.queries)
        authorizations = self._metrics.authorizations
        authorizations.clear()
        authorizations.update(totals.authorizations)
        doh_responses = self._metrics.doh_responses
        doh_responses.clear()
        doh_responses.update(totals.doh_responses)
        for name in _FORWARDER_FIELDS:
            setattr(self.forwarder, name, totals.forwarder[name])
        for name in _CACHE_FIELDS:
            setattr(self.cache, name, totals.cache[name])
        self.tls = totals.tls

    def tls_sample(self) -> TlsSample | None:
        """DoT and DoH summed over the workers; None when none serves TLS."""
        return self.tls.sample(time.time())


class Workers(Component):
    """The worker processes of a node with `server.workers` > 1, from the main process:
    started (each with its listeners up) before the sync API, reloaded by SIGHUP, drained and
    stopped after it. When every worker keeps crashing it calls `stop` and sets `gave_up`."""

    name = "workers"

    def __init__(self, supervisor: Supervisor, drain_s: float, stop: Callable[[], None]) -> None:
        self._supervisor = supervisor
        self._drain_s = drain_s
        self._stop = stop
        self._workers = 0
        self._watch: asyncio.Task[None] | None = None
        self.gave_up = False

    async def start(self, config: Config) -> None:
        self._workers = config.server.workers
        await self._supervisor.start()
        self._watch = asyncio.get_running_loop().create_task(self._stop_when_all_gave_up())

    async def reload(self, config: Config) -> None:
        if config.server.workers != self._workers:
            log.warning("server.workers changed: restart smartdns to apply it")
        if not await self._supervisor.reload():
            raise SmartDNSError("a worker did not apply the new configuration (see its log lines)")

    async def stop(self) -> None:
        log.info("stopping: draining the workers")
        await cancel_tasks(self._watch)
        self._watch = None
        await self._supervisor.stop(self._drain_s)

    async def _stop_when_all_gave_up(self) -> None:
        await self._supervisor.all_gave_up.wait()
        log.error("every worker keeps crashing; stopping")
        self.gave_up = True
        self._stop()


def every(interval_s: float, action: Callable[[], None]) -> asyncio.Task[None]:
    """A task calling `action` every `interval_s` seconds until cancelled."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            action()

    return asyncio.get_running_loop().create_task(loop())
