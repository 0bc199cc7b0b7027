"""doh_h1: the HTTP/1.1 session fed raw bytes: keep-alive, pipelined requests answered in
order, and the bounds (head size, body size, unparseable HTTP, deadlines)."""

from __future__ import annotations

import h11

from smartdns.serve.doh_h1 import MAX_HEAD_BYTES, H1Session
from smartdns.serve.doh_request import dns_response, error_response

DEADLINE_S = 10.0
NOW = 100.0
QUERY = b"\x12\x34" + bytes(10)
GET = b"GET /dns-query?dns=EjQAAAAAAAAAAAAA HTTP/1.1\r\nHost: dns.test\r\n\r\n"
POST = (
    b"POST /dns-query HTTP/1.1\r\nHost: dns.test\r\nContent-Type: application/dns-message\r\n"
    b"Content-Length: 12\r\n\r\n" + QUERY
)

Response = tuple[int, dict[bytes, bytes], bytes]


def _responses(data: bytes) -> list[Response]:
    """The responses in `data`, read by an h11 client (which must send a request for each)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    out: list[Response] = []
    while True:
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        head = client.next_event()
        if not isinstance(head, h11.Response):
            return out
        body = b""
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
        out.append((head.status_code, dict(head.headers), body))
        if client.their_state is not h11.DONE:
            return out
        client.start_next_cycle()


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((first, request),) = session.receive(GET + POST + GET, NOW)
    assert request.method == b"GET" and request.target.startswith(b"/dns-query?dns=")
    assert not session.may_read  # the rest waits while this one is answered
    session.respond(first, dns_response(QUERY), NOW)
    ((second, request),) = session.resume(NOW)
    assert request.method == b"POST" and request.body == QUERY
    assert request.content_type == b"application/dns-message"
    session.respond(second, error_response(415), NOW)
    ((third, _),) = session.resume(NOW)
    session.respond(third, dns_response(QUERY), NOW)
    responses = _responses(session.data_to_send())
    assert [status for status, _, _ in responses] == [200, 415, 200]
    assert responses[0][1][b"content-type"] == b"application/dns-message"
    assert responses[0][1][b"cache-control"] == b"max-age=0" and responses[0][2] == QUERY
    assert not session.closed and session.is_idle()


def test_an_answer_out_of_turn_is_ignored() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((ref, _),) = session.receive(GET, NOW)
    session.respond(ref + 1, dns_response(QUERY), NOW)
    assert session.data_to_send() == b""


def test_a_body_over_64_kib_gets_413_and_a_close() -> None:
    session = H1Session(NOW, DEADLINE_S)
    head = POST.replace(b"Content-Length: 12", b"Content-Length: 70000")[: -len(QUERY)]
    ((ref, request),) = session.receive(head, NOW)
    assert request.problem == 413
    session.respond(ref, error_response(413), NOW)
    ((status, headers, _),) = _responses(session.data_to_send())
    assert status == 413 and headers[b"connection"] == b"close" and session.closed


def test_a_chunked_body_over_64_kib_gets_413() -> None:
    session = H1Session(NOW, DEADLINE_S)
    head = b"POST /dns-query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"8000\r\n" + bytes(0x8000) + b"\r\n"
    ((_, request),) = session.receive(head + chunk * 3, NOW)
    assert request.problem == 413


def test_an_oversized_head_gets_431() -> None:
    session = H1Session(NOW, DEADLINE_S)
    big = b"GET /dns-query HTTP/1.1\r\nUser-Agent: " + b"x" * MAX_HEAD_BYTES
    ((ref, request),) = session.receive(big, NOW)
    assert request.problem == 431
    session.respond(ref, error_response(431), NOW)
    assert [status for status, _, _ in _responses(session.data_to_send())] == [431]
    assert session.closed


def test_unparseable_http_gets_400_and_a_close() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((ref, request),) = session.receive(b"\x16\x03\x01 not http\r\n\r\n", NOW)
    assert request.problem == 400
    session.respond(ref, error_response(400), NOW)
    assert [status for status, _, _ in _responses(session.data_to_send())] == [400]
    assert session.closed


def test_a_dropped_query_closes_the_connection() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((ref, _),) = session.receive(GET + GET, NOW)
    session.respond(ref, None, NOW)
    assert session.closed and session.data_to_send() == b"" and session.resume(NOW) == []


def test_connection_close_from_the_client_is_honoured() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((ref, _),) = session.receive(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), NOW)
    session.respond(ref, dns_response(QUERY), NOW)
    assert [status for status, _, _ in _responses(session.data_to_send())] == [200]
    assert session.closed


def test_idle_and_slow_requests_are_closed_at_the_deadline() -> None:
    session = H1Session(NOW, DEADLINE_S)
    assert session.expire(NOW + 1) == NOW + DEADLINE_S
    assert session.receive(GET[:20], NOW + 5) == []  # trickling in does not keep it open
    assert session.expire(NOW + DEADLINE_S) is None and session.closed


def test_a_request_being_answered_keeps_the_connection() -> None:
    session = H1Session(NOW, DEADLINE_S)
    ((ref, _),) = session.receive(GET, NOW)
    later = NOW + DEADLINE_S * 3
    assert session.expire(later) == later + DEADLINE_S and not session.closed
    session.respond(ref, dns_response(QUERY), later)
    assert session.expire(later + DEADLINE_S) is None
