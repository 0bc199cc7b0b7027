"""DNS over HTTPS (RFC 8484, SPEC 2a) against the real server over TLS with a throwaway CA:
curl (HTTP/2 and HTTP/1.1, GET and POST), kdig and dig `+https`, and the h2 and h11 libraries
for the status codes and the abuse cases (rapid reset, stream limit); EDNS padding over DoH and
DoT; DDR over UDP and DoT; two workers."""

from __future__ import annotations

import base64
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from tests.certificates import SERVER_NAME, Pair, write_pair
from tests.e2e.doh_client import (
    MEDIA_TYPE,
    H2Client,
    Response,
    get_target,
    h1_request,
    tls_socket,
)
from tests.e2e.harness import QUERY_TIMEOUT_S, REGISTERED, UNREGISTERED, Server, running_server
from tests.e2e.streams import RecordCounter, closed_after
from tests.e2e.test_sync_api import call
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port

WAIT_S = 5.0
UNBLOCK_A = ["198.51.100.10", "198.51.100.11"]


def encrypted(pair: Pair, doh_port: int, dot_port: int) -> dict[str, Any]:
    return {
        "encrypted": {
            "server_name": SERVER_NAME,
            "cert_file": str(pair.cert_file),
            "key_file": str(pair.key_file),
            "doh_listen": [f"127.0.0.1:{doh_port}", f"[::1]:{doh_port}"],
            "dot_listen": [f"127.0.0.1:{dot_port}"],
            "ddr": True,
            "ddr_addresses": ["127.0.0.1", "::1"],
        }
    }


class DohServer:
    """A running server with DoH on `port` and DoT on `dot_port`."""

    def __init__(
        self, server: Server, upstream: FakeUpstream, port: int, dot_port: int, pair: Pair
    ) -> None:
        self.server = server
        self.upstream = upstream
        self.port = port
        self.dot_port = dot_port
        self.pair = pair

    def h2(self, source: str = REGISTERED) -> H2Client:
        return H2Client(self.port, self.pair.ca_file, source=source)

    def post(self, wire: bytes, *, source: str = REGISTERED, path: str = "/dns-query") -> Response:
        client = self.h2(source)
        try:
            return client.request("POST", path, wire, [("content-type", MEDIA_TYPE)])
        finally:
            client.close()

    def curl(self, *args: str, source: str = REGISTERED) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                str(WAIT_S),
                "--interface",
                source,
                "--resolve",
                f"{SERVER_NAME}:{self.port}:127.0.0.1",
                "--cacert",
                str(self.pair.ca_file),
                *args,
            ],
            capture_output=True,
            timeout=WAIT_S * 2,
            check=False,
        )

    def dot(self, message: dns.message.Message) -> dns.message.Message:
        return dns.query.tls(
            message,
            "127.0.0.1",
            port=self.dot_port,
            source=REGISTERED,
            timeout=QUERY_TIMEOUT_S,
            ssl_context=ssl.create_default_context(cafile=str(self.pair.ca_file)),
            server_hostname=SERVER_NAME,
        )

    @property
    def url(self) -> str:
        return f"https://{SERVER_NAME}:{self.port}/dns-query"


@pytest.fixture(scope="module")
def doh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DohServer]:
    state = tmp_path_factory.mktemp("doh")
    pair = write_pair(state)
    port, dot_port = free_port(), free_port()
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        upstream.add("example.org", "TXT", ['example.org. 120 IN TXT "a"'])
        with running_server(state, upstream.address, encrypted(pair, port, dot_port)) as server:
            yield DohServer(server, upstream, port, dot_port, pair)


def _wire(name: str, qtype: str = "A", **kwargs: Any) -> bytes:
    message = dns.message.make_query(name, qtype, **kwargs)
    message.id = 0  # RFC 8484 §4.1: ID 0 for cache friendliness
    return message.to_wire()


def _addresses(message: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in message.answer for rdata in rrset)


# ---- real clients --------------------------------------------------------------------------


