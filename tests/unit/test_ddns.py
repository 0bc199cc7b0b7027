"""The DDNS refresher (registrations.sources.ddns) against a fake authority on 127.0.0.1,
through the real lookup client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from smartdns.config.model import DdnsConfig, HostPort, RegistrationsConfig, UpstreamConfig
from smartdns.core.chain import LookupOutcome, Resolution
from smartdns.registrations.entries import Network
from smartdns.registrations.sources.ddns import (
    FIRST_JITTER,
    JITTER,
    LATENCY_BOUNDS_S,
    HostnameRefresher,
    HostnameResolver,
    spread,
)
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.lookup import HostnameLookup, forwarder_config
from tests.fake_authority import FakeAuthority

WAIT_S = 10.0
# An interval as the authority sees it: it notes a question when its thread next gets the GIL
# from the refresher's loop (a switch interval is 5 ms, more on a busy machine), so one interval
# can come out shorter than the refresher's spacing of the questions by that much (seen:
# 0.998 s between lookups the refresher asked 1.0 s or more apart, once in 8 runs).
ARRIVAL_S = 0.02
LAB = RegistrationsConfig(public_only=False)
HOME = "home.example.net"


@dataclass
class RecordingSink:
    """Applies changes to a dict and remembers each one with its time."""

    current: dict[str, set[str]] = field(default_factory=dict)
    history: list[tuple[float, str, set[str]]] = field(default_factory=list)
    fail_next: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def apply_resolved(self, changes: Mapping[str, tuple[Network, ...]]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("sink down")
        now = time.monotonic()
        for hostname, networks in changes.items():
            addresses = {str(network.network_address) for network in networks}
            self.current[hostname] = addresses
            self.history.append((now, hostname, addresses))
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, predicate: Callable[[], bool], within_s: float = WAIT_S) -> float:
        """Wait until `predicate()` holds; return the monotonic time it first did."""
        async with asyncio.timeout(within_s), self.changed:
            await self.changed.wait_for(predicate)
        return time.monotonic()

    def sets_of(self, hostname: str) -> list[set[str]]:
        return [addresses for _, name, addresses in self.history if name == hostname]


class ObservedResolver:
    """Counts finished lookups; a waiter wakes after the refresher has handled the result
    and the sink's batch ran (the notice is queued behind both)."""

    def __init__(self, inner: HostnameResolver) -> None:
        self.inner = inner
        self.finished = 0
        self._event = asyncio.Event()

    async def resolve(self, hostname: str) -> Resolution:
        try:
            return await self.inner.resolve(hostname)
        finally:
            asyncio.get_running_loop().call_soon(self._note)

    def _note(self) -> None:
        self.finished += 1
        self._event.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.finished < count:
                self._event.clear()
                await self._event.wait()


@pytest.fixture
def authority() -> Iterator[FakeAuthority]:
    with FakeAuthority() as fake:
        yield fake


@dataclass
class Rig:
    authority: FakeAuthority
    sink: RecordingSink
    refresher: HostnameRefresher
    lookups: ObservedResolver


def make_rig(
    authority: FakeAuthority,
    *,
    min_ttl: int = 1,
    max_ttl: int = 2,
    grace: int = 60,
    max_concurrent: int = 8,
    rules: RegistrationsConfig = LAB,
    max_lookups_per_s: float = 4000.0,
) -> Rig:
    ddns = DdnsConfig(
        resolvers=(HostPort(authority.host, authority.port),),
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        grace=grace,
        max_concurrent=max_concurrent,
    )
    upstream = forwarder_config(ddns, UpstreamConfig(timeout=0.2, attempts=1))
    lookups = ObservedResolver(
        HostnameLookup(Forwarder(upstream, edns_udp_size=1232), max_concurrent)
    )
    sink = RecordingSink()
    refresher = HostnameRefresher(ddns, rules, lookups, sink, max_lookups_per_s=max_lookups_per_s)
    return Rig(authority, sink, refresher, lookups)


