"""doh_h2: the HTTP/2 session driven in memory by a client-side h2 connection: requests in,
responses out, and the bounds (streams, header lists, bodies, deadlines, rapid reset)."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from smartdns.serve.doh_h2 import (
    BODY_WINDOW_BYTES,
    MAX_HEADER_LIST_BYTES,
    MAX_STREAMS,
    RESET_ALLOWANCE,
    H2Session,
)
from smartdns.serve.doh_request import HttpRequest, dns_response, error_response

DEADLINE_S = 10.0
QUERY = b"\x12\x34" + bytes(10)
CONTENT_TYPE = (b"content-type", b"application/dns-message")


class Pair:
    """A server session and a client connection joined by hand."""

    def __init__(self, *, settings_known: bool = True) -> None:
        self.now = 100.0
        self.server = H2Session(self.now, DEADLINE_S)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []
        if settings_known:  # the client learns our SETTINGS and acknowledges them
            self.to_client()
            self.to_server()
            self.to_client()

    def to_server(self) -> list[tuple[int, HttpRequest]]:
        return self.server.receive(self.client.data_to_send(), self.now)

    def to_client(self) -> None:
        self.events += self.client.receive_data(self.server.data_to_send())

    def open_stream(
        self, method: bytes, path: bytes, *extra: tuple[bytes, bytes], end_stream: bool = False
    ) -> int:
        """Send a request's headers (the pseudo-headers, then `extra`)."""
        stream_id = self.client.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"dns.test"),
            (b":path", path),
            *extra,
        ]
        self.client.send_headers(stream_id, headers, end_stream=end_stream)
        return stream_id

    def request(
        self, method: bytes = b"POST", path: bytes = b"/dns-query", body: bytes = QUERY
    ) -> int:
        stream_id = self.open_stream(method, path, CONTENT_TYPE, end_stream=not body)
        if body:
            self.client.send_data(stream_id, body, end_stream=True)
        return stream_id

    def of_type(self, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        return [event for event in self.events if isinstance(event, kind)]


def _status(pair: Pair, stream_id: int) -> int:
    for event in pair.of_type(h2.events.ResponseReceived):
        assert isinstance(event, h2.events.ResponseReceived)
        if event.stream_id == stream_id:
            return int(dict(event.headers or ())[b":status"])
    raise AssertionError("no response")


def test_post_and_get_are_handed_out_and_answered() -> None:
    pair = Pair()
    post = pair.request()
    get = pair.request(b"GET", b"/dns-query?dns=EjQAAAAAAAAAAAAA", b"")
    requests = pair.to_server()
    assert [(ref, r.method, r.target, r.body) for ref, r in requests] == [
        (post, b"POST", b"/dns-query", QUERY),
        (get, b"GET", b"/dns-query?dns=EjQAAAAAAAAAAAAA", b""),
    ]
    assert requests[0][1].content_type == b"application/dns-message"
    pair.server.respond(get, dns_response(QUERY), pair.now)  # any order
    pair.server.respond(post, error_response(415), pair.now)
    pair.to_client()
    assert _status(pair, get) == 200 and _status(pair, post) == 415
    data = pair.of_type(h2.events.DataReceived)
    assert [(event.stream_id, event.data) for event in data] == [(get, QUERY)]  # type: ignore[attr-defined]
    assert pair.server.is_idle()


def test_a_response_larger_than_the_window_waits_for_window_updates() -> None:
    pair = Pair()
    stream_id = pair.request()
    pair.to_server()
    body = bytes(65_535 + 4_000)  # over the client's initial window of 65,535
    pair.server.respond(stream_id, dns_response(body), pair.now)
    pair.to_client()
    received = sum(len(e.data) for e in pair.of_type(h2.events.DataReceived))  # type: ignore[attr-defined]
    assert received == 65_535
    for event in pair.of_type(h2.events.DataReceived):
        pair.client.acknowledge_received_data(event.flow_controlled_length, stream_id)  # type: ignore[attr-defined]
    pair.to_server()
    pair.to_client()
    received = sum(len(e.data) for e in pair.of_type(h2.events.DataReceived))  # type: ignore[attr-defined]
    assert received == len(body) and pair.of_type(h2.events.StreamEnded)


def test_a_dropped_query_resets_its_stream() -> None:
    pair = Pair()
    stream_id = pair.request()
    pair.to_server()
    pair.server.respond(stream_id, None, pair.now)
    pair.to_client()
    resets = pair.of_type(h2.events.StreamReset)
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (stream_id, h2.errors.ErrorCodes.CANCEL)
    ]  # type: ignore[attr-defined]


