"""Configuration loader: YAML → `model`'s dataclasses, every check in one pass, `PATH:LINE`.

Only the loader and cli.py read settings; everything else receives these values. No I/O
beyond reading the one file and the sync token file (a secret, checked like a setting), and
looking at the feed's credentials and CA files (they must exist; credentials owner-only);
other file paths in it are resolved, not opened.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from smartdns.config.model import (
    CacheConfig,
    Config,
    DatabaseConfig,
    DdnsConfig,
    FeedConfig,
    HostPort,
    LoggingConfig,
    RateLimitConfig,
    Region,
    RegistrationsConfig,
    Secret,
    ServerConfig,
    SyncConfig,
    UnblockConfig,
    Unregistered,
    UpstreamConfig,
)
from smartdns.errors import ConfigError

# Loading. The YAML is composed into nodes, not loaded, so every value keeps its line;
# scalars are converted where they are checked and nothing untyped leaves this section.

_TAG_NULL: Final = "tag:yaml.org,2002:null"
_TAG_BOOL: Final = "tag:yaml.org,2002:bool"
_TAG_INT: Final = "tag:yaml.org,2002:int"
_TAG_FLOAT: Final = "tag:yaml.org,2002:float"
_TAG_STR: Final = "tag:yaml.org,2002:str"
# Plain scalars YAML 1.1 reads as numbers (`1.5`, sexagesimal `1:2:3`) are still the text the
# operator wrote; where a name or an address is expected that text is what counts.
_TEXT_TAGS: Final = frozenset({_TAG_STR, _TAG_INT, _TAG_FLOAT})

_REGION_NAME: Final = re.compile(r"[a-z0-9_-]+")
_LABEL: Final = re.compile(r"[a-z0-9_-]+")
_PORT: Final = re.compile(r"[0-9]+")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_TOKEN: Final = re.compile(rb"[\x21-\x7e]+")  # one HTTP header word: visible ASCII, no spaces
_MIN_TOKEN_CHARS: Final = 16
_MAX_TOKEN_BYTES: Final = 4096
_MAX_UPSTREAM_TIMEOUT_S: Final = 10.0
# JetStream's own rule for key-value bucket names (nats.js VALID_BUCKET_RE).
_BUCKET_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")
_FEED_SCHEMES: Final = ("nats", "tls")
_NATS_PORT: Final = 4222
_HOST_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_MAX_JETSTREAM_REPLICAS: Final = 5

_T = TypeVar("_T")


class _Loader:
    """One pass over the composed document: converts what is valid, records every problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Relative file paths in the config are relative to the config file, not the cwd.
        self.base_dir = path.parent
        self._problems: list[tuple[int, int, str]] = []
        self._bad_nodes: set[int] = set()
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, node: Node, message: str) -> None:
        self._problems.append((_line(node), len(self._problems), message))
        self._bad_nodes.add(id(node))

    def has_problem(self, node: Node) -> bool:
        """True when a problem was recorded on `node` (its value was not converted)."""
        return id(node) in self._bad_nodes

    def problems(self) -> list[str]:
        # Sorted by line so the operator can work down the file; ties keep discovery order.
        return [f"{self.path}:{line}: {message}" for line, _, message in sorted(self._problems)]

    def scalar(self, node: ScalarNode) -> object:
        value: object = self._constructor.construct_object(node)
        return value


_Converter = Callable[[_Loader, Node, str], object]
"""Checks one value node; returns the converted value, or None after recording a problem."""


def _line(node: Node) -> int:
    mark = node.start_mark
    return mark.line + 1 if mark is not None else 1


