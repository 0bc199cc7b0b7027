"""Forwarding to upstream resolvers: health order, fresh ID and source port, retries, TCP on TC.

Owns the sockets it opens (one per attempt, closed on every path). Sends nothing of the client's
but the question; keeps aggregate counters only and never logs a query name.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Final

from asyncio_throttle.throttler import Throttler

from smartdns.config.model import HostPort, UpstreamConfig
from smartdns.core.wire import (
    FLAG_CD,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    HEADER_SIZE,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    Query,
    build_opt,
    parse_upstream_answer,
    skip_name,
)
from smartdns.errors import UpstreamError, WireError

log = logging.getLogger(__name__)

DEADLINE_S: Final = 4.0  # SPEC 2: the client gets SERVFAIL if nothing has answered within 4 s
MAX_MESSAGE_BYTES: Final = 65535  # largest UDP datagram we read; TCP lengths cannot exceed it
MAX_IN_FLIGHT: Final = 1000  # concurrent resolve() calls per worker; each holds a socket
PROBE_INTERVAL_S: Final = 10.0  # a failing upstream is probed this often so it can come back
# `. IN NS`: what a probe asks. It carries nothing of any client.
PROBE_QUESTION: Final = b"\x00" + struct.pack("!HH", 2, 1)
# Our own process is out of sockets or memory: not the upstream's fault.
_LOCAL_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_OPCODE_MASK: Final = 0x7800
_RCODE_MASK: Final = 0x000F
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


class _AttemptFailed(Exception):
    """An attempt's reply was unusable; internal, never leaves this module."""


