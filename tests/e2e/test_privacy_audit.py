"""The privacy audit (issue 7 item 5, SPEC 7) as a test.

One session inside a private network namespace (so IPv6 canary sources other than ::1 exist),
at `logging.level: debug`: canary sources — registered and unregistered, IPv4 and IPv6 — send
valid queries (A, AAAA, HTTPS, TXT; unblock-zone and forwarded names), malformed packets
(FORMERR, NOTIMP, BADVERS, dropped), TCP queries and rate-limited floods, and the sync API gets
PUT/GET/DELETE of an account holding canary addresses, PUTs with invalid canary addresses (422)
and requests with a wrong token (401); an account registers a canary DDNS hostname that the
upstream (the default `ddns.resolvers`) resolves to canary addresses, which then authorize;
DoH clients (HTTP/2 and HTTP/1.1) with a canary user agent ask canary names, name a canary
device ID in the path and ask a canary path; DoT clients ask a canary name, name a canary
device ID in the TLS server name and send a canary server name that is not ours (refused in
the handshake). Then everything the server produced is
searched — stdout, stderr, every file under its state and TMPDIR directories, the database
dump and raw database/WAL bytes, /metrics, /v1/status, /healthz, the sync API's error
bodies — for every canary in dotted/compressed, reversed, hex, packed, decimal, expanded and
upper-case forms, and names in text, upper-case and wire form. The only hits allowed:
registered addresses in the registration table (its `entries` rows in the dump, the raw
database files), and the hostname and what it resolved to in its `hostnames` and `resolved`
rows.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import pytest

from tests.certificates import SERVER_NAME, write_pair
from tests.e2e.doh_client import MEDIA_TYPE, H2Client, get_target, h1_request
from tests.e2e.harness import REPO, Server, _env, rcode_within
from tests.e2e.netns import Namespace, running_server_in, upstream_in
from tests.e2e.streams import framed, read_reply
from tests.e2e.test_privacy import address_forms, find_canaries, name_forms, produced_files
from tests.e2e.test_sync_api import call, put

# Canary sources. IPv6 ones each in their own /56, the rate limiter's bucket for IPv6.
REGISTERED_V4 = "127.0.0.77"
REGISTERED_V6 = "fd53:7:100::77"
UNREGISTERED_V4 = "127.0.0.88"
UNREGISTERED_V6 = "fd53:7:300::88"
FLOOD_REGISTERED = ("127.0.0.79", "fd53:7:200::79")
FLOOD_UNREGISTERED = ("127.0.0.89", "fd53:7:400::89")
SYNC_ADDRESSES = ("127.0.0.99", "fd53:7:500::99")  # registered through the API, then deleted
DDNS_ADDRESSES = ("127.0.0.55", "fd53:7:600::55")  # what the canary hostname resolves to
INVALID_ADDRESSES = ("127.0.0.66/33", "ff05:7::66")  # a PUT holding one of them gets 422
QUERY_SOURCES = (REGISTERED_V4, REGISTERED_V6, UNREGISTERED_V4, UNREGISTERED_V6)
REGISTERED_SOURCES = (REGISTERED_V4, REGISTERED_V6, *FLOOD_REGISTERED)
NAMESPACE_ADDRESSES = (
    REGISTERED_V6,
    UNREGISTERED_V6,
    *FLOOD_REGISTERED,
    *FLOOD_UNREGISTERED,
    *SYNC_ADDRESSES,
    DDNS_ADDRESSES[1],
)

# Canary names.
FORWARDED = "canary-fwd-7f3a.example.org"
UNBLOCK = "canary-unblock-9b1c.netflix.com"
NXDOMAIN = "canary-nx-2e8d.example.org"
MALFORMED = "canary-bad-51de.example.org"
TCP_NAME = "canary-tcp-6a0b.example.org"
FLOOD_NAME = "canary-flood-4c2f.nflxvideo.net"
CHAOS_NAME = "canary-chaos-83b7.bind"
DOH_NAME = "canary-doh-1a6c.example.org"
DOT_NAME = "canary-dot-0d4b.example.org"
NAMES = (
    FORWARDED,
    UNBLOCK,
    NXDOMAIN,
    MALFORMED,
    TCP_NAME,
    FLOOD_NAME,
    CHAOS_NAME,
    DOH_NAME,
    DOT_NAME,
)
# DoH request details (SPEC 7: never a path, header, user agent or device ID)
DOH_AGENT = "canary-agent-3d9e/7.1"
DOH_DEVICE = "canarydevice7c41a0b2e9d5"  # a well-formed device ID nobody registered
DOH_PATH = "/canary-path-8f2d"
DOH_PORT = 8443  # any port is free in a fresh namespace
# DoT: the TLS server name (SPEC 7: never a device ID, nor any name a client sends)
DOT_DEVICE = "canarydotdevice5b2e8c1f7a"  # a well-formed device ID nobody registered
DOT_FOREIGN = "canary-sni-3f7a.example.org"  # not ours: refused in the handshake
DOT_PORT = 8853
DDNS_NAME = "canary-ddns-5e1f.example.org"  # a registered hostname: registration data
DDNS_ACCOUNT = "acct-ddns"

SYNC_ACCOUNT = "acct-audit"  # account ids are opaque and stored by design: not a canary
# A device ID registered through the sync API (SPEC 3, 7): only its digest may be stored.
SYNC_DEVICE = "canarysyncdevice4e7b9a2c6d"
WRONG_TOKEN = "c0ffee5eed" * 6

CLIENT_QPS = 40  # low enough for the floods, high enough for the ~20 queries of each source
REFUSED_QPS = 40
FLOOD_PACKETS = 400
QUERY_TIMEOUT_S = 3.0
DROP_WAIT_S = 0.2  # how long to listen for the reply that must not come (QR set)
METRICS_DEADLINE_S = 5.0
CLIENT_TIMEOUT_S = 60.0
SYNC_EFFECT_S = 2.0
DDNS_EFFECT_S = 5.0  # the refresher's hostname poll, then the lookup and its write

UPSTREAM_RECORDS = [
    (FORWARDED, "A", [f"{FORWARDED}. 300 IN A 192.0.2.9"]),
    (FORWARDED, "AAAA", [f"{FORWARDED}. 300 IN AAAA 2001:db8::9"]),
    (FORWARDED, "TXT", [f'{FORWARDED}. 300 IN TXT "fwd"']),
    (TCP_NAME, "A", [f"{TCP_NAME}. 300 IN A 192.0.2.10"]),
    (DOH_NAME, "A", [f"{DOH_NAME}. 300 IN A 192.0.2.12"]),
    (DOT_NAME, "A", [f"{DOT_NAME}. 300 IN A 192.0.2.13"]),
    ("www.netflix.com", "A", ["www.netflix.com. 300 IN A 192.0.2.11"]),
    (DDNS_NAME, "A", [f"{DDNS_NAME}. 60 IN A {DDNS_ADDRESSES[0]}"]),
    (DDNS_NAME, "AAAA", [f"{DDNS_NAME}. 60 IN AAAA {DDNS_ADDRESSES[1]}"]),
]


# --- canary forms and the search ----------------------------------------------------------------


def all_address_forms(text: str) -> list[bytes]:
    """test_privacy's forms plus expanded IPv6, bare reversed nibbles and upper-case variants."""
    address = ipaddress.ip_address(text)
    extra = [text.upper(), address.reverse_pointer.upper(), str(address)]
    if address.version == 6:
        extra += [
            address.exploded,
            address.exploded.upper(),
            address.exploded.replace(":", ""),
            address.reverse_pointer.removesuffix(".ip6.arpa"),
        ]
    forms = address_forms(text) + [form.encode() for form in extra]
    return list(dict.fromkeys(forms))


