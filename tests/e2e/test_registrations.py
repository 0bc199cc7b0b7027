"""Registrations reach the running server within one second, whoever writes them."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import yaml

from tests.e2e.harness import (
    REGISTERED_V6,
    UNREGISTERED,
    Server,
    base_config,
    rcode_within,
    run_cli,
)
from tests.ports import free_port

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


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b'{"version": 7, "accounts": {"a": ["127.0.0.5"], "a": ["127.0.0.6"]}}', "duplicate"),
        (b'{"version": 7, "accounts": {"a": ["127.0.0.5"]}, "version": 8}', "duplicate"),
        (b'{"version": NaN, "accounts": {}}', "NaN"),
        (b'{"version": 7, "accounts": {"a": ["127.0.0.5"]}', "not valid JSON"),
        (b'{"version": 7, "accounts": {"a": ["127.0.0.5/8"]}}', 'accounts["a"][0]'),
        (b"\xff\xfe{", "not UTF-8"),
    ],
    ids=["duplicate_account", "duplicate_version", "nan", "truncated", "bad_entry", "not_utf8"],
)
def test_import_uses_the_sync_api_rules(tmp_path: Path, document: bytes, reason: str) -> None:
    """SPEC 5: `import` takes a snapshot document "with the same rules" as PUT /v1/snapshot;
    json.loads would keep the last of two equal keys and silently drop an account."""
    config_path = tmp_path / "smartdns.yaml"
    config = base_config(free_port(), tmp_path, "127.0.0.1:53")
    config["registrations"]["min_prefix_v4"] = 24
    config_path.write_text(yaml.safe_dump(config))
    assert run_cli(config_path, "registrations", "add", "kept", "127.0.0.9").returncode == 0
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_bytes(document)
    result = run_cli(config_path, "registrations", "import", str(snapshot))
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr and "127.0.0.5" not in result.stderr
    exported = json.loads(run_cli(config_path, "registrations", "export").stdout)
    assert exported == {"version": 0, "accounts": {"kept": ["127.0.0.9"]}}


def test_cli_device_ids_are_kept_as_digests_and_exported_as_such(tmp_path: Path) -> None:
    """SPEC 3 and 5: `add`/`remove --device-id`; `list` and `export` show counts and digests,
    never the IDs; an exported document imports back to the same digests."""
    device_id = "k3v9q2m8x4t6w1z7p5r0bn2dca"
    digest = hashlib.sha256(device_id.encode()).hexdigest()
    config_path = tmp_path / "smartdns.yaml"
    config_path.write_text(yaml.safe_dump(base_config(free_port(), tmp_path, "127.0.0.1:53")))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        result = run_cli(config_path, "registrations", *args)
        assert device_id not in result.stdout + result.stderr
        return result

    added = cli("add", "phone", "127.0.0.9", "--device-id", device_id)
    assert added.returncode == 0, added.stderr
    assert added.stdout == "phone: 1 entries, 0 hostnames, 1 device IDs, version 0\n"
    taken = cli("add", "other", "--device-id", device_id)
    assert taken.returncode == 1
    assert taken.stderr == "smartdns: error: device_ids[0]: held by another account\n"
    bad = cli("add", "other", "--device-id", device_id.upper())
    assert bad.returncode == 2 and "device_ids[0]: must be lower-case" in bad.stderr
    assert cli("list").stdout == "phone\tversion 0\t127.0.0.9 (1 device IDs)\n"
    listed = json.loads(cli("list", "--json").stdout)
    assert listed["accounts"][0]["device_ids"] == 1
    exported = json.loads(cli("export").stdout)
    assert exported["accounts"] == {
        "phone": {"addresses": ["127.0.0.9"], "device_id_sha256": [digest]}
    }
    document = tmp_path / "export.json"
    document.write_text(json.dumps(exported))
    assert cli("import", str(document)).returncode == 0
    assert json.loads(cli("export").stdout) == exported
    removed = cli("remove", "phone", "--device-id", device_id)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(cli("export").stdout)["accounts"] == {"phone": ["127.0.0.9"]}
    database = b"".join(path.read_bytes() for path in tmp_path.glob("*.db*"))
    assert database and device_id.encode() not in database
