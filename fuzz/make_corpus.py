"""Write the seed corpus for fuzz_pipeline.py: real queries built with dnspython.

    python fuzz/make_corpus.py [fuzz/corpus]

Each file is one selector byte (see fuzz_pipeline.py: source, transport, upstream answer
kind) followed by a DNS query as a client would send it. File names are the content's hash,
as libFuzzer names its own finds, so rerunning is idempotent.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdataclass
import dns.rdatatype

DEFAULT_DIRECTORY = Path(__file__).resolve().parent / "corpus"

# Selector bits: source (0-7) | 8 for TCP | upstream answer kind << 4. Registered sources
# are 0-3; see HOSTS in fuzz_pipeline.py.
REGISTERED_UDP = 0x00
REGISTERED_V6_TCP = 0x0A
UNREGISTERED_UDP = 0x04

LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 47]) + ".netflix.com"


def _edns_queries() -> Iterator[tuple[int, dns.message.Message]]:
    options: list[dns.edns.Option] = [
        dns.edns.ECSOption("192.0.2.0", 24),
        dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8),
        dns.edns.GenericOption(dns.edns.OptionType.NSID, b""),
        dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * 32),
        dns.edns.GenericOption(65001, b"unknown option"),
    ]
    for index, option in enumerate(options):
        yield (
            index << 4,
            dns.message.make_query("www.netflix.com", "A", use_edns=0, options=[option]),
        )
    for payload in (0, 511, 512, 1232, 4096, 65535):
        yield (
            REGISTERED_UDP,
            dns.message.make_query("example.org", "TXT", use_edns=0, payload=payload),
        )
    yield REGISTERED_UDP, dns.message.make_query("example.org", "A", want_dnssec=True)
    yield REGISTERED_UDP, dns.message.make_query("bbc.co.uk", "AAAA", want_dnssec=True)
    yield REGISTERED_UDP, dns.message.make_query("netflix.com", "A", use_edns=1)  # BADVERS


def _plain_queries() -> Iterator[tuple[int, dns.message.Message]]:
    for kind, (name, qtype) in enumerate(
        [
            ("netflix.com", "A"),
            ("WwW.NetFlix.CoM", "A"),  # 0x20 case randomization
            ("api.netflix.com", "AAAA"),
            ("www.bbc.co.uk", "AAAA"),
            ("www.netflix.com", "HTTPS"),
            ("www.netflix.com", "SVCB"),
            ("www.netflix.com", "ANY"),
            ("www.netflix.com", "MX"),
            ("notnetflix.com", "A"),
            ("example.com", "A"),
            ("example.com", "AAAA"),
            ("example.com", "NS"),
            ("example.com", "SOA"),
            ("example.com", "CAA"),
            ("example.com", "DS"),
            ("example.com", "DNSKEY"),
            ("1.2.0.192.in-addr.arpa", "PTR"),
            (".", "NS"),
            (LONG_NAME, "A"),
            (LONG_NAME, "TXT"),
        ]
    ):
        yield (kind & 7) << 4 | (kind % 8), dns.message.make_query(name, qtype)
    yield UNREGISTERED_UDP, dns.message.make_query("www.netflix.com", "A")
    yield REGISTERED_V6_TCP, dns.message.make_query("www.netflix.com", "A")
    yield 0x0B, dns.message.make_query("example.com", "A")  # IPv4-mapped, TCP
    yield 0x07, dns.message.make_query("hulu.com", "A")  # unparseable source text
    chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    yield REGISTERED_UDP, chaos
    checking = dns.message.make_query("example.com", "A")
    checking.flags |= dns.flags.CD | dns.flags.AD
    yield REGISTERED_UDP, checking
    recursion_off = dns.message.make_query("example.com", "A")
    recursion_off.flags &= ~dns.flags.RD
    yield REGISTERED_UDP, recursion_off
    notify = dns.message.make_query("netflix.com", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    yield REGISTERED_UDP, notify


def _raw_queries() -> Iterator[tuple[int, bytes]]:
    """Malformed queries dnspython will not build."""
    base = dns.message.make_query("www.netflix.com", "A", id=0x1234).to_wire()
    yield REGISTERED_UDP, base[:4] + b"\x00\x02" + base[6:] + base[12:]  # QDCOUNT 2
    yield REGISTERED_UDP, base[:4] + b"\x00\x00" + base[6:12]  # QDCOUNT 0
    yield REGISTERED_UDP, base[:12] + b"\xc0\x0c\x00\x01\x00\x01"  # pointer loop in question
    yield REGISTERED_UDP, base[:-3]  # truncated question
    yield REGISTERED_UDP, base[:2] + struct.pack("!H", 0x8180) + base[4:]  # a response
    yield REGISTERED_UDP, base[:7]  # runt
    edns = dns.message.make_query("example.com", "A", use_edns=0).to_wire()
    yield REGISTERED_UDP, edns[:10] + b"\x00\x02" + edns[12:] + edns[-11:]  # two OPT records
    yield REGISTERED_UDP, base[:12] + b"\x40abc\x00\x00\x01\x00\x01"  # extended label type
    yield REGISTERED_UDP, base[:12] + b"\x3f" + b"x" * 62  # label runs past the end


def corpus() -> Iterator[bytes]:
    for selector, message in (*_edns_queries(), *_plain_queries()):
        yield bytes([selector]) + message.to_wire()
    for selector, raw in _raw_queries():
        yield bytes([selector]) + raw


def main(argv: list[str]) -> int:
    directory = Path(argv[1]) if len(argv) > 1 else DEFAULT_DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for data in corpus():
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
        count += 1
    print(f"{count} seeds in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