def all_name_forms(name: str) -> list[bytes]:
    upper_wire = b"".join(bytes([len(label)]) + label.upper().encode() for label in name.split("."))
    return list(dict.fromkeys([*name_forms(name), upper_wire + b"\x00"]))


def canary_address(entry: str) -> str:
    return entry.split("/")[0]


NEVER = {
    **{f"unregistered {a}": all_address_forms(a) for a in (UNREGISTERED_V4, UNREGISTERED_V6)},
    **{f"unregistered flood {a}": all_address_forms(a) for a in FLOOD_UNREGISTERED},
    **{f"invalid {a}": all_address_forms(canary_address(a)) for a in INVALID_ADDRESSES},
    **{f"name {n}": all_name_forms(n) for n in NAMES},
    "wrong token": [WRONG_TOKEN.encode()],
    "doh user agent": [DOH_AGENT.encode(), DOH_AGENT.upper().encode()],
    "doh device id": [DOH_DEVICE.encode(), DOH_DEVICE.upper().encode()],
    "registered device id": [SYNC_DEVICE.encode(), SYNC_DEVICE.upper().encode()],
    "doh path": [DOH_PATH.encode(), DOH_PATH.upper().encode()],
    "dot device id": [DOT_DEVICE.encode(), DOT_DEVICE.upper().encode()],
    "dot server name": all_name_forms(DOT_FOREIGN),
}
REGISTERED = {f"registered {a}": all_address_forms(a) for a in REGISTERED_SOURCES}
DELETED = {f"deleted {a}": all_address_forms(a) for a in SYNC_ADDRESSES}
HOSTNAME = {
    f"hostname {DDNS_NAME}": all_name_forms(DDNS_NAME),
    **{f"resolved {a}": all_address_forms(a) for a in DDNS_ADDRESSES},
}
EVERY_CANARY = {**NEVER, **REGISTERED, **DELETED, **HOSTNAME}
HOSTNAME_ROWS = (b'INSERT INTO "hostnames"', b'INSERT INTO "resolved"')


