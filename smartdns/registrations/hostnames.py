"""Hostname registrations (SPEC 3 "Dynamic home addresses"): syntax, normal form, count.

Pure; no I/O. Reasons never repeat the submitted text (a hostname is registration data and
must not reach a log); entries.parse_hostnames adds the position (`hostnames[1]: label 2 ...`).
"""

from __future__ import annotations

import re
import socket
from typing import Final

MAX_HOSTNAME_OCTETS: Final = 253  # RFC 1035 §2.3.4: 255 on the wire = 253 in text, no root dot
MAX_LABEL_OCTETS: Final = 63
# Longer input is refused before any per-character work (one trailing dot allowed).
_MAX_INPUT_CHARS: Final = MAX_HOSTNAME_OCTETS + 1
# LDH (RFC 952, RFC 1123 §2.1): letters, digits, hyphen; not starting or ending with a hyphen.
# Lower case only: names are case-folded before the check.
_LDH_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_LDH_CHARS: Final = re.compile(r"[a-z0-9-]*")


def parse_hostname(value: object) -> str:
    """Normalize one hostname: ASCII, lower-cased, without a trailing dot.

    Accepted: at least two LDH labels of 1 to 63 octets, at most 253 octets in all. Refused:
    anything an IP stack reads as an address, since a hostname entry must never be a way to
    register an address past the address rules — IPv6 literals (brackets, colons), dotted
    IPv4 in any form `inet_aton` takes (`1.2.3.4`, `1.2.3.4.`, `127.1`, `0x7f.1`), and every
    name whose last label is all digits (RFC 3696 §2: no top-level domain is numeric).
    Internationalized names must be sent in their A-label (`xn--`) form.
    Raises ValueError(reason); the reason never contains `value`.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not value.isascii():
        raise ValueError("must be ASCII (send internationalized names in the xn-- form)")
    if len(value) > _MAX_INPUT_CHARS:
        raise ValueError(f"over {MAX_HOSTNAME_OCTETS} octets")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]  # the root label: "home.example.net." is "home.example.net"
    if ":" in name or name.startswith("["):
        raise ValueError("an IP address literal, not a hostname")
    if len(name) > MAX_HOSTNAME_OCTETS:
        raise ValueError(f"over {MAX_HOSTNAME_OCTETS} octets")
    labels = name.split(".")
    if len(labels) < 2:
        raise ValueError("needs at least two labels")
    for number, label in enumerate(labels, start=1):
        _check_label(number, label)
    if labels[-1].isdigit() or _is_ipv4_literal(name):
        raise ValueError("an IP address literal, not a hostname")
    return name


def _check_label(number: int, label: str) -> None:
    """One label's rules; `number` counts from 1 so the message can name the label."""
    if not label:
        raise ValueError(f"label {number} is empty")
    if len(label) > MAX_LABEL_OCTETS:
        raise ValueError(f"label {number} is over {MAX_LABEL_OCTETS} octets")
    if _LDH_LABEL.fullmatch(label) is None:
        if _LDH_CHARS.fullmatch(label) is None:
            raise ValueError(f"label {number} has a character other than a-z, 0-9 and -")
        raise ValueError(f"label {number} starts or ends with a hyphen")


def _is_ipv4_literal(name: str) -> bool:
    """What the C library would take as an IPv4 address: hex (`0x7f.1`) and shortened forms."""
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True