@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
def test_curl_get_and_post(doh: DohServer, http: str) -> None:
    wire = _wire("www.netflix.com")
    encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
    common = (http, "--dump-header", "-", "--output", "-", "--write-out", "")
    get = doh.curl(*common, f"{doh.url}?dns={encoded}")
    post = doh.curl(
        *common, "--header", f"content-type: {MEDIA_TYPE}", "--data-binary", "@-", doh.url
    )
    post = subprocess.run(
        post.args, input=wire, capture_output=True, timeout=WAIT_S * 2, check=False
    )
    for result in (get, post):
        assert result.returncode == 0, result.stderr
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        lines = head.decode().lower().splitlines()
        version = "http/2" if http == "--http2" else "http/1.1"
        assert lines[0].startswith(f"{version} 200"), lines[0]
        assert f"content-type: {MEDIA_TYPE}" in lines
        assert "cache-control: max-age=60" in lines  # unblock.ttl
        assert _addresses(dns.message.from_wire(body)) == UNBLOCK_A


# what each tool prints for a DoH answer (kdig pads its queries, so the reply is padded too)
DIG_MARKS = {
    "kdig": (";; HTTP session (HTTP/2-", "NOERROR", ";; Received 468 B"),
    "dig": ("status: NOERROR", "(HTTPS)"),
}


@pytest.mark.parametrize("tool", sorted(DIG_MARKS))
def test_kdig_and_dig_https(doh: DohServer, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    tls = (f"+tls-ca={doh.pair.ca_file}", f"+tls-hostname={SERVER_NAME}")
    result = subprocess.run(
        [tool, "-b", REGISTERED, "-p", str(doh.port), "+https", *tls, "@127.0.0.1", "netflix.com"],
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for mark in (*DIG_MARKS[tool], *UNBLOCK_A):  # netflix.com A: the zone's proxies
        assert mark in result.stdout, result.stdout


@pytest.mark.parametrize("post", [True, False])
@pytest.mark.parametrize("version", ["H2", "H1"])
def test_dnspython_https(doh: DohServer, post: bool, version: str) -> None:
    reply = dns.query.https(
        dns.message.make_query("www.netflix.com", "A"),
        doh.url,
        bootstrap_address="127.0.0.1",
        source=REGISTERED,
        timeout=QUERY_TIMEOUT_S,
        post=post,
        verify=ssl.create_default_context(cafile=str(doh.pair.ca_file)),
        http_version=dns.query.HTTPVersion[version],
    )
    assert _addresses(reply) == UNBLOCK_A


def test_unregistered_source_is_refused_with_200(doh: DohServer) -> None:
    response = doh.post(_wire("www.netflix.com"), source=UNREGISTERED)
    assert response.status == 200 and response.message().rcode() == dns.rcode.REFUSED
    assert response.headers["cache-control"] == "max-age=0"


def test_ipv6_source_and_forwarded_answer(doh: DohServer) -> None:
    response = doh.post(_wire("example.org", "TXT"), source="::1")
    assert response.message().answer and response.headers["cache-control"] == "max-age=120"


# ---- status codes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("GET", "/dns-query", b"", [], 400),
        ("GET", "/dns-query?dns=%%%", b"", [], 400),
        ("GET", get_target(b"\x00\x01"), b"", [], 400),  # shorter than a DNS header
        ("POST", "/dns-query", b"x" * 12, [("content-type", "text/plain")], 415),
        (
            "POST",
            "/dns-query",
            bytes(70_000),
            [("content-type", MEDIA_TYPE), ("content-length", "70000")],
            413,
        ),
        ("GET", get_target(_wire("example.org"), "/resolve"), b"", [], 404),
        ("PUT", "/dns-query", _wire("example.org"), [("content-type", MEDIA_TYPE)], 405),
    ],
)
def test_status_codes_over_both_http_versions(
    doh: DohServer,
    method: str,
    path: str,
    body: bytes,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    client = doh.h2()
    try:
        assert client.request(method, path, body, headers).status == status
    finally:
        client.close()
    (response,) = h1_request(
        doh.port, doh.pair.ca_file, [(method, path, body, headers)], source=REGISTERED
    )
    assert response.status == status


def test_http1_keeps_alive_and_answers_pipelined_requests_in_order(doh: DohServer) -> None:
    names = ["www.netflix.com", "example.org", "www.bbc.co.uk"]
    requests = [("GET", get_target(_wire(name)), b"", []) for name in names]
    requests.insert(1, ("GET", "/nowhere", b"", []))
    responses = h1_request(doh.port, doh.pair.ca_file, requests, source=REGISTERED)
    assert [r.status for r in responses] == [200, 404, 200, 200]
    questions = [r.message().question[0].name.to_text() for r in responses if r.status == 200]
    assert questions == [name + "." for name in names]


# ---- HTTP/2 bounds over a real TLS socket ---------------------------------------------------


def test_rapid_reset_gets_goaway(doh: DohServer) -> None:
    client = doh.h2()
    try:
        wire = _wire("example.org")
        for _ in range(150):
            stream_id = client.start("GET", get_target(wire))
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and client.read():
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events):
                break
        (goaway,) = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        client.close()


