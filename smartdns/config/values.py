"""What a valid value is, for the values that are more than a number: listen and resolver
addresses, proxy addresses, zone names, NATS server URLs and bucket names, and files that
must exist (the sync token is read here: a secret, checked like a setting).

Each converter records its problem on the node and returns None; only the file checks do
I/O (a stat, and reading the token file).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Final

from yaml.nodes import Node, ScalarNode

from smartdns.config.model import HostPort, Unregistered
from smartdns.config.reader import (
    TAG_INT,
    TAG_STR,
    Converter,
    Reader,
    choice_field,
    file_path,
    sequence,
    shown,
    string,
    unique_list_field,
)

_LABEL: Final = re.compile(r"[a-z0-9_-]+")
_PORT: Final = re.compile(r"[0-9]+")
_TOKEN: Final = re.compile(rb"[\x21-\x7e]+")  # one HTTP header word: visible ASCII, no spaces
_MIN_TOKEN_CHARS: Final = 16
_MAX_TOKEN_BYTES: Final = 4096
# JetStream's own rule for key-value bucket names (nats.js VALID_BUCKET_RE).
_BUCKET_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")
_FEED_SCHEMES: Final = ("nats", "tls")
_HOST_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
# 253 less a 63-character device ID label and its dot (SPEC 3: IDs are up to 63 characters).
_MAX_SERVER_NAME_CHARS: Final = 253 - 64
_TOKEN_HINT: Final = (
    "one line holding the bearer token, mode 600, e.g. "
    "(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE)"
)

log_level: Final = choice_field(("debug", "info", "warning", "error"), str)
unregistered: Final = choice_field(tuple(choice.value for choice in Unregistered), Unregistered)


def workers(reader: Reader, node: Node, where: str) -> int | None:
    if isinstance(node, ScalarNode) and node.tag == TAG_STR and node.value == "auto":
        return os.cpu_count() or 1
    if isinstance(node, ScalarNode) and node.tag == TAG_INT:
        count = reader.scalar(node)
        if isinstance(count, int) and count >= 1:
            return count
    reader.add(node, f'{where}: expected a positive integer or "auto", got {shown(node)}')
    return None


def _parse_host_port(text: str, default_port: int | None) -> HostPort | str:
    """`ADDRESS:PORT` (IPv6 as `[ADDRESS]:PORT`) → HostPort, or a message saying what is wrong.

    Without brackets an IPv6 address cannot carry a port (`::1:53` is itself an address), so a
    bare IPv6 address is accepted only where the port may default. Hostnames are refused: the
    server must not depend on DNS to start.
    """
    bracketed = text.startswith("[")
    port_text: str | None = None
    if bracketed:
        end = text.find("]")
        if end < 0:
            return 'missing "]" after the IPv6 address'
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return 'expected ":PORT" after "]"'
            port_text = rest[1:]
    elif text.count(":") >= 2:
        if default_port is None:
            return 'an IPv6 address with a port must be bracketed, e.g. "[::1]:53"'
        host = text
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host = text
    if port_text is None:
        if default_port is None:
            return "missing port (write ADDRESS:PORT, IPv6 as [ADDRESS]:PORT)"
        port = default_port
    elif not _PORT.fullmatch(port_text):
        return f'port "{port_text}" is not a number'
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            return "port must be 1..65535"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f'"{host}" is not an IP address (hostnames are not accepted)'
    if bracketed and address.version == 4:
        return "brackets are only for IPv6 addresses"
    return HostPort(str(address), port)


def host_port_field(default_port: int | None) -> Converter:
    def convert(reader: Reader, node: Node, where: str) -> HostPort | None:
        text = string(reader, node, where)
        if text is None:
            return None
        parsed = _parse_host_port(text, default_port)
        if isinstance(parsed, str):
            reader.add(node, f'{where}: "{text}": {parsed}')
            return None
        return parsed

    return convert


def host_ports_field(default_port: int | None, *, may_be_empty: bool = False) -> Converter:
    return unique_list_field(host_port_field(default_port), "address", may_be_empty=may_be_empty)


def ip_address(
    reader: Reader, node: Node, where: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One IPv4 or IPv6 address, no prefix and no port."""
    text = string(reader, node, where)
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        reader.add(node, f'{where}: "{text}" is not an IP address')
        return None


def server_name(reader: Reader, node: Node, where: str) -> str | None:
    """A TLS server name (lower-cased, no trailing dot): letters, digits and inner hyphens in
    at least two labels, no IP address, so `<device id>.<name>` fits a wildcard certificate."""
    text = string(reader, node, where)
    if text is None:
        return None
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    problem = None
    if not name.isascii():
        problem = 'must be ASCII; write internationalized names in their "xn--" form'
    elif len(labels) < 2 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        problem = "expected a host name such as dns.example.net (letters, digits, hyphens)"
    elif len(name) > _MAX_SERVER_NAME_CHARS:
        problem = (
            f"name is {len(name)} characters long; the limit is {_MAX_SERVER_NAME_CHARS}, "
            "which leaves room for a device ID label in front of it"
        )
    elif all(label.isdigit() for label in labels):
        problem = "an IP address is no server name"
    if problem:
        reader.add(node, f'{where}: "{text}": {problem}')
        return None
    return name