@pytest.mark.parametrize("settings_known", [True, False])
def test_streams_over_the_limit_are_refused(settings_known: bool) -> None:
    pair = Pair(settings_known=settings_known)
    pair.client.remote_settings = h2.settings.Settings(client=False)  # no limit to hold to
    streams = [pair.request() for _ in range(MAX_STREAMS + 2)]
    requests = pair.to_server()
    assert len(requests) == MAX_STREAMS
    pair.to_client()
    refused = [e.stream_id for e in pair.of_type(h2.events.StreamReset)]  # type: ignore[attr-defined]
    assert refused == streams[MAX_STREAMS:]
    assert not pair.server.closed


def test_the_client_is_told_the_limits() -> None:
    pair = Pair()
    settings = pair.client.remote_settings
    assert settings.max_concurrent_streams == MAX_STREAMS
    assert settings.max_header_list_size == MAX_HEADER_LIST_BYTES


def test_an_oversized_header_list_ends_the_connection() -> None:
    pair = Pair(settings_known=False)  # the client does not hold itself to our limit
    agent = (b"user-agent", b"x" * MAX_HEADER_LIST_BYTES)
    pair.open_stream(b"GET", b"/dns-query?dns=" + b"A" * 200, agent, end_stream=True)
    assert pair.to_server() == []
    assert pair.server.closed
    pair.to_client()
    assert pair.of_type(h2.events.ConnectionTerminated)


GET_PSEUDO = [(b":method", b"GET"), (b":scheme", b"https")]
GET_PATH = (b":path", b"/dns-query?dns=EjQAAAAAAAAAAAAA")
MALFORMED_HEADER_BLOCKS = {
    "no_path": GET_PSEUDO,
    "path_twice": [*GET_PSEUDO, GET_PATH, GET_PATH],
    "pseudo_after_regular": [*GET_PSEUDO, (b"accept", b"*/*"), GET_PATH],
    "response_pseudo": [*GET_PSEUDO, GET_PATH, (b":status", b"200")],
    "connection_specific": [*GET_PSEUDO, GET_PATH, (b"connection", b"keep-alive")],
    "te_not_trailers": [*GET_PSEUDO, GET_PATH, (b"te", b"gzip")],
}


@pytest.mark.parametrize("defect", sorted(MALFORMED_HEADER_BLOCKS))
def test_a_malformed_request_resets_its_stream(defect: str) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error (PROTOCOL_ERROR); the
    connection goes on. A client whose own checks are off sends the defect."""
    pair = Pair(settings_known=False)
    pair.client = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    pair.client.initiate_connection()
    pair.client.send_headers(1, MALFORMED_HEADER_BLOCKS[defect], end_stream=True)
    assert pair.to_server() == []
    assert not pair.server.closed
    pair.to_client()
    resets = pair.of_type(h2.events.StreamReset)
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (1, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    ]  # type: ignore[attr-defined]
    stream_id = pair.request()  # the connection serves on
    assert [ref for ref, _ in pair.to_server()] == [stream_id]


def test_response_headers_survive_a_header_table_size_change() -> None:
    """Response header blocks are cached field by field and never use the dynamic table, so
    they decode whatever the client's table size; a size change is still signalled."""
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    streams = []
    for _ in range(3):
        stream_id = pair.request()
        pair.to_server()
        pair.server.respond(stream_id, dns_response(QUERY), pair.now)
        pair.to_client()
        pair.to_server()
        streams.append(stream_id)
    assert [_status(pair, stream_id) for stream_id in streams] == [200, 200, 200]
    assert len(pair.client.decoder.header_table.dynamic_entries) == 0


