"""Operating a node: worker processes, SIGHUP reload, SIGTERM drain, systemd notifications."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from tests.e2e.harness import REGISTERED, UNREGISTERED, Server, running_server
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port

EFFECT_DEADLINE_S = 1.0
RESTART_DEADLINE_S = 10.0
POLL_S = 0.02


def _metric(server: Server, name: str) -> dict[str, float]:
    """Samples of one metric family from /metrics: label text → value."""
    with urllib.request.urlopen(f"{server.sync_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            samples[key[len(name) :]] = float(value)
    return samples


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _query_from_fresh_port(
    server: Server, name: str, source: str = REGISTERED, tcp: bool = False
) -> int:
    """One query from a new socket (a new source port, so SO_REUSEPORT may pick any worker)."""
    message = dns.message.make_query(name, "A")
    if tcp:
        return dns.query.tcp(
            message, "127.0.0.1", port=server.port, source=source, timeout=3
        ).rcode()
    return dns.query.udp(message, "127.0.0.1", port=server.port, source=source, timeout=3).rcode()


def _query_with_retry(server: Server, name: str, tries: int = 3) -> int:
    """As a stub resolver does: a lost datagram (one queued on a socket that was just
    killed) is retried; an unanswered query after `tries` fails the test."""
    for attempt in range(tries):
        try:
            message = dns.message.make_query(name, "A")
            return dns.query.udp(
                message, "127.0.0.1", port=server.port, source=REGISTERED, timeout=1
            ).rcode()
        except dns.exception.Timeout:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def two_workers(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    with running_server(tmp_path, upstream.address, {"server": {"workers": 2}}) as server:
        yield server


def _wait_until(condition: object, deadline_s: float, what: str) -> float:
    """Seconds until `condition()` holds; fails when a look that began past the deadline still
    finds it false. Counted to the look's start: its queries' round trips are this client's
    time (long on a busy machine), not the server's."""
    start = time.monotonic()
    while True:
        began = time.monotonic() - start
        if condition():  # type: ignore[operator]
            return began
        assert began < deadline_s, f"{what} not within {deadline_s}s"
        time.sleep(POLL_S)


@pytest.mark.slow
def test_two_workers_share_udp_and_tcp(two_workers: Server) -> None:
    server = two_workers
    assert server.process is not None and len(_children(server.process.pid)) == 2
    for tcp in (False, True):
        for _ in range(40):
            assert _query_from_fresh_port(server, "www.netflix.com", tcp=tcp) == dns.rcode.NOERROR

    def both_counted() -> bool:
        """Every query in (each worker reports once a second: one may have reported midway)."""
        per_worker = _metric(server, "smartdns_worker_queries_total")
        return (
            len(per_worker) == 2
            and all(count > 0 for count in per_worker.values())
            and sum(per_worker.values()) >= 2 * 40
        )

    _wait_until(both_counted, 3.0, "queries counted by both workers")
    totals = _metric(server, "smartdns_queries_total")
    assert totals['{transport="udp",outcome="unblock"}'] == 40
    assert totals['{transport="tcp",outcome="unblock"}'] == 40


@pytest.mark.slow
def test_registration_change_reaches_every_worker_within_one_second(two_workers: Server) -> None:
    server = two_workers
    assert _query_from_fresh_port(server, "www.netflix.com", UNREGISTERED) == dns.rcode.REFUSED
    assert server.cli("registrations", "add", "late", UNREGISTERED).returncode == 0

    def all_authorized() -> bool:
        return all(
            _query_from_fresh_port(server, "www.netflix.com", UNREGISTERED) == dns.rcode.NOERROR
            for _ in range(20)
        )

    _wait_until(all_authorized, EFFECT_DEADLINE_S, "registration in every worker")


@pytest.mark.slow
def test_killed_worker_is_restarted_while_the_other_answers(two_workers: Server) -> None:
    server = two_workers
    assert server.process is not None
    victim, survivor = _children(server.process.pid)
    os.kill(victim, signal.SIGKILL)
    # Datagrams already queued on the dead worker's socket die with it; once its sockets
    # are gone (exited: zombie or reaped) the kernel routes everything to the survivor.
    _wait_until(lambda: not _alive(victim), 5.0, "killed worker exit")
    for _ in range(30):  # the other worker answers meanwhile (SO_REUSEPORT skips the dead one)
        assert _query_with_retry(server, "www.netflix.com") == dns.rcode.NOERROR

    def restarted() -> bool:
        pids = _children(server.process.pid)  # type: ignore[union-attr]
        restarts = _metric(server, "smartdns_worker_restarts_total")
        up = _metric(server, "smartdns_worker_up")
        return (
            len(pids) == 2 and survivor in pids and sum(restarts.values()) == 1 and all(up.values())
        )

    _wait_until(restarted, RESTART_DEADLINE_S, "worker restart")
    assert "restarting it" in server.output()


