"""doh_request: which DoH requests carry a DNS query, the status of the others, and the
response to a reply (RFC 8484 §4, §5.1)."""

from __future__ import annotations

import base64

import dns.message
import dns.rcode
import dns.rrset
import pytest

from smartdns.core.clients import device_digest
from smartdns.serve import doh_request
from smartdns.serve.doh_request import (
    UNKNOWN_DEVICE,
    DnsRequest,
    HttpRequest,
    dns_response,
    error_response,
    no_reply_response,
    read_request,
)

QUERY = dns.message.make_query("example.org", "A").to_wire()
DNS = base64.urlsafe_b64encode(QUERY).rstrip(b"=")
ID = "k3v9q2m8x4t6w1z5y7r0a2b4"


def _get(target: bytes) -> HttpRequest:
    return HttpRequest(b"GET", target, None, b"")


def _post(target: bytes, body: bytes = QUERY, content_type: bytes | None = None) -> HttpRequest:
    return HttpRequest(b"POST", target, content_type or b"application/dns-message", body)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (_get(b"/dns-query?dns=" + DNS), DnsRequest(QUERY, None)),
        (_get(b"/dns-query?ct=x&dns=" + DNS + b"&z=1"), DnsRequest(QUERY, None)),
        (_get(b"/dns-query?dns=" + DNS + b"=="), DnsRequest(QUERY, None)),  # padding tolerated
        (_post(b"/dns-query"), DnsRequest(QUERY, None)),
        (
            _post(b"/dns-query", content_type=b"Application/DNS-Message; x=1"),
            DnsRequest(QUERY, None),
        ),
        (_get(b"/dns-query/" + ID.encode() + b"?dns=" + DNS), DnsRequest(QUERY, device_digest(ID))),
        (_post(b"/dns-query/" + ID.upper().encode()), DnsRequest(QUERY, device_digest(ID))),
        (_post(b"/dns-query/not_a_label"), DnsRequest(QUERY, UNKNOWN_DEVICE)),
        (_post(b"/dns-query/"), DnsRequest(QUERY, UNKNOWN_DEVICE)),
        (_post(b"/dns-query/%6b3v9"), DnsRequest(QUERY, UNKNOWN_DEVICE)),
    ],
)
def test_requests_that_carry_a_query(request_: HttpRequest, expected: DnsRequest) -> None:
    assert read_request(request_) == expected


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (_get(b"/dns-query"), 400),  # no dns parameter
        (_get(b"/dns-query?dns="), 400),  # empty message
        (_get(b"/dns-query?dns=a*b"), 400),  # not base64url
        (_get(b"/dns-query?dns=" + DNS + b"AA"), 400),  # 4n + 1 characters: no encoding's
        (_get(b"/dns-query?dns=" + DNS[:4] + b"=" + DNS[4:]), 400),  # padding inside
        (_get(b"/dns-query?dns=" + DNS[:4] + b" " + DNS[4:]), 400),  # white space
        (_get(b"/dns-query?dns=" + base64.b64encode(b"\xfb\xff" * 12)), 400),  # + and /: not url
        (_get(b"/dns-query?dns=" + b"A" * 87_384), 413),
        (_post(b"/dns-query", body=b""), 400),
        (_post(b"/dns-query", content_type=b"application/json"), 415),
        (HttpRequest(b"POST", b"/dns-query", None, QUERY), 415),
        (_post(b"/dns-query", body=bytes(65_536)), 413),
        (_get(b"/?dns=" + DNS), 404),
        (_get(b"/dns-query/a/b?dns=" + DNS), 404),
        (_get(b"/dns-queryx?dns=" + DNS), 404),
        (HttpRequest(b"PUT", b"/dns-query", None, QUERY), 405),
        (HttpRequest(b"HEAD", b"/dns-query?dns=" + DNS, None, b""), 405),
        (HttpRequest(b"PUT", b"/elsewhere", None, b""), 404),  # the path first
        (HttpRequest(b"GET", b"/dns-query?dns=" + DNS, None, b"", 431), 431),  # HTTP said so
    ],
)
def test_requests_that_get_an_error_status(request_: HttpRequest, status: int) -> None:
    assert read_request(request_) == status


def _reply(*records: str, authority: tuple[str, ...] = (), rcode: int = 0) -> bytes:
    query = dns.message.make_query("example.org", "A", use_edns=0)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    for text in records:
        reply.answer.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    for text in authority:
        reply.authority.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    return reply.to_wire()


@pytest.mark.parametrize(
    ("reply", "max_age"),
    [
        (_reply("example.org. 300 IN A 192.0.2.1", "example.org. 60 IN TXT x"), 60),
        (_reply("example.org. 0 IN A 192.0.2.1"), 0),
        (_reply(rcode=dns.rcode.REFUSED), 0),
        # negative: the SOA's TTL, at most its MINIMUM (RFC 2308 §5)
        (_reply(authority=("org. 900 IN SOA a. b. 1 2 3 4 120",)), 120),
        (_reply(authority=("org. 30 IN SOA a. b. 1 2 3 4 120",)), 30),
    ],
)
def test_dns_response_is_200_with_the_smallest_ttl_as_max_age(reply: bytes, max_age: int) -> None:
    response = dns_response(reply)
    assert response.status == 200 and response.body == reply
    assert dict(response.headers) == {
        b"content-type": b"application/dns-message",
        b"cache-control": b"max-age=%d" % max_age,
    }


def test_error_responses_are_empty_and_405_names_the_methods() -> None:
    assert error_response(404).body == b"" and error_response(404).headers == ()
    assert dict(error_response(405).headers) == {b"allow": b"GET, POST"}


@pytest.mark.parametrize(
    ("packet", "status"),
    [(b"\x00" * 5, 400), (QUERY[:2] + b"\x80" + QUERY[3:], 400), (QUERY, None)],
)
def test_a_query_without_reply_is_400_when_unreadable_else_reset(
    packet: bytes, status: int | None
) -> None:
    response = no_reply_response(packet)
    assert (response.status if response is not None else None) == status


def test_response_headers_kept_for_small_replies_are_bounded_and_exact() -> None:
    """The headers are kept by the reply's exact octets: a reply whose TTL counted down is
    another key and gets its own max-age; large replies are not kept; the count is bounded."""
    first = _reply("example.org. 300 IN A 192.0.2.1")
    later = _reply("example.org. 299 IN A 192.0.2.1")
    assert dict(dns_response(first).headers)[b"cache-control"] == b"max-age=300"
    assert dict(dns_response(first).headers)[b"cache-control"] == b"max-age=300"
    assert dict(dns_response(later).headers)[b"cache-control"] == b"max-age=299"
    large = _reply(*[f"example.org. 60 IN TXT {'x' * 200}"] * 3)
    assert len(large) > doh_request._REPLY_HEADERS_CACHED_OCTETS
    dns_response(large)
    assert large not in doh_request._reply_headers
    for ttl in range(doh_request._REPLY_HEADERS_CACHED + 10):
        reply = _reply(f"example.org. {ttl} IN A 192.0.2.1")
        assert dict(dns_response(reply).headers)[b"cache-control"] == b"max-age=%d" % ttl
    assert 0 < len(doh_request._reply_headers) <= doh_request._REPLY_HEADERS_CACHED
