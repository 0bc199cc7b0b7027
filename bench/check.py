"""Answer check: dnsperf counts rcodes only (and h2load, for DoH, HTTP statuses only), so
before measuring, a sample of each case is asked with a real client over each transport and
the answers themselves are compared (a fast wrong answer is a failure). Uses dnslib, from
smartdns' test extra, and h2 for DoH.
"""

from __future__ import annotations

import base64
import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import h2.config
import h2.connection
import h2.events
from dnslib import QTYPE, RCODE, DNSRecord

from bench.tools import (
    DOH_PATH,
    REGIONS,
    REGISTERED,
    SERVER_NAME,
    UNREGISTERED,
    ZONES,
    TlsFiles,
    upstream_address,
    upstream_names,
)

TIMEOUT_S = 2.0
SAMPLE = 25


@dataclass(frozen=True, slots=True)
class Expectation:
    name: str
    source: str
    rcode: str
    addresses: frozenset[str]  # the A records expected in the answer section


def expected_unblock(name: str) -> frozenset[str]:
    labels = name.lower().split(".")
    for start in range(len(labels)):
        zone = ".".join(labels[start:])
        if zone in ZONES:
            return frozenset(REGIONS[ZONES[zone]])
    raise ValueError("not in an unblock zone")


def expectations(
    unblock: Sequence[str], upstream_count: int, refuses_unregistered: bool
) -> list[Expectation]:
    """A spread-out sample of case (a), (b) and, where the server can do it, (c)."""
    step_a = max(1, len(unblock) // SAMPLE)
    step_b = max(1, upstream_count // SAMPLE)
    names_b = upstream_names(upstream_count)
    wanted = [
        Expectation(name, REGISTERED, "NOERROR", expected_unblock(name))
        for name in unblock[::step_a]
    ]
    wanted += [
        Expectation(names_b[i], REGISTERED, "NOERROR", frozenset({upstream_address(i)}))
        for i in range(0, upstream_count, step_b)
    ]
    if refuses_unregistered:
        wanted += [
            Expectation(name, UNREGISTERED, "REFUSED", frozenset())
            for name in (*unblock[::step_a], *names_b[::step_b])
        ]
    return wanted


class Exchange(Protocol):
    """Sends one DNS message and returns the reply's bytes (one transport, one source)."""

    def __call__(self, message: bytes) -> bytes: ...


def ask(exchange: Exchange, name: str) -> tuple[str, frozenset[str]]:
    """The rcode and the A addresses of the answer to `name A`."""
    request = DNSRecord.question(name, "A")
    reply = DNSRecord.parse(exchange(request.pack()))
    if reply.header.id != request.header.id:
        return "WRONG-ID", frozenset()
    addresses = frozenset(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)
    return str(RCODE.get(reply.header.rcode)), addresses


@contextmanager
def udp_exchange(port: int, source: str) -> Iterator[Exchange]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(TIMEOUT_S)

        def exchange(message: bytes) -> bytes:
            sock.sendto(message, ("127.0.0.1", port))
            return sock.recv(65535)

        yield exchange


def _tls_socket(port: int, source: str, tls: TlsFiles, alpn: str) -> ssl.SSLSocket:
    """A verified TLS connection to 127.0.0.1:`port` from `source`, server name SERVER_NAME
    (no device ID: the server authorizes by source address)."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT_S, (source, 0))
    try:
        return context.wrap_socket(raw, server_hostname=SERVER_NAME)
    except BaseException:
        raw.close()
        raise


def _read_exactly(sock: ssl.SSLSocket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        data += chunk
    return data


@contextmanager
def dot_exchange(port: int, source: str, tls: TlsFiles) -> Iterator[Exchange]:
    """One DoT connection (RFC 7858: 2-byte length framing), a query at a time."""
    with _tls_socket(port, source, tls, "dot") as sock:

        def exchange(message: bytes) -> bytes:
            sock.sendall(struct.pack("!H", len(message)) + message)
            (length,) = struct.unpack("!H", _read_exactly(sock, 2))
            return _read_exactly(sock, length)

        yield exchange


@contextmanager
def doh_exchange(port: int, source: str, tls: TlsFiles) -> Iterator[Exchange]:
    """One HTTP/2 connection, a `GET /dns-query?dns=` at a time (RFC 8484 §4.1: ID 0, which
    the reply keeps; the caller's ID is put back so `ask` can compare it)."""
    with _tls_socket(port, source, tls, "h2") as sock:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())

        def exchange(message: bytes) -> bytes:
            query_id, anonymous = message[:2], b"\0\0" + message[2:]
            encoded = base64.urlsafe_b64encode(anonymous).rstrip(b"=").decode()
            stream = connection.get_next_available_stream_id()
            headers = [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", SERVER_NAME),
                (":path", f"{DOH_PATH}?dns={encoded}"),
                ("accept", "application/dns-message"),
            ]
            connection.send_headers(stream, headers, end_stream=True)
            sock.sendall(connection.data_to_send())
            status, body = "", b""
            while True:
                data = sock.recv(65535)
                if not data:
                    raise ConnectionError("connection closed mid-response")
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers).get(b":status", b"").decode()
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                        sock.sendall(connection.data_to_send())
                        if status != "200":
                            raise ConnectionError(f"HTTP status {status or 'missing'}")
                        return query_id + body[2:]
                sock.sendall(connection.data_to_send())

        yield exchange


@contextmanager
def exchange_for(
    transport: str, port: int, source: str, tls: TlsFiles | None
) -> Iterator[Exchange]:
    """A client of `transport` (udp, dot, doh) from `source`, one connection for its life."""
    if transport == "udp":
        with udp_exchange(port, source) as exchange:
            yield exchange
        return
    assert tls is not None
    opener = dot_exchange if transport == "dot" else doh_exchange
    with opener(port, source, tls) as exchange:
        yield exchange


def check_answers(
    transport: str, port: int, tls: TlsFiles | None, wanted: Sequence[Expectation]
) -> list[str]:
    """Problems found (empty when every sampled answer is right). No names of clients are
    involved: these are benchmark names on loopback."""
    problems = []
    for source in dict.fromkeys(item.source for item in wanted):
        try:
            with exchange_for(transport, port, source, tls) as exchange:
                for item in (item for item in wanted if item.source == source):
                    problems += _check_one(exchange, item)
        except (OSError, ssl.SSLError) as error:
            problems.append(f"{transport} from {source}: connection failed ({error})")
    return problems


def warm_up(transport: str, port: int, tls: TlsFiles | None, names: Sequence[str]) -> list[str]:
    """Ask every name once over one connection from the registered source (fills the
    server's cache); problems: any answer that is not NOERROR with an address."""
    problems = []
    with exchange_for(transport, port, REGISTERED, tls) as exchange:
        for name in names:
            rcode, addresses = ask(exchange, name)
            if rcode != "NOERROR" or not addresses:
                problems.append(f"{transport} warm-up: {name} got {rcode} {sorted(addresses)}")
    return problems


def _check_one(exchange: Exchange, item: Expectation) -> list[str]:
    try:
        rcode, addresses = ask(exchange, item.name)
    except (OSError, TimeoutError) as error:
        return [f"{item.name} from {item.source}: no answer ({error})"]
    if rcode != item.rcode or addresses != item.addresses:
        return [
            f"{item.name} from {item.source}: got {rcode} {sorted(addresses)},"
            f" want {item.rcode} {sorted(item.addresses)}"
        ]
    return []
