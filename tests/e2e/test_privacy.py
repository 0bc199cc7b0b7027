"""SPEC 7 as a test: after a debug-level session with canary sources and names, no canary is
found in anything the server produced, except registered addresses in the registration table."""

from __future__ import annotations

import ipaddress
import socket
import sqlite3
import struct
from pathlib import Path

import dns.message
import yaml

from tests.e2e.harness import Server, running_server
from tests.fake_upstream import FakeUpstream

REGISTERED_CANARY = "127.0.0.77"
UNREGISTERED_CANARY = "127.0.0.88"
CANARY_NAMES = (
    "canary-fwd-7f3a.example.org",
    "canary-unblock-9b1c.netflix.com",
    "canary-bad-51de.example.org",
)


def address_forms(text: str) -> list[bytes]:
    """Dotted, reversed (in-addr.arpa), hex, packed and upper-case forms of an address."""
    address = ipaddress.ip_address(text)
    packed = address.packed
    forms = [text, address.reverse_pointer, packed.hex(), packed.hex().upper(), str(int(address))]
    if address.version == 4:
        forms.append(".".join(reversed(text.split("."))))
    return [form.encode() for form in forms] + [packed]


def name_forms(name: str) -> list[bytes]:
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"
    first_label = name.split(".")[0]
    return [
        name.encode(),
        name.upper().encode(),
        wire,
        first_label.encode(),
        first_label.encode().hex().encode(),
    ]


def find_canaries(blobs: dict[str, bytes], canaries: dict[str, list[bytes]]) -> list[str]:
    hits = []
    for where, blob in blobs.items():
        lowered = blob.lower()
        for canary, forms in canaries.items():
            for form in forms:
                if form in blob or (len(form) > 4 and form.lower() in lowered):
                    hits.append(f"{canary} ({form!r}) in {where}")
    return hits


def produced_files(root: Path) -> dict[str, bytes]:
    return {
        str(path): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.suffix != ".sock"
    }


def test_search_finds_a_planted_canary(tmp_path: Path) -> None:
    planted = tmp_path / "planted.log"
    planted.write_text(f"client {UNREGISTERED_CANARY} asked {CANARY_NAMES[0].upper()}\n")
    hits = find_canaries(
        produced_files(tmp_path),
        {"address": address_forms(UNREGISTERED_CANARY), "name": name_forms(CANARY_NAMES[0])},
    )
    assert len(hits) >= 2


def _traffic(server: Server) -> None:
    for source in (REGISTERED_CANARY, UNREGISTERED_CANARY):
        for name in CANARY_NAMES:
            for qtype in ("A", "AAAA", "HTTPS", "TXT"):
                server.query(name, qtype, source=source)
            server.query(name, "A", source=source, tcp=True)
            server.query(name, "A", source=source, use_edns=1)  # BADVERS
        bad = dns.message.make_query(CANARY_NAMES[2], "A").to_wire()
        server.raw_udp(bad[:2] + b"\x78\x00" + bad[4:], source=source)  # opcode 15
        server.raw_udp(bad[:5] + b"\x02" + bad[6:], source=source)  # QDCOUNT 2
        server.raw_udp(bad[:-3], source=source)  # truncated
        with socket.create_connection(
            ("127.0.0.1", server.port), timeout=3, source_address=(source, 0)
        ) as conn:
            conn.sendall(struct.pack("!H", 5) + b"junk!")
            conn.recv(10)


def test_no_canary_reaches_output_files_or_database(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.add(CANARY_NAMES[0], "A", [f"{CANARY_NAMES[0]}. 300 IN A 192.0.2.9"])
    with running_server(tmp_path, upstream.address, registrations=(REGISTERED_CANARY,)) as server:
        _traffic(server)
        assert server.query(
            CANARY_NAMES[0], "A", source=REGISTERED_CANARY
        ).answer  # the session really ran
        config = yaml.safe_load(server.config_path.read_text())
    assert server.stop() == 0
    assert "DEBUG" in server.output() or config["logging"]["level"] == "debug"

    canaries = {"unregistered address": address_forms(UNREGISTERED_CANARY)}
    canaries.update({name: name_forms(name) for name in CANARY_NAMES})
    everything = produced_files(tmp_path)
    database = sqlite3.connect(tmp_path / "registrations.db")
    dump = "\n".join(database.iterdump()).encode()
    everything["database dump"] = dump
    assert find_canaries(everything, canaries) == []

    # The registered canary may appear only in the registration table itself.
    registered = {"registered address": address_forms(REGISTERED_CANARY)}
    outside_registry = {
        where: blob
        for where, blob in everything.items()
        if where != "database dump" and not Path(where).name.startswith("registrations.db")
    }
    outside_registry["database dump without entries"] = b"\n".join(
        line for line in dump.split(b"\n") if not line.startswith(b'INSERT INTO "entries"')
    )
    assert find_canaries(outside_registry, registered) == []
    database.close()
