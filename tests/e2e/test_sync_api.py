"""The sync API of the running server through a real HTTP client (urllib): every status code
of SPEC 4, the one-second promise both ways, snapshots, status, metrics, token reload, and the
CLI's import/export speaking the same document."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from tests.e2e.harness import (
    REGISTERED,
    UNREGISTERED,
    Server,
    rcode_within,
    running_server,
    write_token,
)
from tests.fake_upstream import FakeUpstream

HTTP_TIMEOUT_S = 5.0
EFFECT_DEADLINE_S = 1.0
RELOAD_TIMEOUT_S = 10.0


def call(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = "",
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON or text); `token=""` means the server's own token."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token or server.token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.sync_url + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            status, content_type, text = (
                response.status,
                response.headers["Content-Type"],
                response.read(),
            )
    except urllib.error.HTTPError as error:
        status, content_type, text = error.code, error.headers["Content-Type"], error.read()
    if content_type and content_type.startswith("application/json"):
        return status, json.loads(text)
    return status, text.decode()


def put(server: Server, account: str, version: int, addresses: list[str]) -> tuple[int, Any]:
    return call(
        server, "PUT", f"/v1/accounts/{account}", {"version": version, "addresses": addresses}
    )


# --- 401 -------------------------------------------------------------------------------------


def test_v1_needs_the_bearer_token_in_the_header(server: Server) -> None:
    assert call(server, "GET", "/v1/status", token=None)[0] == 401
    assert call(server, "GET", "/v1/status", token="f" * 64)[0] == 401
    query = urllib.parse.urlencode({"token": server.token})
    assert call(server, "GET", f"/v1/status?{query}", token=None)[0] == 401
    assert call(server, "GET", f"/v1/status?{query}")[0] == 401  # even next to a valid header
    basic = {"Authorization": "Basic " + server.token}
    assert call(server, "GET", "/v1/status", token=None, headers=basic)[0] == 401
    assert call(server, "GET", "/v1/status")[0] == 200


# --- the one-second promise --------------------------------------------------------------------


def test_put_then_delete_take_effect_within_one_second(server: Server) -> None:
    assert server.query("www.netflix.com", source=UNREGISTERED).rcode() == dns.rcode.REFUSED
    assert put(server, "acct-e2e", 10, [UNREGISTERED]) == (
        200,
        {"account": "acct-e2e", "version": 10, "addresses": 1, "hostnames": 0, "device_ids": 0},
    )
    rcode_within(server, UNREGISTERED, dns.rcode.NOERROR, EFFECT_DEADLINE_S)
    assert call(server, "DELETE", "/v1/accounts/acct-e2e?version=11") == (
        200,
        {"account": "acct-e2e", "version": 11, "existed": True},
    )
    rcode_within(server, UNREGISTERED, dns.rcode.REFUSED, EFFECT_DEADLINE_S)


# --- read-your-writes (SPEC 4): in every worker's answers when the 200 arrives ----------------

PROBES = 24  # fresh source ports: all on one of two workers by chance 1 in 2**23


@pytest.fixture
def two_workers(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    with running_server(tmp_path, upstream.address, {"server": {"workers": 2}}) as server:
        yield server


def _every_probe_gets(server: Server, source: str, wanted: int) -> None:
    """PROBES queries, each from a new socket (a new source port, so SO_REUSEPORT spreads
    them over the workers), right away: no retry, no waiting."""
    rcodes = [server.query("www.netflix.com", source=source).rcode() for _ in range(PROBES)]
    assert rcodes == [wanted] * PROBES, [dns.rcode.to_text(rcode) for rcode in rcodes]


def _metric_values(server: Server, name: str) -> list[float]:
    with urllib.request.urlopen(f"{server.sync_url}/metrics", timeout=HTTP_TIMEOUT_S) as reply:
        text = reply.read().decode()
    return [float(value) for value in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)]


def test_put_delete_and_snapshot_are_in_every_workers_answers_at_their_200(
    two_workers: Server,
) -> None:
    server = two_workers
    _every_probe_gets(server, UNREGISTERED, dns.rcode.REFUSED)
    assert put(server, "acct-ryw", 10, [UNREGISTERED])[0] == 200
    _every_probe_gets(server, UNREGISTERED, dns.rcode.NOERROR)
    assert call(server, "DELETE", "/v1/accounts/acct-ryw?version=11")[0] == 200
    _every_probe_gets(server, UNREGISTERED, dns.rcode.REFUSED)
    snapshot = {"version": 12, "accounts": {"snap": [UNREGISTERED]}}
    assert call(server, "PUT", "/v1/snapshot", snapshot)[0] == 200
    _every_probe_gets(server, UNREGISTERED, dns.rcode.NOERROR)
    _every_probe_gets(server, REGISTERED, dns.rcode.REFUSED)  # "demo" is not in the snapshot
    # The probes did reach both workers (each reports its count about once a second).
    deadline = time.monotonic() + 5.0
    while not all(_metric_values(server, "smartdns_worker_queries_total")):
        assert time.monotonic() < deadline, _metric_values(server, "smartdns_worker_queries_total")
        time.sleep(0.05)
    assert len(_metric_values(server, "smartdns_worker_queries_total")) == 2


def test_a_worker_that_does_not_confirm_is_counted_and_restarted(two_workers: Server) -> None:
    """SPEC 4: the 200 goes out after a second anyway (the write is durable), once the silent
    worker is gone (so every process still answering has the write); it is counted and
    replaced, and its successor answers from the database."""
    server = two_workers
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    stopped = int(children.read_text().split()[0])
    os.kill(stopped, signal.SIGSTOP)  # alive but silent: it cannot confirm
    try:
        started = time.monotonic()
        assert put(server, "acct-slow", 10, [UNREGISTERED])[0] == 200
        waited = time.monotonic() - started
        assert 0.9 < waited < 3.0, waited
        assert stopped not in [int(pid) for pid in children.read_text().split()]  # reaped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert sorted(_metric_values(server, "smartdns_worker_unconfirmed_total")) == [0, 1]
    deadline = time.monotonic() + 15.0
    while _metric_values(server, "smartdns_worker_up") != [1, 1]:
        assert time.monotonic() < deadline, "not replaced:\n" + server.output()[-3000:]
        time.sleep(0.05)
    assert stopped not in [int(pid) for pid in children.read_text().split()]
    _every_probe_gets(server, UNREGISTERED, dns.rcode.NOERROR)


# --- 200 / 404 / 409 ---------------------------------------------------------------------------


def test_ordering_idempotency_and_tombstones(server: Server) -> None:
    assert put(server, "acct-1", 5, ["127.0.5.1"])[0] == 200
    assert put(server, "acct-1", 5, ["127.0.5.1"]) == (
        200,
        {"account": "acct-1", "version": 5, "addresses": 1, "hostnames": 0, "device_ids": 0},
    )
    status, body = put(server, "acct-1", 4, ["127.0.5.2"])
    assert status == 409 and "127.0.5.2" not in body["error"]
    assert put(server, "acct-1", 5, ["127.0.5.2"])[0] == 409
    assert call(server, "DELETE", "/v1/accounts/acct-1?version=8")[0] == 200
    assert put(server, "acct-1", 7, ["127.0.5.1"])[0] == 409  # a PUT older than the DELETE
    assert call(server, "GET", "/v1/accounts/acct-1") == (404, {"error": "no such account"})
    assert call(server, "GET", "/v1/accounts/never-seen")[0] == 404
    assert call(server, "GET", "/v1/nothing-here")[0] == 404


def test_snapshot_replaces_everything_and_stale_snapshot_is_409(server: Server) -> None:
    assert server.query("www.netflix.com", source=REGISTERED).rcode() == dns.rcode.NOERROR
    snapshot = {"version": 20, "accounts": {"s1": [UNREGISTERED], "s2": ["127.0.6.0/24"]}}
    assert call(server, "PUT", "/v1/snapshot", snapshot) == (
        200,
        {"version": 20, "accounts": 2, "entries": 2, "device_ids": 0},
    )
    rcode_within(server, REGISTERED, dns.rcode.REFUSED, EFFECT_DEADLINE_S)  # "demo" is gone
    rcode_within(server, UNREGISTERED, dns.rcode.NOERROR, EFFECT_DEADLINE_S)
    assert call(server, "GET", "/v1/accounts/demo")[0] == 404
    status, body = call(server, "PUT", "/v1/snapshot", {"version": 19, "accounts": {}})
    assert status == 409, body
    assert put(server, "late", 20, [REGISTERED])[0] == 409  # not above the snapshot version
    status, body = call(server, "GET", "/v1/status")
    assert (status, body) == (200, {"accounts": 2, "entries": 2, "snapshot_version": 20})


def test_status_has_counts_and_no_address(server: Server) -> None:
    status, body = call(server, "GET", "/v1/status")
    assert (status, body) == (200, {"accounts": 1, "entries": 2, "snapshot_version": 0})
    assert not re.search(r"\d+\.\d+\.\d+\.\d+|::", json.dumps(body))


# --- 400 / 422 / 413 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the cases that must leave it unchanged anyway."""
    with (
        FakeUpstream() as upstream,
        running_server(tmp_path_factory.mktemp("invalid"), upstream.address) as server,
    ):
        yield server


