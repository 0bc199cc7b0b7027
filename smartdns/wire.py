"""DNS wire format for the hot path: header, question and OPT parsing, reply building.

Pure functions on bytes; no I/O, no logging, no dnslib (it costs tens of µs per packet).
"""

from __future__ import annotations

from typing import Final, NamedTuple

QTYPE_A: Final = 1
QTYPE_NS: Final = 2
QTYPE_CNAME: Final = 5
QTYPE_SOA: Final = 6
QTYPE_AAAA: Final = 28
QTYPE_OPT: Final = 41
QTYPE_SVCB: Final = 64
QTYPE_HTTPS: Final = 65
QTYPE_ANY: Final = 255
QCLASS_IN: Final = 1
QCLASS_CHAOS: Final = 3

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5
RCODE_BADVERS: Final = 16  # extended: upper 8 bits travel in the OPT TTL (RFC 6891 §6.1.3)

FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
FLAG_AD: Final = 0x0020
FLAG_CD: Final = 0x0010
EDNS_FLAG_DO: Final = 0x8000

HEADER_SIZE: Final = 12
MIN_UDP_SIZE: Final = 512  # RFC 6891 §6.2.5: smaller advertised sizes count as 512


class Query(NamedTuple):
    """One parsed query. A NamedTuple, not a dataclass: it is built once per packet.

    `question` is the question section exactly as received (0x20 case preserved);
    `qname` is the owner name in wire format, lower-cased, ending with the root label;
    `udp_size` is the client's EDNS payload size (at least 512) or 0 without EDNS.
    """

    id: int
    flags: int
    question: bytes
    qname: bytes
    qtype: int
    qclass: int
    has_edns: bool
    udp_size: int
    dnssec_ok: bool

    @property
    def udp_limit(self) -> int:
        """Largest UDP reply the client accepts, before our own `edns_udp_size` cap."""
        return self.udp_size if self.has_edns else MIN_UDP_SIZE