def _shown(node: Node) -> str:
    """How a wrong value is named in a message: the text as written, or its kind."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _TAG_NULL:
        return "an empty value"
    if node.tag == _TAG_STR:
        return f'"{node.value}"'
    return str(node.value)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG_NULL


def _mapping(
    loader: _Loader, node: Node, where: str, allowed: Collection[str] | None
) -> dict[str, tuple[Node, Node]] | None:
    """Key name → (key node, value node); unknown and duplicate keys are problems.

    PyYAML's loader silently keeps the last of two equal keys; composing lets us see both.
    `where` is the dotted path of the mapping ("" for the top level).
    """
    if not isinstance(node, MappingNode):
        loader.add(node, f"{where}: expected a mapping, got {_shown(node)}")
        return None
    inside = f"in {where}" if where else "at top level"
    entries: dict[str, tuple[Node, Node]] = {}
    pairs: list[tuple[Node, Node]] = list(node.value)
    for key, value in pairs:
        if not isinstance(key, ScalarNode) or key.tag == _TAG_NULL:
            loader.add(key, f"{where or 'top level'}: keys must be plain names, got {_shown(key)}")
            continue
        name = str(key.value)
        if name in entries:
            first = _line(entries[name][0])
            loader.add(key, f'duplicate key "{name}" {inside} (first on line {first})')
            continue
        if allowed is not None and name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = (
                f'did you mean "{close[0]}"?' if close else "expected one of: " + ", ".join(allowed)
            )
            loader.add(key, f'unknown key "{name}" {inside} ({hint})')
            continue
        entries[name] = (key, value)
    return entries


def _sequence(loader: _Loader, node: Node, where: str) -> list[Node] | None:
    if not isinstance(node, SequenceNode):
        loader.add(node, f"{where}: expected a list, got {_shown(node)}")
        return None
    items: list[Node] = list(node.value)
    return items


def _text(loader: _Loader, node: Node, where: str) -> str | None:
    if isinstance(node, ScalarNode) and node.tag in _TEXT_TAGS:
        return str(node.value)
    loader.add(node, f"{where}: expected a string, got {_shown(node)}")
    return None


def _int(loader: _Loader, node: Node, where: str) -> int | None:
    # The int tag never matches true/false, so a bool is not mistaken for 1 or 0.
    if isinstance(node, ScalarNode) and node.tag == _TAG_INT:
        value = loader.scalar(node)
        if isinstance(value, int):
            return value
    loader.add(node, f"{where}: expected an integer, got {_shown(node)}")
    return None


def _range_text(low: int, high: int | None) -> str:
    return f"at least {low}" if high is None else f"{low}..{high}"


def _int_field(low: int, high: int | None = None) -> _Converter:
    def convert(loader: _Loader, node: Node, where: str) -> int | None:
        value = _int(loader, node, where)
        if value is None:
            return None
        if value < low or (high is not None and value > high):
            loader.add(node, f"{where}: must be {_range_text(low, high)}, got {value}")
            return None
        return value

    return convert


def _seconds_field(maximum_s: float | None = None) -> _Converter:
    def convert(loader: _Loader, node: Node, where: str) -> float | None:
        value: object = None
        if isinstance(node, ScalarNode) and node.tag in (_TAG_INT, _TAG_FLOAT):
            value = loader.scalar(node)
        if not isinstance(value, int | float):
            loader.add(node, f"{where}: expected a number of seconds, got {_shown(node)}")
            return None
        seconds = float(value)
        too_long = maximum_s is not None and seconds > maximum_s
        if not math.isfinite(seconds) or seconds <= 0 or too_long:
            limit = "" if maximum_s is None else f" and at most {maximum_s:g}"
            loader.add(node, f"{where}: must be more than 0{limit} seconds, got {node.value}")
            return None
        return seconds

    return convert


def _bool(loader: _Loader, node: Node, where: str) -> bool | None:
    if isinstance(node, ScalarNode) and node.tag == _TAG_BOOL:
        return loader.scalar(node) is True
    loader.add(node, f"{where}: expected true or false, got {_shown(node)}")
    return None


def _file_path(loader: _Loader, node: Node, where: str) -> Path | None:
    text = _text(loader, node, where)
    if text is None:
        return None
    if not text.strip():
        loader.add(node, f"{where}: must not be empty")
        return None
    path = Path(text)
    return path if path.is_absolute() else (loader.base_dir / path).resolve()


def _file_problem(path: Path, *, owner_only: bool, missing: str) -> str | None:
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


def _existing_file_field(*, owner_only: bool) -> _Converter:
    """A file path that must name an existing regular file (owner-only for a secret)."""

    def convert(loader: _Loader, node: Node, where: str) -> Path | None:
        path = _file_path(loader, node, where)
        if path is None:
            return None
        problem = _file_problem(path, owner_only=owner_only, missing="file does not exist")
        if problem is not None:
            loader.add(node, f"{where}: {path}: {problem}")
            return None
        return path

    return convert


def _bucket_name(loader: _Loader, node: Node, where: str) -> str | None:
    text = _text(loader, node, where)
    if text is None:
        return None
    if not _BUCKET_NAME.fullmatch(text):
        loader.add(
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


def _feed_servers(loader: _Loader, node: Node, where: str) -> tuple[str, ...] | None:
    items = _sequence(loader, node, where)
    if items is None:
        return None
    if not items:
        loader.add(node, f"{where}: must list at least one server")
        return None
    found: dict[str, str] = {}
    valid = True
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        text = _text(loader, item, item_where)
        problem = None if text is None else _feed_url_problem(text)
        if text is None:
            valid = False
        elif problem is not None:
            loader.add(item, f'{item_where}: "{text}": {problem}')
            valid = False
        elif text in found:
            loader.add(item, f'{item_where}: "{text}" is listed twice (also {found[text]})')
            valid = False
        else:
            found[text] = item_where
    return tuple(found) if valid else None


def _log_level(loader: _Loader, node: Node, where: str) -> str | None:
    text = _text(loader, node, where)
    if text is None:
        return None
    if text.lower() not in _LOG_LEVELS:
        loader.add(node, f'{where}: "{text}" must be one of {" | ".join(_LOG_LEVELS)}')
        return None
    return text.lower()


def _unregistered(loader: _Loader, node: Node, where: str) -> Unregistered | None:
    text = _text(loader, node, where)
    if text is None:
        return None
    try:
        return Unregistered(text.lower())
    except ValueError:
        choices = " | ".join(choice.value for choice in Unregistered)
        loader.add(node, f'{where}: "{text}" must be one of {choices}')
        return None


def _workers(loader: _Loader, node: Node, where: str) -> int | None:
    if isinstance(node, ScalarNode) and node.tag == _TAG_STR and node.value == "auto":
        return os.cpu_count() or 1
    if isinstance(node, ScalarNode) and node.tag == _TAG_INT:
        count = loader.scalar(node)
        if isinstance(count, int) and count >= 1:
            return count
    loader.add(node, f'{where}: expected a positive integer or "auto", got {_shown(node)}')
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


def _host_port_field(default_port: int | None) -> _Converter:
    def convert(loader: _Loader, node: Node, where: str) -> HostPort | None:
        text = _text(loader, node, where)
        if text is None:
            return None
        parsed = _parse_host_port(text, default_port)
        if isinstance(parsed, str):
            loader.add(node, f'{where}: "{text}": {parsed}')
            return None
        return parsed

    return convert


def _host_ports_field(default_port: int | None) -> _Converter:
    convert_one = _host_port_field(default_port)

    def convert(loader: _Loader, node: Node, where: str) -> tuple[HostPort, ...] | None:
        items = _sequence(loader, node, where)
        if items is None:
            return None
        if not items:
            loader.add(node, f"{where}: must list at least one address")
            return None
        found: dict[HostPort, str] = {}
        valid = True
        for index, item in enumerate(items):
            item_where = f"{where}[{index}]"
            host_port = convert_one(loader, item, item_where)
            if not isinstance(host_port, HostPort):
                valid = False
            elif host_port in found:
                loader.add(
                    item, f'{item_where}: "{host_port}" is listed twice (also {found[host_port]})'
                )
                valid = False
            else:
                found[host_port] = item_where
        return tuple(found) if valid else None

    return convert


def _addresses(
    loader: _Loader, node: Node, where: str, version: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    items = _sequence(loader, node, where)
    if items is None:
        return None
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for index, item in enumerate(items):
        item_where = f"{where}[{index}]"
        text = _text(loader, item, item_where)
        if text is None:
            continue
        if "/" in text:
            loader.add(item, f'{item_where}: "{text}": must be a single address, not a prefix')
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            loader.add(item, f'{item_where}: "{text}" is not an IPv{version} address')
            continue
        if address.version != version:
            other = f"ipv{address.version}"
            loader.add(
                item,
                f'{item_where}: "{text}" is not an IPv{version} address (put it under {other})',
            )
        elif address in addresses:
            loader.add(item, f'{item_where}: "{text}" is listed twice')
        else:
            addresses.append(address)
    return addresses


def _zone_name(loader: _Loader, node: Node, where: str) -> str | None:
    """Normalize a zone (lower case, no trailing dot) and check it is a usable domain name."""
    text = _text(loader, node, where)
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
        loader.add(node, f'{where}: "{text}": {problem}')
        return None
    return name


def _make(make: Callable[..., _T], values: Mapping[str, object]) -> _T:
    """Build a config dataclass from the keys present, so defaults live only in the dataclass.

    `values` is typed `object` because it is keyed by YAML names; each value was converted
    to its field's type by that field's converter, which is what mypy cannot see here.
    """
    return make(**values)


def _section_entries(
    loader: _Loader, node: Node, where: str, allowed: Collection[str]
) -> dict[str, tuple[Node, Node]]:
    # An empty section (`server:` with every key commented out) is the same as an absent one.
    if _is_null(node):
        return {}
    return _mapping(loader, node, where, allowed) or {}


def _section(
    loader: _Loader,
    node: Node,
    where: str,
    fields: Mapping[str, _Converter],
    make: Callable[..., _T],
) -> tuple[_T, dict[str, tuple[Node, Node]]]:
    """Check one plain section against its field table; return it and the keys found."""
    entries = _section_entries(loader, node, where, list(fields))
    values: dict[str, object] = {}
    for name, (_, value_node) in entries.items():
        value = fields[name](loader, value_node, f"{where}.{name}")
        if value is not None:
            values[name] = value
    return _make(make, values), entries


_SERVER: Final[Mapping[str, _Converter]] = {
    "listen": _host_ports_field(None),
    "workers": _workers,
    "edns_udp_size": _int_field(512, 4096),  # RFC 6891 §6.2.5: below 512 means 512
    "tcp_idle_timeout": _seconds_field(),
    "tcp_max_connections": _int_field(1),
}
_DATABASE: Final[Mapping[str, _Converter]] = {"path": _file_path}
_REGISTRATIONS: Final[Mapping[str, _Converter]] = {
    "min_prefix_v4": _int_field(0, 32),
    "min_prefix_v6": _int_field(0, 128),
    "max_per_account": _int_field(1),
    "max_hostnames_per_account": _int_field(0),
    "public_only": _bool,
}
_UPSTREAM: Final[Mapping[str, _Converter]] = {
    "servers": _host_ports_field(53),
    "timeout": _seconds_field(_MAX_UPSTREAM_TIMEOUT_S),
    "attempts": _int_field(1, 10),
    "max_qps": _int_field(1),
}
_CACHE: Final[Mapping[str, _Converter]] = {
    "max_entries": _int_field(1),
    "min_ttl": _int_field(0),
    "max_ttl": _int_field(0),
    "negative_ttl": _int_field(0),
    "serve_stale": _int_field(0),
}
_RATE_LIMIT: Final[Mapping[str, _Converter]] = {
    "client_qps": _int_field(1),
    "refused_qps": _int_field(1),
}
_SYNC: Final[Mapping[str, _Converter]] = {
    "listen": _host_port_field(None),
    "token_file": _file_path,
    "max_body": _int_field(1),
}
_DDNS: Final[Mapping[str, _Converter]] = {
    "resolvers": _host_ports_field(53),
    "min_ttl": _int_field(1),
    "max_ttl": _int_field(1),
    "grace": _int_field(0),
    "max_concurrent": _int_field(1),
}
_FEED: Final[Mapping[str, _Converter]] = {
    "servers": _feed_servers,
    "bucket": _bucket_name,
    "replicas": _int_field(1, _MAX_JETSTREAM_REPLICAS),
    "credentials_file": _existing_file_field(owner_only=True),
    "tls_ca_file": _existing_file_field(owner_only=False),
    "refresher": _bool,
}
_LOGGING: Final[Mapping[str, _Converter]] = {"level": _log_level}
_UNBLOCK_KEYS: Final = ("ttl", "canary_nxdomain", "regions", "zones")
_REGION_KEYS: Final = ("ipv4", "ipv6")


def _region(loader: _Loader, key: Node, node: Node, where: str) -> Region | None:
    entries = _mapping(loader, node, where, _REGION_KEYS)
    if entries is None:
        return None
    values: dict[str, object] = {}
    for name, version in (("ipv4", 4), ("ipv6", 6)):
        if name in entries:
            found = _addresses(loader, entries[name][1], f"{where}.{name}", version)
            if found is not None:
                values[name] = tuple(found)
    ipv4 = entries.get("ipv4")
    # A wrong or invalid ipv4 value is reported where it is; this is for a region without any.
    if ipv4 is None or (isinstance(ipv4[1], SequenceNode) and not ipv4[1].value):
        loader.add(key, f"{where}: no ipv4 address; A answers for the region's zones need one")
    return _make(Region, values)


def _submapping(
    loader: _Loader, entries: Mapping[str, tuple[Node, Node]], name: str, where: str
) -> dict[str, tuple[Node, Node]]:
    if name not in entries:
        return {}
    return _mapping(loader, entries[name][1], where, None) or {}


def _unblock(loader: _Loader, node: Node) -> UnblockConfig:
    """The unblock section, with the zone ↔ region cross-checks done in the same pass."""
    entries = _section_entries(loader, node, "unblock", _UNBLOCK_KEYS)
    values: dict[str, object] = {}
    if "ttl" in entries:
        ttl = _int_field(0, 86_400)(loader, entries["ttl"][1], "unblock.ttl")
        if ttl is not None:
            values["ttl"] = ttl
    if "canary_nxdomain" in entries:
        canary = _bool(loader, entries["canary_nxdomain"][1], "unblock.canary_nxdomain")
        if canary is not None:
            values["canary_nxdomain"] = canary

    # Every region named in the file counts as defined, even a broken one, so a zone list
    # pointing at it does not get a second, misleading problem.
    region_keys: dict[str, Node] = {}
    regions: dict[str, Region] = {}
    for name, (key, value) in _submapping(loader, entries, "regions", "unblock.regions").items():
        where = f"unblock.regions.{name}"
        region_keys[name] = key
        if not _REGION_NAME.fullmatch(name):
            loader.add(key, f'{where}: region name "{name}" may contain only a-z, 0-9, "-" and "_"')
        region = _region(loader, key, value, where)
        if region is not None:
            regions[name] = region

    zones: dict[str, str] = {}
    first_listed: dict[str, str] = {}
    used: set[str] = set()
    for region_name, (key, value) in _submapping(loader, entries, "zones", "unblock.zones").items():
        where = f"unblock.zones.{region_name}"
        if region_name not in region_keys:
            loader.add(key, f'{where}: region "{region_name}" is not defined in unblock.regions')
        items = _sequence(loader, value, where)
        # A broken zone list is reported where it is; only an empty one leaves a region unused.
        if items is None or items:
            used.add(region_name)
        for index, item in enumerate(items or ()):
            item_where = f"{where}[{index}]"
            zone = _zone_name(loader, item, item_where)
            if zone is None:
                continue
            if zone in first_listed:
                # One name, one answer: a zone in two regions would make the answer arbitrary.
                loader.add(
                    item, f'{item_where}: zone "{zone}" is already listed at {first_listed[zone]}'
                )
                continue
            first_listed[zone] = f"{item_where} (line {_line(item)})"
            zones[zone] = region_name

    for name, key in region_keys.items():
        if name not in used:
            loader.add(
                key,
                f'unblock.regions.{name}: region "{name}" is not used by any zone in unblock.zones',
            )

    if "regions" in entries:
        values["regions"] = MappingProxyType(regions)
    if "zones" in entries:
        values["zones"] = MappingProxyType(zones)
    return _make(UnblockConfig, values)


_SECTION_TABLES: Final[Mapping[str, tuple[Mapping[str, _Converter], Callable[..., object]]]] = {
    "server": (_SERVER, ServerConfig),
    "database": (_DATABASE, DatabaseConfig),
    "registrations": (_REGISTRATIONS, RegistrationsConfig),
    "upstream": (_UPSTREAM, UpstreamConfig),
    "cache": (_CACHE, CacheConfig),
    "rate_limit": (_RATE_LIMIT, RateLimitConfig),
    "sync": (_SYNC, SyncConfig),
    "ddns": (_DDNS, DdnsConfig),
    "logging": (_LOGGING, LoggingConfig),
}
_SECTIONS: Final = (*_SECTION_TABLES, "unregistered", "unblock", "feed")
_SERVERS_REQUIRED: Final = (
    "upstream.servers is required: a list of resolver addresses to forward to"
)


_TOKEN_HINT: Final = (
    "one line holding the bearer token, mode 600, e.g. "
    "(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE)"
)


def _token_problem(path: Path) -> bytes | str:
    """The token in the file at `path`, or what is wrong with the file.

    The file must be a regular file that no other user can access (mode & 0o077 == 0),
    holding one word of visible ASCII. Messages never quote the content.
    """
    missing = f"file does not exist; create it: {_TOKEN_HINT}"
    problem = _file_problem(path, owner_only=True, missing=missing)
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


def _sync_with_token(loader: _Loader, sync: SyncConfig, node: Node) -> SyncConfig:
    """Read the bearer token (SPEC 4); a missing, empty or shared file is a config problem."""
    token = _token_problem(sync.token_file)
    if isinstance(token, str):
        loader.add(node, f"sync.token_file: {sync.token_file}: {token}")
        return sync
    return replace(sync, token=Secret(token))


def _check_ttl_order(
    loader: _Loader,
    name: str,
    section: CacheConfig | DdnsConfig,
    found: Mapping[str, tuple[Node, Node]],
) -> None:
    if section.min_ttl > section.max_ttl:
        where = found.get("min_ttl") or found["max_ttl"]
        loader.add(
            where[1],
            f"{name}.min_ttl ({section.min_ttl}) must not be more than "
            f"{name}.max_ttl ({section.max_ttl})",
        )


def _feed(loader: _Loader, key: Node, node: Node) -> FeedConfig | None:
    """The optional feed section: None when absent or empty, else servers are required."""
    section, found = _section(loader, node, "feed", _FEED, FeedConfig)
    if not found:
        return None
    if "servers" not in found:
        loader.add(key, "feed.servers is required: a list of nats:// or tls:// server URLs")
    return section


def _config(loader: _Loader, root: MappingNode) -> Config:
    entries = _mapping(loader, root, "", _SECTIONS) or {}
    sections: dict[str, object] = {}
    token_node: Node = root  # where a token problem is reported when token_file is left out
    token_file_given = False
    for name, (key, node) in entries.items():
        if name == "unregistered":
            choice = _unregistered(loader, node, name)
            if choice is not None:
                sections[name] = choice
            continue
        if name == "unblock":
            sections[name] = _unblock(loader, node)
            continue
        if name == "feed":
            sections[name] = _feed(loader, key, node)
            continue
        fields, make = _SECTION_TABLES[name]
        section, found = _section(loader, node, name, fields, make)
        sections[name] = section
        if name == "sync":
            token_file_given = "token_file" in found
            token_node = found["token_file"][1] if token_file_given else key
        if name == "upstream" and "servers" not in found:
            loader.add(key, _SERVERS_REQUIRED)
        if isinstance(section, CacheConfig | DdnsConfig):
            _check_ttl_order(loader, name, section, found)
    if "upstream" not in entries:
        loader.add(root, _SERVERS_REQUIRED)
    ddns = sections.get("ddns", DdnsConfig())
    upstream = sections.get("upstream")
    if isinstance(ddns, DdnsConfig) and isinstance(upstream, UpstreamConfig) and not ddns.resolvers:
        sections["ddns"] = replace(ddns, resolvers=upstream.servers)
    sync = sections.get("sync", SyncConfig())
    # A token_file value that is itself invalid was reported already; its default is no guide.
    if isinstance(sync, SyncConfig) and not (token_file_given and loader.has_problem(token_node)):
        sections["sync"] = _sync_with_token(loader, sync, token_node)
    return _make(Config, {"path": loader.path, **sections})


def load_config(path: Path) -> Config:
    """Read and check the YAML file at `path`; raise ConfigError listing every problem.

    Problems are `PATH:LINE: message`, sorted by line; a file that cannot be read or parsed,
    or whose top level is not a mapping, gives one `PATH: message`. Relative file paths in
    the config resolve against the config file's directory. The sync token is read here, so
    a missing, empty or group/other-accessible token file is a problem like any other.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the file: {error.strerror or error}"]) from error
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text (byte {error.start})"]) from error
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "unreadable"
        raise ConfigError([f"{path}: invalid YAML{at}: {problem}"]) from error
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: invalid YAML: {error}"]) from error
    except RecursionError as error:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from error
    if root is None:
        raise ConfigError([f"{path}: the file is empty; at least upstream.servers is required"])
    if not isinstance(root, MappingNode):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of sections, got {_shown(root)}"]
        )
    loader = _Loader(path)
    config = _config(loader, root)
    problems = loader.problems()
    if problems:
        raise ConfigError(problems)
    return config


def describe(config: Config) -> str:
    """The line `check-config` prints for a valid file."""
    return "config OK: " + summary(config)


def summary(config: Config) -> str:
    """The configuration in one line for `check-config` and the start and reload log lines:
    counts and modes only, no addresses of clients, no secrets."""
    parts = [
        _count(len(config.server.listen), "listen address", "listen addresses"),
        _count(config.server.workers, "worker", "workers"),
        _count(len(config.unblock.regions), "region", "regions"),
        _count(len(config.unblock.zones), "zone", "zones"),
        _count(len(config.upstream.servers), "upstream", "upstreams"),
        f"unregistered={config.unregistered.value}",
        f"feed={'off' if config.feed is None else 'on'}",
    ]
    return ", ".join(parts)


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"
