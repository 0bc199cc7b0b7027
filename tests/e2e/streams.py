"""DNS over a stream (TCP, DoT): RFC 1035 §4.2.2 framing by hand for tests that need to
pipeline, stall or watch a connection close, on a plain or a TLS socket."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import dns.message


def framed(name: str = "www.netflix.com", qtype: str = "A", query_id: int = 0x1234) -> bytes:
    message = dns.message.make_query(name, qtype)
    message.id = query_id
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(size):  # at least one byte per round
        if len(data) == size:
            break
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_reply(sock: socket.socket) -> dns.message.Message:
    (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    return dns.message.from_wire(recv_exactly(sock, length))


def closed_after(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the server closes `sock` (EOF, a reset, or a TLS error on a TLS socket),
    reading whatever comes."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    for _ in range(10_000):
        try:
            if not sock.recv(65536):
                break
        except (ConnectionResetError, ssl.SSLError):
            break
    else:
        raise AssertionError("too much data")
    return time.monotonic() - started
