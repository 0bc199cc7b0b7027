"""Tests for smartdns.config.certificates: what a pair must be for `encrypted` (pure, on PEM
bytes from a throwaway CA)."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from smartdns.config.certificates import inspect_pair

CA = trustme.CA()


def pem(*names: str, not_after: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    leaf = CA.issue_cert(*names, not_after=not_after)
    chain = b"".join(part.bytes() for part in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


@pytest.mark.parametrize(
    ("names", "missing"),
    [
        (("dns.example.net", "*.dns.example.net"), None),
        (("DNS.Example.NET", "*.DNS.example.net"), None),
        (("*.example.net", "*.dns.example.net"), None),  # one label up covers the bare name
        (("dns.example.net",), "*.dns.example.net"),
        (("*.dns.example.net",), "dns.example.net"),
        (("*.example.net",), "*.dns.example.net"),  # a wildcard covers one label only
        (("*.net", "dns.example.net", "*.dns.example.net"), None),
        (("other.test",), "dns.example.net, *.dns.example.net"),
    ],
)
def test_names_covered(names: tuple[str, ...], missing: str | None) -> None:
    inspection = inspect_pair(*pem(*names), "dns.example.net")
    wanted = () if missing is None else (f"the certificate does not cover {missing}",)
    assert inspection.problems == wanted


def test_ddr_addresses_must_be_ip_sans() -> None:
    cert, key = pem("dns.example.net", "*.dns.example.net", "203.0.113.53")
    v4, v6 = ipaddress.ip_address("203.0.113.53"), ipaddress.ip_address("2001:db8::53")
    assert inspect_pair(cert, key, "dns.example.net", [v4]).problems == ()
    assert inspect_pair(cert, key, "dns.example.net", [v4, v6]).problems == (
        "the certificate does not cover 2001:db8::53",
    )


def test_not_after_is_the_leafs() -> None:
    when = datetime.datetime(2031, 5, 17, 12, 0, tzinfo=datetime.UTC)
    inspection = inspect_pair(
        *pem("dns.example.net", "*.dns.example.net", not_after=when), "dns.example.net"
    )
    assert inspection.not_after == when.timestamp()


def test_the_key_must_be_the_leafs_and_readable() -> None:
    cert, _ = pem("dns.example.net", "*.dns.example.net")
    _, other_key = pem("dns.example.net")
    assert (
        inspect_pair(cert, other_key, "dns.example.net")
        .problems[0]
        .startswith("key_file is not the key of the certificate")
    )
    garbage = inspect_pair(cert, b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "dns.example.net")
    assert garbage.problems == ("key_file holds no PEM private key smartdns can use",)
    nothing = inspect_pair(b"no certificate", b"", "dns.example.net")
    assert nothing == nothing.__class__(("cert_file holds no PEM certificate",), None)


def test_an_encrypted_key_is_named_as_such() -> None:
    cert, key_pem = pem("dns.example.net", "*.dns.example.net")
    key = serialization.load_pem_private_key(key_pem, password=None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    [problem] = inspect_pair(cert, locked, "dns.example.net").problems
    assert problem.startswith("key_file is encrypted with a password")
    assert "secret" not in problem