def test_a_body_over_64_kib_gets_413_and_a_reset() -> None:
    pair = Pair()
    stream_id = pair.open_stream(b"POST", b"/dns-query", CONTENT_TYPE)
    pair.client.send_data(stream_id, bytes(16_384))
    pair.client.send_data(stream_id, bytes(16_384))
    pair.client.send_data(stream_id, bytes(16_384))
    pair.client.send_data(stream_id, bytes(16_383))
    assert pair.to_server() == []  # 65,535 octets: still a request being read
    pair.client.send_data(stream_id, b"x")  # the window holds one octet more: it shows
    ((ref, request),) = pair.to_server()
    assert ref == stream_id and request.problem == 413
    pair.server.respond(ref, error_response(request.problem), pair.now)
    pair.to_client()
    assert _status(pair, stream_id) == 413
    resets = pair.of_type(h2.events.StreamReset)
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (stream_id, h2.errors.ErrorCodes.NO_ERROR)
    ]  # type: ignore[attr-defined]
    assert not pair.server.closed


def test_a_declared_content_length_over_64_kib_gets_413_at_once() -> None:
    pair = Pair()
    pair.open_stream(b"POST", b"/dns-query", (b"content-length", b"70000"))
    ((_, request),) = pair.to_server()
    assert request.problem == 413


def test_a_body_that_never_ends_is_reset_at_the_deadline_then_the_connection_goes() -> None:
    pair = Pair()
    stream_id = pair.open_stream(b"POST", b"/dns-query")
    pair.client.send_data(stream_id, QUERY[:5])
    assert pair.to_server() == []
    pair.now += DEADLINE_S - 1
    assert pair.server.expire(pair.now) == pair.now + 1
    pair.now += 1
    assert pair.server.expire(pair.now) is None  # the stream reset, and nothing else going on
    pair.to_client()
    assert [e.stream_id for e in pair.of_type(h2.events.StreamReset)] == [stream_id]  # type: ignore[attr-defined]
    assert pair.of_type(h2.events.ConnectionTerminated) and pair.server.closed


