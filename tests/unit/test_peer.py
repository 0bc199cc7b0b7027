"""peer: what each transport imposes, stated by the peer's fields rather than by transport."""

from __future__ import annotations

import dataclasses

import pytest

from smartdns.core.counters import Transport
from smartdns.core.peer import Peer, stream_peer, udp_peer
from smartdns.core.wire import MAX_MESSAGE_SIZE


def test_udp_peer_is_spoofable_and_leaves_the_limit_to_the_query() -> None:
    assert udp_peer("192.0.2.1") == Peer("192.0.2.1", Transport.UDP, None, True)


def test_udp_peer_is_reused_for_a_recent_source() -> None:
    assert udp_peer("192.0.2.7") is udp_peer("192.0.2.7")
    assert udp_peer("192.0.2.7") is not udp_peer("192.0.2.8")


def test_stream_peer_is_not_spoofable_and_carries_a_full_message() -> None:
    peer = stream_peer("2001:db8::1")
    assert peer == Peer("2001:db8::1", Transport.TCP, MAX_MESSAGE_SIZE, False)
    assert MAX_MESSAGE_SIZE == 0xFFFF


def test_peer_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        udp_peer("192.0.2.1").host = "192.0.2.2"  # type: ignore[misc]
