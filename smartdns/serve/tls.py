"""TLS for DoT and DoH (SPEC 2a): the server contexts (TLS 1.2+, ALPN per transport, session
tickets), the device ID named in the TLS server name, and replacing the certificate on reload.

The handshake itself runs in the event loop's SSL transport; this module only configures it.
Never logs: a server name is a device ID, and an error text here names files, never a peer.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final, Literal

from smartdns.core.clients import device_digest
from smartdns.core.counters import Transport

# RFC 7858 §3.2 (ALPN "dot", RFC 8310) and RFC 8484 §5.2 (HTTP/2, with HTTP/1.1 beside it).
ALPN: Final = {Transport.DOT: ("dot",), Transport.DOH: ("h2", "http/1.1")}
DEVICE_ATTRIBUTE: Final = "smartdns_device"  # set on the SSLObject by the SNI callback


class ServerName:
    """What a TLS server name says (SPEC 2a): `<label>.<server_name>` names the device ID
    `<label>`, the bare `server_name` (or no server name) names none. Any other name is
    refused: the certificate does not cover it, and a client that meant to name a device
    must not be served by its address instead."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name.lower()
        self._suffix = "." + self.server_name

    def device(self, sent: str | None) -> bytes | Literal[False] | None:
        """The digest of the ID that `sent` names, None when it names none, False when the
        name is not ours. Compared case-insensitively (DNS names are)."""
        if sent is None:
            return None
        name = sent.lower().removesuffix(".")
        if name == self.server_name:
            return None
        label = name.removesuffix(self._suffix)
        if label == name or not label or "." in label:
            return False
        return device_digest(label)


def device_of(ssl_object: object) -> bytes | None:
    """The device ID digest the handshake of `ssl_object` named, None when none (or no TLS:
    `transport.get_extra_info("ssl_object")` is None on plain TCP)."""
    device: bytes | None = getattr(ssl_object, DEVICE_ATTRIBUTE, None)
    return device


class TlsContexts:
    """One server context per transport, kept for the life of the process: a reload loads
    the new certificate into the same contexts, so the session ticket keys (OpenSSL's, per
    context, only in memory) stay and clients keep resuming."""

    def __init__(self, server_name: str, cert_file: Path, key_file: Path) -> None:
        """Load the pair; ssl.SSLError or OSError when it cannot be loaded."""
        self.names = ServerName(server_name)
        self.contexts = {transport: self._context(alpn) for transport, alpn in ALPN.items()}
        self.load(server_name, cert_file, key_file)

    def _context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # SPEC 2a: TLS 1.2 or 1.3
        context.options |= ssl.OP_NO_RENEGOTIATION
        context.set_alpn_protocols(list(alpn))  # a client sending no ALPN is served too
        context.sni_callback = self._on_server_name
        return context

    def load(self, server_name: str, cert_file: Path, key_file: Path) -> None:
        """Serve `cert_file` and `key_file` to new handshakes. The pair is loaded into a
        throwaway context first, so a bad one (ssl.SSLError, OSError) changes nothing;
        connections already open keep the certificate they were made with."""
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        probe.load_cert_chain(cert_file, key_file)
        for context in self.contexts.values():
            context.load_cert_chain(cert_file, key_file)
        self.names = ServerName(server_name)

    def _on_server_name(
        self, ssl_object: ssl.SSLObject, sent: str | None, context: ssl.SSLContext
    ) -> int | None:
        """SNI: remember the device ID digest on the connection (computed once), or refuse
        a name that is not ours: the handshake fails (OpenSSL queues unrecognized_name, RFC
        6066 §3; the event loop closes the connection on the failure, so it may not be sent)."""
        device = self.names.device(sent)
        if device is False:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        setattr(ssl_object, DEVICE_ATTRIBUTE, device)
        return None
