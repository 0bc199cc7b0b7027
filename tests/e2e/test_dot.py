"""DNS over TLS (RFC 7858, SPEC 2a) against the real server: real clients (dnspython, kdig,
dig, Python's ssl), a throwaway CA; device IDs in the server name, pipelining with answers
out of order, the idle and handshake timeouts, the connection cap, session resumption,
certificate reload on SIGHUP, and two workers."""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from cryptography import x509

from smartdns.serve.encrypted import HANDSHAKE_BURST
from tests.certificates import NAMES as SERVER_NAMES
from tests.certificates import SERVER_NAME, Pair, write_pair
from tests.e2e.harness import (
    QUERY_TIMEOUT_S,
    REGISTERED,
    UNREGISTERED,
    Server,
    base_config,
    merge,
    run_cli,
    running_server,
)
from tests.e2e.streams import RecordCounter, closed_after, framed, read_reply, split_framed
from tests.e2e.test_sync_api import call
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port

DEVICE_ID = "k3v9q2w8e7r6t5y4u3i2o1p0"  # registered only where a test says so
WAIT_S = 5.0
IDLE_TIMEOUT_S = 2.0  # harness default server.tcp_idle_timeout


def encrypted(pair: Pair, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "encrypted": {
            "server_name": SERVER_NAME,
            "cert_file": str(pair.cert_file),
            "key_file": str(pair.key_file),
            "dot_listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
            "doh_listen": [],
            **extra,
        }
    }


@pytest.fixture(name="pair")
def fixture_pair(tmp_path: Path) -> Pair:
    return write_pair(tmp_path)


@pytest.fixture(name="dot")
def fixture_dot(tmp_path: Path, upstream: FakeUpstream, pair: Pair) -> Iterator[DotServer]:
    port = free_port()
    override = encrypted(pair, port, handshake_timeout=1)
    with running_server(tmp_path, upstream.address, override) as server:
        yield DotServer(server, port, pair)