def test_an_idle_connection_gets_goaway_after_the_deadline_but_not_while_answering() -> None:
    pair = Pair()
    stream_id = pair.request()
    pair.to_server()
    pair.now += DEADLINE_S * 3  # an upstream answer may take its time
    assert pair.server.expire(pair.now) is not None and not pair.server.closed
    pair.server.respond(stream_id, dns_response(QUERY), pair.now)
    assert pair.server.expire(pair.now + DEADLINE_S - 0.5) == pair.now + DEADLINE_S
    assert pair.server.expire(pair.now + DEADLINE_S) is None
    pair.to_client()
    (goaway,) = pair.of_type(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR  # type: ignore[attr-defined]


def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    pair = Pair()
    for _ in range(RESET_ALLOWANCE):
        stream_id = pair.request()
        pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    pair.to_server()
    assert not pair.server.closed  # a window of abandoned streams is allowed
    stream_id = pair.request()
    pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    pair.to_server()
    assert pair.server.closed
    pair.to_client()
    (goaway,) = pair.of_type(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_answered_streams_earn_resets() -> None:
    pair = Pair()
    for _ in range(RESET_ALLOWANCE * 2):  # a reset for every stream let finish: fine
        answered = pair.request()
        ((ref, _),) = pair.to_server()
        pair.server.respond(ref, dns_response(QUERY), pair.now)
        assert ref == answered
        stream_id = pair.request()
        pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        pair.to_server()
        pair.to_client()
    assert not pair.server.closed


def test_an_answer_for_a_stream_the_client_reset_goes_nowhere() -> None:
    pair = Pair()
    stream_id = pair.request()
    pair.to_server()
    pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    pair.to_server()
    pair.server.respond(stream_id, dns_response(QUERY), pair.now)
    pair.to_client()
    assert not pair.of_type(h2.events.ResponseReceived) and pair.server.is_idle()


def _closed_window_pair() -> Pair:
    """A client that announces a zero stream window: it never lets an answer body through."""
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.to_server()
    pair.to_client()
    return pair


def test_answers_held_by_a_closed_window_do_not_keep_the_connection() -> None:
    pair = _closed_window_pair()
    stream_id = pair.request()
    pair.to_server()
    pair.server.respond(stream_id, dns_response(QUERY), pair.now)
    assert not pair.server.is_idle()  # the body waits for the window
    assert pair.server.expire(pair.now + DEADLINE_S) is None and pair.server.closed


def test_more_than_256_kib_held_by_closed_windows_ends_the_connection() -> None:
    pair = _closed_window_pair()
    streams = [pair.request() for _ in range(5)]
    pair.to_server()
    for stream_id in streams[:4]:
        pair.server.respond(stream_id, dns_response(bytes(64_000)), pair.now)
    assert not pair.server.closed  # 256,000 octets held: at the bound
    pair.server.respond(streams[4], dns_response(bytes(64_000)), pair.now)
    assert pair.server.closed
    pair.to_client()
    (goaway,) = pair.of_type(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]


def test_a_client_opening_its_window_counts_as_activity() -> None:
    pair = _closed_window_pair()
    stream_id = pair.request()
    pair.to_server()
    pair.server.respond(stream_id, dns_response(QUERY), pair.now)
    pair.now += DEADLINE_S - 1
    pair.client.increment_flow_control_window(len(QUERY), stream_id)
    pair.to_server()
    pair.to_client()
    assert [e.data for e in pair.of_type(h2.events.DataReceived)] == [QUERY]  # type: ignore[attr-defined]
    assert pair.server.expire(pair.now + DEADLINE_S - 1) is not None


def test_request_bodies_held_are_bounded_by_the_connection_window() -> None:
    """(h2 gives windows back once half of one is consumed: the bodies here are larger.)"""
    pair = Pair()
    assert pair.client.outbound_flow_control_window == BODY_WINDOW_BYTES
    first = pair.open_stream(b"POST", b"/dns-query", CONTENT_TYPE)
    for _ in range(3):
        pair.client.send_data(first, bytes(16_000))
    assert pair.to_server() == []
    pair.to_client()
    # nothing is given back while the body is being read: the client has the rest only
    assert pair.client.outbound_flow_control_window == BODY_WINDOW_BYTES - 48_000
    pair.client.send_data(first, QUERY, end_stream=True)
    ((ref, request),) = pair.to_server()
    assert ref == first and len(request.body) == 48_000 + len(QUERY)
    pair.to_client()
    assert pair.client.outbound_flow_control_window == BODY_WINDOW_BYTES  # consumed: back


def test_an_abandoned_body_gives_its_window_back() -> None:
    pair = Pair()
    stream_id = pair.open_stream(b"POST", b"/dns-query", CONTENT_TYPE)
    pair.client.send_data(stream_id, bytes(16_000))
    pair.client.send_data(stream_id, bytes(16_000))
    pair.client.send_data(stream_id, bytes(8_000))
    pair.to_server()
    pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    pair.to_server()
    pair.to_client()
    assert pair.client.outbound_flow_control_window == BODY_WINDOW_BYTES


# ---- the frame layer's bounds, in raw frames (built here, not by the module under test) --

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
GET_BLOCK = hpack.Encoder().encode(
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"dns.test"),
        (b":path", b"/dns-query?dns=EjQAAAAAAAAAAAAA"),
    ]
)


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">L", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">L", stream_id)
        + payload
    )


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        kind, flags, stream_id = data[3], data[4], int.from_bytes(data[5:9], "big")
        frames.append((kind, flags, stream_id, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


class Raw:
    """A server session fed hand-made frames after the preface and an empty SETTINGS."""

    def __init__(self) -> None:
        self.server = H2Session(100.0, DEADLINE_S)
        self.requests = self.send(PREFACE + raw(SETTINGS, 0, 0))

    def send(self, data: bytes) -> list[tuple[int, HttpRequest]]:
        return self.server.receive(data, 100.0)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        return parse(self.server.data_to_send())

    def goaway_code(self) -> int:
        assert self.server.closed
        (payload,) = [p for kind, _, _, p in self.frames() if kind == GOAWAY]
        return int.from_bytes(payload[4:8], "big")


def test_the_server_speaks_first_and_acknowledges_the_client_settings() -> None:
    session = Raw()
    frames = session.frames()
    assert [(kind, flags) for kind, flags, _, _ in frames] == [
        (SETTINGS, 0),
        (WINDOW_UPDATE, 0),
        (SETTINGS, 1),
    ]
    ours = frames[0][3]
    values = {
        ours[i : i + 2]: int.from_bytes(ours[i + 2 : i + 6], "big") for i in range(0, len(ours), 6)
    }
    assert values == {
        b"\x00\x03": MAX_STREAMS,
        b"\x00\x06": MAX_HEADER_LIST_BYTES,
        b"\x00\x04": BODY_WINDOW_BYTES,
    }


@pytest.mark.parametrize(
    "opening",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
        PREFACE + raw(PING, 0, 0, bytes(8)),  # RFC 9113 §3.4: SETTINGS first
        PREFACE + raw(SETTINGS, 1, 0),  # an ACK is not the client's SETTINGS
    ],
)
def test_a_bad_connection_preface_gets_protocol_error(opening: bytes) -> None:
    server = H2Session(100.0, DEADLINE_S)
    assert server.receive(opening, 100.0) == []
    assert server.closed
    payload = next(p for kind, _, _, p in parse(server.data_to_send()) if kind == GOAWAY)
    assert int.from_bytes(payload[4:8], "big") == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_frames_split_anywhere_across_reads_are_reassembled() -> None:
    server = H2Session(100.0, DEADLINE_S)
    stream = PREFACE + raw(SETTINGS, 0, 0) + raw(HEADERS, END_HEADERS | END_STREAM, 1, GET_BLOCK)
    requests = []
    for octet in range(len(stream)):
        requests += server.receive(stream[octet : octet + 1], 100.0)
    assert [(ref, r.method) for ref, r in requests] == [(1, b"GET")]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw(HEADERS, END_HEADERS | END_STREAM, 2, GET_BLOCK), "PROTOCOL_ERROR"),  # even ID
        (raw(DATA, 0, 0, b"x"), "PROTOCOL_ERROR"),  # DATA on stream 0
        (raw(DATA, 0, 9, b"x"), "PROTOCOL_ERROR"),  # DATA on a stream never opened
        (raw(RST_STREAM, 0, 9, bytes(4)), "PROTOCOL_ERROR"),  # reset of an idle stream
        (raw(WINDOW_UPDATE, 0, 0, bytes(4)), "PROTOCOL_ERROR"),  # zero increment
        (raw(WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), "FLOW_CONTROL_ERROR"),  # window > 2^31-1
        (raw(PING, 0, 0, bytes(7)), "FRAME_SIZE_ERROR"),
        (raw(SETTINGS, 0, 0, bytes(5)), "FRAME_SIZE_ERROR"),
        (raw(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), "FLOW_CONTROL_ERROR"),  # window
        (raw(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x10\x00"), "PROTOCOL_ERROR"),  # frame size
        (raw(5, END_HEADERS, 1, bytes(4)), "PROTOCOL_ERROR"),  # PUSH_PROMISE from a client
        (raw(CONTINUATION, END_HEADERS, 1, GET_BLOCK), "PROTOCOL_ERROR"),  # none expected
        (raw(DATA, 0, 1, bytes(16_385)), "FRAME_SIZE_ERROR"),  # over our MAX_FRAME_SIZE
        (raw(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"), "COMPRESSION_ERROR"),
        (raw(HEADERS, END_HEADERS | PADDED, 1, b"\x09" + bytes(8)), "PROTOCOL_ERROR"),  # pad
    ],
)
def test_a_connection_error_gets_goaway_with_its_code(frame: bytes, code: str) -> None:
    session = Raw()
    session.frames()
    assert session.send(frame) == []
    assert session.goaway_code() == h2.errors.ErrorCodes[code]


def test_a_lower_stream_id_for_a_new_request_gets_protocol_error() -> None:
    session = Raw()
    session.send(raw(HEADERS, END_HEADERS | END_STREAM, 5, GET_BLOCK))
    session.server.respond(5, error_response(404), 100.0)
    session.frames()
    session.send(raw(HEADERS, END_HEADERS, 3, GET_BLOCK))  # 3 < 5, and not the trailers of 5
    assert session.goaway_code() == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_a_header_block_in_continuations_is_read() -> None:
    session = Raw()
    block = GET_BLOCK
    requests = session.send(
        raw(HEADERS, END_STREAM, 1, block[:5])
        + raw(CONTINUATION, 0, 1, block[5:10])
        + raw(CONTINUATION, END_HEADERS, 1, block[10:])
    )
    assert [(ref, r.target) for ref, r in requests] == [(1, b"/dns-query?dns=EjQAAAAAAAAAAAAA")]


def test_another_frame_inside_a_header_block_gets_protocol_error() -> None:
    session = Raw()
    session.send(raw(HEADERS, END_STREAM, 1, GET_BLOCK[:5]) + raw(PING, 0, 0, bytes(8)))
    assert session.goaway_code() == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_continuations_beyond_the_header_list_bound_end_the_connection() -> None:
    """The block is held only up to MAX_HEADER_LIST_BYTES, whatever it would decode to."""
    session = Raw()
    frames = raw(HEADERS, END_STREAM, 1, b"\x00" * 4000)
    frames += raw(CONTINUATION, 0, 1, b"\x00" * 4000) + raw(CONTINUATION, 0, 1, b"\x00" * 4000)
    assert session.send(frames) == []
    assert session.goaway_code() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_padding_is_stripped_from_headers_and_data() -> None:
    session = Raw()
    headers = hpack.Encoder().encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/dns-query"),
            CONTENT_TYPE,
        ]
    )
    requests = session.send(
        raw(HEADERS, END_HEADERS | PADDED, 1, b"\x03" + headers + b"pad")
        + raw(DATA, END_STREAM | PADDED, 1, b"\x02" + QUERY + b"pp")
    )
    assert [(r.method, r.body) for _, r in requests] == [(b"POST", QUERY)]


