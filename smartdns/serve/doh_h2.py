"""DoH over HTTP/2, sans I/O: the `h2` state machine with this server's bounds around it
(RFC 9113; CVE-2023-44487 "rapid reset"; slow requests). Bytes in, complete requests out,
responses in, bytes out; the asyncio protocol (serve.doh) moves the bytes and owns the timer.

h2 logs nothing by default (its DummyLogger); its exceptions end the connection here and
their text goes nowhere (SPEC 7).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack

from smartdns.serve.doh_request import (
    MAX_BODY_BYTES,
    PAYLOAD_TOO_LARGE,
    HttpRequest,
    HttpResponse,
)
from smartdns.serve.tcp import MAX_UNSENT_BYTES  # also for answers the client's windows hold

MAX_STREAMS: Final = 100  # SETTINGS_MAX_CONCURRENT_STREAMS (SPEC 2a)
MAX_HEADER_LIST_BYTES: Final = 8192  # SETTINGS_MAX_HEADER_LIST_SIZE: a DoH request needs < 1 KiB
# Client resets beyond the streams it let finish: one window of streams may be abandoned at
# once (a closed browser tab); more than that is the rapid reset attack.
RESET_ALLOWANCE: Final = MAX_STREAMS
_UNBOUNDED_STREAMS: Final = 2**31 - 1
# Flow control bounds what request bodies a connection holds: its window (and each stream's)
# is one octet more than the largest body, so a body over it still shows (413), and it opens
# again only as bodies are consumed (a request complete, cut short or reset).
BODY_WINDOW_BYTES: Final = MAX_BODY_BYTES + 1
_DEFAULT_WINDOW: Final = 65_535  # RFC 9113 §6.9.2: every window starts here
# h2's own header checks cost more than the rest of a request; with them off, `_open`
# applies the ones that make a request malformed (RFC 9113 §8.2.2, §8.3.1).
_REQUEST_PSEUDO_HEADERS: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_REQUIRED_PSEUDO_HEADERS: Final = frozenset({b":method", b":scheme", b":path"})
_CONNECTION_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_HEADER_FIELDS_CACHED: Final = 4096  # distinct (name, value) pairs: statuses, sizes, max-ages


def _settings(max_streams: int) -> h2.settings.Settings:
    """Our SETTINGS (RFC 9113 §6.5.2); the stream window fits the largest request body."""
    return h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BODY_WINDOW_BYTES,
        },
    )


class _Malformed(Exception):
    """A request header block RFC 9113 §8.1.1 calls malformed."""


class _ResponseEncoder(hpack.Encoder):
    """Response header blocks from cached fields. No field enters the dynamic table (every
    literal is "never indexed"), so a field's encoding does not depend on what went before
    and a block is the concatenation of its fields' encodings, each computed once. The price
    is a few dozen octets per response that the dynamic table would have saved."""

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        block = b"".join([_encode_field(name, value) for name, value in headers])
        if self.header_table.resized:  # RFC 7541 §4.2: a size change is signalled first
            self.header_table.resized = False
            return self._encode_table_size_change() + block
        return block


_FIELD_ENCODER: Final = hpack.Encoder()  # its dynamic table stays empty: nothing is indexed


@functools.lru_cache(maxsize=_HEADER_FIELDS_CACHED)
def _encode_field(name: bytes, value: bytes) -> bytes:
    return _FIELD_ENCODER.add((name, value), sensitive=True, huffman=True)


@dataclass(slots=True)
class _Incoming:
    """A request whose headers arrived and whose body is still coming."""

    method: bytes
    target: bytes
    content_type: bytes | None
    started: float
    body: bytearray = field(default_factory=bytearray)
    unacknowledged: int = 0  # flow-controlled octets received, window not yet given back


class H2Session:
    """One HTTP/2 connection's DoH state. `receive` returns (stream ID, request) for each
    request completed; `respond` answers one (None resets the stream: a query the policy
    dropped); `data_to_send` is what goes on the wire; `expire` applies the deadlines.
    `closed` once a GOAWAY went out or the connection failed: send what is left, then close.

    Bounds: at most MAX_STREAMS requests open or being answered (over that a new stream is
    refused with REFUSED_STREAM, whatever the client has acknowledged of our settings);
    header lists over MAX_HEADER_LIST_BYTES end the connection (h2's DenialOfServiceError);
    a body over MAX_BODY_BYTES gets 413 and the stream reset; a request not complete within
    `deadline_s` of its headers is reset; no request answered (nor window opened) for
    `deadline_s` while none waits for its answer ends the connection (GOAWAY), and so do
    more than MAX_UNSENT_BYTES of answers held back by the client's windows; client resets
    beyond RESET_ALLOWANCE more than the streams answered end it with ENHANCE_YOUR_CALM."""

    def __init__(self, now: float, deadline_s: float) -> None:
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self._h2.encoder = _ResponseEncoder()
        self._h2.local_settings = _settings(MAX_STREAMS)
        # h2 applies the header list bound only once the client acknowledges our settings;
        # a client that never does is held to it from the first frame
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(BODY_WINDOW_BYTES - _DEFAULT_WINDOW)
        # The SETTINGS frame went out with MAX_STREAMS; the stream limit is then enforced
        # here, as a stream error (REFUSED_STREAM, RFC 9113 §5.1.2), not by h2, which makes
        # it a connection error and drops every request read in the same batch with it.
        self._h2.local_settings = _settings(_UNBOUNDED_STREAMS)
        self._deadline_s = deadline_s
        self._incoming: dict[int, _Incoming] = {}
        self._answering: set[int] = set()
        self._unsent: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self._cut: set[int] = set()  # answered before their request body ended (413)
        self._resets = 0
        self._answered = 0
        self._last_active = now
        self.closed = False

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def is_idle(self) -> bool:
        """No request open, being answered or being sent."""
        return not (self._incoming or self._answering or self._unsent)

    @property
    def may_read(self) -> bool:
        """Streams, not reading, bound the work in progress (MAX_STREAMS)."""
        return not self.closed

    def resume(self, now: float) -> list[tuple[int, HttpRequest]]:
        """Nothing waits behind an answer in HTTP/2: streams are independent."""
        return []

    # ---- receiving ---------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[tuple[int, HttpRequest]]:
        if self.closed:
            return []
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True  # h2 queued a GOAWAY with the error code
            return []
        requests: list[tuple[int, HttpRequest]] = []
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._open(event, now, requests)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event, requests)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id, now, requests)
            elif isinstance(event, h2.events.StreamReset):
                self._reset_by_client(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._last_active = now  # the client reads: progress
                self._flush()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
            if self.closed:
                break
        return requests

    def _open(
        self, event: h2.events.RequestReceived, now: float, out: list[tuple[int, HttpRequest]]
    ) -> None:
        stream_id = event.stream_id
        if stream_id is None:
            return
        if len(self._incoming) + len(self._answering) + len(self._unsent) >= MAX_STREAMS:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        try:
            method, target, content_type, too_large = _read_headers(event.headers or ())
        except _Malformed:
            self._goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        incoming = _Incoming(method, target, content_type, now)
        self._incoming[stream_id] = incoming
        if too_large:
            self._too_large(stream_id, incoming, out)

    def _data(self, event: h2.events.DataReceived, out: list[tuple[int, HttpRequest]]) -> None:
        stream_id = event.stream_id
        if stream_id is None:
            return
        size = event.flow_controlled_length or 0
        incoming = self._incoming.get(stream_id)
        if incoming is None:  # a stream already answered: nothing is kept
            self._h2.acknowledge_received_data(size, stream_id)
            return
        incoming.unacknowledged += size
        incoming.body += event.data or b""
        if len(incoming.body) > MAX_BODY_BYTES:
            self._too_large(stream_id, incoming, out)

    def _too_large(
        self, stream_id: int, incoming: _Incoming, out: list[tuple[int, HttpRequest]]
    ) -> None:
        """413 through the usual path, then the stream is reset (`respond` sees it is not
        complete): the rest of the body is never read."""
        self._release(stream_id)
        self._answering.add(stream_id)
        self._cut.add(stream_id)
        request = HttpRequest(
            incoming.method, incoming.target, incoming.content_type, b"", PAYLOAD_TOO_LARGE
        )
        out.append((stream_id, request))

    def _ended(self, stream_id: int | None, now: float, out: list[tuple[int, HttpRequest]]) -> None:
        incoming = self._release(stream_id)
        if incoming is None or stream_id is None:
            return
        self._answering.add(stream_id)
        self._last_active = now
        out.append(
            (
                stream_id,
                HttpRequest(
                    incoming.method, incoming.target, incoming.content_type, bytes(incoming.body)
                ),
            )
        )

    def _reset_by_client(self, stream_id: int | None) -> None:
        """The client abandoned a stream: forget it (its query, if forwarded, still finishes
        and fills the cache; its answer goes nowhere), and count it against the allowance."""
        if stream_id is not None:
            self._release(stream_id)
            self._answering.discard(stream_id)
            self._unsent.pop(stream_id, None)
            self._cut.discard(stream_id)
        self._resets += 1
        if self._resets > self._answered + RESET_ALLOWANCE:
            self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _release(self, stream_id: int | None) -> _Incoming | None:
        """Stop reading a request (complete, cut short or abandoned) and give the window its
        body took back to the client."""
        incoming = self._incoming.pop(stream_id, None) if stream_id is not None else None
        if incoming is not None and incoming.unacknowledged and stream_id is not None:
            self._h2.acknowledge_received_data(incoming.unacknowledged, stream_id)
        return incoming

    # ---- answering ---------------------------------------------------------------------

    def respond(self, stream_id: int, response: HttpResponse | None, now: float) -> None:
        """Send the response on `stream_id` (nothing when the client reset it meanwhile);
        None resets the stream instead (CANCEL)."""
        if stream_id not in self._answering or self.closed:
            return
        self._answering.discard(stream_id)
        self._last_active = now
        if response is None:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            return
        headers = [
            (b":status", b"%d" % response.status),
            (b"content-length", b"%d" % len(response.body)),
            *response.headers,
        ]
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not response.body)
            if stream_id in self._cut:
                # RFC 9113 §8.1: a complete response before the request's end, then a reset
                # with NO_ERROR asks the client to stop sending (error responses are empty)
                self._cut.discard(stream_id)
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            return  # the stream closed under us
        self._answered += 1
        if response.body:
            self._unsent[stream_id] = response.body
            self._flush()
            if sum(map(len, self._unsent.values())) > MAX_UNSENT_BYTES:
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)  # a client that won't read

    def _flush(self) -> None:
        """Send what the flow-control windows allow of the waiting bodies; a stream whose
        request body was cut short (413) is reset once its response is out."""
        h2conn = self._h2
        for stream_id, body in list(self._unsent.items()):
            try:
                while body:
                    window = min(
                        h2conn.local_flow_control_window(stream_id),
                        h2conn.max_outbound_frame_size,
                    )
                    if window <= 0:
                        break
                    h2conn.send_data(stream_id, body[:window], end_stream=len(body) <= window)
                    body = body[window:]
            except h2.exceptions.ProtocolError:
                body = b""  # the stream closed under us
            if body:
                self._unsent[stream_id] = body
            else:
                del self._unsent[stream_id]

    # ---- time --------------------------------------------------------------------------

    def expire(self, now: float) -> float | None:
        """Reset requests older than the deadline; end an idle connection. Returns when to
        call again (None once closed)."""
        if self.closed:
            return None
        deadline = self._deadline_s
        for stream_id, incoming in list(self._incoming.items()):
            if now - incoming.started >= deadline:
                self._release(stream_id)
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        # Waiting on upstream keeps a connection; waiting on the client's flow-control window
        # does not: a client that never opens it is cut off like an idle one.
        busy = bool(self._answering)
        if not busy and now - self._last_active >= deadline:
            self._goaway(h2.errors.ErrorCodes.NO_ERROR)
            return None
        checks = [now if busy else self._last_active]
        checks += (incoming.started for incoming in self._incoming.values())
        return min(checks) + deadline

    def _goaway(self, code: h2.errors.ErrorCodes) -> None:
        self._h2.close_connection(code)
        self.closed = True


def _read_headers(
    headers: Iterable[tuple[bytes | str, bytes | str]],
) -> tuple[bytes, bytes, bytes | None, bool]:
    """Method, target, content type, and whether the declared length is over MAX_BODY_BYTES.
    Raises _Malformed for what RFC 9113 calls a malformed request: pseudo-headers unknown,
    repeated, missing or after a regular field (§8.3), connection-specific fields (§8.2.2).
    h2 decoded the names as bytes (header_encoding=None)."""
    method = target = b""
    content_type: bytes | None = None
    too_large = False
    pseudo: set[bytes] = set()
    regular = False
    for name, value in headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
        if name[:1] == b":":
            if regular or name in pseudo or name not in _REQUEST_PSEUDO_HEADERS:
                raise _Malformed
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            continue
        regular = True
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            too_large = not value.isdigit() or int(value) > MAX_BODY_BYTES
        elif name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
            raise _Malformed
    if not pseudo >= _REQUIRED_PSEUDO_HEADERS:
        raise _Malformed
    return method, target, content_type, too_large