def address_list(
    reader: Reader, node: Node, where: str, version: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    items = sequence(reader, node, where)
    if items is None:
        return None
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        text = string(reader, item, item_where)
        if text is None:
            continue
        if "/" in text:
            reader.add(item, f'{item_where}: "{text}": must be a single address, not a prefix')
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            reader.add(item, f'{item_where}: "{text}" is not an IPv{version} address')
            continue
        if address.version != version:
            other = f"ipv{address.version}"
            reader.add(
                item,
                f'{item_where}: "{text}" is not an IPv{version} address (put it under {other})',
            )
        elif address in addresses:
            reader.add(item, f'{item_where}: "{text}" is listed twice')
        else:
            addresses.append(address)
    return addresses


def zone_name(reader: Reader, node: Node, where: str) -> str | None:
    """Normalize a zone (lower case, no trailing dot) and check it is a usable domain name."""
    text = string(reader, node, where)
    if text is None:
        return None
    name = text.lower().removesuffix(".")
    problem = None
    if not text:
        problem = "a zone name must not be empty"
    elif not name:
        problem = 'the root zone "." cannot be an unblock zone'
    elif not name.isascii():
        problem = 'must be ASCII; write internationalized names in their "xn--" form'
    elif len(name) > 253:
        problem = f"name is {len(name)} characters long; the limit is 253"
    else:
        for label in name.split("."):
            if not label:
                problem = "empty label (two dots in a row, or a leading dot)"
            elif label == "*":
                problem = (
                    'no wildcards: a zone already covers every name under it, list "{}"'.format(
                        name.removeprefix("*.")
                    )
                )
            elif len(label) > 63:
                problem = f"label of {len(label)} characters; the limit is 63"
            elif not _LABEL.fullmatch(label):
                problem = f'label "{label}" may contain only letters, digits, "-" and "_"'
            if problem:
                break
    if problem:
        reader.add(node, f'{where}: "{text}": {problem}')
        return None
    return name


def file_problem(path: Path, *, owner_only: bool, missing: str) -> str | None:
    """What is wrong with the file at `path` (None when nothing): absent, unreadable, not a
    regular file, or, with `owner_only`, accessible by another user (mode & 0o077)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return missing
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if owner_only and info.st_mode & 0o077:
        which = "readable" if info.st_mode & 0o044 else "accessible"
        return f"file is {which} by other users (chmod 600)"
    return None


def existing_file_field(*, owner_only: bool) -> Converter:
    """A file path that must name an existing regular file (owner-only for a secret)."""

    def convert(reader: Reader, node: Node, where: str) -> Path | None:
        path = file_path(reader, node, where)
        if path is None:
            return None
        problem = file_problem(path, owner_only=owner_only, missing="file does not exist")
        if problem is not None:
            reader.add(node, f"{where}: {path}: {problem}")
            return None
        return path

    return convert


def read_token(path: Path) -> bytes | str:
    """The token in the file at `path`, or what is wrong with the file.

    The file must be a regular file that no other user can access (mode & 0o077 == 0),
    holding one word of visible ASCII. Messages never quote the content.
    """
    missing = f"file does not exist; create it: {_TOKEN_HINT}"
    problem = file_problem(path, owner_only=True, missing=missing)
    if problem is not None:
        return problem
    try:
        with path.open("rb") as file:
            content = file.read(_MAX_TOKEN_BYTES + 1)
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    token = content.strip()
    if not token:
        return f"file is empty; it must hold {_TOKEN_HINT}"
    if len(content) > _MAX_TOKEN_BYTES or not _TOKEN.fullmatch(token):
        return "the token must be one line of printable ASCII without spaces"
    if len(token) < _MIN_TOKEN_CHARS:
        return f"the token is too short: use at least {_MIN_TOKEN_CHARS} random characters"
    return token


def bucket_name(reader: Reader, node: Node, where: str) -> str | None:
    text = string(reader, node, where)
    if text is None:
        return None
    if not _BUCKET_NAME.fullmatch(text):
        reader.add(
            node, f'{where}: "{text}": a bucket name may contain only A-Z, a-z, 0-9, "-" and "_"'
        )
        return None
    return text


def _is_host_name(host: str) -> bool:
    """An IP address or a DNS host name (letters, digits, inner hyphens; dots between)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
    return True


def _feed_url_problem(text: str) -> str | None:
    """What is wrong with a NATS server URL (None when nothing).

    Host names are accepted here, unlike for DNS upstreams: the feed is not needed to answer
    DNS, and TLS checks the server's name. User and password are refused so that no secret
    sits in the YAML (they belong in feed.credentials_file).
    """
    try:
        url = urllib.parse.urlsplit(text)
    except ValueError:  # an unclosed "[" (the only thing urlsplit refuses)
        return "expected nats://HOST:PORT (IPv6 in brackets)"
    try:
        port = url.port
    except ValueError:
        return "port must be a number 1..65535"
    if url.scheme.lower() not in _FEED_SCHEMES:
        return "must start with nats:// or tls://"
    if url.username is not None or url.password is not None:
        return "no user or password in the URL; put them in feed.credentials_file"
    if not url.hostname or not _is_host_name(url.hostname):
        return "expected nats://HOST:PORT (IPv6 in brackets)"
    if port == 0:
        return "port must be a number 1..65535"
    if url.path not in ("", "/") or url.query or url.fragment:
        return "nothing may follow HOST:PORT"
    return None


def feed_server(reader: Reader, node: Node, where: str) -> str | None:
    """One NATS server URL, as written (the NATS client takes URL text)."""
    text = string(reader, node, where)
    if text is None:
        return None
    problem = _feed_url_problem(text)
    if problem is not None:
        reader.add(node, f'{where}: "{text}": {problem}')
        return None
    return text


feed_servers: Final = unique_list_field(feed_server, "server")