@pytest.fixture
async def rig(authority: FakeAuthority) -> AsyncIterator[Rig]:
    made = make_rig(authority)
    await made.refresher.start()
    yield made
    await made.refresher.stop()


@contextlib.asynccontextmanager
async def started(rig: Rig) -> AsyncIterator[Rig]:
    await rig.refresher.start()
    try:
        yield rig
    finally:
        await rig.refresher.stop()


# ---- pure timing rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "low", "high"),
    [
        (60, 54, 60),  # inside the range: the last 10 % of the TTL
        (300, 270, 300),
        (1000, 270, 300),  # clamped to max_ttl
        (0, 30, 33),  # clamped to min_ttl: spread upwards, never sooner than min_ttl
        (30, 30, 33),
        (32, 30, 32),  # just above min_ttl: what is left of the last 10 %
    ],
)
def test_spread_stays_in_ttl_window(base: float, low: float, high: float) -> None:
    assert spread(base, 30, 300, 0.0) == pytest.approx(low)
    assert spread(base, 30, 300, 1.0) == pytest.approx(high)
    assert low <= spread(base, 30, 300, 0.5) <= high


@pytest.mark.parametrize(
    ("base", "low", "high"),
    [(60, 30, 60), (300, 150, 300), (40, 30, 40), (10, 30, 33)],
)
def test_first_answers_spread_over_half_the_ttl(base: float, low: float, high: float) -> None:
    assert spread(base, 30, 300, 0.0, FIRST_JITTER) == pytest.approx(low)
    assert spread(base, 30, 300, 1.0, FIRST_JITTER) == pytest.approx(high)


def test_spread_without_room_is_exact() -> None:
    assert spread(10, 60, 60, 0.7) == 60
    assert JITTER == 0.1


# ---- against the fake authority ------------------------------------------------------------


