"""port_holders: sockets of this very process, found through the real /proc."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from smartdns.config.model import HostPort
from smartdns.errors import SmartDNSError
from smartdns.node.port_holders import check_ports_free


@pytest.fixture
def udp_port() -> Iterator[int]:
    """A UDP socket on 127.0.0.1 shared with SO_REUSEPORT, as a left-over worker holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_held_udp_port_is_reported_with_the_holder(udp_port: int, host: str) -> None:
    with pytest.raises(SmartDNSError) as raised:
        check_ports_free([HostPort(host, udp_port)])
    assert f"{host}:{udp_port} is held by process {os.getpid()}" in str(raised.value)


def test_another_address_or_family_on_the_port_is_free(udp_port: int) -> None:
    check_ports_free([HostPort("127.0.0.9", udp_port), HostPort("::1", udp_port)])


def test_udp_on_a_tls_port_is_free(udp_port: int) -> None:
    check_ports_free([], tcp_only=[HostPort("127.0.0.1", udp_port)])  # HTTP/3 may hold it


def test_a_listening_ipv6_tcp_socket_is_reported() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        port = int(sock.getsockname()[1])
        check_ports_free([HostPort("::1", port)])  # bound, not listening: a connection's end
        sock.listen()
        with pytest.raises(SmartDNSError, match=rf"\[::\]:{port} is held by process"):
            check_ports_free([], tcp_only=[HostPort("::", port)])