def found_forms(
    blobs: dict[str, bytes], canaries: dict[str, list[bytes]]
) -> set[tuple[str, bytes]]:
    """(canary, form) for every form of every canary that the search finds in `blobs`."""
    found = set()
    for canary, forms in canaries.items():
        for form in forms:
            if find_canaries(blobs, {canary: [form]}):
                found.add((canary, form))
    return found


def is_registration_db(where: str) -> bool:
    return Path(where).name.startswith("registrations.db")


# --- the client side, run inside the namespace ---------------------------------------------------


def _rcode(wire: bytes | None) -> int | None:
    return None if wire is None else dns.message.from_wire(wire).rcode()


def _query(server: Server, name: str, qtype: str, source: str, **kwargs: Any) -> dict[str, Any]:
    try:
        reply = server.query(name, qtype, source=source, **kwargs)
    except dns.exception.Timeout:
        return {"rcode": None, "answers": 0}
    return {"rcode": reply.rcode(), "answers": len(reply.answer)}


def _raw_tcp(server: Server, source: str, payload: bytes) -> int | None:
    where = "::1" if ":" in source else "127.0.0.1"
    with socket.create_connection(
        (where, server.port), timeout=QUERY_TIMEOUT_S, source_address=(source, 0)
    ) as conn:
        conn.sendall(struct.pack("!H", len(payload)) + payload)
        data = b""
        try:
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            return None
    return _rcode(data[2:]) if len(data) > 2 else None