def test_streams_over_100_are_refused_and_the_rest_answered(doh: DohServer) -> None:
    client = doh.h2()
    doh.upstream.delay_s = 0.3  # forwarded queries stay open while the rest arrive
    try:
        client.read()  # our SETTINGS; the client is then made to ignore the limit
        assert client.conn.remote_settings.max_concurrent_streams == 100
        client.conn.remote_settings = h2.settings.Settings(client=False)
        targets = [get_target(_wire(f"n{index}.example.org")) for index in range(110)]
        streams = [client.start("GET", target, flush=False) for target in targets]
        client.flush()  # all 110 in one write
        responses = [client.response(stream_id) for stream_id in streams]
        refused = [r for r in responses if r.status == 0]
        assert len(refused) == 10
        refused_stream = str(int(h2.errors.ErrorCodes.REFUSED_STREAM))
        assert all(r.headers["reset"] == refused_stream for r in refused)
        assert all(r.status == 200 for r in responses if r.status != 0)
    finally:
        doh.upstream.delay_s = 0.0
        client.close()


# ---- padding, DDR --------------------------------------------------------------------------


def test_padding_over_doh_and_dot_but_not_udp(doh: DohServer) -> None:
    padded = _wire("www.netflix.com", use_edns=0, pad=128)
    reply = doh.post(padded).body
    assert len(reply) % 468 == 0
    assert dns.edns.OptionType.PADDING in [o.otype for o in dns.message.from_wire(reply).options]
    message = dns.message.make_query("www.netflix.com", "A", use_edns=0, pad=128)
    assert len(doh.dot(message).to_wire()) % 468 == 0
    over_udp = doh.server.send(message)
    assert len(over_udp.to_wire()) % 468 != 0 and not over_udp.options


def _svcb(message: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in message.answer for rdata in rrset)


DDR_QUESTION = ("_dns.resolver.arpa", "SVCB")
DDR_RECORDS_TEMPLATE = [
    '1 dns.test. alpn="h2" port="{doh}" ipv4hint="127.0.0.1" ipv6hint="::1"'
    ' dohpath="/dns-query{{?dns}}"',
    '2 dns.test. alpn="dot" port="{dot}" ipv4hint="127.0.0.1" ipv6hint="::1"',
]


