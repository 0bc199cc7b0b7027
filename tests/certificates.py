"""Throwaway certificates for the DoT and DoH tests (trustme): a CA and leaves signed by it,
written as PEM files the way an operator installs them (fullchain, key owner-only)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAME = "dns.test"
NAMES = (SERVER_NAME, f"*.{SERVER_NAME}", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Pair:
    cert_file: Path
    key_file: Path
    ca_file: Path


def write_pair(
    directory: Path,
    names: tuple[str, ...] = NAMES,
    *,
    ca: trustme.CA | None = None,
    stem: str = "",
    not_after: datetime.datetime | None = None,
) -> Pair:
    """A leaf for `names` (host names, wildcards and IP addresses) signed by `ca` (a new one
    by default), written to `<stem>cert.pem`, `<stem>key.pem` (mode 600) and `<stem>ca.pem`."""
    ca = ca or trustme.CA()
    leaf = ca.issue_cert(*names, not_after=not_after)
    pair = Pair(
        directory / f"{stem}cert.pem", directory / f"{stem}key.pem", directory / f"{stem}ca.pem"
    )
    pair.cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    pair.key_file.write_bytes(leaf.private_key_pem.bytes())
    pair.key_file.chmod(0o600)
    ca.cert_pem.write_to_path(str(pair.ca_file))
    return pair
