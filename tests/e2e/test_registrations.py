"""Registrations reach the running server within one second, whoever writes them."""

from __future__ import annotations

import json

import dns.message
import dns.rcode

from tests.e2e.harness import REGISTERED_V6, UNREGISTERED, Server, rcode_within

EFFECT_DEADLINE_S = 1.0


def test_cli_add_and_remove_take_effect_within_one_second(server: Server) -> None:
    assert server.query("www.netflix.com", source=UNREGISTERED).rcode() == dns.rcode.REFUSED
    added = server.cli("registrations", "add", "acct-late", UNREGISTERED)
    assert added.returncode == 0, added.stderr
    rcode_within(server, UNREGISTERED, dns.rcode.NOERROR, EFFECT_DEADLINE_S)
    removed = server.cli("registrations", "remove", "acct-late")
    assert removed.returncode == 0, removed.stderr
    rcode_within(server, UNREGISTERED, dns.rcode.REFUSED, EFFECT_DEADLINE_S)


def test_prefix_registration_covers_the_range(server: Server) -> None:
    result = server.cli("registrations", "add", "acct-net", "127.0.9.0/24")
    assert result.returncode == 0, result.stderr
    rcode_within(server, "127.0.9.200", dns.rcode.NOERROR, EFFECT_DEADLINE_S)
    assert server.query("www.netflix.com", source="127.0.10.1").rcode() == dns.rcode.REFUSED


def test_ipv6_client_deregistered_is_refused(server: Server) -> None:
    assert server.query("www.netflix.com", source=REGISTERED_V6).answer
    result = server.cli("registrations", "remove", "demo", REGISTERED_V6)
    assert result.returncode == 0, result.stderr
    rcode_within(server, REGISTERED_V6, dns.rcode.REFUSED, EFFECT_DEADLINE_S)


def test_import_replaces_everything(server: Server) -> None:
    snapshot = server.state / "snapshot.json"
    snapshot.write_text(json.dumps({"version": 5, "accounts": {"other": [UNREGISTERED]}}))
    result = server.cli("registrations", "import", str(snapshot))
    assert result.returncode == 0, result.stderr
    rcode_within(server, UNREGISTERED, dns.rcode.NOERROR, EFFECT_DEADLINE_S)
    rcode_within(server, "127.0.0.2", dns.rcode.REFUSED, EFFECT_DEADLINE_S)
    exported = json.loads(server.cli("registrations", "export").stdout)
    assert exported == {"version": 5, "accounts": {"other": [UNREGISTERED]}}