class UpstreamBusyError(UpstreamError):
    """Refused for lack of local capacity (rate bound, in-flight bound, no sockets): says
    nothing about the upstreams, so it is neither remembered as a failure nor held against
    an upstream's health."""


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
        self._opt_plain = build_opt(edns_udp_size, dnssec_ok=False)
        self._opt_do = build_opt(edns_udp_size, dnssec_ok=True)
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

    def close(self) -> None:
        """Refuse new work and stop probing. Sockets belong to attempts and are closed by them."""
        self._closed = True
        for task in self._probes:
            task.cancel()

    async def resolve(self, query: Query) -> bytes:
        """Return the first acceptable upstream response to `query`'s question, as received.

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

    async def _resolve(self, query: Query) -> bytes:
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
                        outcome, response = await self._attempt(
                            index, question, flags, query.dnssec_ok
                        )
                        if outcome is _Outcome.ANSWER:
                            self.stats.answers += 1
                            return response
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
    ) -> tuple[_Outcome, bytes]:
        """One try at one server: UDP, then TCP if the UDP answer was truncated."""
        server = self.config.servers[index]
        try:
            response = await self._exchange_udp(server, question, flags, dnssec_ok)
            if _flags(response) & FLAG_TC:
                self.stats.tcp_retries += 1
                response = await self._exchange_tcp(server, question, flags, dnssec_ok)
            _check_parseable(response, len(question))
        except TimeoutError:
            self.stats.timeouts += 1
            self._mark_failed(index)
            return _Outcome.FAILED, b""
        except OSError as error:
            if error.errno in _LOCAL_ERRNOS:
                self.stats.overloaded += 1
                raise UpstreamBusyError("no socket for an upstream query") from None
            self.stats.failures += 1
            self._mark_failed(index)
            return _Outcome.FAILED, b""
        except _AttemptFailed:
            self.stats.failures += 1
            self._mark_failed(index)
            return _Outcome.FAILED, b""
        rcode = _flags(response) & _RCODE_MASK
        if rcode in _NEXT_SERVER_RCODES:
            self.stats.failures += 1
            if rcode in _UNHEALTHY_RCODES:
                self._mark_failed(index)
            return _Outcome.NEXT, b""
        self._mark_ok(index)
        return _Outcome.ANSWER, response

    def _build(self, question: bytes, flags: int, dnssec_ok: bool) -> tuple[int, bytes]:
        """Our query: fresh random ID, one question, one OPT (RFC 6891) without options."""
        query_id = secrets.randbits(16)
        header = struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 1)
        return query_id, header + question + (self._opt_do if dnssec_ok else self._opt_plain)

    async def _exchange_udp(
        self, server: HostPort, question: bytes, flags: int, dnssec_ok: bool
    ) -> bytes:
        """Send over a fresh connected UDP socket; wait for the reply that matches.

        Connected, so the kernel drops datagrams from other sources; the OS picks a fresh
        source port per socket. Non-matching datagrams are counted and ignored until the
        attempt's timeout (a spoofer must not be able to end the attempt early).
        """
        query_id, message = self._build(question, flags, dnssec_ok)
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((server.host, server.port))
            sock.send(message)
            self.stats.queries_sent += 1
            async with asyncio.timeout(self.config.timeout):
                while True:
                    await _wait_io(loop, sock, writable=False)
                    while True:
                        try:
                            data = sock.recv(MAX_MESSAGE_BYTES)
                        except BlockingIOError:
                            break
                        if _matches(data, query_id, question):
                            return data
                        self.stats.mismatched += 1
        finally:
            sock.close()

    async def _exchange_tcp(
        self, server: HostPort, question: bytes, flags: int, dnssec_ok: bool
    ) -> bytes:
        """One query over a fresh TCP connection with 2-byte length framing (RFC 7766)."""
        query_id, message = self._build(question, flags, dnssec_ok)
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.config.timeout):
                status = sock.connect_ex((server.host, server.port))
                if status == errno.EINPROGRESS:
                    await _wait_io(loop, sock, writable=True)
                    status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if status:
                    raise OSError(status, "connect failed")
                await _send_all(loop, sock, struct.pack("!H", len(message)) + message)
                self.stats.queries_sent += 1
                (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
                data = await _recv_exactly(loop, sock, length)
        finally:
            sock.close()
        if not _matches(data, query_id, question):
            self.stats.mismatched += 1
            raise _AttemptFailed("TCP reply does not match the query")
        return data


# ---- helpers -------------------------------------------------------------------------------


def _flags(message: bytes) -> int:
    flags: int = struct.unpack_from("!H", message, 2)[0]
    return flags


def _matches(data: bytes, query_id: int, question: bytes) -> bool:
    """Is `data` a reply to our query: same ID, QR set, QUERY, one question equal to ours?

    The name is compared case-insensitively (an upstream may apply 0x20 randomization);
    lower-casing also touches length bytes, but those are at most 63, below b"A".
    """
    end = HEADER_SIZE + len(question)
    if len(data) < end:
        return False
    reply_id, flags, qdcount = struct.unpack_from("!HHH", data)
    if reply_id != query_id or not flags & FLAG_QR or flags & _OPCODE_MASK or qdcount != 1:
        return False
    name_end = end - 4
    return (
        data[HEADER_SIZE:name_end].lower() == question[:-4] and data[name_end:end] == question[-4:]
    )


def _check_parseable(data: bytes, question_length: int | None = None) -> None:
    """Refuse a reply that wire.parse_upstream_answer refuses (SPEC 2: unparseable upstream
    answers count as upstream failures): truncated, names over 255 octets or with pointers to
    no earlier name, A/AAAA with the wrong RDLENGTH and other RDATA that does not fit its
    type, more than MAX_UPSTREAM_RECORDS records, a misplaced OPT. The walk costs about a
    microsecond per record and is capped, so a crafted reply cannot stall the loop (a full
    parser such as dnslib costs over ten times that per record)."""
    try:
        if question_length is None:
            question_length = skip_name(data, HEADER_SIZE) + 4 - HEADER_SIZE
        parse_upstream_answer(data, question_length)
    except WireError:
        raise _AttemptFailed("unparseable upstream reply") from None


async def _wait_io(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    """Wait until `sock` is readable (or writable). The watcher is removed before returning,
    on every path, so the caller can close the socket at once without leaving a stale fd
    registered in the loop."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await _wait_io(loop, sock, writable=True)
            continue
        view = view[sent:]


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes (at most 65535, a 2-byte length); EOF is a failure."""
    buffer = bytearray()
    while len(buffer) < size:
        try:
            chunk = sock.recv(size - len(buffer))
        except BlockingIOError:
            await _wait_io(loop, sock, writable=False)
            continue
        if not chunk:
            raise _AttemptFailed("upstream closed the TCP connection early")
        buffer += chunk
    return bytes(buffer)