def test_ping_is_answered_and_priority_and_unknown_frames_are_ignored() -> None:
    session = Raw()
    session.frames()
    requests = session.send(
        raw(PING, 0, 0, b"12345678")
        + raw(PRIORITY, 0, 1, bytes(5))
        + raw(0xFA, 0x3, 1, b"whatever")
        + raw(HEADERS, END_HEADERS | END_STREAM, 1, GET_BLOCK)
    )
    assert [ref for ref, _ in requests] == [1] and not session.server.closed
    assert session.frames() == [(PING, 1, 0, b"12345678")]


def test_a_ping_flood_that_is_not_read_ends_the_connection() -> None:
    """PING answers are bounded like any output: more than MAX_UNSENT_BYTES of them from
    one read is ENHANCE_YOUR_CALM (serve.doh stops reading a client that does not read)."""
    session = Raw()
    session.frames()
    session.send(raw(PING, 0, 0, bytes(8)) * 20_000)
    assert session.goaway_code() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_data_on_a_closed_stream_gives_its_window_back() -> None:
    session = Raw()
    session.send(raw(HEADERS, END_HEADERS | END_STREAM, 1, GET_BLOCK))
    session.server.respond(1, error_response(404), 100.0)
    session.frames()
    for _ in range(5):  # RFC 9113 §5.1: ignored, but its flow-controlled octets count
        session.send(raw(DATA, 0, 1, bytes(16_000)))
    assert not session.server.closed
    updates = [p for kind, _, stream, p in session.frames() if kind == WINDOW_UPDATE]
    assert sum(int.from_bytes(p, "big") for p in updates) >= 64_000