INVALID = [
    ("PUT", "/v1/accounts/acct-1", b"{not json", 400, "body is not valid JSON"),
    ("PUT", "/v1/accounts/acct-1", b'{"version": 9}', 400, "addresses: missing"),
    ("PUT", "/v1/accounts/acct-1", b'{"version": "9", "addresses": []}', 400, "version: "),
    ("PUT", "/v1/accounts/acct-1", b'{"version": 9, "addresses": {}}', 400, "addresses: "),
    ("PUT", "/v1/snapshot", b'{"version": 9, "accounts": []}', 400, "accounts: "),
    ("DELETE", "/v1/accounts/acct-1?version=x", None, 400, "version: "),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["127.0.0.300"]}',
        422,
        "addresses[0]: not a valid IP address or prefix",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["127.0.0.1/16"]}',
        422,
        "addresses[0]: host bits set",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["127.0.0.0/8"]}',
        422,
        "addresses[0]: prefix /8 is wider than the allowed /24",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["::1", "::/0"]}',
        422,
        "addresses[1]: ",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["224.0.0.1"]}',
        422,
        "addresses[0]: multicast address",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        b'{"version": 9, "addresses": ["0.0.0.0"]}',
        422,
        "addresses[0]: unspecified address",
    ),
    (
        "PUT",
        "/v1/accounts/acct-1",
        json.dumps({"version": 9, "addresses": [f"127.0.1.{i}" for i in range(17)]}).encode(),
        422,
        "addresses: 17 entries exceed the limit of 16 per account",
    ),
    ("PUT", "/v1/accounts/not%20valid", b'{"version": 9, "addresses": []}', 422, "account: "),
    (
        "PUT",
        "/v1/snapshot",
        b'{"version": 9, "accounts": {"ok": ["127.0.0.1/8"]}}',
        422,
        'accounts["ok"][0]: host bits set',
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "fragment"),
    INVALID,
    ids=[f"{case[3]}-{index}" for index, case in enumerate(INVALID)],
)
def test_invalid_input_is_rejected_whole(
    shared_server: Server, method: str, path: str, raw: bytes | None, status: int, fragment: str
) -> None:
    server = shared_server
    assert put(server, "acct-1", 3, ["127.0.7.1"])[0] == 200  # the same write each time
    before = (call(server, "GET", "/v1/status"), call(server, "GET", "/v1/accounts/acct-1"))
    got, body = call(server, method, path, raw=raw)
    assert got == status, body
    assert body["error"].startswith(fragment) or fragment in body["error"], body
    assert "127.0.0" not in body["error"] and server.token not in body["error"]
    assert (call(server, "GET", "/v1/status"), call(server, "GET", "/v1/accounts/acct-1")) == before
    assert server.query("www.netflix.com", source=REGISTERED).rcode() == dns.rcode.NOERROR