class DotServer:
    """A running server with DoT on `port`, and clients for it."""

    def __init__(self, server: Server, port: int, pair: Pair) -> None:
        self.server = server
        self.port = port
        self.pair = pair

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pair.ca_file))
        context.set_alpn_protocols(["dot"])
        return context

    def connect(
        self,
        hostname: str | None = SERVER_NAME,
        *,
        source: str = REGISTERED,
        context: ssl.SSLContext | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        raw = socket.create_connection(
            ("127.0.0.1", self.port), timeout=WAIT_S, source_address=(source, 0)
        )
        context = context or self.context()
        if hostname is None:
            context.check_hostname = False
        return context.wrap_socket(raw, server_hostname=hostname, session=session)

    def query(
        self, name: str, qtype: str = "A", *, hostname: str = SERVER_NAME, source: str = REGISTERED
    ) -> dns.message.Message:
        return dns.query.tls(
            dns.message.make_query(name, qtype),
            "127.0.0.1",
            port=self.port,
            source=source,
            timeout=QUERY_TIMEOUT_S,
            ssl_context=self.context(),
            server_hostname=hostname,
        )


def answer_addresses(reply: dns.message.Message) -> list[str]:
    return sorted(item.to_text() for rrset in reply.answer for item in rrset)


# --- answers and device IDs ------------------------------------------------------------------


def test_dot_answers_as_udp_does(dot: DotServer) -> None:
    reply = dot.query("www.netflix.com")
    assert reply.rcode() == dns.rcode.NOERROR
    assert answer_addresses(reply) == ["198.51.100.10", "198.51.100.11"]
    assert dot.query("example.org").answer[0][0].to_text() == "192.0.2.1"
    assert dot.query("www.netflix.com", source=UNREGISTERED).rcode() == dns.rcode.REFUSED
    over_ipv6 = dns.query.tls(
        dns.message.make_query("www.netflix.com", "A"),
        "::1",
        port=dot.port,
        source="::1",
        timeout=QUERY_TIMEOUT_S,
        ssl_context=dot.context(),
        server_hostname=SERVER_NAME,
    )
    assert answer_addresses(over_ipv6) == ["198.51.100.10", "198.51.100.11"]


def test_alpn_dot_tls12_and_no_alpn_are_served(dot: DotServer) -> None:
    with dot.connect() as sock:
        assert sock.selected_alpn_protocol() == "dot"
    context = dot.context()
    context.set_alpn_protocols(["h2"])  # nothing in common: served without ALPN
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with dot.connect(context=context) as sock:
        assert sock.version() == "TLSv1.2" and sock.selected_alpn_protocol() is None
        sock.sendall(framed("www.netflix.com"))
        assert read_reply(sock).rcode() == dns.rcode.NOERROR


def test_an_unknown_device_id_is_refused_even_from_a_registered_address(dot: DotServer) -> None:
    """SPEC 2a: a named ID that is not registered is not authorized; no fallback."""
    reply = dot.query("www.netflix.com", hostname=f"{DEVICE_ID}.{SERVER_NAME}")
    assert reply.rcode() == dns.rcode.REFUSED
    reply = dot.query("www.netflix.com", hostname=f"{DEVICE_ID.upper()}.DNS.Test")
    assert reply.rcode() == dns.rcode.REFUSED
    with dot.connect(hostname=None) as sock:  # no server name: by address
        sock.sendall(framed("www.netflix.com"))
        assert read_reply(sock).rcode() == dns.rcode.NOERROR
    assert DEVICE_ID not in dot.server.output().lower()


def test_a_server_name_not_ours_is_refused_in_the_handshake(dot: DotServer) -> None:
    context = dot.context()
    context.check_hostname = False
    for name in ("other.test", f"a.{DEVICE_ID}.{SERVER_NAME}"):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            dot.connect(name, context=context)
    assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR


def dig_over_tls(
    tool: str, dot: DotServer, hostname: str, timeout: str, source: str = REGISTERED
) -> str:
    """`tool` (kdig or dig 9.18) asking for www.netflix.com over TLS as `hostname`: its output."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    command = [tool, "-b", source, "-p", str(dot.port), "@127.0.0.1", "+tls"]
    command += [f"+tls-ca={dot.pair.ca_file}", f"+tls-hostname={hostname}", timeout]
    result = subprocess.run(
        [*command, "www.netflix.com", "A"], capture_output=True, text=True, timeout=30
    )
    return result.stdout + result.stderr


def test_kdig_over_tls(dot: DotServer) -> None:
    for hostname, wanted in ((SERVER_NAME, "NOERROR"), (f"{DEVICE_ID}.{SERVER_NAME}", "REFUSED")):
        output = dig_over_tls("kdig", dot, hostname, "+timeout=3")
        assert f"status: {wanted}" in output, output
        assert "TLS session (TLS1.3)" in output


def test_a_registered_device_id_authorizes_real_clients_from_any_address(dot: DotServer) -> None:
    body = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID]}
    assert call(dot.server, "PUT", "/v1/accounts/phone", body)[0] == 200
    named = f"{DEVICE_ID}.{SERVER_NAME}"
    reply = dot.query("www.netflix.com", hostname=named, source=UNREGISTERED)
    assert answer_addresses(reply) == ["198.51.100.10", "198.51.100.11"]
    output = dig_over_tls("kdig", dot, named.upper(), "+timeout=3", source=UNREGISTERED)
    assert "status: NOERROR" in output and "198.51.100.10" in output, output
    # dig 9.18 sends no server name (+tls-hostname only checks the certificate): by address.
    output = dig_over_tls("dig", dot, named, "+time=3", source=UNREGISTERED)
    assert "status: REFUSED" in output, output
    # Without the ID the same address is refused: it is not registered.
    assert dot.query("www.netflix.com", source=UNREGISTERED).rcode() == dns.rcode.REFUSED
    assert DEVICE_ID not in dot.server.output().lower()


def test_dig_over_tls(dot: DotServer) -> None:
    output = dig_over_tls("dig", dot, SERVER_NAME, "+time=3")
    assert "status: NOERROR" in output, output
    assert "198.51.100.10" in output


# --- the TCP rules inside TLS ----------------------------------------------------------------


def test_pipelined_queries_are_answered_out_of_order(
    dot: DotServer, upstream: FakeUpstream
) -> None:
    upstream.delay_s = 0.3  # within the harness's upstream.timeout of 0.5 s
    with dot.connect() as sock:
        sock.sendall(framed("example.org", query_id=1) + framed("www.netflix.com", query_id=2))
        first, second = read_reply(sock), read_reply(sock)
    assert (first.id, second.id) == (2, 1)  # the local answer did not wait for the upstream
    assert second.answer[0][0].to_text() == "192.0.2.1"


def test_answers_ready_together_leave_in_one_tls_record(dot: DotServer) -> None:
    """Pipelined queries read together and answered at once are written together: one TLS
    record and one send, not one per answer."""
    client = RecordCounter(dot.port, dot.context(), SERVER_NAME, REGISTERED)
    try:
        client.send(b"".join(framed("www.netflix.com", query_id=n) for n in (1, 2, 3)))
        received = b""
        for _ in range(10):  # each read waits at most the socket's timeout
            received += client.read()
            if len(split_framed(received)) == 3:
                break
        assert [reply.id for reply in split_framed(received)] == [1, 2, 3]
        assert client.application_records() == 1
    finally:
        client.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(dot: DotServer) -> None:
    with dot.connect() as sock:
        sock.sendall(framed("www.netflix.com"))
        assert read_reply(sock).rcode() == dns.rcode.NOERROR
        waited = closed_after(sock, IDLE_TIMEOUT_S + WAIT_S)
    assert IDLE_TIMEOUT_S - 0.5 <= waited < IDLE_TIMEOUT_S + 2


def test_a_client_that_never_says_hello_is_closed_after_the_handshake_timeout(
    dot: DotServer,
) -> None:
    with socket.create_connection(("127.0.0.1", dot.port), timeout=WAIT_S) as sock:
        waited = closed_after(sock, WAIT_S)
    assert 0.5 <= waited < 1 + 2  # handshake_timeout: 1
    assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR


def test_large_replies_are_never_truncated(dot: DotServer) -> None:
    reply = dot.query("big.example.org")
    assert not reply.flags & dns.flags.TC
    assert len(reply.answer[0]) == 120


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_sessions_are_resumed(dot: DotServer, version: ssl.TLSVersion) -> None:
    context = dot.context()
    context.maximum_version = version
    with dot.connect(context=context) as sock:
        sock.sendall(framed("www.netflix.com"))
        read_reply(sock)  # TLS 1.3 tickets arrive after the handshake
        session = sock.session
    assert session is not None and session.has_ticket
    with dot.connect(context=context, session=session) as sock:
        assert sock.session_reused and sock.version() == version.name.replace("v1_", "v1.")
        sock.sendall(framed("www.netflix.com"))
        assert read_reply(sock).rcode() == dns.rcode.NOERROR


def test_at_the_cap_the_least_recently_active_idle_connection_is_shed(
    tmp_path: Path, upstream: FakeUpstream, pair: Pair
) -> None:
    port = free_port()
    with running_server(tmp_path, upstream.address, encrypted(pair, port, max_connections=2)) as (
        server
    ):
        dot = DotServer(server, port, pair)
        older, newer = dot.connect(), dot.connect()
        for sock in (older, newer):
            sock.sendall(framed("www.netflix.com"))
            read_reply(sock)
        newer.sendall(framed("www.netflix.com"))  # older is now the least recently active
        read_reply(newer)
        with dot.connect() as third:
            third.sendall(framed("www.netflix.com"))
            assert read_reply(third).rcode() == dns.rcode.NOERROR
        assert closed_after(older, WAIT_S) < WAIT_S
        newer.sendall(framed("www.netflix.com"))
        assert read_reply(newer).rcode() == dns.rcode.NOERROR
        older.close()
        newer.close()


def test_sigterm_drains_a_query_in_flight_then_closes(
    dot: DotServer, upstream: FakeUpstream
) -> None:
    upstream.delay_s = 0.3
    with dot.connect() as sock:
        sock.sendall(framed("example.org", query_id=7))
        assert upstream.wait_for_queries(1)
        dot.server.signal(signal.SIGTERM)
        reply = read_reply(sock)
        assert (reply.id, reply.answer[0][0].to_text()) == (7, "192.0.2.1")
        assert closed_after(sock, WAIT_S) < WAIT_S
    assert dot.server.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dot.port), timeout=WAIT_S)


# --- certificates ----------------------------------------------------------------------------


def serial_seen(dot: DotServer) -> int:
    context = dot.context()
    with dot.connect(context=context) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_serves_a_new_certificate_and_keeps_open_connections(dot: DotServer) -> None:
    before = serial_seen(dot)
    old_trust = dot.context()
    kept = dot.connect(context=old_trust)
    kept.sendall(framed("www.netflix.com"))
    read_reply(kept)
    session = kept.session
    new = write_pair(dot.pair.cert_file.parent, stem="new-")
    shutil.copy(new.cert_file, dot.pair.cert_file)
    shutil.copy(new.key_file, dot.pair.key_file)
    shutil.copy(new.ca_file, dot.pair.ca_file)  # clients now trust the new CA only
    dot.server.signal(signal.SIGHUP)
    dot.server.wait_notification("READY=1", WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            after = serial_seen(dot)
            break
        except ssl.SSLError:  # the old certificate until the reload is done
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert after != before
    kept.sendall(framed("www.netflix.com"))
    assert read_reply(kept).rcode() == dns.rcode.NOERROR
    kept.close()
    # The ticket keys survived the reload: a session from before it is resumed.
    with dot.connect(context=old_trust, session=session) as resumed:
        assert resumed.session_reused


def test_sighup_with_a_broken_pair_keeps_the_old_one(dot: DotServer) -> None:
    before = serial_seen(dot)
    other = write_pair(dot.pair.cert_file.parent, stem="other-")
    shutil.copy(other.key_file, dot.pair.key_file)  # the key of another certificate
    dot.server.notifications.clear()
    dot.server.signal(signal.SIGHUP)
    dot.server.wait_notification("READY=1", WAIT_S)
    assert serial_seen(dot) == before
    assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR
    output = dot.server.output()
    assert "reload failed, keeping the running configuration" in output
    assert "key_file is not the key of the certificate" in output
    assert "PRIVATE KEY" not in output


def write_config(tmp_path: Path, upstream: FakeUpstream, pair: Pair) -> Path:
    config = merge(
        base_config(free_port(), tmp_path, upstream.address), encrypted(pair, free_port())
    )
    path = tmp_path / "smartdns.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("names", "key", "message"),
    [
        (("other.test",), "", "the certificate does not cover dns.test, *.dns.test"),
        (("dns.test",), "", "the certificate does not cover *.dns.test"),
        (SERVER_NAMES, "other-", "key_file is not the key of the certificate"),
    ],
)
def test_check_config_and_serve_name_what_is_wrong(
    tmp_path: Path, upstream: FakeUpstream, names: tuple[str, ...], key: str, message: str
) -> None:
    pair = write_pair(tmp_path, names)
    if key:
        pair = Pair(pair.cert_file, write_pair(tmp_path, stem=key).key_file, pair.ca_file)
    path = write_config(tmp_path, upstream, pair)
    line = next(
        number
        for number, text in enumerate(path.read_text().splitlines(), 1)
        if "cert_file" in text
    )
    for command in ("check-config", "serve"):
        result = run_cli(path, command)
        assert result.returncode == 2, result
        prefix = f"{path}:{line}: encrypted.cert_file: {pair.cert_file}: "
        assert result.stderr.startswith(prefix + message), result.stderr
        assert result.stderr.count("\n") == 1


def test_check_config_warns_of_a_certificate_expiring_within_14_days(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    path = write_config(tmp_path, upstream, write_pair(tmp_path, not_after=soon))
    result = run_cli(path, "check-config")
    assert result.returncode == 0, result
    assert result.stdout.startswith("config OK")
    assert f"{path}: warning: encrypted.cert_file:" in result.stderr
    assert "expires in 9.9 days" in result.stderr or "expires in 10.0 days" in result.stderr
    path = write_config(tmp_path, upstream, write_pair(tmp_path))
    assert run_cli(path, "check-config").stderr == ""


def test_sighup_rebinds_dot_and_turns_it_off(dot: DotServer) -> None:
    config = dot.server.config
    moved = free_port()
    config["encrypted"]["dot_listen"] = [f"127.0.0.1:{moved}"]
    dot.server.config_path.write_text(yaml.safe_dump(config))
    dot.server.notifications.clear()
    dot.server.signal(signal.SIGHUP)
    dot.server.wait_notification("READY=1", WAIT_S)
    old_port, dot.port = dot.port, moved
    assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", old_port), timeout=WAIT_S)
    del config["encrypted"]
    dot.server.config_path.write_text(yaml.safe_dump(config))
    dot.server.notifications.clear()
    dot.server.signal(signal.SIGHUP)
    dot.server.wait_notification("READY=1", WAIT_S)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", moved), timeout=WAIT_S)
    assert dot.server.query("www.netflix.com").rcode() == dns.rcode.NOERROR
    assert "encrypted=off" in dot.server.output()


def test_start_fails_clearly_when_the_dot_port_is_taken(
    tmp_path: Path, upstream: FakeUpstream, pair: Pair
) -> None:
    path = write_config(tmp_path, upstream, pair)
    config = yaml.safe_load(path.read_text())
    taken = config["encrypted"]["dot_listen"][0]
    host, port = taken.rsplit(":", 1)
    with socket.create_server((host, int(port))):
        registered = run_cli(path, "registrations", "add", "demo", REGISTERED)
        assert registered.returncode == 0, registered.stderr
        result = run_cli(path, "serve")
    assert result.returncode == 1, result
    assert taken in result.stderr and "smartdns: error: cannot listen" in result.stderr


def test_serve_logs_the_expiry_warning(tmp_path: Path, upstream: FakeUpstream) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    pair = write_pair(tmp_path, not_after=soon)
    with running_server(tmp_path, upstream.address, encrypted(pair, free_port())) as server:
        assert "WARNING smartdns.node.daemon: " in server.output()
        assert "warning: encrypted.cert_file:" in server.output()


# --- metrics ---------------------------------------------------------------------------------


def metric_values(server: Server) -> dict[str, float]:
    status, page = call(server, "GET", "/metrics", token=None)
    assert status == 200
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in str(page).splitlines())
        if name.startswith("smartdns_tls_")
    }


def metrics_within(server: Server, wanted: dict[str, float], timeout_s: float) -> dict[str, float]:
    """The TLS samples once each of `wanted` is at least its value (workers report each
    second); fails past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = metric_values(server)
        if all(values.get(name, 0) >= least for name, least in wanted.items()):
            return values
        assert time.monotonic() < deadline, values
        time.sleep(0.1)


def test_metrics_count_connections_and_handshakes(dot: DotServer) -> None:
    context = dot.context()
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        dot.connect("other.test", context=context)
    with socket.create_connection(("127.0.0.1", dot.port), timeout=WAIT_S) as sock:
        closed_after(sock, WAIT_S)  # handshake_timeout
    kept = dot.connect()
    values = metrics_within(
        dot.server,
        {
            'smartdns_tls_connections{transport="dot"}': 1,
            'smartdns_tls_connections_accepted_total{transport="dot"}': 1,
            'smartdns_tls_handshakes_total{outcome="ok"}': 1,
            'smartdns_tls_handshakes_total{outcome="failed"}': 1,
            'smartdns_tls_handshakes_total{outcome="timeout"}': 1,
        },
        WAIT_S,
    )
    kept.close()
    assert values['smartdns_tls_connections{transport="doh"}'] == 0
    expiry_s = values["smartdns_tls_certificate_expiry_seconds"]
    not_after = x509.load_pem_x509_certificate(dot.pair.cert_file.read_bytes()).not_valid_after_utc
    assert abs(expiry_s - (not_after.timestamp() - time.time())) < 60


def test_handshakes_over_the_rate_are_closed_before_they_begin(dot: DotServer) -> None:
    for _ in range(HANDSHAKE_BURST + 20):  # at once: the burst, then the rate per second
        socket.create_connection(("127.0.0.1", dot.port), timeout=WAIT_S).close()
    metrics_within(dot.server, {'smartdns_tls_handshakes_total{outcome="rate_limited"}': 1}, WAIT_S)
    time.sleep(0.1)  # the bucket refills at 50 a second: wait for a few handshakes' worth
    assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR


# --- workers -----------------------------------------------------------------------------------


def test_two_workers_serve_dot(tmp_path: Path, upstream: FakeUpstream, pair: Pair) -> None:
    port = free_port()
    override = {"server": {"workers": 2}, **encrypted(pair, port)}
    with running_server(tmp_path, upstream.address, override) as server:
        dot = DotServer(server, port, pair)
        for _ in range(8):  # SO_REUSEPORT spreads connections over both workers
            assert dot.query("www.netflix.com").rcode() == dns.rcode.NOERROR
        assert server.output().count("smartdns started") >= 2
        wanted = {'smartdns_tls_connections_accepted_total{transport="dot"}': 8}
        values = metrics_within(server, wanted, WAIT_S)  # summed over the workers
        assert values["smartdns_tls_certificate_expiry_seconds"] > 0


def test_debug_output_names_no_peer_and_no_server_name(dot: DotServer) -> None:
    context = dot.context()
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        dot.connect("other.test", context=context, source=UNREGISTERED)
    address = ("127.0.0.1", dot.port)
    with socket.create_connection(address, source_address=(UNREGISTERED, 0)) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello
        closed_after(sock, WAIT_S)
    dot.query("www.netflix.com", hostname=f"{DEVICE_ID}.{SERVER_NAME}", source=UNREGISTERED)
    dot.server.stop()
    output = dot.server.output()
    assert "smartdns started" in output  # the log was captured (at level debug)
    for secret in (UNREGISTERED, DEVICE_ID, "other.test"):
        assert secret not in output.lower()
