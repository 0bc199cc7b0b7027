"""DoH requests and responses (RFC 8484) above HTTP: which requests carry a DNS query, what
status the others get, and the response for a DNS reply. Pure; no I/O, no HTTP framing
(serve.doh_h2 and serve.doh_h1 own that), nothing logged.

Nothing about a request (path, query string, headers) leaves this module except the DNS
message and the digest of the device ID it named (SPEC 7).
"""

from __future__ import annotations

import binascii
import re
from typing import Final, NamedTuple

from smartdns.core.clients import device_digest
from smartdns.core.wire import HEADER_SIZE, MAX_MESSAGE_SIZE, new_tuple, reply_max_age

PATH: Final = b"/dns-query"
MEDIA_TYPE: Final = b"application/dns-message"
MAX_BODY_BYTES: Final = MAX_MESSAGE_SIZE  # a DNS message cannot be longer (RFC 8484 §6)
# RFC 4648 §5 without padding; 4 characters carry 3 octets
_MAX_PARAMETER_CHARS: Final = -(-MAX_MESSAGE_SIZE * 4 // 3)
# base64url's - and _ to base64's + and /, and base64's own + and / to an octet outside
# both alphabets: RFC 8484 says base64url, so a parameter in base64 proper is undecodable
_FROM_BASE64URL: Final = bytes.maketrans(b"-_+/", b"+/!!")
_LABEL: Final = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# What a path segment that is no DNS label is looked up as: the digest of the empty ID, which
# no registration can hold (IDs are 20 to 63 characters), so it authorizes nothing (SPEC 2a:
# an ID that is not registered gets `unregistered`, never the source address).
UNKNOWN_DEVICE: Final = device_digest("")

_REPLY_HEADERS_CACHED: Final = 4096  # replies whose response headers are kept
_REPLY_HEADERS_CACHED_OCTETS: Final = 512  # the longest: at most 2 MiB of replies in all
_reply_headers: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}

OK: Final = 200
BAD_REQUEST: Final = 400
NOT_FOUND: Final = 404
METHOD_NOT_ALLOWED: Final = 405
PAYLOAD_TOO_LARGE: Final = 413
UNSUPPORTED_MEDIA_TYPE: Final = 415


# The three values below are built for every request: named tuples, because a frozen
# dataclass costs several times as much to build (its __init__ sets each field through
# object.__setattr__), and a DoH request's whole budget is a few microseconds.


class HttpRequest(NamedTuple):
    """A request as the HTTP layer read it. `problem` is a status the HTTP layer already
    decided (413 for a body over MAX_BODY_BYTES, 400 for unparseable HTTP/1.1, 431), 0 when
    none: the request then goes through the same reading and counting as any other."""

    method: bytes
    target: bytes
    content_type: bytes | None
    body: bytes
    problem: int = 0


class DnsRequest(NamedTuple):
    """A DoH request that carries a DNS message, and the device ID digest it named."""

    packet: bytes
    device: bytes | None


class HttpResponse(NamedTuple):
    """What goes back: the status, the body and its headers (without framing headers)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def read_request(request: HttpRequest) -> DnsRequest | int:
    """The DNS message of a DoH request (RFC 8484 §4.1), or the error status, checked in
    this order: a problem the HTTP layer found; a path other than `/dns-query` or
    `/dns-query/<id>` 404; a method other than GET and POST 405; a POST whose content type
    is not application/dns-message 415; a message over 65,535 octets 413; a missing or
    undecodable `dns` parameter or an empty message 400. Whether the message is a readable
    DNS query is the pipeline's to say."""
    if request.problem:
        return request.problem
    path, _, query = request.target.partition(b"?")
    device = None if path == PATH else _device(path)
    if isinstance(device, int):
        return device
    if request.method == b"GET":
        packet = _dns_parameter(query)
        if isinstance(packet, int):
            return packet
    elif request.method == b"POST":
        if not _is_dns_message(request.content_type):
            return UNSUPPORTED_MEDIA_TYPE
        packet = request.body
        if len(packet) > MAX_BODY_BYTES:
            return PAYLOAD_TOO_LARGE
    else:
        return METHOD_NOT_ALLOWED
    if not packet:
        return BAD_REQUEST
    return new_tuple(DnsRequest, (packet, device))  # once per request: the class costs more


