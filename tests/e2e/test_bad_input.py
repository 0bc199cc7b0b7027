"""Bad input never crashes or stalls the server: each case is followed by a normal query."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess

import dns.message
import dns.rcode
import pytest

from tests.e2e.harness import REGISTERED, UNREGISTERED, Server

NO_REPLY_WAIT_S = 0.5  # for cases whose correct outcome is silence


def _header(
    flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, query_id: int = 0x4242
) -> bytes:
    return struct.pack("!6H", query_id, flags, qd, an, ns, ar)


QUESTION = b"\x07example\x03org\x00\x00\x01\x00\x01"
OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"

CASES = [
    pytest.param(b"", None, id="empty_datagram_is_dropped"),
    pytest.param(b"\x42\x42\x01", None, id="runt_packet_is_dropped"),
    pytest.param(_header(flags=0x8000) + QUESTION, None, id="qr_set_is_dropped"),
    pytest.param(_header(flags=15 << 11) + QUESTION, dns.rcode.NOTIMP, id="opcode_15_gets_notimp"),
    pytest.param(
        _header(flags=4 << 11) + QUESTION, dns.rcode.NOTIMP, id="notify_opcode_gets_notimp"
    ),
    pytest.param(_header(qd=0), dns.rcode.FORMERR, id="qdcount_0_gets_formerr"),
    pytest.param(
        _header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR, id="qdcount_2_gets_formerr"
    ),
    pytest.param(
        _header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
        dns.rcode.FORMERR,
        id="label_over_63_gets_formerr",
    ),
    pytest.param(
        _header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
        dns.rcode.FORMERR,
        id="name_over_255_gets_formerr",
    ),
    pytest.param(
        _header() + b"\xc0\x0c\x00\x01\x00\x01",
        dns.rcode.FORMERR,
        id="compression_loop_gets_formerr",
    ),
    pytest.param(
        _header() + b"\xc0\xff\x00\x01\x00\x01",
        dns.rcode.FORMERR,
        id="pointer_out_of_range_gets_formerr",
    ),
    pytest.param(
        _header() + b"\x07example\x03or", dns.rcode.FORMERR, id="truncated_packet_gets_formerr"
    ),
    pytest.param(
        _header(ar=2) + QUESTION + OPT + OPT, dns.rcode.FORMERR, id="two_opt_records_get_formerr"
    ),
    pytest.param(
        _header() + os.urandom(5) + b"\xff",
        dns.rcode.FORMERR,
        id="garbage_after_header_gets_formerr",
    ),
]


@pytest.mark.parametrize("source", [REGISTERED, UNREGISTERED])
@pytest.mark.parametrize(("packet", "rcode"), CASES)
def test_bad_input_then_normal_query(
    server: Server, packet: bytes, rcode: int | None, source: str
) -> None:
    reply = server.raw_udp(
        packet, source=source, timeout_s=NO_REPLY_WAIT_S if rcode is None else 3.0
    )
    if rcode is None:
        assert reply is None
    else:
        assert reply is not None
        assert reply[:2] == packet[:2]  # same ID
        assert reply[2] & 0x80  # QR
        assert reply[3] & 0x0F == rcode
        assert reply[2] & 0x78 == packet[2] & 0x78  # the opcode copied (RFC 1035 §4.1.1)
    follow_up = server.query("www.netflix.com", "A")
    assert follow_up.rcode() == dns.rcode.NOERROR and follow_up.answer


@pytest.mark.parametrize("source", [REGISTERED, UNREGISTERED])
@pytest.mark.parametrize("opcode", ["15", "status", "notify", "update"])
def test_dig_with_another_opcode_gets_notimp_with_its_opcode(
    server: Server, opcode: str, source: str
) -> None:
    """dig discards a reply whose opcode differs ("Opcode mismatch") and times out. RD is
    copied (RFC 1035 §4.1.1), CD is not: RFC 4035 defines it for opcode QUERY only."""
    dig = shutil.which("dig")
    if dig is None:
        pytest.fail("dig is not installed; the README's test command installs it")
    args = [dig, "@127.0.0.1", "-p", str(server.port), "-b", source, f"+opcode={opcode}", "+cdflag"]
    result = subprocess.run(
        [*args, "+tries=1", "+time=2", "example.org"], capture_output=True, text=True, timeout=10
    )
    assert "mismatch" not in result.stdout + result.stderr
    assert "status: NOTIMP" in result.stdout, result.stdout
    shown = "RESERVED" + opcode if opcode.isdigit() else opcode.upper()
    assert f"opcode: {shown}," in result.stdout
    flags = re.search(r";; flags: ([a-z ]*);", result.stdout)
    assert flags is not None and flags[1].split() == ["qr", "rd", "ra"], result.stdout


def test_burst_of_random_packets_does_not_stall(server: Server) -> None:
    rng = __import__("random").Random(1234)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((REGISTERED, 0))
        for _ in range(2000):
            size = rng.randrange(0, 600)
            sock.sendto(bytes(rng.getrandbits(8) for _ in range(size)), ("127.0.0.1", server.port))
    reply = server.query("example.org", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert "Traceback" not in server.output()


def test_tcp_garbage_closes_only_that_connection(server: Server) -> None:
    with socket.create_connection(
        ("127.0.0.1", server.port), timeout=3, source_address=(REGISTERED, 0)
    ) as bad:
        bad.sendall(b"\x00\x03abc")
        assert bad.recv(10) == b""  # closed by the server
    reply = server.query("www.netflix.com", "A", tcp=True)
    assert reply.answer