def test_ddr_over_udp_dot_and_doh(doh: DohServer) -> None:
    expected = sorted(r.format(doh=doh.port, dot=doh.dot_port) for r in DDR_RECORDS_TEMPLATE)
    assert _svcb(doh.server.query(*DDR_QUESTION)) == expected
    assert _svcb(doh.dot(dns.message.make_query(*DDR_QUESTION))) == expected
    assert _svcb(doh.post(_wire(*DDR_QUESTION)).message()) == expected
    below = doh.server.query("x._dns.resolver.arpa", "SVCB")
    assert below.rcode() == dns.rcode.NOERROR and not below.answer
    stranger = doh.server.query(*DDR_QUESTION, source=UNREGISTERED)
    assert stranger.rcode() == dns.rcode.REFUSED


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig not installed")
def test_ddr_as_kdig_shows_it(doh: DohServer) -> None:
    result = subprocess.run(
        ["kdig", "-b", REGISTERED, "-p", str(doh.server.port), "@127.0.0.1", *DDR_QUESTION],
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"alpn=h2 port={doh.port}" in result.stdout, result.stdout
    assert 'key7="/dns-query{?dns}"' in result.stdout, result.stdout  # kdig 3.2: no dohpath name
    assert f"alpn=dot port={doh.dot_port}" in result.stdout, result.stdout


def _metrics(server: Server) -> str:
    with urllib.request.urlopen(f"{server.sync_url}/metrics", timeout=WAIT_S) as reply:
        return str(reply.read().decode())


def test_metrics_count_doh_responses_by_status_class(doh: DohServer) -> None:
    doh.post(_wire("www.netflix.com"))
    doh.post(_wire("www.netflix.com"), path="/elsewhere")
    counts = {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in _metrics(doh.server).splitlines()
        if line.startswith("smartdns_doh_responses_total{")
    }
    assert counts['status="2xx"'] >= 1 and counts['status="4xx"'] >= 1
    assert 'status="5xx"' in counts


def test_two_workers_serve_doh_and_their_counts_add_up(tmp_path: Path) -> None:
    pair = write_pair(tmp_path)
    port, dot_port = free_port(), free_port()
    override = {**encrypted(pair, port, dot_port), "server": {"workers": 2}}
    with (
        FakeUpstream() as upstream,
        running_server(tmp_path, upstream.address, override) as server,
    ):
        doh = DohServer(server, upstream, port, dot_port, pair)
        connections = 24  # SO_REUSEPORT spreads them over both workers
        for _ in range(connections):
            assert _addresses(doh.post(_wire("www.netflix.com")).message()) == UNBLOCK_A
        (response,) = h1_request(port, pair.ca_file, [("GET", "/x", b"", [])], source=REGISTERED)
        assert response.status == 404
        deadline = time.monotonic() + WAIT_S
        counted = (
            f'smartdns_doh_responses_total{{status="2xx"}} {connections}',
            'smartdns_doh_responses_total{status="4xx"} 1',  # the 404 may come in a later report
        )
        while True:  # the workers report their counters every so often
            text = _metrics(server)
            if all(line in text for line in counted):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        served = re.findall(r'smartdns_worker_queries_total\{worker="\d+"\} (\d+)', text)
        assert len(served) == 2 and all(int(count) > 0 for count in served), served


DEVICE_ID = "q7w3e9r1t5y8u2i6o0p4a7s3"


def test_a_device_id_in_the_path_authorizes_from_any_address_until_withdrawn(
    doh: DohServer,
) -> None:
    body: dict[str, Any] = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID]}
    assert call(doh.server, "PUT", "/v1/accounts/appletv", body)[0] == 200
    wire = _wire("www.netflix.com")
    client = doh.h2(UNREGISTERED)
    try:

        def rcode(path: str) -> int:
            response = client.request("GET", get_target(wire, path))
            return int(response.message().rcode())

        assert rcode(f"/dns-query/{DEVICE_ID}") == dns.rcode.NOERROR  # by the ID alone
        assert rcode(f"/dns-query/{DEVICE_ID.upper()}") == dns.rcode.NOERROR  # compared lower
        assert rcode("/dns-query") == dns.rcode.REFUSED  # no ID: the unregistered address
        by_name = H2Client(
            doh.port, doh.pair.ca_file, source=UNREGISTERED, hostname=f"{DEVICE_ID}.{SERVER_NAME}"
        )
        try:  # no ID in the path: the one the TLS server name named, as over DoT
            assert by_name.request("GET", get_target(wire)).message().rcode() == dns.rcode.NOERROR
            other = get_target(wire, "/dns-query/unknownid0000000000000")  # the path's wins
            assert by_name.request("GET", other).message().rcode() == dns.rcode.REFUSED
        finally:
            by_name.close()
        body = {"version": 2, "addresses": [], "device_ids": []}
        assert call(doh.server, "PUT", "/v1/accounts/appletv", body)[0] == 200
        assert rcode(f"/dns-query/{DEVICE_ID}") == dns.rcode.REFUSED  # at once, same connection
    finally:
        client.close()
    # an unknown or malformed ID from a registered address: no fallback to the address
    for path in ("/dns-query/unknownid0000000000000", "/dns-query/not_a_label"):
        response = doh.h2().request("GET", get_target(wire, path))
        assert response.message().rcode() == dns.rcode.REFUSED
    assert DEVICE_ID not in doh.server.output().lower()


