"""The DDNS refresher (SPEC 3 "Dynamic home addresses"): keeps every registered hostname
resolved and hands "hostname → its current addresses" changes to a sink (the one writer).

One task schedules every name from a heap of due times; lookups run at most
`ddns.max_concurrent` at once and at most `max_lookups_per_s` start per second. Keeps only
aggregate counts; never logs a hostname or an address, and no exception text carries one.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import ipaddress
import logging
import math
import random
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple, Protocol

from smartdns.config.model import DdnsConfig, RegistrationsConfig
from smartdns.core.chain import FAILED, LookupOutcome, Resolution
from smartdns.logs import WarnOnce
from smartdns.registrations.entries import Network, parse_address

log = logging.getLogger(__name__)

MAX_LOOKUPS_PER_S: Final = 4000.0  # hostname lookups started per second (2+ queries each)
LOOKUP_DEADLINE_S: Final = 10.0  # a lookup (A and AAAA, CNAME targets) that takes longer failed
JITTER: Final = 0.1  # refreshes are spread over the last 10 % of the TTL (above min_ttl)
# A name's first answer (a registration, or every name after a start) is spread over the last
# half: names looked up in one burst come due apart from their second lookup on, instead of
# in the same burst again.
FIRST_JITTER: Final = 0.5
SINK_RETRY_S: Final = 1.0  # after the sink failed to apply a batch
# Lookup latency histogram bounds, seconds (Prometheus `le`).
LATENCY_BOUNDS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BURST_S: Final = 0.05  # the rate bound lets this much of a second's lookups start at once
_IDLE_WAIT_S: Final = 3600.0
_FAMILIES: Final = {4: socket.AF_INET, 16: socket.AF_INET6}

Addresses = tuple[Network, ...]
# Held per hostname: packed addresses (4 or 16 octets), sorted, IPv4 first. Compact, and
# invisible to the cyclic collector, which a hundred thousand sets of ipaddress objects are
# not (each full collection would walk them all).
_Packed = tuple[bytes, ...]


class HostnameResolver(Protocol):
    """Looks a hostname's A and AAAA up (upstream.lookup.HostnameLookup in the node)."""

    async def resolve(self, hostname: str) -> Resolution: ...


class HostnameSink(Protocol):
    """Where results go: the writer, which authorizes them on every worker (or the feed)."""

    async def apply_resolved(self, changes: Mapping[str, Addresses]) -> None:
        """Make each hostname's addresses these (empty: none), all at once; return when they
        are in effect. A hostname's new and old addresses come in one change, so applying it
        atomically authorizes the new address before (not after) the old one goes."""
        ...


class RefresherStats:
    """Aggregate counters: nothing per hostname, nothing that names one."""

    __slots__ = (
        "expired",
        "latency_buckets",
        "latency_count",
        "latency_sum_s",
        "lookups",
        "rejected",
        "sink_failures",
    )

    def __init__(self) -> None:
        self.lookups: Counter[LookupOutcome] = Counter()
        self.rejected = 0  # resolved addresses the registration rules refuse, or over the cap
        self.sink_failures = 0  # batches the sink failed to apply (retried)
        self.expired = 0  # hostnames withdrawn: lookups still failing when the grace ended
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS_S) + 1)  # the last is +Inf
        self.latency_count = 0
        self.latency_sum_s = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BOUNDS_S, seconds)] += 1
        self.latency_count += 1
        self.latency_sum_s += seconds


class _Name(NamedTuple):
    """One distinct hostname's state, replaced whole on each change. Stored as a plain tuple
    (`_get`, `_put`): a tuple of numbers and tuples of bytes is one the cyclic collector stops
    tracking, and a NamedTuple, a subclass, never is. 100,000 names held as objects added
    ~16 ms to every full collection of the node's process (about one a second under load)."""

    serial: int  # this registration of the name: removed and added again, it gets a new one
    refs: int  # accounts holding it
    due: float  # heap key: min(next lookup, grace end), or inf while a lookup runs
    retry_at: float  # next lookup
    good_until: float = -math.inf  # last positive answer + grace
    failures: int = 0  # consecutive failed lookups
    addresses: _Packed = ()  # what the sink was last given
    answer: _Packed = ()  # the last answer with addresses, sorted
    accepted: _Packed = ()  # what the rules accept of `answer`


