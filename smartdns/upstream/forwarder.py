"""Forwarding to upstream resolvers: health order, retries, TCP on TC, the answer checked once.

The socket exchange itself is `exchange.Exchange`. Sends nothing of the client's but the
question; keeps aggregate counters only and never logs a query name.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import struct
from dataclasses import dataclass
from typing import Final

from asyncio_throttle.throttler import Throttler

from smartdns.config.model import UpstreamConfig
from smartdns.core.wire import (
    FLAG_CD,
    FLAG_RD,
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    ForwardedAnswer,
    Query,
    parse_upstream_answer,
)
from smartdns.errors import UpstreamError, WireError
from smartdns.upstream.exchange import Exchange, ExchangeFailedError
from smartdns.upstream.resolver import DEADLINE_S, UpstreamBusyError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT: Final = 1000  # concurrent resolve() calls per worker; each holds a socket
PROBE_INTERVAL_S: Final = 10.0  # a failing upstream is probed this often so it can come back
# `. IN NS`: what a probe asks. It carries nothing of any client.
PROBE_QUESTION: Final = b"\x00" + struct.pack("!HH", 2, 1)
# Our own process is out of sockets or memory: not the upstream's fault.
_LOCAL_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Answers that say "ask someone else": the next upstream is tried at once.
_NEXT_SERVER_RCODES: Final = frozenset({RCODE_SERVFAIL, RCODE_REFUSED, RCODE_NOTIMP, RCODE_FORMERR})
# ...of which these also count against the server's health (it cannot handle our query at all).
_UNHEALTHY_RCODES: Final = frozenset({RCODE_NOTIMP, RCODE_FORMERR})


@dataclass(slots=True)
class ForwarderStats:
    """Aggregate counters; nothing per client or per name."""

    queries_sent: int = 0  # messages sent upstream (UDP and TCP)
    answers: int = 0  # resolve() calls that returned an answer
    timeouts: int = 0  # attempts that got no acceptable reply in time
    failures: int = 0  # attempts that failed otherwise: socket error, unparseable, bad rcode
    mismatched: int = 0  # replies ignored: wrong ID, QR clear or another question
    rate_limited: int = 0  # resolve() calls refused by the `max_qps` bound
    tcp_retries: int = 0  # truncated UDP answers retried over TCP
    overloaded: int = 0  # resolve() calls refused by the in-flight bound or lack of sockets
    probes: int = 0  # health probes sent to failing upstreams


class _Outcome(enum.Enum):
    ANSWER = "answer"
    FAILED = "failed"  # timeout, garbage or socket error: counts against health
    NEXT = "next"  # a refusing rcode: go to the next server


class Forwarder:
    """Resolves parsed queries through the configured upstreams (SPEC 2 "Forwarding").

    One instance per worker; safe for many concurrent `resolve()` calls on one event loop.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        edns_udp_size: int,
        max_in_flight: int = MAX_IN_FLIGHT,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        if not config.servers:
            raise ValueError("no upstream servers configured")
        self.config = config  # the daemon keeps this forwarder over a reload that keeps these
        self.edns_udp_size = edns_udp_size
        self._failures = [0] * len(config.servers)  # consecutive failures per server
        self._probe_at = [0.0] * len(config.servers)  # when a failing server is probed next
        self._next_probe = float("inf")  # min(_probe_at) over failing servers
        self._probes: set[asyncio.Task[None]] = set()
        self._probe_interval_s = probe_interval_s
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._throttler = Throttler(rate_limit=config.max_qps, period=1.0)
        self._closed = False
        self.stats = ForwarderStats()
        self._exchange = Exchange(edns_udp_size, config.timeout, self.stats)

    def close(self) -> None:
        """Refuse new work and stop probing. Sockets belong to attempts and are closed by them."""
        self._closed = True
        for task in self._probes:
            task.cancel()

    async def resolve(self, query: Query) -> ForwardedAnswer:
        """The first acceptable upstream answer to `query`'s question, parsed and checked
        once (wire.parse_upstream_answer; SPEC 2: an unparseable answer is a failure).

        Our own message is built from the question alone (fresh ID, RD, CD copied, an OPT with
        our size and the client's DO bit, no options), so nothing of the client reaches an
        upstream. Servers are tried in health order, `attempts` times each for `timeout` s;
        a truncated UDP answer is retried over TCP. NOERROR and NXDOMAIN are answers; the
        other rcodes in `_NEXT_SERVER_RCODES` move on to the next server.
        Raises UpstreamBusyError at once when rate limited or at the in-flight bound, and
        UpstreamError when every server failed or after DEADLINE_S.
        """
        if self._closed:
            raise UpstreamBusyError("forwarder is closed")
        if self._in_flight >= self._max_in_flight:
            self.stats.overloaded += 1
            raise UpstreamBusyError("in-flight upstream queries at their bound")
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_probe:
            self._start_probes(loop)
        self._in_flight += 1
        try:
            return await self._resolve(query)
        finally:
            self._in_flight -= 1

    async def _resolve(self, query: Query) -> ForwardedAnswer:
        try:
            # acquire() only suspends when the rate bound is reached; a zero timeout turns
            # that suspension into an immediate TimeoutError, so excess fails and never queues.
            async with asyncio.timeout(0):
                await self._throttler.acquire()  # type: ignore[no-untyped-call]  # untyped library
        except TimeoutError:
            self.stats.rate_limited += 1
            raise UpstreamBusyError("upstream rate limit reached") from None

        question = query.qname + struct.pack("!HH", query.qtype, query.qclass)
        flags = FLAG_RD | (query.flags & FLAG_CD)
        tried = 0
        try:
            async with asyncio.timeout(DEADLINE_S):
                for index in self._health_order():
                    tried += 1
                    for _ in range(self.config.attempts):
                        outcome, answer = await self._attempt(
                            index, question, flags, query.dnssec_ok
                        )
                        if answer is not None:
                            self.stats.answers += 1
                            return answer
                        if outcome is _Outcome.NEXT:
                            break
        except TimeoutError:
            raise UpstreamError(
                f"no answer from {tried} upstream(s) within {DEADLINE_S:g} s"
            ) from None
        raise UpstreamError(f"no usable answer from {tried} upstream(s)")

    # ---- health ------------------------------------------------------------------------------

    def _health_order(self) -> list[int]:
        """Healthy servers in config order, then failing ones, fewest failures first."""
        failures = self._failures
        return sorted(range(len(failures)), key=lambda i: (failures[i], i))

    def _mark_failed(self, index: int) -> None:
        self._failures[index] += 1
        if self._failures[index] == 1:
            log.warning("upstream %s is failing; trying others first", self.config.servers[index])
            probe_at = asyncio.get_running_loop().time() + self._probe_interval_s
            self._probe_at[index] = probe_at
            self._next_probe = min(self._next_probe, probe_at)

    def _start_probes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Probe each failing server whose time has come with `. NS`, in the background, so
        a recovered server goes back to its place without a client query waiting on it."""
        now = loop.time()
        upcoming = float("inf")
        for index, failures in enumerate(self._failures):
            if not failures:
                continue
            if self._probe_at[index] <= now:
                self._probe_at[index] = now + self._probe_interval_s
                task = loop.create_task(self._probe(index))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            upcoming = min(upcoming, self._probe_at[index])
        self._next_probe = upcoming

    async def _probe(self, index: int) -> None:
        self.stats.probes += 1
        try:
            async with asyncio.timeout(DEADLINE_S):
                await self._attempt(index, PROBE_QUESTION, FLAG_RD, False)
        except (TimeoutError, UpstreamBusyError):
            pass  # still failing (or we are out of sockets): the next probe comes later

    def _mark_ok(self, index: int) -> None:
        self._probe_at[index] = 0.0
        if self._failures[index]:
            log.info(
                "upstream %s is answering again after %d failures",
                self.config.servers[index],
                self._failures[index],
            )
            self._failures[index] = 0

    # ---- one attempt -------------------------------------------------------------------------

    async def _attempt(
        self, index: int, question: bytes, flags: int, dnssec_ok: bool
    ) -> tuple[_Outcome, ForwardedAnswer | None]:
        """One try at one server: UDP, then TCP if the UDP answer was truncated; the answer
        is parsed here, once, and only an answer that parses counts as one."""
        server = self.config.servers[index]
        try:
            response = await self._exchange.udp(server, question, flags, dnssec_ok)
            if (response[2] << 8) & FLAG_TC:
                self.stats.tcp_retries += 1
                response = await self._exchange.tcp(server, question, flags, dnssec_ok)
            answer = parse_upstream_answer(response, len(question))
        except TimeoutError:
            self.stats.timeouts += 1
            self._mark_failed(index)
            return _Outcome.FAILED, None
        except OSError as error:
            if error.errno in _LOCAL_ERRNOS:
                self.stats.overloaded += 1
                raise UpstreamBusyError("no socket for an upstream query") from None
            return self._failed(index)
        except (ExchangeFailedError, WireError):
            return self._failed(index)
        if answer.rcode in _NEXT_SERVER_RCODES:
            self.stats.failures += 1
            if answer.rcode in _UNHEALTHY_RCODES:
                self._mark_failed(index)
            return _Outcome.NEXT, None
        self._mark_ok(index)
        return _Outcome.ANSWER, answer

    def _failed(self, index: int) -> tuple[_Outcome, None]:
        self.stats.failures += 1
        self._mark_failed(index)
        return _Outcome.FAILED, None