def test_sigterm_drains_a_doh_query_in_flight(tmp_path: Path) -> None:
    pair = write_pair(tmp_path)
    port, dot_port = free_port(), free_port()
    with (
        FakeUpstream() as upstream,
        running_server(tmp_path, upstream.address, encrypted(pair, port, dot_port)) as server,
    ):
        upstream.add("slow.example.org", "A", ["slow.example.org. 300 IN A 192.0.2.77"])
        upstream.delay_s = 0.4  # the answer is still on its way when SIGTERM lands
        client = H2Client(port, pair.ca_file, source=REGISTERED)
        try:
            stream_id = client.start("GET", get_target(_wire("slow.example.org")))
            assert upstream.wait_for_queries(1, timeout=WAIT_S)  # the query is upstream
            server.signal(signal.SIGTERM)
            response = client.response(stream_id)
        finally:
            client.close()
        assert _addresses(response.message()) == ["192.0.2.77"]
        assert server.stop() == 0


IDLE_TIMEOUT_S = 2.0  # the harness's server.tcp_idle_timeout


def test_the_server_preface_leaves_with_the_first_response(doh: DohServer) -> None:
    """HTTP/2's server preface (SETTINGS) waits for the client's, then leaves with the SETTINGS
    ack and the first response: one TLS record and one send for all of it."""
    context = ssl.create_default_context(cafile=str(doh.pair.ca_file))
    context.set_alpn_protocols(["h2"])
    client = RecordCounter(doh.port, context, SERVER_NAME, REGISTERED)
    try:
        assert client.tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", SERVER_NAME),
            (":path", get_target(_wire("www.netflix.com"))),
        ]
        conn.send_headers(1, headers, end_stream=True)
        client.send(conn.data_to_send())
        events: list[h2.events.Event] = []
        for _ in range(10):  # each read waits at most the socket's timeout
            events += conn.receive_data(client.read())
            if any(isinstance(event, h2.events.StreamEnded) for event in events):
                break
        assert [type(event) for event in events][:2] == [
            h2.events.RemoteSettingsChanged,
            h2.events.WindowUpdated,
        ]
        assert any(isinstance(event, h2.events.SettingsAcknowledged) for event in events)
        assert any(isinstance(event, h2.events.StreamEnded) for event in events)
        assert client.application_records() == 1
    finally:
        client.close()


def test_an_idle_http2_connection_gets_goaway_after_the_idle_timeout(doh: DohServer) -> None:
    client = doh.h2()
    try:
        assert client.request("GET", get_target(_wire("www.netflix.com"))).status == 200
        started = time.monotonic()
        client.sock.settimeout(IDLE_TIMEOUT_S + WAIT_S)
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events):
            assert client.read(), "closed without GOAWAY"
        assert IDLE_TIMEOUT_S - 0.5 < time.monotonic() - started < IDLE_TIMEOUT_S + 2.0
        assert closed_after(client.sock, WAIT_S) < WAIT_S
    finally:
        client.close()


def test_a_request_trickling_in_over_http1_is_cut_off_at_the_idle_timeout(
    doh: DohServer,
) -> None:
    request = f"GET {get_target(_wire('www.netflix.com'))} HTTP/1.1\r\nHost: x\r\n".encode()
    sock = tls_socket(doh.port, doh.pair.ca_file, source=REGISTERED, alpn="http/1.1")
    with sock:
        started = time.monotonic()
        sock.settimeout(0.3)
        for byte in request:  # one byte every 0.3 s: slower than any real client
            try:
                sock.sendall(bytes([byte]))
                if not sock.recv(1):
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                break
        elapsed = time.monotonic() - started
    assert IDLE_TIMEOUT_S - 0.5 < elapsed < IDLE_TIMEOUT_S + 2.0
