"""Device IDs end to end (SPEC 2a, 3, 4): registered through the sync API or the CLI, named
in a DoT server name from an address nobody registered, and withdrawn: in effect on an
already open connection when the 200 is sent (read-your-writes, every worker), within a
second for the CLI."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from tests.certificates import SERVER_NAME, write_pair
from tests.e2e.harness import UNREGISTERED, running_server
from tests.e2e.streams import framed, read_reply
from tests.e2e.test_dot import DotServer, encrypted
from tests.e2e.test_sync_api import call
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port

DEVICE_ID = "m4n8b2v6c0x4z8l2k6j0h4g8f2"
CLI_EFFECT_S = 1.0


@pytest.fixture(name="dot", params=[1, 2], ids=["workers1", "workers2"])
def fixture_dot(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> Iterator[DotServer]:
    pair = write_pair(tmp_path)
    port = free_port()
    override = {**encrypted(pair, port), "server": {"workers": request.param}}
    with running_server(tmp_path, upstream.address, override) as server:
        yield DotServer(server, port, pair)


def rcode_on(sock: ssl.SSLSocket, query_id: int) -> int:
    sock.sendall(framed("www.netflix.com", query_id=query_id))
    reply = read_reply(sock)
    assert reply.id == query_id
    return reply.rcode()


def test_withdrawn_id_is_refused_on_an_open_connection_right_after_the_200(
    dot: DotServer,
) -> None:
    body = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID]}
    assert call(dot.server, "PUT", "/v1/accounts/phone", body)[0] == 200
    with dot.connect(f"{DEVICE_ID}.{SERVER_NAME}", source=UNREGISTERED) as sock:
        assert rcode_on(sock, 1) == dns.rcode.NOERROR  # by the ID, from an unregistered address
        withdrawn = {"version": 2, "addresses": [], "device_ids": []}
        assert call(dot.server, "PUT", "/v1/accounts/phone", withdrawn)[0] == 200
        assert rcode_on(sock, 2) == dns.rcode.REFUSED  # no wait: in effect with the 200
        body["version"] = 3
        assert call(dot.server, "PUT", "/v1/accounts/phone", body)[0] == 200
        assert rcode_on(sock, 3) == dns.rcode.NOERROR
        assert call(dot.server, "DELETE", "/v1/accounts/phone?version=4")[0] == 200
        assert rcode_on(sock, 4) == dns.rcode.REFUSED
    assert DEVICE_ID not in dot.server.output().lower()


def test_cli_withdrawal_reaches_an_open_connection_within_a_second(dot: DotServer) -> None:
    added = dot.server.cli("registrations", "add", "tv", "--device-id", DEVICE_ID)
    assert added.returncode == 0, added.stderr
    with dot.connect(f"{DEVICE_ID}.{SERVER_NAME}", source=UNREGISTERED) as sock:
        assert _rcode_within(sock, dns.rcode.NOERROR, CLI_EFFECT_S, first_id=1) < CLI_EFFECT_S
        removed = dot.server.cli("registrations", "remove", "tv", "--device-id", DEVICE_ID)
        assert removed.returncode == 0, removed.stderr
        assert _rcode_within(sock, dns.rcode.REFUSED, CLI_EFFECT_S, first_id=100) < CLI_EFFECT_S


def _rcode_within(sock: ssl.SSLSocket, wanted: int, deadline_s: float, first_id: int) -> float:
    """Seconds until a query on `sock` gets `wanted`; fails past the deadline."""
    started = time.monotonic()
    for query_id in range(first_id, first_id + 100):
        elapsed = time.monotonic() - started
        if rcode_on(sock, query_id) == wanted:
            return elapsed
        assert elapsed < deadline_s, f"not rcode {wanted} after {elapsed:.2f} s"
        time.sleep(0.05)
    raise AssertionError("no answer changed")
