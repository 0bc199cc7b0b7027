"""A fake authoritative DNS server for DDNS tests: A, AAAA and CNAME records a test changes.

FakeUpstream's thread, sockets (UDP and TCP on one loopback port) and `delay_s`/`drop`/
`truncate_udp` knobs, with its own answering: replies built by hand (no dnslib, so a bench of
100,000 names is not measuring the fake), CNAMEs chased within its data like an authority
does for its own zone (or not, `follow_cnames = False`, as for a target in another zone),
queries counted per name and type, and the most queries it ever held at once.
Unknown names get NXDOMAIN, known names without the type NODATA, both with an SOA.
"""

from __future__ import annotations

import collections
import ipaddress
import struct
import time
from dataclasses import dataclass, field
from typing import Final

from smartdns.core.wire import (
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    QTYPE_SOA,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    encode_name,
    read_name,
)
from tests.fake_upstream import FakeUpstream

FLAG_AA: Final = 0x0400
_RR: Final = struct.Struct("!HHIH")
_TYPE_NAMES: Final = {"A": QTYPE_A, "AAAA": QTYPE_AAAA, "CNAME": QTYPE_CNAME}
_SOA_OWNER: Final = encode_name("test")
NEGATIVE_TTL: Final = 5  # the SOA's TTL and MINIMUM: what NXDOMAIN and NODATA live
_SOA_RDATA: Final = (
    encode_name("ns.test")
    + encode_name("hostmaster.test")
    + struct.pack("!5I", 1, 3600, 600, 86400, NEGATIVE_TTL)
)
_SOA_RECORD: Final = _SOA_OWNER + _RR.pack(QTYPE_SOA, 1, NEGATIVE_TTL, len(_SOA_RDATA)) + _SOA_RDATA


@dataclass(slots=True)
class _Node:
    ttl: int
    a: list[bytes] = field(default_factory=list)
    aaaa: list[bytes] = field(default_factory=list)
    cname: bytes | None = None


class FakeAuthority(FakeUpstream):
    """Answers from `set_addresses` / `set_cname` data; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.follow_cnames = True
        self._nodes: dict[bytes, _Node] = {}
        self._counts: collections.Counter[tuple[bytes, int]] = collections.Counter()
        self._total = 0
        self._received: collections.deque[float] = collections.deque()
        self._max_in_flight = 0
        self._last_seen: dict[bytes, float] = {}
        self.intervals: list[float] | None = None  # a list: time between a name's A queries

    # ---- data --------------------------------------------------------------------------------

    def set_addresses(self, name: str, addresses: list[str], ttl: int = 60) -> None:
        """`name` owns exactly these A and AAAA records (an empty list: NODATA for both)."""
        node = _Node(ttl)
        for text in addresses:
            packed = ipaddress.ip_address(text).packed
            (node.a if len(packed) == 4 else node.aaaa).append(packed)
        with self._lock:
            self._nodes[encode_name(name)] = node

    def set_cname(self, name: str, target: str, ttl: int = 60) -> None:
        with self._lock:
            self._nodes[encode_name(name)] = _Node(ttl, cname=encode_name(target))

    def remove(self, name: str) -> None:
        """`name` no longer exists: NXDOMAIN."""
        with self._lock:
            self._nodes.pop(encode_name(name), None)

    # ---- observations ------------------------------------------------------------------------

    def count(self, name: str | None = None, qtype: str | None = None) -> int:
        """Queries received for `name` (all names when None), of `qtype` (all when None)."""
        with self._lock:
            if name is None and qtype is None:
                return self._total
            wire = None if name is None else encode_name(name)
            wanted = None if qtype is None else _TYPE_NAMES[qtype.upper()]
            return sum(
                count
                for (qname, rtype), count in self._counts.items()
                if (wire is None or qname == wire) and (wanted is None or rtype == wanted)
            )

    @property
    def max_in_flight(self) -> int:
        """The most queries held at once: received less than `delay_s` before another."""
        with self._lock:
            return self._max_in_flight

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._total = 0
            self._received.clear()
            self._max_in_flight = 0

    def wait_for_count(self, name: str, count: int, timeout: float = 5.0) -> bool:
        """Block until `name` got at least `count` queries; False on timeout."""
        wire = encode_name(name)
        with self._changed:
            return self._changed.wait_for(
                lambda: self._counts[wire, QTYPE_A] + self._counts[wire, QTYPE_AAAA] >= count,
                timeout,
            )

    # ---- answering (server thread) -----------------------------------------------------------

    def _respond(self, raw: bytes, transport: str, source: tuple[str, int]) -> list[bytes] | None:
        try:
            query_id, flags, qdcount = struct.unpack_from("!HHH", raw)
            qname, after = read_name(raw, 12)
            (qtype,) = struct.unpack_from("!H", raw, after)
        except Exception:
            with self._lock:
                self._junk += 1
            return None
        if flags & FLAG_QR or qdcount != 1:
            return None
        self._note(qname, qtype)
        if self.drop:
            return None
        question = raw[12 : after + 4]
        rcode, answers, authority = self._answer(qname, qtype)
        flags_out = FLAG_QR | FLAG_AA | (flags & FLAG_RD) | rcode
        if transport == "udp" and self.truncate_udp:
            answers, authority = [], []
            flags_out |= FLAG_TC
        header = struct.pack("!6H", query_id, flags_out, 1, len(answers), len(authority), 0)
        return [header + question + b"".join(answers) + b"".join(authority)]

    def _note(self, qname: bytes, qtype: int) -> None:
        now = time.monotonic()
        with self._changed:
            self._counts[qname, qtype] += 1
            self._total += 1
            received = self._received
            received.append(now)
            while received and received[0] <= now - self.delay_s:
                received.popleft()
            self._max_in_flight = max(self._max_in_flight, len(received))
            if self.intervals is not None and qtype == QTYPE_A:
                last = self._last_seen.get(qname)
                if last is not None:
                    self.intervals.append(now - last)
                self._last_seen[qname] = now
            self._changed.notify_all()

    def _answer(self, qname: bytes, qtype: int) -> tuple[int, list[bytes], list[bytes]]:
        """rcode, answer records and authority records for (qname, qtype)."""
        answers: list[bytes] = []
        name = qname
        with self._lock:
            for _ in range(16):  # a loop in the test data ends here
                node = self._nodes.get(name)
                if node is None:  # RFC 6604: the rcode is the chain's last name's
                    return RCODE_NXDOMAIN, answers, [_SOA_RECORD]
                if node.cname is not None and qtype != QTYPE_CNAME:
                    answers.append(_record(name, QTYPE_CNAME, node.ttl, node.cname))
                    if not self.follow_cnames:
                        return RCODE_NOERROR, answers, []
                    name = node.cname
                    continue
                rdatas = node.a if qtype == QTYPE_A else node.aaaa if qtype == QTYPE_AAAA else []
                answers.extend(_record(name, qtype, node.ttl, rdata) for rdata in rdatas)
                return RCODE_NOERROR, answers, [] if rdatas else [_SOA_RECORD]
        return RCODE_NOERROR, answers, []


def _record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + _RR.pack(rtype, 1, ttl, len(rdata)) + rdata