def test_data_over_the_connection_window_gets_flow_control_error() -> None:
    session = Raw()
    post = hpack.Encoder().encode(
        [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/dns-query")]
    )
    session.send(raw(HEADERS, END_HEADERS, 1, post))
    # 65,536 octets, the whole window, then one more (in one read: nothing given back yet)
    session.send(raw(DATA, 0, 1, bytes(16_384)) * 4 + raw(DATA, 0, 1, b"x"))
    assert session.goaway_code() == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


def test_the_client_max_frame_size_is_honoured() -> None:
    pair = Pair()
    pair.client.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 32_768,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000,
        }
    )
    pair.client.increment_flow_control_window(100_000)
    pair.to_server()
    pair.to_client()  # our ACK: the client now takes frames of up to 32 KiB
    stream_id = pair.request()
    pair.to_server()
    pair.server.respond(stream_id, dns_response(bytes(40_000)), pair.now)
    pair.to_client()
    sizes = [len(e.data) for e in pair.of_type(h2.events.DataReceived)]  # type: ignore[attr-defined]
    assert sizes == [32_768, 40_000 - 32_768]


def test_goaway_from_the_client_closes_once_its_open_streams_are_answered() -> None:
    pair = Pair()
    stream_id = pair.request()
    pair.client.close_connection()
    assert [ref for ref, _ in pair.to_server()] == [stream_id]
    assert not pair.server.closed
    pair.server.respond(stream_id, dns_response(QUERY), pair.now)
    assert pair.server.closed
    frames = parse(pair.server.data_to_send())
    assert [(kind, stream) for kind, _, stream, _ in frames] == [(HEADERS, 1), (DATA, 1)]