def _malformed(server: Server, source: str) -> dict[str, int | None]:
    good = dns.message.make_query(MALFORMED, "A").to_wire()
    long_label = b"\x50" + b"canary-bad-51de" * 6  # a label of 80 octets
    return {
        "notimp": _rcode(server.raw_udp(good[:2] + b"\x78\x00" + good[4:], source=source)),
        "qdcount2": _rcode(server.raw_udp(good[:5] + b"\x02" + good[6:], source=source)),
        "truncated": _rcode(server.raw_udp(good[:-3], source=source)),
        "long_label": _rcode(server.raw_udp(good[:12] + long_label + good[12:], source=source)),
        "qr_set": _rcode(
            server.raw_udp(good[:2] + b"\x81\x00" + good[4:], source=source, timeout_s=DROP_WAIT_S)
        ),
        "tcp_truncated": _raw_tcp(server, source, good[:-3]),
    }


def _flood(server: Server, source: str) -> int:
    """FLOOD_PACKETS queries as fast as the socket takes them; the replies are not read."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    where = "::1" if ":" in source else "127.0.0.1"
    wire = dns.message.make_query(FLOOD_NAME, "A").to_wire()
    sent = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        for _ in range(FLOOD_PACKETS):
            try:
                sock.sendto(wire, (where, server.port))
                sent += 1
            except OSError:  # a full socket buffer: the flood goes on
                continue
    return sent


def _limited(metrics: str) -> dict[str, int]:
    counts = {}
    for outcome in ("rate_limited", "truncated"):
        pattern = rf'smartdns_queries_total\{{transport="udp",outcome="{outcome}"\}} (\d+)'
        match = re.search(pattern, metrics)
        counts[outcome] = int(match.group(1)) if match else 0
    return counts


def _sync(server: Server, ca_file: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(status, body) of each sync API request, and the rcodes of DoH queries naming the
    account's device ID while it is registered and after the account's deletion."""
    account = f"/v1/accounts/{SYNC_ACCOUNT}"
    results: dict[str, Any] = {}
    device: dict[str, int] = {}
    body = {"version": 5, "addresses": list(SYNC_ADDRESSES), "device_ids": [SYNC_DEVICE]}
    results["put"] = call(server, "PUT", account, body)
    device["registered"] = _doh_naming(ca_file, SYNC_DEVICE)  # in effect with the 200
    for source in SYNC_ADDRESSES:  # the registration really took effect, for both families
        rcode_within(server, source, dns.rcode.NOERROR, SYNC_EFFECT_S)
    results["get"] = call(server, "GET", account)
    for i, invalid in enumerate(INVALID_ADDRESSES):
        results[f"put_invalid_{i}"] = put(server, SYNC_ACCOUNT, 6, [SYNC_ADDRESSES[0], invalid])
    invalid_device = {"version": 6, "addresses": [], "device_ids": [SYNC_DEVICE.upper()]}
    results["put_invalid_device"] = call(server, "PUT", account, invalid_device)
    results["put_wrong_token"] = call(
        server,
        "PUT",
        account,
        {"version": 7, "addresses": [UNREGISTERED_V4, UNREGISTERED_V6]},
        token=WRONG_TOKEN,
    )
    results["get_wrong_token"] = call(server, "GET", account, token=WRONG_TOKEN)
    results["delete"] = call(server, "DELETE", f"{account}?version=8")
    device["deleted"] = _doh_naming(ca_file, SYNC_DEVICE)
    for source in SYNC_ADDRESSES:
        rcode_within(server, source, dns.rcode.REFUSED, SYNC_EFFECT_S)
    results["get_deleted"] = call(server, "GET", account)
    body = {"version": 9, "addresses": [], "hostnames": [DDNS_NAME]}
    results["ddns_put"] = call(server, "PUT", f"/v1/accounts/{DDNS_ACCOUNT}", body)
    for source in DDNS_ADDRESSES:  # the hostname was resolved and what it resolved to authorizes
        rcode_within(server, source, dns.rcode.NOERROR, DDNS_EFFECT_S)
    return results, device


