"""The sync API's HTTP edge over raw sockets: what it refuses, it answers and then closes at
once (no lingering on a body it will not read), and every Content-Encoding but identity is
415 whatever aiohttp's parser could or could not decode."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, running_server
from tests.fake_upstream import FakeUpstream

CLOSE_DEADLINE_S = 1.0
MAX_BODY = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    state: Path = tmp_path_factory.mktemp("sync-edge")
    with (
        FakeUpstream() as upstream,
        running_server(state, upstream.address, {"sync": {"max_body": MAX_BODY}}) as running,
    ):
        yield running


def _exchange(server: Server, request: bytes) -> tuple[int, dict[str, str]]:
    """Send `request`, read until the server closes; fails unless that happens within
    CLOSE_DEADLINE_S with a FIN (a reset could destroy the reply before the client reads it).
    Returns the status and the lower-cased headers of the one reply."""
    host, port = server.sync_url.removeprefix("http://").rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=CLOSE_DEADLINE_S) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + CLOSE_DEADLINE_S
        while chunk := _recv_before(sock, deadline, received):
            received += chunk
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def _recv_before(sock: socket.socket, deadline: float, received: bytes) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AssertionError(f"still open {CLOSE_DEADLINE_S} s after the request: {received!r}")
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        raise AssertionError(f"still open {CLOSE_DEADLINE_S} s after: {received!r}") from None


def _put(server: Server, headers: bytes, body: bytes = b"", token: str | None = None) -> bytes:
    return (
        b"PUT /v1/accounts/acct-edge HTTP/1.1\r\nHost: smartdns\r\n"
        + f"Authorization: Bearer {token or server.token}\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


def test_body_announced_over_max_body_is_413_and_closed(server: Server) -> None:
    # Part of the body follows the headers, as a client that does not wait for 100 does.
    request = _put(server, f"Content-Length: {MAX_BODY * 1000}\r\n".encode(), b" " * 8192)
    status, headers = _exchange(server, request)
    assert (status, headers.get("connection")) == (413, "close")


def test_chunked_body_found_over_max_body_is_413_and_closed(server: Server) -> None:
    chunk = b" " * (MAX_BODY + 1)
    body = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"  # and no last chunk: more to come
    status, headers = _exchange(server, _put(server, b"Transfer-Encoding: chunked\r\n", body))
    assert (status, headers.get("connection")) == (413, "close")


def test_401_to_a_request_announcing_a_body_is_closed(server: Server) -> None:
    request = _put(server, b"Content-Length: 100\r\n", b'{"version"', token="wrong")
    status, headers = _exchange(server, request)
    assert (status, headers.get("connection")) == (401, "close")


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip", "deflate", "compress", "x-other"])
def test_every_content_encoding_but_identity_is_415(server: Server, encoding: str) -> None:
    body = b'{"version": 1, "addresses": []}'
    headers = f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n".encode()
    headers += b"Connection: close\r\n"  # the body was sent whole: keep-alive would be fine
    status, response_headers = _exchange(server, _put(server, headers, body))
    assert (status, response_headers.get("accept-encoding")) == (415, "identity")
