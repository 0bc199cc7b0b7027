"""Device ID registrations (SPEC 2a and 3): syntax, count, and the digest that is all we keep.

Pure; no I/O. An ID is a bearer credential: no reason here ever repeats it, and what leaves
this module is its SHA-256 digest (core.clients.device_digest), never the ID;
entries.parse_device_ids adds the position (`device_ids[2]: ...`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from smartdns.core.clients import device_digest
from smartdns.errors import RegistrationError

MIN_DEVICE_ID_CHARS: Final = 20
MAX_DEVICE_ID_CHARS: Final = 63  # one DNS label: the first label of a DoT server name
DIGEST_HEX_CHARS: Final = 64  # SHA-256, as the feed and an export carry it
# The member holding digests in hex where IDs cannot be given: the feed's values, and the
# snapshot document `registrations export` writes (and import and PUT /v1/snapshot take).
DIGESTS_KEY: Final = "device_id_sha256"
_DEVICE_ID: Final = re.compile(r"[a-z0-9]*")
_DIGEST_HEX: Final = re.compile(r"[0-9a-f]{64}")


def parse_device_id(value: object) -> bytes:
    """The digest of one device ID: 20 to 63 characters of `[a-z0-9]` (one DNS label, since
    a certificate's `*.server_name` covers exactly one; SPEC 2a). Upper case is refused, not
    folded: the portal issues lower-case IDs, and a portal sending upper case has a bug to see.
    Raises ValueError(reason); the reason never contains `value`."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not MIN_DEVICE_ID_CHARS <= len(value) <= MAX_DEVICE_ID_CHARS:
        raise ValueError(
            f"must be {MIN_DEVICE_ID_CHARS} to {MAX_DEVICE_ID_CHARS} characters, got {len(value)}"
        )
    if not value.isascii() or _DEVICE_ID.fullmatch(value) is None:
        raise ValueError("must be lower-case letters a-z and digits only")
    return device_digest(value)


def parse_digest_hex(value: object) -> bytes:
    """A device ID digest as 64 lower-case hex characters (the feed's and export's form).
    Raises ValueError(reason); the reason never contains `value`."""
    if not isinstance(value, str) or _DIGEST_HEX.fullmatch(value) is None:
        raise ValueError(f"must be a SHA-256 digest as {DIGEST_HEX_CHARS} lower-case hex digits")
    return bytes.fromhex(value)


def check_count(count: int, limit: int, field: str = "device_ids") -> None:
    """RegistrationError when an account would hold more than `limit` IDs (CLI `add`)."""
    if count > limit:
        raise RegistrationError(
            field, f"{count} device IDs exceed the limit of {limit} per account"
        )


def digests_hex(digests: Sequence[bytes]) -> list[str]:
    """Digests as the feed and an export write them, sorted (canonical)."""
    return sorted(digest.hex() for digest in digests)