def test_body_over_max_body_is_413_before_it_is_sent(server: Server) -> None:
    host, port = server.sync_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(
            b"PUT /v1/snapshot HTTP/1.1\r\nHost: smartdns\r\n"
            + f"Authorization: Bearer {server.token}\r\n".encode()
            + b"Content-Length: 40000000\r\n\r\n"  # over the default 32 MiB; never sent
        )
        status_line = sock.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line


# --- /healthz, /metrics ------------------------------------------------------------------------

ADDRESS_LIKE = re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b|[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,}")


def test_healthz_needs_no_token(server: Server) -> None:
    assert call(server, "GET", "/healthz", token=None) == (200, "ok\n")


def test_metrics_have_no_address_name_or_account_after_traffic(server: Server) -> None:
    canary_name = "canary-metrics-4e1d.example.org"
    assert put(server, "acct-canary-77", 30, ["127.0.0.99"])[0] == 200
    for source in (REGISTERED, UNREGISTERED, "::1"):
        server.query(canary_name, "A", source=source)
        server.query("www.netflix.com", "A", source=source, tcp=True)
    call(server, "GET", "/v1/accounts/acct-canary-77")
    call(server, "GET", "/v1/status", token="wrong-token-0123456789")
    status, text = call(server, "GET", "/metrics", token=None)
    assert status == 200
    assert (
        'smartdns_sync_requests_total{method="PUT",route="/v1/accounts/{account}",status="200"} 1'
        in text
    )
    assert re.search(r'smartdns_queries_total\{transport="tcp",outcome="unblock"\} [1-9]', text)
    assert re.search(r'smartdns_queries_total\{transport="udp",outcome="refuse"\} [1-9]', text)
    assert "smartdns_registered_accounts 2" in text
    assert re.search(r"^smartdns_cache_entries [0-9]+$", text, re.MULTILINE)
    for forbidden in ("canary", "acct-canary", "127.0.0", "wrong-token", server.token):
        assert forbidden not in text
    assert not ADDRESS_LIKE.search(text), ADDRESS_LIKE.search(text)


