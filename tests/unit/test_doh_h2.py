"""doh_h2: the HTTP/2 session driven in memory by a client-side h2 connection: requests in,
responses out, and the bounds (streams, header lists, bodies, deadlines, rapid reset)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
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
def test_a_malformed_request_ends_the_connection(defect: str) -> None:
    """h2's header validation is off (it cost more than the rest of a request); the session
    applies RFC 9113 §8.1.1 itself. A client whose own checks are off sends the defect."""
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
    assert pair.server.closed
    pair.to_client()
    ended = pair.of_type(h2.events.ConnectionTerminated)
    assert [e.error_code for e in ended] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]  # type: ignore[attr-defined]


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