class QueryStream:
    """A bounded stream of queries in a thread, recording every rcode (or the failure)."""

    def __init__(self, server: Server, name: str, count: int, interval_s: float = 0.005) -> None:
        self.results: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(server, name, count, interval_s))

    def _run(self, server: Server, name: str, count: int, interval_s: float) -> None:
        for _ in range(count):
            try:
                reply = server.query(name, "A")
                self.results.append(dns.rcode.to_text(reply.rcode()))
            except Exception as error:  # a lost query is what the test looks for
                self.results.append(type(error).__name__)
            time.sleep(interval_s)

    def __enter__(self) -> QueryStream:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._thread.join(timeout=60)


def _rewrite_config(server: Server, change: dict[str, object]) -> None:
    config = yaml.safe_load(server.config_path.read_text())
    config["unblock"]["zones"].update(change)
    server.config_path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_adds_a_zone_without_dropping_queries(
    tmp_path: Path, upstream: FakeUpstream, workers: int
) -> None:
    upstream.add("www.hulu.com", "A", ["www.hulu.com. 300 IN A 192.0.2.77"])
    with running_server(tmp_path, upstream.address, {"server": {"workers": workers}}) as server:
        assert [r.to_text() for r in server.query("www.hulu.com").answer[0]] == ["192.0.2.77"]
        with QueryStream(server, "www.netflix.com", 200) as stream:
            _rewrite_config(server, {"us": ["netflix.com", "nflxvideo.net", "hulu.com"]})
            server.notifications.clear()
            server.signal(signal.SIGHUP)
            server.wait_notification("RELOADING=1", 10)
            server.wait_notification("READY=1", 10)
        assert stream.results == ["NOERROR"] * 200

        def proxied() -> bool:
            answers = [r.to_text() for rr in server.query("www.hulu.com").answer for r in rr]
            return answers == ["198.51.100.10", "198.51.100.11"]

        _wait_until(proxied, EFFECT_DEADLINE_S, "new zone answered")


def test_sighup_with_broken_config_keeps_serving(server: Server) -> None:
    good = server.config_path.read_text()
    server.config_path.write_text(good + "bogus_key: 1\n")
    broken_line = len(good.splitlines()) + 1
    server.notifications.clear()
    server.signal(signal.SIGHUP)
    server.wait_notification("READY=1", 10)
    assert f"{server.config_path}:{broken_line}:" in server.output()
    assert server.query("www.netflix.com").answer


def test_sigterm_answers_in_flight_queries_and_exits_zero(
    server: Server, upstream: FakeUpstream
) -> None:
    upstream.delay_s = 0.3  # in flight when SIGTERM arrives (the upstream timeout is 0.5 s)
    sockets = []
    try:
        for index in range(10):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((REGISTERED, 0))
            sock.settimeout(5)
            sock.sendto(
                dns.message.make_query(f"n{index}.example.org", "A").to_wire(),
                ("127.0.0.1", server.port),
            )
            sockets.append(sock)
        assert upstream.wait_for_queries(10, timeout=5)
        server.signal(signal.SIGTERM)
        replies = [dns.message.from_wire(sock.recv(4096)) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert [reply.rcode() for reply in replies] == [dns.rcode.NXDOMAIN] * 10
    assert server.stop() == 0


def test_notifications_arrive_in_order(server: Server) -> None:
    assert server.notifications[0] == "READY=1"
    server.notifications.clear()
    server.signal(signal.SIGHUP)
    server.wait_notification("RELOADING=1", 10)
    server.wait_notification("READY=1", 10)
    assert server.stop() == 0
    states = [
        n for n in server.notifications if n.split("=")[0] in ("READY", "RELOADING", "STOPPING")
    ]
    assert states == ["RELOADING=1", "READY=1", "STOPPING=1"]


@pytest.mark.slow
def test_workers_stop_with_the_main_process(two_workers: Server) -> None:
    assert two_workers.process is not None
    pids = _children(two_workers.process.pid)
    assert two_workers.stop() == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )


def test_sighup_rebinds_changed_listen_addresses(server: Server) -> None:
    new_port = free_port()
    config = yaml.safe_load(server.config_path.read_text())
    config["server"]["listen"] = [f"127.0.0.1:{new_port}"]
    server.config_path.write_text(yaml.safe_dump(config))
    server.notifications.clear()
    server.signal(signal.SIGHUP)
    server.wait_notification("READY=1", 10)
    message = dns.message.make_query("www.netflix.com", "A")
    reply = dns.query.udp(message, "127.0.0.1", port=new_port, source=REGISTERED, timeout=3)
    assert reply.answer
    reply = dns.query.tcp(message, "127.0.0.1", port=new_port, source=REGISTERED, timeout=3)
    assert reply.answer
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(message, "::1", port=server.port, timeout=0.5)  # [::1] was dropped


def test_sighup_to_a_taken_port_keeps_the_old_listeners(server: Server) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        config = yaml.safe_load(server.config_path.read_text())
        config["server"]["listen"] = [f"127.0.0.1:{taken}"]
        server.config_path.write_text(yaml.safe_dump(config))
        server.notifications.clear()
        server.signal(signal.SIGHUP)
        server.wait_notification("READY=1", 10)
    assert f"127.0.0.1:{taken}" in server.output()
    assert server.query("www.netflix.com").answer
