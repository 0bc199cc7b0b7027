"""Property tests over the DoH sessions and rules: whatever a client sends, the HTTP/2 and
HTTP/1.1 sessions and read_request answer with requests, statuses or a closed connection,
never an exception (which would end the connection through the error boundary, logged).
Valid traffic comes from the h2 client and literal HTTP/1.1; mutations flip, cut and splice
bytes. Bounded and derandomized for CI."""

from __future__ import annotations

import h2.config
import h2.connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartdns.serve.doh_h1 import H1Session
from smartdns.serve.doh_h2 import H2Session
from smartdns.serve.doh_request import (
    DnsRequest,
    HttpRequest,
    dns_response,
    error_response,
    read_request,
)

CI = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
STATUSES = {400, 404, 405, 413, 415, 431}
QUERY = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03org\x00\x00\x01\x00\x01"
HTTP1 = [
    b"GET /dns-query?dns=AAABAAABAAAAAAAAB2V4YW1wbGUDb3JnAAABAAE HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\n"
    b"Content-Length: 29\r\n\r\n" + QUERY,
    b"POST /dns-query/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1d\r\n" + QUERY + b"\r\n0\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        index = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[index:]
        else:
            data[index:index] = draw(st.binary(max_size=8))
    return bytes(data)


def _h2_client_bytes() -> bytes:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    for path in (b"/dns-query?dns=AAABAAABAAAAAAAAB2V4YW1wbGUDb3JnAAABAAE", b"/dns-query"):
        stream_id = client.get_next_available_stream_id()
        headers = [(b":method", b"POST" if path == b"/dns-query" else b"GET")]
        headers += [(b":scheme", b"https"), (b":authority", b"x"), (b":path", path)]
        headers += [(b"content-type", b"application/dns-message")]
        client.send_headers(stream_id, headers, end_stream=path != b"/dns-query")
        if path == b"/dns-query":
            client.send_data(stream_id, QUERY, end_stream=True)
    return client.data_to_send()


H2_VALID = _h2_client_bytes()


def _answer_all(session: H1Session | H2Session, requests: list[tuple[int, HttpRequest]]) -> None:
    """Answer what the session hands out as the protocol would, pipelined ones included."""
    for _ in range(100):
        if not requests:
            return
        for ref, request in requests:
            read = read_request(request)
            response = error_response(read) if isinstance(read, int) else dns_response(QUERY)
            session.respond(ref, response, 0.0)
        requests = session.resume(0.0)
        session.data_to_send()


@CI
@given(st.lists(st.sampled_from(HTTP1).flatmap(mutated), min_size=1, max_size=3), st.data())
def test_h1_session_never_raises(messages: list[bytes], data: st.DataObject) -> None:
    session = H1Session(0.0, 10.0)
    stream = b"".join(messages)
    cut = data.draw(st.integers(0, len(stream)))
    for chunk in (stream[:cut], stream[cut:], b""):
        _answer_all(session, session.receive(chunk, 0.0))
    session.expire(20.0)


@CI
@given(mutated(H2_VALID), st.data())
def test_h2_session_never_raises(stream: bytes, data: st.DataObject) -> None:
    session = H2Session(0.0, 10.0)
    cut = data.draw(st.integers(0, len(stream)))
    for chunk in (stream[:cut], stream[cut:]):
        _answer_all(session, session.receive(chunk, 0.0))
    session.data_to_send()
    session.expire(20.0)


@CI
@given(
    st.sampled_from([b"GET", b"POST", b"PUT", b"", b"get"]),
    st.binary(max_size=80) | st.builds(lambda tail: b"/dns-query" + tail, st.binary(max_size=60)),
    st.none() | st.binary(max_size=40),
    st.binary(max_size=40),
)
def test_read_request_gives_a_query_or_a_known_status(
    method: bytes, target: bytes, content_type: bytes | None, body: bytes
) -> None:
    read = read_request(HttpRequest(method, target, content_type, body))
    assert isinstance(read, DnsRequest) or read in STATUSES
