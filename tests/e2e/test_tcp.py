"""TCP limits (RFC 7766, RFC 9210) against the real server: idle timeout, slow senders,
garbage, the connection cap with idle shedding, queries per connection, clients that never
read, and running out of file descriptors. While each limit bites, UDP and new TCP clients
are still answered."""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from smartdns.serve.framing import FIRST_QUERY_GRACE_S
from tests.e2e.harness import REGISTERED, Server, running_server
from tests.e2e.streams import closed_after, framed, read_reply
from tests.fake_upstream import FakeUpstream

IDLE_TIMEOUT_S = 2.0  # harness default `server.tcp_idle_timeout`
WAIT_S = 5.0
TCP_CLOSE = 7  # tcpi_state after a reset
TCP_CLOSE_WAIT = 8  # tcpi_state after the peer's FIN


def _connect(server: Server, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((REGISTERED, 0))
    sock.settimeout(WAIT_S)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _is_closed(sock: socket.socket) -> bool:
    return _is_closed_state(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


def _is_closed_state(state: int) -> bool:
    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)


def _others_answered(server: Server) -> None:
    """UDP and a new TCP connection are both answered."""
    assert server.query("www.netflix.com").answer
    assert server.query("www.netflix.com", tcp=True).answer


def test_pipelined_queries_on_one_connection(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"".join(framed(query_id=i) for i in range(1, 21)))
        ids = {read_reply(sock).id for _ in range(20)}
    assert ids == set(range(1, 21))


def test_idle_connection_is_closed_after_the_idle_timeout(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(framed())
        assert read_reply(sock).answer
        answered = time.monotonic()  # the idle time runs from here, not from the checks below
        _others_answered(server)
        closed_after(sock, IDLE_TIMEOUT_S + 3)
        took = time.monotonic() - answered
    assert IDLE_TIMEOUT_S - 0.7 <= took <= IDLE_TIMEOUT_S + 1.5


@pytest.mark.slow
def test_slowloris_one_byte_per_second_times_out(server: Server) -> None:
    message = framed()
    with _connect(server) as sock:
        started = time.monotonic()
        for index in range(len(message) - 1):  # never completes within the deadline
            try:
                sock.sendall(message[index : index + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            if _is_closed(sock):
                break
            if index == 1:
                _others_answered(server)
            time.sleep(1.0)  # the pace under test
        took = time.monotonic() - started + closed_after(sock, IDLE_TIMEOUT_S + 3)
    assert took <= IDLE_TIMEOUT_S + 2.0  # from the first byte, not from the last one
    _others_answered(server)


@pytest.mark.parametrize(
    ("garbage", "at_once"),
    [
        pytest.param(b"\x00\x05hello", True, id="length_below_a_header"),
        pytest.param(b"\x00\x00", True, id="zero_length"),
        pytest.param(b"\xff\xff" + os.urandom(100), False, id="length_never_filled"),
    ],
)
def test_garbage_closes_only_that_connection(server: Server, garbage: bytes, at_once: bool) -> None:
    with _connect(server) as other, _connect(server) as bad:
        other.sendall(framed(query_id=1))
        assert read_reply(other).id == 1
        bad.sendall(garbage)
        started = time.monotonic()
        bad.settimeout(0.25)
        for query_id in range(2, 30):
            other.sendall(framed(query_id=query_id))  # the neighbour is unaffected
            assert read_reply(other).id == query_id
            try:
                if not bad.recv(100):
                    break
            except ConnectionResetError:
                break
            except TimeoutError:
                continue
        took = time.monotonic() - started
        assert took < (0.5 if at_once else IDLE_TIMEOUT_S + 1.5)
    _others_answered(server)


def test_unreadable_message_with_sound_framing_keeps_the_connection(server: Server) -> None:
    junk = os.urandom(30)
    junk = junk[:2] + bytes([junk[2] | 0x80]) + junk[3:]  # QR set: dropped, not answered
    with _connect(server) as sock:
        sock.sendall(struct.pack("!H", len(junk)) + junk + framed(query_id=7))
        assert read_reply(sock).id == 7


def test_connection_cap_sheds_idle_connections_first(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # idle timeout out of the way: only shedding closes a connection here, however long a
    # busy machine takes between the steps
    override = {"server": {"tcp_max_connections": 3, "tcp_idle_timeout": 30}}
    with running_server(tmp_path, upstream.address, override) as server:
        idle = [_connect(server) for _ in range(3)]
        for sock in idle:
            sock.sendall(framed())
            assert read_reply(sock).answer
        try:
            # full of idle connections: the newcomer is served, the oldest idle one closed
            with _connect(server) as newcomer:
                newcomer.sendall(framed())
                assert read_reply(newcomer).answer
                assert closed_after(idle[0], WAIT_S) < WAIT_S
                # now make every connection busy: a message under way
                busy = [idle[1], idle[2], newcomer]
                for sock in busy:
                    sock.sendall(framed()[:5])
                with _connect(server) as refused:
                    refused.sendall(framed())
                    assert closed_after(refused, WAIT_S) < WAIT_S
                assert server.query("www.netflix.com").answer  # UDP keeps answering
                for sock in busy:
                    assert not _is_closed(sock)
        finally:
            for sock in idle:
                sock.close()
        _others_answered(server)


def test_connection_cap_spares_new_connections_until_their_first_query(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # idle timeout out of the way: only shedding closes a connection here
    override = {"server": {"tcp_max_connections": 2, "tcp_idle_timeout": 30}}
    with running_server(tmp_path, upstream.address, override) as server:
        silent, answered = _connect(server), _connect(server)
        try:
            # both are new and have sent nothing yet: the newcomer is turned away, not them
            with _connect(server) as newcomer:
                newcomer.sendall(framed())
                assert closed_after(newcomer, WAIT_S) < WAIT_S
            answered.sendall(framed(query_id=1))
            assert read_reply(answered).id == 1
            time.sleep(FIRST_QUERY_GRACE_S)
            # past its grace, the connection that never asked is the one shed
            with _connect(server) as late:
                late.sendall(framed(query_id=2))
                assert read_reply(late).id == 2
            assert closed_after(silent, WAIT_S) < WAIT_S
            assert not _is_closed(answered)
        finally:
            silent.close()
            answered.close()
        _others_answered(server)


def test_a_connection_serves_every_query_pipelined_on_it(server: Server) -> None:
    """No cap on a connection's queries: 2,500 pipelined queries get 2,500 answers and the
    connection stays open (a cap would drop what was pipelined behind it)."""
    count = 2_500
    with _connect(server) as sock:
        sock.sendall(b"".join(framed(query_id=i % 65536) for i in range(count)))
        for _ in range(count):
            read_reply(sock)
        assert not _is_closed(sock)
    _others_answered(server)


def test_client_that_never_reads_is_disconnected(server: Server) -> None:
    assert server.query("big.example.org", tcp=True).answer  # cached: answers come at once
    query = framed("big.example.org")
    with _connect(server, rcvbuf=4096) as sock:
        sock.setblocking(False)
        sent = 0
        for _ in range(20_000):  # until the server stops reading us (or gives up on us)
            try:
                sent += sock.send(query)
            except (BlockingIOError, ConnectionResetError):
                break
        assert sent > 100 * len(query)
        _others_answered(server)
        started = time.monotonic()
        for _ in range(100):  # without reading a byte
            if _is_closed(sock):
                break
            time.sleep(0.1)
        assert _is_closed(sock), "still connected"
        assert time.monotonic() - started <= IDLE_TIMEOUT_S + 1.5
    _others_answered(server)


@pytest.fixture
def limited(server: Server) -> Iterator[tuple[Server, int]]:
    """The server with its descriptor limit lowered to what it has open now plus two."""
    assert server.process is not None
    pid = server.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, original[1]))
    try:
        yield server, pid
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)


def test_out_of_descriptors_pauses_accepting_and_recovers(limited: tuple[Server, int]) -> None:
    server, pid = limited

    held: list[socket.socket] = []  # clients keep their connections: the server sheds them

    def ask(index: int) -> int:
        sock = _connect(server)
        held.append(sock)
        sock.sendall(framed(query_id=index))
        return read_reply(sock).id

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = sorted(pool.map(ask, range(8)))
        assert ids == list(range(8))  # idle connections were shed to make room
        assert "out of file descriptors" in server.output()
        assert server.query("www.netflix.com").answer  # UDP needs no descriptor
        # a forward needs a socket too; whether it got one or a quick SERVFAIL, that is
        # neither remembered as a failure nor held against the upstream
        started = time.monotonic()
        server.query("fd.example.org")
        assert time.monotonic() - started < 1.5  # not the 4 s of waiting on a dead upstream
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(4096, hard), hard))
        assert server.query("fd.example.org").rcode() == dns.rcode.NXDOMAIN
        assert server.query("example.org").answer[0][0].to_text() == "192.0.2.1"
        _others_answered(server)
    finally:
        for sock in held:
            sock.close()