def _doh_naming(ca_file: Path, device_id: str) -> int:
    """The rcode of a DoH query naming `device_id`, from an address nobody registered."""
    wire = dns.message.make_query(DOH_NAME, "A").to_wire()
    client = H2Client(DOH_PORT, ca_file, source=UNREGISTERED_V4)
    try:
        target = get_target(wire, f"/dns-query/{device_id}")
        return client.request("GET", target, b"", []).message().rcode()
    finally:
        client.close()


def _doh(ca_file: Path, source: str) -> dict[str, int]:
    """DoH requests from `source`, each with the canary user agent: a canary name over HTTP/2
    GET and POST and over HTTP/1.1, the canary device ID in the path, a canary path."""
    agent = [("user-agent", DOH_AGENT)]
    wire = dns.message.make_query(DOH_NAME, "A").to_wire()
    client = H2Client(DOH_PORT, ca_file, source=source)
    try:
        post = client.request("POST", "/dns-query", wire, [("content-type", MEDIA_TYPE), *agent])
        get = client.request("GET", get_target(wire), b"", agent)
        device = client.request("GET", get_target(wire, f"/dns-query/{DOH_DEVICE}"), b"", agent)
        path = client.request("GET", get_target(wire, DOH_PATH), b"", agent)
    finally:
        client.close()
    http1 = h1_request(
        DOH_PORT,
        ca_file,
        [("GET", get_target(wire), b"", agent), ("GET", DOH_PATH, b"", agent)],
        source=source,
    )
    return {
        "post": post.message().rcode(),
        "get": get.message().rcode(),
        "device": device.message().rcode(),
        "path": path.status,
        "http1": http1[0].message().rcode(),
        "http1_path": http1[1].status,
    }


