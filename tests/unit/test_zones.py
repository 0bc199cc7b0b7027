"""zones: label-boundary, case-insensitive, most specific zone wins."""

from __future__ import annotations

import pytest

from smartdns.core.wire import encode_name
from smartdns.core.zones import ZoneMatcher

MATCHER = ZoneMatcher(
    {
        encode_name("netflix.com"): "us",
        encode_name("bbc.co.uk"): "uk",
        encode_name("special.netflix.com"): "uk",
    }
)


@pytest.mark.parametrize(
    ("name", "region"),
    [
        ("netflix.com", "us"),
        ("www.NetFlix.com", "us"),
        ("a.b.c.netflix.com.", "us"),
        ("notnetflix.com", None),
        ("netflix.com.evil.example", None),
        ("com", None),
        ("special.netflix.com", "uk"),
        ("x.special.netflix.com", "uk"),
        ("notspecial.netflix.com", "us"),
        ("www.bbc.co.uk", "uk"),
        ("co.uk", None),
        ("", None),
    ],
)
def test_match(name: str, region: str | None) -> None:
    assert MATCHER.match(encode_name(name)) == region


def test_label_containing_a_dot_does_not_fake_a_boundary() -> None:
    # one label "evil.netflix" followed by "com": not inside netflix.com
    qname = b"\x0cevil.netflix\x03com\x00"
    assert MATCHER.match(qname) is None


def test_empty_matcher() -> None:
    assert ZoneMatcher[str]({}).match(encode_name("netflix.com")) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("_dns.resolver.arpa", "exact"),
        ("_DNS.Resolver.Arpa.", "exact"),
        ("x._dns.resolver.arpa", "below"),  # an exact zone holds nothing below it
        ("resolver.arpa", "below"),
        ("arpa", None),
    ],
)
def test_an_exact_zone_matches_only_itself(name: str, value: str | None) -> None:
    zones = {encode_name("resolver.arpa"): "below", encode_name("_dns.resolver.arpa"): "exact"}
    matcher = ZoneMatcher(zones, exact=[encode_name("_dns.resolver.arpa")])
    assert matcher.match(encode_name(name)) == value
