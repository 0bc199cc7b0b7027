"""One query to one upstream over a fresh socket: UDP, or TCP with 2-byte framing (RFC 7766).

Owns the socket of each exchange (closed on every path). Builds our own message from the
question alone (fresh random ID, an OPT with our size and no options), so nothing of the
client reaches an upstream; accepts only a reply that matches ID and question.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket
import struct
from typing import Final, Protocol

from smartdns.config.model import HostPort
from smartdns.core.wire import FLAG_QR, HEADER_SIZE, build_opt

MAX_MESSAGE_BYTES: Final = 65535  # largest UDP datagram we read; TCP lengths cannot exceed it
_OPCODE_MASK: Final = 0x7800
_HEADER = struct.Struct("!6H")
_LENGTH = struct.Struct("!H")


class ExchangeFailedError(Exception):
    """The exchange's reply was unusable (mismatched over TCP, connection closed early)."""


class ExchangeCounts(Protocol):
    """Where an exchange counts what it did (the forwarder's aggregate stats)."""

    queries_sent: int  # messages sent upstream (UDP and TCP)
    mismatched: int  # replies ignored: wrong ID, QR clear or another question


class Exchange:
    """Sends `question` (wire name, type, class) to a server and returns the reply's bytes.
    Raises TimeoutError after `timeout_s`, OSError for socket errors, ExchangeFailedError."""

    __slots__ = ("_counts", "_opt_do", "_opt_plain", "_timeout_s")

    def __init__(self, edns_udp_size: int, timeout_s: float, counts: ExchangeCounts) -> None:
        self._timeout_s = timeout_s
        self._opt_plain = build_opt(edns_udp_size, dnssec_ok=False)
        self._opt_do = build_opt(edns_udp_size, dnssec_ok=True)
        self._counts = counts

    def _message(self, question: bytes, flags: int, dnssec_ok: bool) -> tuple[int, bytes]:
        """Our query: fresh random ID, one question, one OPT (RFC 6891) without options."""
        query_id = secrets.randbits(16)
        header = _HEADER.pack(query_id, flags, 1, 0, 0, 1)
        return query_id, header + question + (self._opt_do if dnssec_ok else self._opt_plain)

    async def udp(self, server: HostPort, question: bytes, flags: int, dnssec_ok: bool) -> bytes:
        """Send over a fresh connected UDP socket; wait for the reply that matches.

        Connected, so the kernel drops datagrams from other sources; the OS picks a fresh
        source port per socket. Non-matching datagrams are counted and ignored until the
        timeout (a spoofer must not be able to end the attempt early).
        """
        query_id, message = self._message(question, flags, dnssec_ok)
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((server.host, server.port))
            sock.send(message)
            self._counts.queries_sent += 1
            async with asyncio.timeout(self._timeout_s):
                while True:
                    await _wait_io(loop, sock, writable=False)
                    while True:
                        try:
                            data = sock.recv(MAX_MESSAGE_BYTES)
                        except BlockingIOError:
                            break
                        if _matches(data, query_id, question):
                            return data
                        self._counts.mismatched += 1
        finally:
            sock.close()

    async def tcp(self, server: HostPort, question: bytes, flags: int, dnssec_ok: bool) -> bytes:
        """One query over a fresh TCP connection with 2-byte length framing (RFC 7766)."""
        query_id, message = self._message(question, flags, dnssec_ok)
        loop = asyncio.get_running_loop()
        sock = socket.socket(server.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self._timeout_s):
                status = sock.connect_ex((server.host, server.port))
                if status == errno.EINPROGRESS:
                    await _wait_io(loop, sock, writable=True)
                    status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if status:
                    raise OSError(status, "connect failed")
                await _send_all(loop, sock, _LENGTH.pack(len(message)) + message)
                self._counts.queries_sent += 1
                (length,) = _LENGTH.unpack(await _recv_exactly(loop, sock, 2))
                data = await _recv_exactly(loop, sock, length)
        finally:
            sock.close()
        if not _matches(data, query_id, question):
            self._counts.mismatched += 1
            raise ExchangeFailedError("TCP reply does not match the query")
        return data


def _matches(data: bytes, query_id: int, question: bytes) -> bool:
    """Is `data` a reply to our query: same ID, QR set, QUERY, one question equal to ours?

    The name is compared case-insensitively (an upstream may apply 0x20 randomization);
    lower-casing also touches length bytes, but those are at most 63, below b"A".
    """
    end = HEADER_SIZE + len(question)
    if len(data) < end:
        return False
    reply_id, flags, qdcount = struct.unpack_from("!HHH", data)
    if reply_id != query_id or not flags & FLAG_QR or flags & _OPCODE_MASK or qdcount != 1:
        return False
    name_end = end - 4
    return (
        data[HEADER_SIZE:name_end].lower() == question[:-4] and data[name_end:end] == question[-4:]
    )


async def _wait_io(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    """Wait until `sock` is readable (or writable). The watcher is removed before returning,
    on every path, so the caller can close the socket at once without leaving a stale fd
    registered in the loop."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await _wait_io(loop, sock, writable=True)
            continue
        view = view[sent:]


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes (at most 65535, a 2-byte length); EOF is a failure."""
    buffer = bytearray()
    while len(buffer) < size:
        try:
            chunk = sock.recv(size - len(buffer))
        except BlockingIOError:
            await _wait_io(loop, sock, writable=False)
            continue
        if not chunk:
            raise ExchangeFailedError("upstream closed the TCP connection early")
        buffer += chunk
    return bytes(buffer)