# --- token reload --------------------------------------------------------------------------------


def reload(server: Server) -> None:
    server.notifications.clear()
    server.signal(signal.SIGHUP)
    server.wait_notification("READY=1", RELOAD_TIMEOUT_S)


def test_sighup_rereads_the_token_and_keeps_it_when_the_file_is_bad(server: Server) -> None:
    old = server.token
    new = write_token(server.state)
    assert call(server, "GET", "/v1/status", token=old)[0] == 200  # not before the reload
    reload(server)
    assert call(server, "GET", "/v1/status", token=old)[0] == 401
    assert call(server, "GET", "/v1/status", token=new)[0] == 200
    token_file = server.state / "sync.token"
    os.chmod(token_file, 0o644)
    reload(server)
    assert call(server, "GET", "/v1/status", token=new)[0] == 200
    line = f"{server.config_path}:"
    problem = f"sync.token_file: {token_file}: file is readable by other users (chmod 600)"
    assert any(line in row and problem in row for row in server.output().splitlines())
    assert new not in server.output() and old not in server.output()


# --- the CLI speaks the same document ------------------------------------------------------------


def test_cli_export_and_import_use_the_api_document(server: Server) -> None:
    document = {"version": 40, "accounts": {"x1": ["127.0.8.1", "::1"], "x2": ["127.0.9.0/24"]}}
    assert call(server, "PUT", "/v1/snapshot", document)[0] == 200
    exported = server.cli("registrations", "export")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout) == document
    document = {"version": 41, "accounts": {"x3": [UNREGISTERED]}}
    (server.state / "snapshot.json").write_text(json.dumps(document))
    imported = server.cli("registrations", "import", str(server.state / "snapshot.json"))
    assert imported.returncode == 0, imported.stderr
    assert call(server, "GET", "/v1/accounts/x3") == (
        200,
        {
            "account": "x3",
            "version": 41,
            "addresses": [UNREGISTERED],
            "hostnames": [],
            "device_ids": 0,
        },
    )
    status, body = call(server, "PUT", "/v1/snapshot", json.loads(exported.stdout))
    assert status == 409, body  # version 40 is older than the imported 41