def _dot(ca_file: Path, source: str) -> dict[str, int | str]:
    """DoT from `source`: a canary name with our server name, the canary device ID in the
    server name, and a canary server name that is not ours."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False  # the foreign name is not in the certificate, on purpose

    def rcode(server_name: str) -> int | str:
        where = ("::1" if ":" in source else "127.0.0.1", DOT_PORT)
        raw = socket.create_connection(where, QUERY_TIMEOUT_S, source_address=(source, 0))
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                sock.sendall(framed(DOT_NAME))
                return read_reply(sock).rcode()
        except (ssl.SSLError, ConnectionResetError):
            return "refused in the handshake"
        finally:
            raw.close()

    return {
        "plain": rcode(SERVER_NAME),
        "device": rcode(f"{DOT_DEVICE}.{SERVER_NAME}"),
        "foreign": rcode(DOT_FOREIGN),
    }


def client_session(state: str, port: str, ca_file: str) -> None:
    """All the client traffic of the audit; prints a JSON summary. Runs inside the namespace."""
    server = Server(state=Path(state), port=int(port), config_path=Path(state) / "smartdns.yaml")
    summary: dict[str, Any] = {"queries": {}, "malformed": {}, "doh": {}, "dot": {}}
    for source in QUERY_SOURCES:
        for name in (FORWARDED, UNBLOCK, NXDOMAIN):
            for qtype in ("A", "AAAA", "HTTPS", "TXT"):
                summary["queries"][f"{source} {name} {qtype}"] = _query(server, name, qtype, source)
        for name in (TCP_NAME, UNBLOCK):
            summary["queries"][f"{source} {name} A tcp"] = _query(
                server, name, "A", source, tcp=True
            )
        summary["queries"][f"{source} badvers"] = _query(server, FORWARDED, "A", source, use_edns=1)
        summary["queries"][f"{source} chaos"] = _query(
            server, CHAOS_NAME, "TXT", source, rdclass=dns.rdataclass.CH
        )
        summary["malformed"][source] = _malformed(server, source)
        summary["doh"][source] = _doh(Path(ca_file), source)
        summary["dot"][source] = _dot(Path(ca_file), source)

    summary["flood_sent"] = {s: _flood(server, s) for s in (*FLOOD_REGISTERED, *FLOOD_UNREGISTERED)}
    deadline = time.monotonic() + METRICS_DEADLINE_S
    while True:  # the counters are aggregated: poll until the floods show up, with a deadline
        metrics = call(server, "GET", "/metrics", token=None)[1]
        summary["limited"] = _limited(metrics)
        if sum(summary["limited"].values()) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    summary["sync"], summary["device"] = _sync(server, Path(ca_file))
    summary["metrics"] = call(server, "GET", "/metrics", token=None)
    summary["status"] = call(server, "GET", "/v1/status")
    summary["healthz"] = call(server, "GET", "/healthz", token=None)
    print(json.dumps(summary))


# --- the session ---------------------------------------------------------------------------------


@dataclass
class Session:
    summary: dict[str, Any]
    output: dict[str, bytes]  # stdout and stderr
    files: dict[str, bytes]  # every file under the state and temporary dirs, running and after
    dump: list[bytes]  # the database's iterdump lines
    http: dict[str, bytes]  # /metrics, /v1/status, /healthz and the sync API's error bodies
    tmpdir: Path
    config: dict[str, Any]
    exit_code: int


def _run_session(root: Path) -> Session:
    state, tmpdir, tls = root / "state", root / "tmp", root / "tls"
    for directory in (state, tmpdir, tls):
        directory.mkdir()
    pair = write_pair(tls)
    override = {
        "rate_limit": {"client_qps": CLIENT_QPS, "refused_qps": REFUSED_QPS},
        "logging": {"level": "debug"},
        "encrypted": {
            "server_name": SERVER_NAME,
            "cert_file": str(pair.cert_file),
            "key_file": str(pair.key_file),
            "doh_listen": [f"127.0.0.1:{DOH_PORT}", f"[::1]:{DOH_PORT}"],
            "dot_listen": [f"127.0.0.1:{DOT_PORT}", f"[::1]:{DOT_PORT}"],
        },
    }
    with (
        Namespace(NAMESPACE_ADDRESSES) as namespace,
        upstream_in(namespace, UPSTREAM_RECORDS) as upstream,
        running_server_in(
            namespace, state, tmpdir, upstream, override, registrations=REGISTERED_SOURCES
        ) as server,
    ):
        code = "import sys; from tests.e2e.test_privacy_audit import client_session; " + (
            "client_session(*sys.argv[1:])"
        )
        client = subprocess.run(
            namespace.python(code, str(state), str(server.port), str(pair.ca_file)),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            cwd=REPO,
            env=_env(),
        )
        assert client.returncode == 0, f"client session failed:\n{client.stderr}"
        summary = json.loads(client.stdout)
        # The WAL is checkpointed away at a clean stop: read everything while it still runs too.
        running = {**produced_files(state), **produced_files(tmpdir)}
        config = server.config
        exit_code = server.stop()

    database = sqlite3.connect(f"file:{state / 'registrations.db'}?mode=ro", uri=True)
    try:
        dump = [line.encode() for line in database.iterdump()]
    finally:
        database.close()
    output = {"stdout": server.stdout_path.read_bytes(), "stderr": server.stderr_path.read_bytes()}
    files = {f"while running: {k}": v for k, v in running.items()}
    files.update({**produced_files(state), **produced_files(tmpdir)})
    http = {
        "/metrics": summary["metrics"][1].encode(),
        "/v1/status": json.dumps(summary["status"][1]).encode(),
        "/healthz": str(summary["healthz"][1]).encode(),
    }
    for key, (status, body) in summary["sync"].items():
        if key != "get":  # GET returns the registration itself, to the portal: by design
            http[f"sync {key} ({status})"] = json.dumps(body).encode()
    return Session(summary, output, files, dump, http, tmpdir, config, exit_code)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    yield _run_session(tmp_path_factory.mktemp("privacy-audit"))


# --- positive controls ---------------------------------------------------------------------------


def test_search_finds_every_form_of_every_canary_when_planted(tmp_path: Path) -> None:
    everything = {(canary, form) for canary, forms in EVERY_CANARY.items() for form in forms}
    planted_files = tmp_path / "planted"
    planted_files.mkdir()
    log_lines = []
    for i, (_canary, form) in enumerate(sorted(everything)):
        (planted_files / f"{i}.bin").write_bytes(b"\x00junk " + form + b" junk\xff")
        log_lines.append(b"2024-05-01 12:00:00 DEBUG smartdns.serve: client " + form + b" ok")
    in_files = found_forms(produced_files(planted_files), EVERY_CANARY)
    in_log = found_forms({"log": b"\n".join(log_lines)}, EVERY_CANARY)
    assert everything - in_files == set()
    assert everything - in_log == set()
    clean = b"2024-05-01 12:00:00 DEBUG smartdns.serve: 3 queries, 127.0.0.1:53 [::1]:53"
    assert found_forms({"clean": clean}, EVERY_CANARY) == set()


def test_search_finds_the_registered_canaries_in_the_registration_table(session: Session) -> None:
    """The real database is searched for real: each registered canary is in its entries rows,
    the hostname and what it resolved to in theirs."""
    entries = b"\n".join(line for line in session.dump if line.startswith(b'INSERT INTO "entries"'))
    for canary, forms in REGISTERED.items():
        assert find_canaries({"entries": entries}, {canary: forms}), canary
    rows = b"\n".join(line for line in session.dump if line.startswith(HOSTNAME_ROWS))
    for canary, forms in HOSTNAME.items():
        assert find_canaries({"hostname rows": rows}, {canary: forms}), canary


# --- the session ran as intended -----------------------------------------------------------------


def test_session_really_ran(session: Session) -> None:
    queries, malformed = session.summary["queries"], session.summary["malformed"]
    for source in (REGISTERED_V4, REGISTERED_V6):
        assert queries[f"{source} {UNBLOCK} A"] == {"rcode": dns.rcode.NOERROR, "answers": 1}
        assert queries[f"{source} {FORWARDED} A"] == {"rcode": dns.rcode.NOERROR, "answers": 1}
        assert queries[f"{source} {NXDOMAIN} A"]["rcode"] == dns.rcode.NXDOMAIN
        assert queries[f"{source} {TCP_NAME} A tcp"] == {"rcode": dns.rcode.NOERROR, "answers": 1}
    for source in (UNREGISTERED_V4, UNREGISTERED_V6):
        assert queries[f"{source} {FORWARDED} A"]["rcode"] == dns.rcode.REFUSED
        assert queries[f"{source} {UNBLOCK} A tcp"]["rcode"] == dns.rcode.REFUSED
    for source in QUERY_SOURCES:
        assert queries[f"{source} badvers"]["rcode"] == dns.rcode.BADVERS
        assert queries[f"{source} chaos"]["rcode"] == dns.rcode.REFUSED
        assert malformed[source] == {
            "notimp": dns.rcode.NOTIMP,
            "qdcount2": dns.rcode.FORMERR,
            "truncated": dns.rcode.FORMERR,
            "long_label": dns.rcode.FORMERR,
            "qr_set": None,
            "tcp_truncated": dns.rcode.FORMERR,
        }
    assert all(v["rcode"] is not None for v in queries.values())  # nothing timed out
    for source in QUERY_SOURCES:
        rcode = dns.rcode.NOERROR if source in (REGISTERED_V4, REGISTERED_V6) else dns.rcode.REFUSED
        assert session.summary["doh"][source] == {
            "post": rcode,
            "get": rcode,
            "device": dns.rcode.REFUSED,  # an unknown ID: no fallback to the address
            "path": 404,
            "http1": rcode,
            "http1_path": 404,
        }
        assert session.summary["dot"][source] == {
            "plain": rcode,
            "device": dns.rcode.REFUSED,
            "foreign": "refused in the handshake",
        }
    assert session.summary["limited"]["rate_limited"] > 0
    assert sum(session.summary["limited"].values()) > 0
    sync = session.summary["sync"]
    assert sync["put"][0] == 200 and sync["put"][1]["device_ids"] == 1
    assert sync["get"][0] == 200 and sync["get"][1]["device_ids"] == 1
    assert sorted(sync["get"][1]["addresses"]) == sorted(SYNC_ADDRESSES)
    assert sync["put_invalid_0"][0] == sync["put_invalid_1"][0] == 422
    assert sync["put_invalid_device"][0] == 422
    # By the ID from an unregistered address while registered; refused once deleted.
    assert session.summary["device"] == {
        "registered": dns.rcode.NOERROR,
        "deleted": dns.rcode.REFUSED,
    }
    assert sync["put_wrong_token"][0] == sync["get_wrong_token"][0] == 401
    assert sync["delete"] == [200, {"account": SYNC_ACCOUNT, "version": 8, "existed": True}]
    assert sync["get_deleted"][0] == 404
    assert sync["ddns_put"][0] == 200
    assert session.summary["healthz"][0] == 200
    assert session.summary["status"][0] == 200
    assert session.exit_code == 0
    # The server ran at debug level (it logs nothing more there: no line names a client).
    assert session.config["logging"]["level"] == "debug"
    assert b"INFO smartdns.node.daemon: smartdns started" in session.output["stderr"]


# --- the audit -----------------------------------------------------------------------------------


def test_no_canary_in_stdout_or_stderr(session: Session) -> None:
    assert find_canaries(session.output, {**NEVER, **REGISTERED, **DELETED, **HOSTNAME}) == []


def test_no_canary_in_files_outside_the_database(session: Session) -> None:
    files = {k: v for k, v in session.files.items() if not is_registration_db(k)}
    assert any(Path(k).name == "stderr.log" for k in files)  # the captured output is among them
    assert find_canaries(files, {**NEVER, **REGISTERED, **DELETED, **HOSTNAME}) == []


def test_no_unregistered_canary_or_name_in_the_raw_database(session: Session) -> None:
    database = {k: v for k, v in session.files.items() if is_registration_db(k)}
    assert any(k.endswith("registrations.db") for k in database)
    running_wal = database.get(
        f"while running: {session.tmpdir.parent / 'state'}/registrations.db-wal"
    )
    assert running_wal, "the WAL of the running server was not captured"
    assert find_canaries(database, NEVER) == []


def test_database_dump_holds_registered_addresses_only_in_entries(session: Session) -> None:
    dump = {f"dump line {i}": line for i, line in enumerate(session.dump)}
    assert find_canaries(dump, {**NEVER, **DELETED}) == []
    outside_entries = {
        where: line for where, line in dump.items() if not line.startswith(b'INSERT INTO "entries"')
    }
    assert find_canaries(outside_entries, REGISTERED) == []


def test_database_dump_holds_the_hostname_only_in_its_rows(session: Session) -> None:
    """The hostname in its `hostnames` row, what it resolved to in its `resolved` rows (kept
    only while an account holds it), and nowhere else in the database."""
    dump = {f"dump line {i}": line for i, line in enumerate(session.dump)}
    outside = {where: line for where, line in dump.items() if not line.startswith(HOSTNAME_ROWS)}
    assert find_canaries(outside, HOSTNAME) == []


def test_no_canary_in_http_answers(session: Session) -> None:
    assert find_canaries(session.http, {**NEVER, **REGISTERED, **DELETED, **HOSTNAME}) == []


def test_the_temporary_directory_was_searched(session: Session) -> None:
    """TMPDIR pointed into the test's directory; whatever the server put there was searched."""
    inside = [k for k in session.files if k.startswith(str(session.tmpdir))]
    assert inside == [str(p) for p in session.tmpdir.rglob("*") if p.is_file()]


if __name__ == "__main__":  # pragma: no cover - the client side, when run by hand
    client_session(*sys.argv[1:])