def test_window_updates_on_a_stream_are_honoured_and_overflow_resets_it() -> None:
    pair = _closed_window_pair()
    first, second = pair.request(), pair.request()
    pair.to_server()
    pair.server.respond(first, dns_response(QUERY), pair.now)
    pair.client.increment_flow_control_window(len(QUERY) - 1, first)  # one octet short
    pair.to_server()
    pair.to_client()
    assert [e.data for e in pair.of_type(h2.events.DataReceived)] == [QUERY[:-1]]  # type: ignore[attr-defined]
    assert not pair.of_type(h2.events.StreamEnded)
    frames = raw(WINDOW_UPDATE, 0, second, b"\x7f\xff\xff\xff") * 2  # over 2^31-1
    pair.server.receive(frames, pair.now)
    assert not pair.server.closed
    resets = parse(pair.server.data_to_send())
    assert [(kind, stream, int.from_bytes(p, "big")) for kind, _, stream, p in resets] == [
        (RST_STREAM, second, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
    ]


def test_resets_that_cross_their_answers_count_as_rapid_reset() -> None:
    """The attack against a fast server: each reset arrives after its stream was answered
    (from the cache, in the same read as the next request)."""
    session = Raw()
    session.frames()
    for stream_id in range(1, 2 * (RESET_ALLOWANCE // 2 + 1) * 2, 2):
        for ref, _ in session.send(raw(HEADERS, END_HEADERS | END_STREAM, stream_id, GET_BLOCK)):
            session.server.respond(ref, dns_response(QUERY), 100.0)
        session.send(raw(RST_STREAM, 0, stream_id, b"\x00\x00\x00\x08"))
    assert session.goaway_code() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