async def test_resolved_addresses_delivered(rig: Rig) -> None:
    rig.authority.set_addresses(HOME, ["127.0.0.2", "::2"], ttl=60)
    rig.refresher.add([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.2", "::2"})
    assert rig.refresher.addresses_authorized == 2
    assert rig.refresher.hostnames == 1
    assert rig.refresher.stats.lookups[LookupOutcome.ADDRESSES] == 1
    assert rig.refresher.stats.latency_count == 1
    assert sum(rig.refresher.stats.latency_buckets) == 1
    assert len(rig.refresher.stats.latency_buckets) == len(LATENCY_BOUNDS_S) + 1


async def test_record_change_new_delivered_with_old_removed_within_ttl(rig: Rig) -> None:
    rig.authority.set_addresses(HOME, ["127.0.0.2"], ttl=1)
    rig.refresher.add([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.2"})
    changed_at = time.monotonic()
    rig.authority.set_addresses(HOME, ["127.0.0.3"], ttl=1)
    seen_at = await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.3"})
    assert seen_at - changed_at <= 1 + 1
    # one change swapped them: never a moment with neither
    assert rig.sink.sets_of(HOME) == [{"127.0.0.2"}, {"127.0.0.3"}]


@pytest.mark.parametrize(
    ("record_ttl", "max_ttl", "low", "high"),
    [
        (0, 5, 1.0, 1.1),  # no lookup before min_ttl (1 s), however low the TTL
        (3600, 2, 1.8, 2.0),  # one within max_ttl, however high the TTL
    ],
)
async def test_refresh_interval_is_the_ttl_clamped(
    authority: FakeAuthority, record_ttl: int, max_ttl: int, low: float, high: float
) -> None:
    rig = make_rig(authority, min_ttl=1, max_ttl=max_ttl)
    authority.intervals = []
    authority.set_addresses(HOME, ["127.0.0.2"], ttl=record_ttl)
    rig.refresher.add([HOME])
    async with started(rig):
        assert await asyncio.to_thread(authority.wait_for_count, HOME, 6, WAIT_S)  # 3 lookups
    first, *rest = authority.intervals  # the first answer's spread is wider (FIRST_JITTER)
    assert min(low, 1.0) - ARRIVAL_S <= first <= high + 0.5
    assert rest and all(low - ARRIVAL_S <= interval <= high + 0.5 for interval in rest)


async def test_the_ttl_runs_from_the_question_not_the_answer(authority: FakeAuthority) -> None:
    """However long the lookup took, the next one asks when the TTL (clamped, spread) has run
    from the last question. (Counted from the answer's arrival, the lookup's latency came on
    top of every interval.)"""
    rig = make_rig(authority, min_ttl=1, max_ttl=5)
    authority.delay_s = 0.15  # the lookup's latency (the forwarder gives up after 0.2 s)
    authority.intervals = []
    authority.set_addresses(HOME, ["127.0.0.2"], ttl=1)
    rig.refresher.add([HOME])
    async with started(rig):
        assert await asyncio.to_thread(authority.wait_for_count, HOME, 10, WAIT_S)  # 5 lookups
    _first, *rest = authority.intervals  # the first answer's spread is wider (FIRST_JITTER)
    assert rest and all(1.0 - ARRIVAL_S <= interval <= 1.1 + 0.05 for interval in rest)


async def test_cname_chain_followed_and_refreshed(rig: Rig) -> None:
    rig.authority.follow_cnames = False  # the refresher must ask for each target itself
    rig.authority.set_cname(HOME, "box.dyn.example", ttl=60)
    rig.authority.set_cname("box.dyn.example", "real.dyn.example", ttl=1)
    rig.authority.set_addresses("real.dyn.example", ["127.0.0.5"], ttl=60)
    rig.refresher.add([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.5"})
    changed_at = time.monotonic()
    rig.authority.set_addresses("real.dyn.example", ["127.0.0.6"], ttl=60)
    seen_at = await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.6"})
    assert seen_at - changed_at <= 1 + 1  # the chain's smallest TTL (1 s) rules


async def test_dead_authority_keeps_last_good_through_grace(authority: FakeAuthority) -> None:
    grace = 3
    rig = make_rig(authority, min_ttl=1, max_ttl=1, grace=grace)
    authority.set_addresses(HOME, ["127.0.0.2"], ttl=1)
    rig.refresher.add([HOME])
    async with started(rig) as running:
        await running.sink.wait(lambda: running.sink.current.get(HOME) == {"127.0.0.2"})
        authority.drop = True
        died_at = time.monotonic()
        dropped_at = await running.sink.wait(lambda: running.sink.current.get(HOME) == set())
        stats = running.refresher.stats
    # the last success was at most one refresh (1.1 s) before the authority died
    assert grace - 1.1 <= dropped_at - died_at <= grace + 1.0
    assert stats.lookups[LookupOutcome.FAILED] >= 1
    assert stats.expired == 1
    assert rig.sink.sets_of(HOME) == [{"127.0.0.2"}, set()]


async def test_failures_back_off(authority: FakeAuthority) -> None:
    rig = make_rig(authority, min_ttl=1, max_ttl=8, grace=60)
    authority.drop = True
    authority.intervals = []
    rig.refresher.add([HOME])
    async with started(rig) as _:
        assert await asyncio.to_thread(authority.wait_for_count, HOME, 8, WAIT_S)
    first, second, third = authority.intervals[:3]
    # the 0.2 s timeout, then min_ttl (spread upwards), then doubling (spread over its last
    # 10 %), capped at max_ttl
    assert 1.0 + 0.2 - ARRIVAL_S <= first <= 1.1 + 0.2 + 0.4
    assert 1.8 + 0.2 - ARRIVAL_S <= second <= 2.0 + 0.2 + 0.4
    assert 3.6 + 0.2 - ARRIVAL_S <= third <= 4.0 + 0.2 + 0.4


@pytest.mark.parametrize("negative", ["nxdomain", "nodata"])
async def test_negative_answer_removes_after_grace(authority: FakeAuthority, negative: str) -> None:
    rig = make_rig(authority, min_ttl=1, max_ttl=1, grace=2)
    authority.set_addresses(HOME, ["127.0.0.2"], ttl=1)
    rig.refresher.add([HOME])
    async with started(rig) as running:
        await running.sink.wait(lambda: running.sink.current.get(HOME) == {"127.0.0.2"})
        if negative == "nxdomain":
            authority.remove(HOME)
        else:
            authority.set_addresses(HOME, [])
        gone_at = time.monotonic()
        dropped_at = await running.sink.wait(lambda: running.sink.current.get(HOME) == set())
        outcome = LookupOutcome.NXDOMAIN if negative == "nxdomain" else LookupOutcome.NODATA
        assert running.refresher.stats.lookups[outcome] >= 1
        assert running.refresher.stats.expired == 0  # the name is gone, not failing
    assert 2 - 1.1 <= dropped_at - gone_at <= 2 + 1.5


async def test_name_that_never_existed_authorizes_nothing(rig: Rig) -> None:
    rig.refresher.add(["nothing.example.net"])
    await rig.lookups.wait(1)
    assert rig.refresher.stats.lookups[LookupOutcome.NXDOMAIN] == 1
    assert rig.sink.history == []


@pytest.mark.parametrize(
    ("rules", "answer", "expected", "rejected"),
    [
        (
            RegistrationsConfig(public_only=True),
            ["10.1.2.3", "127.0.0.9", "fd00::1", "8.8.8.8"],
            {"8.8.8.8"},
            3,
        ),
        (RegistrationsConfig(public_only=True), ["10.1.2.3", "127.0.0.9"], set(), 2),
        (LAB, ["0.0.0.0", "224.0.0.1", "ff02::1", "127.0.0.2"], {"127.0.0.2"}, 3),
        (LAB, ["::ffff:127.0.0.7"], {"127.0.0.7"}, 0),  # mapped: the IPv4 address
        (
            RegistrationsConfig(public_only=False, max_per_account=2),
            ["127.0.0.4", "127.0.0.3", "127.0.0.2"],
            {"127.0.0.2", "127.0.0.3"},
            1,
        ),
    ],
)
async def test_addresses_checked_with_the_registration_rules(
    authority: FakeAuthority,
    rules: RegistrationsConfig,
    answer: list[str],
    expected: set[str],
    rejected: int,
) -> None:
    rig = make_rig(authority, rules=rules, min_ttl=60, max_ttl=60)
    authority.set_addresses(HOME, answer)
    rig.refresher.add([HOME])
    async with started(rig) as running:
        stats = running.refresher.stats
        await running.lookups.wait(1)
        assert running.sink.current.get(HOME, set()) == expected
        assert stats.rejected == rejected
        assert running.refresher.addresses_authorized == len(expected)


async def test_two_accounts_one_hostname_one_lookup(rig: Rig) -> None:
    rig.authority.set_addresses(HOME, ["127.0.0.2"], ttl=60)
    rig.refresher.add([HOME])
    rig.refresher.add([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.2"})
    assert rig.authority.count(HOME, "A") == 1
    assert rig.refresher.hostnames == 1
    rig.refresher.remove([HOME])  # one account left holds it
    assert rig.refresher.hostnames == 1
    rig.refresher.remove([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == set())
    assert rig.refresher.hostnames == 0
    assert rig.refresher.addresses_authorized == 0


async def test_replace_all_keeps_held_names_and_drops_the_rest(rig: Rig) -> None:
    for name in ("a.example.net", "b.example.net"):
        rig.authority.set_addresses(name, ["127.0.0.2"], ttl=60)
    rig.refresher.add(["a.example.net", "b.example.net"])
    await rig.sink.wait(lambda: len(rig.sink.current) == 2)
    rig.refresher.replace_all(["b.example.net", "b.example.net", "c.example.net"])
    rig.authority.set_addresses("c.example.net", ["127.0.0.3"], ttl=60)
    await rig.sink.wait(
        lambda: (
            rig.sink.current.get("a.example.net") == set()
            and rig.sink.current.get("c.example.net") == {"127.0.0.3"}
        )
    )
    assert rig.authority.count("b.example.net", "A") == 1  # not looked up again
    rig.refresher.remove(["b.example.net"])
    assert rig.refresher.hostnames == 2  # still held by the second account


async def test_name_removed_during_its_lookup_is_not_delivered(rig: Rig) -> None:
    rig.authority.set_addresses(HOME, ["127.0.0.2"])
    rig.authority.delay_s = 0.2
    rig.refresher.add([HOME])
    assert await asyncio.to_thread(rig.authority.wait_for_count, HOME, 2)
    rig.refresher.remove([HOME])
    await rig.lookups.wait(1)
    assert rig.refresher.stats.latency_count == 1
    assert rig.sink.history == []


async def test_sink_failure_is_retried(rig: Rig) -> None:
    rig.sink.fail_next = 1
    rig.authority.set_addresses(HOME, ["127.0.0.2"], ttl=60)
    rig.refresher.add([HOME])
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.2"})
    assert rig.refresher.stats.sink_failures == 1


async def test_lookups_start_within_the_rate_bound(authority: FakeAuthority) -> None:
    rig = make_rig(authority, max_lookups_per_s=100, max_concurrent=50)
    names = [f"h{i}.example.net" for i in range(60)]
    for name in names:
        authority.set_addresses(name, ["127.0.0.2"], ttl=60)
    started_at = time.monotonic()
    rig.refresher.add(names)
    async with started(rig) as running:
        done_at = await running.sink.wait(lambda: len(running.sink.current) == 60)
    # a burst of 5 (50 ms worth), then 100 a second
    assert done_at - started_at >= (60 - 5) / 100


async def test_thousand_hostnames_within_the_concurrency_bound(authority: FakeAuthority) -> None:
    rig = make_rig(authority, max_concurrent=10, min_ttl=60, max_ttl=60)
    names = [f"h{i}.example.net" for i in range(1000)]
    for i, name in enumerate(names):
        authority.set_addresses(name, [f"127.0.{i >> 8}.{i & 255}"], ttl=60)
    authority.delay_s = 0.005
    rig.refresher.add(names)
    async with started(rig) as running:
        await running.sink.wait(lambda: len(running.sink.current) == 1000, within_s=30)
        assert running.refresher.addresses_authorized == 1000
    assert authority.count() == 2000
    assert authority.max_in_flight == 10
    assert rig.refresher.stats.lookups[LookupOutcome.ADDRESSES] == 1000


async def test_resolver_exception_is_a_failed_lookup(authority: FakeAuthority) -> None:
    class Broken:
        async def resolve(self, hostname: str) -> Resolution:
            raise RuntimeError("boom")

    sink = RecordingSink()
    lookups = ObservedResolver(Broken())
    refresher = HostnameRefresher(DdnsConfig(min_ttl=1, max_ttl=1), LAB, lookups, sink)
    refresher.add([HOME])
    await refresher.start()
    try:
        await lookups.wait(1)
    finally:
        await refresher.stop()
    assert refresher.stats.lookups[LookupOutcome.FAILED] == 1
    assert sink.history == []


async def test_seeded_addresses_kept_until_a_lookup_says_otherwise(rig: Rig) -> None:
    rig.authority.drop = True  # the first lookups fail: the stored addresses stay
    rig.refresher.add([HOME])
    rig.refresher.seed({HOME: [bytes([127, 0, 0, 2])], "unregistered.example.net": [b"\0" * 4]})
    assert rig.refresher.addresses_authorized == 1
    await rig.lookups.wait(1)
    assert rig.sink.history == []  # nothing withdrawn, nothing rewritten
    rig.authority.drop = False
    rig.authority.set_addresses(HOME, ["127.0.0.3"], ttl=60)
    await rig.sink.wait(lambda: rig.sink.current.get(HOME) == {"127.0.0.3"})
    assert rig.sink.sets_of(HOME) == [{"127.0.0.3"}]
