"""Tests for smartdns.serve.tls: the device ID a server name names, the contexts' settings,
and a certificate reload that keeps the old pair when the new one is bad."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from smartdns.core.clients import device_digest
from smartdns.core.counters import Transport
from smartdns.serve.tls import ServerName, TlsContexts, device_of

ID = "k3v9q2w8e7r6t5y4u3i2"


@pytest.mark.parametrize(
    ("sent", "device"),
    [
        (None, None),
        ("dns.example.net", None),
        ("DNS.Example.Net", None),
        ("dns.example.net.", None),
        (f"{ID}.dns.example.net", device_digest(ID)),
        (f"{ID.upper()}.DNS.example.NET", device_digest(ID)),
        ("www.dns.example.net", device_digest("www")),  # not an ID: unregistered, refused
        (f"a.{ID}.dns.example.net", False),
        ("example.net", False),
        ("notdns.example.net", False),
        (f"{ID}dns.example.net", False),
        (".dns.example.net", False),
        ("other.test", False),
    ],
)
def test_server_name_names_a_device(sent: str | None, device: bytes | bool | None) -> None:
    assert ServerName("Dns.Example.Net").device(sent) == device


def test_device_of_a_plain_transport_is_none() -> None:
    assert device_of(None) is None


@pytest.fixture(name="pair")
def fixture_pair(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("dns.test", "*.dns.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_contexts_are_tls12_plus_with_alpn_per_transport(pair: tuple[Path, Path]) -> None:
    contexts = TlsContexts("dns.test", *pair)
    assert set(contexts.contexts) == {Transport.DOT, Transport.DOH}
    for context in contexts.contexts.values():
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert not context.options & ssl.OP_NO_TICKET  # session tickets are offered


def test_a_bad_pair_is_refused_and_the_names_stay(pair: tuple[Path, Path], tmp_path: Path) -> None:
    contexts = TlsContexts("dns.test", *pair)
    other = trustme.CA().issue_cert("dns.test")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    with pytest.raises(ssl.SSLError):
        contexts.load("new.test", pair[0], tmp_path / "other-key.pem")  # key of another cert
    with pytest.raises(OSError):
        contexts.load("new.test", tmp_path / "missing.pem", pair[1])
    assert contexts.names.server_name == "dns.test"
    contexts.load("new.test", *pair)
    assert contexts.names.server_name == "new.test"