def _device(path: bytes) -> bytes | int | None:
    """None for `/dns-query` (no ID: authorized by address), the ID's digest for
    `/dns-query/<id>` (lower-cased, as SPEC 3 IDs are), UNKNOWN_DEVICE for a segment that is
    no DNS label (SPEC 2a: certificates cover one label, so no real ID looks otherwise);
    404 for any other path."""
    if path == PATH:
        return None
    if not path.startswith(PATH + b"/"):
        return NOT_FOUND
    segment = path[len(PATH) + 1 :]
    if b"/" in segment:
        return NOT_FOUND
    if _LABEL.fullmatch(segment) is None:
        return UNKNOWN_DEVICE
    return device_digest(segment.lower().decode("ascii"))


def _dns_parameter(query: bytes) -> bytes | int:
    """The `dns` parameter of a GET, base64url without padding (RFC 8484 §4.1; trailing
    `=` tolerated), decoded; 400 when missing or undecodable, 413 when longer than any
    DNS message could encode to."""
    for pair in query.split(b"&"):
        if pair[:4] != b"dns=":
            continue
        value = pair[4:].rstrip(b"=")
        if len(value) > _MAX_PARAMETER_CHARS:
            return PAYLOAD_TOO_LARGE
        padded = value.translate(_FROM_BASE64URL) + b"=" * (-len(value) % 4)
        try:  # strict: any octet outside the alphabet, and a length no encoding has (4n + 1)
            return binascii.a2b_base64(padded, strict_mode=True)
        except binascii.Error:
            return BAD_REQUEST
    return BAD_REQUEST


def _is_dns_message(content_type: bytes | None) -> bool:
    """The media type, parameters and case aside, is application/dns-message."""
    if content_type is None:
        return False
    return content_type.partition(b";")[0].strip().lower() == MEDIA_TYPE


def dns_response(reply: bytes) -> HttpResponse:
    """200 with the DNS reply, whatever its rcode (RFC 8484 §4.2.1), and how long an HTTP
    cache may keep it (§5.1: the smallest TTL, at most the SOA minimum of a negative one).

    The headers of small replies are kept, keyed by the reply's exact octets, like a packet
    cache: DoH clients send ID 0 (§4.1), so a name asked again gets the same reply octets
    until a TTL counts down; reading the TTLs again cost more than the rest of the response."""
    headers = _reply_headers.get(reply)
    if headers is None:
        headers = (
            (b"content-type", MEDIA_TYPE),
            (b"cache-control", b"max-age=%d" % reply_max_age(reply)),
        )
        if len(reply) <= _REPLY_HEADERS_CACHED_OCTETS:
            if len(_reply_headers) >= _REPLY_HEADERS_CACHED:
                # all at once: dropping the oldest, next(iter()) walks the slots deleted
                # before it until the dict is rebuilt (5 us a miss at 4,096 entries)
                _reply_headers.clear()
            _reply_headers[reply] = headers
    return new_tuple(HttpResponse, (OK, headers, reply))


def error_response(status: int) -> HttpResponse:
    """An error status with an empty body; 405 names the methods there are (RFC 9110 §15.5.6)."""
    if status == METHOD_NOT_ALLOWED:
        return HttpResponse(status, ((b"allow", b"GET, POST"),), b"")
    return HttpResponse(status, (), b"")


def no_reply_response(packet: bytes) -> HttpResponse | None:
    """What a query the pipeline sent no reply for gets: 400 when it was no readable DNS
    query (shorter than a header, or a response: the pipeline drops those unread); None for
    a readable one the policy dropped (`unregistered: drop`), which the transport answers by
    resetting the stream or closing the connection, the nearest HTTP has to silence."""
    if len(packet) < HEADER_SIZE or packet[2] & 0x80:
        return error_response(BAD_REQUEST)
    return None
