"""No process outlives its node: workers stop when the main process dies however it dies, and
a node never shares its ports with processes of an earlier instance (docs/operations.md)."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.e2e.harness import REGISTERED, Server, run_cli, running_server
from tests.fake_upstream import FakeUpstream

GONE_DEADLINE_S = 1.5  # the promise is one second; the slack is the test's own polling
POLL_S = 0.02
FRESH_SOCKETS = 50


@pytest.fixture
def two_workers(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    with running_server(tmp_path, upstream.address, {"server": {"workers": 2}}) as server:
        yield server


def _workers(server: Server) -> list[int]:
    assert server.process is not None
    pid = server.process.pid
    workers = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(workers) == 2
    return workers


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _assert_gone_within(pids: list[int], deadline_s: float) -> None:
    """Fails when a worker is still alive after `deadline_s`, killing the survivors first
    (an orphan would hold the port for the tests that follow)."""
    deadline = time.monotonic() + deadline_s
    while survivors := [pid for pid in pids if _alive(pid)]:
        if time.monotonic() >= deadline:
            for pid in survivors:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"workers {survivors} outlived the main process")
        time.sleep(POLL_S)


def _rcodes_from_fresh_sockets(server: Server, count: int) -> list[int]:
    """One query per new socket (a new source port, so SO_REUSEPORT may pick any holder)."""
    message = dns.message.make_query("www.netflix.com", "A")
    return [
        dns.query.udp(message, "127.0.0.1", port=server.port, source=REGISTERED, timeout=3).rcode()
        for _ in range(count)
    ]


@pytest.mark.slow
def test_sigkill_of_the_main_process_stops_the_workers(two_workers: Server) -> None:
    workers = _workers(two_workers)
    two_workers.kill()
    _assert_gone_within(workers, GONE_DEADLINE_S)


@pytest.mark.slow
def test_sigkill_after_sigstop_stops_the_workers_and_a_new_node_answers_alone(
    two_workers: Server,
) -> None:
    server = two_workers
    workers = _workers(server)
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    # Three seconds of queries: the workers' periodic reports pile up unread in the stopped
    # main process's end of the control socket, so killing it resets the socket.
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert _rcodes_from_fresh_sockets(server, 1) == [dns.rcode.NOERROR]
    server.kill()
    _assert_gone_within(workers, GONE_DEADLINE_S)

    server.start()
    # Through the new node's sync API: its 200 means every worker of the node applied it.
    removal = urllib.request.Request(
        f"{server.sync_url}/v1/accounts/demo?version=1",
        method="DELETE",
        headers={"Authorization": f"Bearer {server.token}"},
    )
    with urllib.request.urlopen(removal, timeout=5) as response:
        assert response.status == 200
    rcodes = _rcodes_from_fresh_sockets(server, FRESH_SOCKETS)
    assert rcodes == [dns.rcode.REFUSED] * FRESH_SOCKETS


def test_start_fails_naming_the_process_that_holds_the_port(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_server(tmp_path, upstream.address) as server:
        pass  # a config, a database and a port; stopped again
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        # What a surviving worker of an earlier instance holds: the same port, shared.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", server.port))
        result = run_cli(server.config_path, "serve")
    assert result.returncode == 1
    assert f"127.0.0.1:{server.port}" in result.stderr
    assert str(os.getpid()) in result.stderr and "Traceback" not in result.stderr