class HostnameRefresher:
    """Resolves each distinct registered hostname once, on its TTL; see the module docstring.

    The owner tells it which hostnames are registered (`add`, `remove` per account holding
    them, or `replace_all`), and `start`s and `stop`s it; results reach `sink`.
    """

    def __init__(
        self,
        ddns: DdnsConfig,
        rules: RegistrationsConfig,
        resolver: HostnameResolver,
        sink: HostnameSink,
        *,
        max_lookups_per_s: float = MAX_LOOKUPS_PER_S,
        rng: random.Random | None = None,
    ) -> None:
        self._ddns = ddns
        self._rules = rules
        self._resolver = resolver
        self._sink = sink
        self._rate = max_lookups_per_s
        self._rng = rng or random.Random()
        self._names: dict[str, tuple[Any, ...]] = {}  # hostname → a _Name as a plain tuple
        self._heap: list[tuple[float, str]] = []
        self._lookups: set[asyncio.Task[None]] = set()
        self._pending: dict[str, Addresses] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._serial = 0
        self._tokens = 1.0
        self._tokens_at = 0.0
        self._address_count = 0
        self._sink_warning = WarnOnce(__name__, "DDNS results not applied; retrying")
        self.stats = RefresherStats()

    # ---- what is registered ------------------------------------------------------------------

    @property
    def hostnames(self) -> int:
        """Distinct hostnames being kept resolved."""
        return len(self._names)

    @property
    def addresses_authorized(self) -> int:
        """Addresses the sink holds for all hostnames together."""
        return self._address_count

    def addresses(self, hostname: str) -> Addresses:
        """The addresses last given to the sink for `hostname` (empty when none or unknown)."""
        state = self._get(hostname)
        return _networks(state.addresses) if state is not None else ()

    def _get(self, hostname: str) -> _Name | None:
        raw = self._names.get(hostname)
        return None if raw is None else _Name._make(raw)

    def _put(self, hostname: str, state: _Name) -> None:
        self._names[hostname] = tuple(state)

    def add(self, hostnames: Iterable[str]) -> None:
        """One more account holds each of these (normalized) hostnames; new ones are looked
        up at once, so a registration is authorized within a lookup of being made."""
        now = self._now()
        for hostname in hostnames:
            state = self._get(hostname)
            if state is not None:
                self._put(hostname, state._replace(refs=state.refs + 1))
                continue
            self._serial += 1
            self._put(hostname, _Name(self._serial, 1, now, now))
            heapq.heappush(self._heap, (now, hostname))
        self._wake.set()

    def remove(self, hostnames: Iterable[str]) -> None:
        """One account fewer holds each; a hostname no account holds is forgotten and its
        addresses withdrawn (an empty change for it)."""
        for hostname in hostnames:
            state = self._get(hostname)
            if state is None:
                continue
            if state.refs > 1:
                self._put(hostname, state._replace(refs=state.refs - 1))
                continue
            del self._names[hostname]  # its heap entry is skipped when it comes up
            if state.addresses:
                self._address_count -= len(state.addresses)
                self._queue_change(hostname, ())

    def replace_all(self, hostnames: Iterable[str]) -> None:
        """The whole registration set (one item per account holding a hostname): names no
        longer held are removed, new ones added, kept ones keep their state and schedule."""
        wanted = Counter(hostnames)
        for hostname in [name for name in self._names if name not in wanted]:
            self.remove([hostname] * _Name._make(self._names[hostname]).refs)
        for hostname, refs in wanted.items():
            if hostname not in self._names:
                self.add([hostname])
            state = self._get(hostname)
            assert state is not None  # added above
            self._put(hostname, state._replace(refs=refs))

    def seed(self, resolved: Mapping[str, Iterable[bytes]]) -> None:
        """What registered hostnames resolved to before (packed, from the store), so a restart
        does not withdraw them: kept as the last good addresses, through the grace from now,
        until the first lookup replaces or confirms them."""
        now = self._now()
        for hostname, packed in resolved.items():
            state = self._get(hostname)
            if state is None:
                continue
            addresses = tuple(sorted(set(packed), key=_order))
            self._address_count += len(addresses) - len(state.addresses)
            good_until = now + self._ddns.grace
            self._put(hostname, state._replace(addresses=addresses, good_until=good_until))

    def use(self, resolver: HostnameResolver) -> None:
        """Look up through `resolver` from now on (new resolvers after a reload)."""
        self._resolver = resolver

    def reload(self, ddns: DdnsConfig, rules: RegistrationsConfig) -> None:
        """New settings: they apply from each name's next lookup."""
        self._ddns = ddns
        self._rules = rules

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
            if self._pending:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def stop(self) -> None:
        """Stop looking up; lookups in flight and an undelivered batch are abandoned."""
        tasks = [t for t in (self._dispatcher, self._flusher) if t is not None]
        tasks.extend(self._lookups)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = self._flusher = None

    # ---- scheduling --------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _dispatch(self) -> None:
        """Start every due lookup the concurrency and rate bounds allow, then sleep until the
        next is due, a slot frees or a name is added."""
        while True:
            self._wake.clear()
            wait = self._start_due(self._now())
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _start_due(self, now: float) -> float:
        """Start what may start now; return how long to sleep (0: look again at once)."""
        heap = self._heap
        limit = self._ddns.max_concurrent
        self._tokens = min(
            max(1.0, self._rate * _BURST_S), self._tokens + (now - self._tokens_at) * self._rate
        )
        self._tokens_at = now
        while heap and heap[0][0] <= now:
            if len(self._lookups) >= limit:
                return _IDLE_WAIT_S  # a finishing lookup wakes us
            if self._tokens < 1.0:
                return (1.0 - self._tokens) / self._rate
            due, hostname = heapq.heappop(heap)
            state = self._get(hostname)
            if state is None or state.due != due:
                continue  # removed, or rescheduled since this entry was pushed
            if now < state.retry_at:
                self._expire(hostname, state)  # the grace ended before the next retry
                continue
            self._tokens -= 1.0
            self._put(hostname, state._replace(due=math.inf))
            task = asyncio.get_running_loop().create_task(self._lookup(hostname, state.serial))
            self._lookups.add(task)
            task.add_done_callback(self._lookup_done)
        return heap[0][0] - now if heap else _IDLE_WAIT_S

    def _lookup_done(self, task: asyncio.Task[None]) -> None:
        self._lookups.discard(task)
        self._wake.set()

    def _spread(self, base_s: float, jitter: float = JITTER) -> float:
        ddns = self._ddns
        return spread(base_s, ddns.min_ttl, ddns.max_ttl, self._rng.random(), jitter)

    def _backoff(self, failures: int) -> float:
        """min_ttl, doubling per consecutive failure up to max_ttl, spread like a refresh."""
        return self._spread(self._ddns.min_ttl * 2.0 ** min(failures - 1, 32))

    # ---- one lookup --------------------------------------------------------------------------

    async def _lookup(self, hostname: str, serial: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(LOOKUP_DEADLINE_S):
                resolution = await self._resolver.resolve(hostname)
        except Exception:  # boundary: a lookup that breaks is a failed lookup, never a crash
            resolution = FAILED
        now = loop.time()
        self.stats.observe_latency(now - started)
        self.stats.lookups[resolution.outcome] += 1
        state = self._get(hostname)
        if state is not None and state.serial == serial:  # not removed (and added again)
            self._finish(hostname, state, resolution, started, now)

    def _finish(
        self, hostname: str, state: _Name, resolution: Resolution, started: float, now: float
    ) -> None:
        """Apply one result (SPEC 3): a positive answer replaces the addresses; a failure adds
        what the half that answered found and keeps the rest through the grace; NXDOMAIN and
        NODATA keep them through the grace. Past the grace only the answer counts.

        An answer's TTL runs from when it was asked for (`started`), not from when it arrived
        here: counted from its arrival, every refresh came the lookup's latency after the
        TTL ran out, and more when the loop was busy. A failure backs off from `now`."""
        outcome = resolution.outcome
        within_grace = now < state.good_until
        if outcome is LookupOutcome.ADDRESSES:
            jitter = JITTER if state.answer else FIRST_JITTER
            state = self._accept(state, resolution.addresses)
            state = state._replace(failures=0, good_until=now + self._ddns.grace)
            retry_at = started + self._spread(resolution.ttl, jitter)
            self._commit(hostname, state, state.accepted, retry_at)
            return
        if outcome is LookupOutcome.FAILED:
            found: _Packed = ()
            if resolution.addresses:
                state = self._accept(state, resolution.addresses)
                found = state.accepted
            if within_grace:
                found = tuple(sorted(set(state.addresses).union(found), key=_order))
            elif state.addresses:
                self.stats.expired += 1
            state = state._replace(failures=state.failures + 1)
            self._commit(hostname, state, found, now + self._backoff(state.failures))
            return
        state = state._replace(failures=0)
        ttl = resolution.ttl if resolution.ttl >= 0 else self._ddns.min_ttl
        kept = state.addresses if within_grace else ()
        self._commit(hostname, state, kept, started + self._spread(ttl))

    def _expire(self, hostname: str, state: _Name) -> None:
        """The grace ended without a positive answer: withdraw, keep retrying on schedule.
        Counted when lookups were failing (not after NXDOMAIN or NODATA: the name is gone)."""
        if state.failures and state.addresses:
            self.stats.expired += 1
        self._commit(hostname, state, (), state.retry_at)

    def _commit(self, hostname: str, state: _Name, addresses: _Packed, retry_at: float) -> None:
        """Give the sink `addresses` if they changed, store the state, schedule the next
        lookup at `retry_at` (the heap entry comes earlier when the grace ends first)."""
        if addresses != state.addresses:
            self._address_count += len(addresses) - len(state.addresses)
            self._queue_change(hostname, _networks(addresses))
        due = retry_at
        if addresses and state.good_until < retry_at:
            due = max(state.good_until, self._now())
        self._put(hostname, state._replace(addresses=addresses, retry_at=retry_at, due=due))
        heapq.heappush(self._heap, (due, hostname))

    def _accept(self, state: _Name, packed: tuple[bytes, ...]) -> _Name:
        """`state` with the answer and what SPEC 3's rules accept of it (/32 and /128
        addresses, at most `max_per_account`, the lowest). An answer equal to the previous
        one is not checked again (nor its rejections counted again): a steady name costs no
        parsing per refresh."""
        answer = tuple(sorted(set(packed), key=_order))
        if answer == state.answer:
            return state
        accepted: set[bytes] = set()
        for address in answer:
            text = socket.inet_ntop(_FAMILIES[len(address)], address)
            try:
                # the network's address: an IPv4-mapped AAAA is the IPv4 address (SPEC 2)
                accepted.add(parse_address(text, self._rules).network_address.packed)
            except ValueError:
                self.stats.rejected += 1
        ordered = sorted(accepted, key=_order)
        cap = self._rules.max_per_account
        self.stats.rejected += max(0, len(ordered) - cap)
        return state._replace(answer=answer, accepted=tuple(ordered[:cap]))

    # ---- to the sink -------------------------------------------------------------------------

    def _queue_change(self, hostname: str, addresses: Addresses) -> None:
        """Batch changes while the sink is busy; the latest set per hostname wins."""
        self._pending[hostname] = addresses
        if self._flusher is None and self._dispatcher is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    await self._sink.apply_resolved(batch)
                except Exception as error:  # boundary: the sink failing must not stop refreshes
                    self.stats.sink_failures += 1
                    self._sink_warning.warn(type(error).__name__)
                    for hostname, addresses in batch.items():
                        self._pending.setdefault(hostname, addresses)  # unless superseded
                    await asyncio.sleep(SINK_RETRY_S)
        finally:
            self._flusher = None


def spread(
    base_s: float, min_ttl: float, max_ttl: float, fraction: float, jitter: float = JITTER
) -> float:
    """When to look up again: `base_s` clamped to [min_ttl, max_ttl], then the point at
    `fraction` (0..1, random) of its last `jitter` part, so names answered together come due
    apart and each is refreshed by the time its TTL runs out. Never sooner than min_ttl
    (SPEC 3: the operator's floor on lookups): at min_ttl the spread goes up instead, by
    JITTER at most and never past max_ttl."""
    base = min(max(base_s, min_ttl), max_ttl)
    low = max(min_ttl, base * (1 - jitter))
    high = base if base > low else min(max_ttl, base * (1 + JITTER))
    return low + (high - low) * fraction


def _order(packed: bytes) -> tuple[int, bytes]:
    return len(packed), packed


def _networks(addresses: _Packed) -> Addresses:
    """/32 and /128 networks, for the sink (only for a change, never per refresh)."""
    return tuple(
        ipaddress.IPv4Network(address) if len(address) == 4 else ipaddress.IPv6Network(address)
        for address in addresses
    )
