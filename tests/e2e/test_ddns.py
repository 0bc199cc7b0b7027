"""DDNS hostname registrations against the real server (SPEC 3): a fake authority on loopback
whose records the tests change, the sync API and the CLI, one worker and two."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml

from tests.e2e.harness import Server, rcode_within, running_server
from tests.e2e.test_sync_api import call
from tests.fake_authority import FakeAuthority
from tests.fake_upstream import FakeUpstream

HOME = "home.example.net"
FIRST = "127.0.0.4"  # where the home is, then where it moves
SECOND = "127.0.0.5"
TTL = 1
DEADLINE_S = 5.0  # the first lookup (within the 0.25 s hostname poll) and its write


@pytest.fixture
def authority() -> Iterator[FakeAuthority]:
    with FakeAuthority() as fake:
        yield fake


def ddns_override(authority: FakeAuthority, **extra: Any) -> dict[str, Any]:
    return {
        "ddns": {
            "resolvers": [authority.address],
            "min_ttl": TTL,
            "max_ttl": TTL,
            "grace": 2,
            "max_concurrent": 8,
        },
        **extra,
    }


@pytest.fixture
def ddns_server(
    tmp_path: Path, upstream: FakeUpstream, authority: FakeAuthority
) -> Iterator[Server]:
    # One unrelated entry: the CLI creates the database the server needs.
    with running_server(
        tmp_path, upstream.address, ddns_override(authority), registrations=("127.0.0.9",)
    ) as server:
        yield server


def refused(server: Server, source: str) -> bool:
    return server.query("www.netflix.com", source=source).rcode() == dns.rcode.REFUSED


def test_hostname_authorizes_what_it_resolves_to_and_follows_changes(
    ddns_server: Server, authority: FakeAuthority
) -> None:
    server = ddns_server
    authority.set_addresses(HOME, [FIRST], ttl=TTL)
    body = {"version": 1, "addresses": [], "hostnames": ["Home.Example.NET."]}
    assert call(server, "PUT", "/v1/accounts/home", body) == (
        200,
        {"account": "home", "version": 1, "addresses": 0, "hostnames": 1, "device_ids": 0},
    )
    assert call(server, "GET", "/v1/accounts/home")[1]["hostnames"] == [HOME]
    rcode_within(server, FIRST, dns.rcode.NOERROR, DEADLINE_S)
    assert refused(server, SECOND)

    authority.set_addresses(HOME, [SECOND], ttl=TTL)
    rcode_within(server, SECOND, dns.rcode.NOERROR, TTL + 1 + 0.5)
    assert refused(server, FIRST)  # swapped in one write: the old one is gone as well

    status, metrics = call(server, "GET", "/metrics", token=None)
    assert status == 200
    assert "smartdns_ddns_hostnames 1" in metrics
    assert "smartdns_ddns_addresses 1" in metrics
    assert 'smartdns_ddns_lookups_total{outcome="addresses"}' in metrics
    assert HOME not in metrics and SECOND not in metrics

    assert call(server, "DELETE", "/v1/accounts/home?version=2")[0] == 200
    rcode_within(server, SECOND, dns.rcode.REFUSED, 1.0)
    output = server.output()
    assert "DDNS refresher: 0 hostnames" in output  # it ran, and logged a count only
    assert "home.example" not in output.lower() and FIRST not in output and SECOND not in output


def test_bad_hostname_is_422_naming_the_position(ddns_server: Server) -> None:
    body = {"version": 1, "addresses": [], "hostnames": ["ok.example.net", "10.1.2.3"]}
    assert call(ddns_server, "PUT", "/v1/accounts/home", body) == (
        422,
        {"error": "hostnames[1]: an IP address literal, not a hostname"},
    )
    snapshot = {"version": 5, "accounts": {"a": {"addresses": [], "hostnames": ["x"]}}}
    assert call(ddns_server, "PUT", "/v1/snapshot", snapshot) == (
        422,
        {"error": 'accounts["a"].hostnames[0]: needs at least two labels'},
    )


def test_cli_adds_lists_exports_and_removes_hostnames(
    ddns_server: Server, authority: FakeAuthority
) -> None:
    server = ddns_server
    authority.set_addresses(HOME, [FIRST], ttl=TTL)
    result = server.cli("registrations", "add", "cli-home", "--hostname", HOME)
    assert result.returncode == 0, result.stderr
    rcode_within(server, FIRST, dns.rcode.NOERROR, DEADLINE_S)
    listed = json.loads(server.cli("registrations", "list", "cli-home", "--json").stdout)
    assert listed["accounts"] == [
        {"account": "cli-home", "version": 0, "addresses": [], "hostnames": [HOME], "device_ids": 0}
    ]
    exported = json.loads(server.cli("registrations", "export").stdout)
    assert exported["accounts"]["cli-home"] == {"addresses": [], "hostnames": [HOME]}
    assert exported["accounts"]["demo"] == ["127.0.0.9"]
    result = server.cli("registrations", "remove", "cli-home", "--hostname", HOME)
    assert result.returncode == 0, result.stderr
    rcode_within(server, FIRST, dns.rcode.REFUSED, DEADLINE_S)


def test_snapshot_object_form_and_two_accounts_one_lookup(
    ddns_server: Server, authority: FakeAuthority
) -> None:
    authority.set_addresses(HOME, [FIRST], ttl=3600)  # clamped to max_ttl: refreshed each 1 s
    snapshot = {
        "version": 10,
        "accounts": {
            "a": {"addresses": [], "hostnames": [HOME]},
            "b": {"addresses": ["127.0.0.9"], "hostnames": [HOME]},
        },
    }
    assert call(ddns_server, "PUT", "/v1/snapshot", snapshot)[0] == 200
    rcode_within(ddns_server, FIRST, dns.rcode.NOERROR, DEADLINE_S)
    started, count = time.monotonic(), authority.count(HOME, "A")
    assert authority.wait_for_count(HOME, 2 * (count + 2), timeout=5.0)
    elapsed = time.monotonic() - started
    # one lookup per max_ttl (1 s, spread by up to 10 % earlier), for both accounts together
    assert authority.count(HOME, "A") - count <= elapsed / 0.9 + 1


def test_refresher_runs_once_with_workers(
    tmp_path: Path, upstream: FakeUpstream, authority: FakeAuthority
) -> None:
    authority.set_addresses(HOME, [FIRST], ttl=3600)
    override = ddns_override(authority, server={"workers": 2})
    override["ddns"].update(min_ttl=60, max_ttl=60)
    with running_server(
        tmp_path, upstream.address, override, registrations=("127.0.0.9",)
    ) as server:
        result = server.cli("registrations", "add", "home", "--hostname", HOME)
        assert result.returncode == 0, result.stderr
        rcode_within(server, FIRST, dns.rcode.NOERROR, DEADLINE_S)
        for _ in range(20):  # fresh source ports: SO_REUSEPORT spreads them over both workers
            assert server.query("www.netflix.com", source=FIRST).rcode() == dns.rcode.NOERROR
        assert authority.count(HOME, "A") == 1  # the main process resolves, not each worker


def test_sighup_switches_to_new_resolvers(ddns_server: Server, authority: FakeAuthority) -> None:
    server = ddns_server
    authority.set_addresses(HOME, [FIRST], ttl=TTL)
    assert (
        call(
            server, "PUT", "/v1/accounts/home", {"version": 1, "addresses": [], "hostnames": [HOME]}
        )[0]
        == 200
    )
    rcode_within(server, FIRST, dns.rcode.NOERROR, DEADLINE_S)
    with FakeAuthority() as other:
        other.set_addresses(HOME, [SECOND], ttl=TTL)
        config = server.config
        config["ddns"]["resolvers"] = [other.address]
        server.config_path.write_text(yaml.safe_dump(config))
        server.notifications.clear()
        server.signal(signal.SIGHUP)
        server.wait_notification("READY=1", DEADLINE_S)
        rcode_within(server, SECOND, dns.rcode.NOERROR, TTL + 1 + 0.5)
        assert refused(server, FIRST)
        assert other.count(HOME, "A") >= 1
