"""Start-up failures, modes for unregistered clients, real dig/kdig clients, SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import yaml

from tests.e2e.harness import UNREGISTERED, Server, base_config, run_cli, running_server
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port


def _serve_once(config_path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(config_path, "serve")


def test_missing_database_stops_start_up(tmp_path: Path, upstream: FakeUpstream) -> None:
    config_path = tmp_path / "smartdns.yaml"
    config_path.write_text(yaml.safe_dump(base_config(free_port(), tmp_path, upstream.address)))
    result = _serve_once(config_path)
    assert result.returncode == 1
    assert "registrations.db" in result.stderr and "Traceback" not in result.stderr


def test_taken_listen_address_stops_start_up(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    config_path = tmp_path / "smartdns.yaml"
    config_path.write_text(yaml.safe_dump(base_config(port, tmp_path, upstream.address)))
    assert run_cli(config_path, "registrations", "add", "demo", "127.0.0.2").returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = _serve_once(config_path)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_is_reported_with_line(tmp_path: Path) -> None:
    config_path = tmp_path / "smartdns.yaml"
    config_path.write_text(
        "server:\n  listen: ['127.0.0.1:53']\n  bogus: 1\nupstream:\n  servers: ['192.0.2.53']\n"
    )
    result = _serve_once(config_path)
    assert result.returncode == 2
    assert f"{config_path}:3:" in result.stderr


@pytest.mark.parametrize(("mode", "rcode"), [("drop", None), ("resolve", dns.rcode.NOERROR)])
def test_unregistered_modes(
    tmp_path: Path, upstream: FakeUpstream, mode: str, rcode: int | None
) -> None:
    with running_server(tmp_path, upstream.address, {"unregistered": mode}) as server:
        if rcode is None:
            wire = dns.message.make_query("example.org", "A").to_wire()
            assert server.raw_udp(wire, source=UNREGISTERED, timeout_s=0.5) is None
        else:
            forwarded = server.query("example.org", "A", source=UNREGISTERED)
            assert forwarded.rcode() == rcode and forwarded.answer[0][0].to_text() == "192.0.2.1"
            # resolve never unblocks: the real upstream answer for an unblock-zone name
            unblocked = server.query("www.netflix.com", "MX", source=UNREGISTERED)
            assert unblocked.answer[0][0].to_text() == "10 mx.netflix.com."
            proxied = server.query("www.netflix.com", "A", source=UNREGISTERED)
            assert all(
                r.to_text() not in ("198.51.100.10", "198.51.100.11")
                for rr in proxied.answer
                for r in rr
            )
        assert server.query("www.netflix.com", "A").answer  # registered client unaffected


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the README's test command installs it")
    return path


@pytest.mark.parametrize("tcp", [False, True])
def test_dig_gets_the_proxy(server: Server, tcp: bool) -> None:
    args = [
        _tool("dig"),
        "@127.0.0.1",
        "-p",
        str(server.port),
        "-b",
        "127.0.0.2",
        "+short",
        "www.netflix.com",
    ]
    result = subprocess.run(
        [*args, "+tcp"] if tcp else args, capture_output=True, text=True, timeout=10
    )
    assert sorted(result.stdout.split()) == ["198.51.100.10", "198.51.100.11"]


def test_kdig_over_ipv6_and_tcp(server: Server) -> None:
    args = [
        _tool("kdig"),
        "@::1",
        "-p",
        str(server.port),
        "+tcp",
        "+short",
        "www.bbc.co.uk",
        "AAAA",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=10)
    assert result.stdout.split() == ["2001:db8:20::1"]


def test_dig_unregistered_is_refused(server: Server) -> None:
    args = [
        _tool("dig"),
        "@127.0.0.1",
        "-p",
        str(server.port),
        "-b",
        UNREGISTERED,
        "www.netflix.com",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=10)
    assert "status: REFUSED" in result.stdout


def test_sigterm_exits_zero_after_stopping(server: Server) -> None:
    assert server.query("www.netflix.com").answer
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    assert "STOPPING=1" in server.notifications or "stopped" in server.output()
    assert "smartdns stopped" in server.output()
