"""A DoH client for the e2e tests: HTTP/2 (the `h2` library) or HTTP/1.1 (`h11`) over a real
TLS socket to the server, with full control of method, path and headers, so the status codes
and the abuse cases can be driven exactly. Every socket operation has a timeout."""

from __future__ import annotations

import base64
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import dns.message
import h2.config
import h2.connection
import h2.events
import h11

from tests.certificates import SERVER_NAME

TIMEOUT_S = 5.0
MEDIA_TYPE = "application/dns-message"


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def message(self) -> dns.message.Message:
        assert self.status == 200, self.status
        return dns.message.from_wire(self.body)


def tls_socket(
    port: int, ca_file: Path, *, source: str, alpn: str, hostname: str = SERVER_NAME
) -> ssl.SSLSocket:
    where = "::1" if ":" in source else "127.0.0.1"
    raw = socket.create_connection((where, port), timeout=TIMEOUT_S, source_address=(source, 0))
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols([alpn])
    sock = context.wrap_socket(raw, server_hostname=hostname)
    assert sock.selected_alpn_protocol() == alpn
    return sock


def get_target(wire: bytes, path: str = "/dns-query") -> str:
    return f"{path}?dns={base64.urlsafe_b64encode(wire).rstrip(b'=').decode()}"


class H2Client:
    """One HTTP/2 connection; `request` sends one request and waits for its response."""

    def __init__(
        self, port: int, ca_file: Path, *, source: str, hostname: str = SERVER_NAME
    ) -> None:
        self.sock = tls_socket(port, ca_file, source=source, alpn="h2", hostname=hostname)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def headers(
        self, method: str, path: str, extra: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        return [
            (":method", method),
            (":scheme", "https"),
            (":authority", SERVER_NAME),
            (":path", path),
            *extra,
        ]

    def start(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        extra: list[tuple[str, str]] | None = None,
        *,
        flush: bool = True,
    ) -> int:
        """Send a request; a body larger than the flow-control window is sent as far as the
        window allows and left unfinished (what a 413 needs)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.headers(method, path, extra or []), not body)
        while body:
            room = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if room <= 0:
                break
            self.conn.send_data(stream_id, body[:room], end_stream=len(body) <= room)
            body = body[room:]
        if flush:
            self.flush()
        return stream_id

    def read(self) -> bool:
        """Read once; False at end of stream."""
        data = self.sock.recv(65_536)
        if not data:
            return False
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id:
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
        self.events += events
        self.flush()
        return True

    def response(self, stream_id: int) -> Response:
        while True:
            status, headers, body, ended, reset = 0, {}, b"", False, -1
            for event in self.events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    headers = {bytes(k).decode(): bytes(v).decode() for k, v in event.headers or ()}
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data or b""
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    ended = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    reset = int(event.error_code or 0)
            if ended:  # a complete response, even when a reset followed it (413)
                return Response(status, headers, body)
            if reset >= 0:
                return Response(0, {"reset": str(reset)}, b"")
            if not self.read():
                raise EOFError("connection closed before the response")

    def request(
        self, method: str, path: str, body: bytes = b"", extra: list[tuple[str, str]] | None = None
    ) -> Response:
        return self.response(self.start(method, path, body, extra))


def h1_request(
    port: int,
    ca_file: Path,
    requests: list[tuple[str, str, bytes, list[tuple[str, str]]]],
    *,
    source: str,
) -> list[Response]:
    """Send `requests` (method, target, body, extra headers) pipelined on one HTTP/1.1
    connection; their responses, in order."""
    sock = tls_socket(port, ca_file, source=source, alpn="http/1.1")
    out = b""
    for method, target, body, extra in requests:
        # a fresh state machine per request: h11 waits for each response before it lets a
        # client send the next, and the bytes are all a pipelining client needs
        client = h11.Connection(h11.CLIENT)
        headers = [("host", SERVER_NAME), ("content-length", str(len(body))), *extra]
        out += client.send(h11.Request(method=method, target=target, headers=headers)) or b""
        out += client.send(h11.Data(data=body)) if body else b""
        out += client.send(h11.EndOfMessage()) or b""
    sock.sendall(out)
    reader = h11.Connection(h11.CLIENT)
    responses: list[Response] = []
    with sock:
        for method, target, _, _ in requests:
            reader.send(h11.Request(method=method, target=target, headers=[("host", "x")]))
            reader.send(h11.EndOfMessage())
            head = _event(reader, sock)
            assert isinstance(head, h11.Response), head
            body = b""
            while not isinstance(event := _event(reader, sock), h11.EndOfMessage):
                assert isinstance(event, h11.Data)
                body += event.data
            headers = {bytes(k).decode(): bytes(v).decode() for k, v in head.headers}
            responses.append(Response(head.status_code, headers, body))
            if reader.their_state is not h11.DONE:
                break
            reader.start_next_cycle()
    return responses


def _event(reader: h11.Connection, sock: ssl.SSLSocket) -> object:
    while True:
        event = reader.next_event()
        if event is not h11.NEED_DATA:
            return event
        reader.receive_data(sock.recv(65_536))
