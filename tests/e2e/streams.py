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


def split_framed(data: bytes) -> list[dns.message.Message]:
    """The length-prefixed messages in `data` (complete ones only)."""
    messages = []
    position = 0
    while position + 2 <= len(data):
        end = position + 2 + struct.unpack_from("!H", data, position)[0]
        if end > len(data):
            break
        messages.append(dns.message.from_wire(data[position + 2 : end]))
        position = end
    return messages


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


class RecordCounter:
    """A TLS 1.2 client over memory BIOs that sees the raw records: how many application data
    records (writes of the server) carried what it read. TLS 1.2, because TLS 1.3 sends its
    session tickets as records of the same outer type."""

    def __init__(self, port: int, context: ssl.SSLContext, hostname: str, source: str) -> None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        self._sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5.0, source_address=(source, 0)
        )
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._raw = b""  # what the server sent: whole records are counted from it
        for _ in range(10):  # a TLS 1.2 handshake takes two round trips
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._exchange()
        self._flush()

    def close(self) -> None:
        self._sock.close()

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._sock.sendall(pending)

    def _exchange(self) -> None:
        self._flush()
        data = self._sock.recv(65536)
        if not data:
            raise EOFError
        self._raw += data
        self._incoming.write(data)

    def send(self, data: bytes) -> None:
        """`data` in one write: one record."""
        self.tls.write(data)
        self._flush()

    def read(self) -> bytes:
        """Whatever plaintext the next read of the socket completes (b"" while none)."""
        self._exchange()
        out = b""
        while True:
            try:
                out += self.tls.read(65536)
            except ssl.SSLWantReadError:
                return out

    def application_records(self) -> int:
        """Application data records received so far (content type 23, RFC 5246 §6.2.1)."""
        count = position = 0
        while position + 5 <= len(self._raw):
            count += self._raw[position] == 23
            position += 5 + struct.unpack_from("!H", self._raw, position + 3)[0]
        return count
