"""What a usable certificate pair for `encrypted` is (SPEC 2a): the certificate and key parse,
the key is the certificate's, the certificate covers `server_name` and `*.server_name` (and
the DDR addresses as IP addresses when `ddr` is on), and when it stops being valid.

Pure: it inspects bytes it is handed (X.509 parsing by `cryptography`); messages never quote
key material.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Inspection:
    """What is wrong with a pair (each problem one message), and the leaf's notAfter as
    seconds since the epoch (None when the certificate could not be read)."""

    problems: tuple[str, ...]
    not_after: float | None


def inspect_pair(
    cert_pem: bytes, key_pem: bytes, server_name: str, addresses: Iterable[Address] = ()
) -> Inspection:
    """Check the PEM certificate chain (leaf first) and PEM private key for `server_name`.

    A wildcard SAN covers exactly one label (RFC 6125 §6.4.3), so `*.server_name` must be
    listed itself: a `*.example.net` does not cover `<id>.dns.example.net`. `addresses` are
    DDR's ipv4hint/ipv6hint, which a verified discovery (RFC 9462 §4.2) finds as IP SANs.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return Inspection(("cert_file holds no PEM certificate",), None)
    leaf = chain[0]
    not_after = leaf.not_valid_after_utc.timestamp()
    problems = [*_key_problems(leaf, key_pem), *_name_problems(leaf, server_name, addresses)]
    return Inspection(tuple(problems), not_after)


def _key_problems(leaf: x509.Certificate, key_pem: bytes) -> list[str]:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return ["key_file is encrypted with a password; smartdns needs it unencrypted (chmod 600)"]
    except (ValueError, UnsupportedAlgorithm):
        return ["key_file holds no PEM private key smartdns can use"]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return [
            "key_file is not the key of the certificate "
            "(the first one in cert_file: the leaf comes first, then the chain)"
        ]
    return []


def _name_problems(
    leaf: x509.Certificate, server_name: str, addresses: Iterable[Address]
) -> list[str]:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ["the certificate has no subjectAltName; it must list the server names"]
    dns_names = {name.lower().removesuffix(".") for name in names.get_values_for_type(x509.DNSName)}
    ips = set(names.get_values_for_type(x509.IPAddress))
    missing = [name for name in (server_name, "*." + server_name) if not _covers(dns_names, name)]
    missing += [str(address) for address in addresses if address not in ips]
    if not missing:
        return []
    return ["the certificate does not cover " + ", ".join(missing)]


def _covers(dns_names: set[str], name: str) -> bool:
    """`name` is listed, or a wildcard one label above covers it (a wildcard name itself is
    covered only by being listed)."""
    if name in dns_names:
        return True
    if name.startswith("*."):
        return False
    _, _, parent = name.partition(".")
    return f"*.{parent}" in dns_names
