"""The sections of the configuration file, each registered once in `SECTIONS`: its name (the
YAML key and the `Config` field), how it is read (for most, a table of field converters),
the keys it requires, and the checks that need more than one value, run in one pass once
every section is read.

A new section: its dataclass and `Config` field in `model`, then one entry in `SECTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from yaml.nodes import MappingNode, Node

from smartdns.config.certificates import inspect_pair
from smartdns.config.model import (
    CacheConfig,
    Config,
    DatabaseConfig,
    DdnsConfig,
    EncryptedConfig,
    FeedConfig,
    LoggingConfig,
    RateLimitConfig,
    RegistrationsConfig,
    Secret,
    ServerConfig,
    SyncConfig,
    UpstreamConfig,
)
from smartdns.config.reader import (
    Converter,
    Entries,
    Reader,
    boolean,
    build,
    convert_fields,
    file_path,
    int_field,
    mapping,
    seconds_field,
    section_entries,
    unique_list_field,
)
from smartdns.config.unblock import read_unblock
from smartdns.config.values import (
    bucket_name,
    existing_file_field,
    feed_servers,
    host_port_field,
    host_ports_field,
    ip_address,
    log_level,
    read_token,
    server_name,
    unregistered,
    workers,
)

_MAX_UPSTREAM_TIMEOUT_S: Final = 10.0
_MAX_JETSTREAM_REPLICAS: Final = 5
_MAX_HANDSHAKE_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Read:
    """One section as read: its value (None: the Config default), its key node (None when
    the section is absent) and the keys found in it."""

    name: str
    value: object
    key: Node | None
    entries: Entries


_ReadSection = Callable[[Reader, Node | None, str], tuple[object, Entries]]
"""Reads a section's value node (None when absent) at a dotted path: its value and keys."""

_Check = Callable[[Reader, Read, Mapping[str, Read], Node], object]
"""A check once every section is read: (reader, this section, all sections by name, the
document's root node) → this section's value, completed where the check fills something in."""


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    read: _ReadSection
    # Keys that must be present (key, what it holds); a missing one is a problem on the
    # section's key, or on the document when the section is absent too.
    required: tuple[tuple[str, str], ...] = ()
    checks: tuple[_Check, ...] = ()


def _table(make: Callable[..., object], fields: Mapping[str, Converter]) -> _ReadSection:
    """A plain section: each key converted by its field's converter, the rest defaults."""

    def read(reader: Reader, node: Node | None, where: str) -> tuple[object, Entries]:
        entries = section_entries(reader, node, where, list(fields))
        return build(make, convert_fields(reader, entries, where, fields)), entries

    return read


def _optional(read_table: _ReadSection) -> _ReadSection:
    """A section that is None (off) when absent or empty."""

    def read(reader: Reader, node: Node | None, where: str) -> tuple[object, Entries]:
        value, entries = read_table(reader, node, where)
        return (value if entries else None), entries

    return read


def _scalar(convert: Converter) -> _ReadSection:
    """A section that is one value (`unregistered: refuse`)."""

    def read(reader: Reader, node: Node | None, where: str) -> tuple[object, Entries]:
        return (None if node is None else convert(reader, node, where)), {}

    return read


def _ttl_order(reader: Reader, this: Read, sections: Mapping[str, Read], root: Node) -> object:
    """min_ttl must not be more than max_ttl; reported on the one written (min_ttl first)."""
    section = this.value
    if isinstance(section, CacheConfig | DdnsConfig) and section.min_ttl > section.max_ttl:
        where = this.entries.get("min_ttl") or this.entries["max_ttl"]
        reader.add(
            where[1],
            f"{this.name}.min_ttl ({section.min_ttl}) must not be more than "
            f"{this.name}.max_ttl ({section.max_ttl})",
        )
    return section


def _resolvers_default_to_upstream(
    reader: Reader, this: Read, sections: Mapping[str, Read], root: Node
) -> object:
    """ddns.resolvers left out: the DNS upstreams resolve registered hostnames too."""
    ddns, upstream = this.value, sections["upstream"].value
    if isinstance(ddns, DdnsConfig) and isinstance(upstream, UpstreamConfig) and not ddns.resolvers:
        return replace(ddns, resolvers=upstream.servers)
    return ddns


def _sync_token(reader: Reader, this: Read, sections: Mapping[str, Read], root: Node) -> object:
    """Read the bearer token (SPEC 4); a missing, empty or shared file is a config problem,
    reported on token_file, else on the sync key, else on the document."""
    sync = this.value
    if not isinstance(sync, SyncConfig):
        return sync
    given = this.entries.get("token_file")
    # A token_file value that is itself invalid was reported already; its default is no guide.
    if given is not None and reader.has_problem(given[1]):
        return sync
    token = read_token(sync.token_file)
    if isinstance(token, str):
        node = given[1] if given is not None else (root if this.key is None else this.key)
        reader.add(node, f"sync.token_file: {sync.token_file}: {token}")
        return sync
    return replace(sync, token=Secret(token))


def _encrypted_serves_something(
    reader: Reader, this: Read, sections: Mapping[str, Read], root: Node
) -> object:
    """An encrypted section must listen somewhere, and DDR needs the addresses it announces
    (SPEC 2a: ipv4hint/ipv6hint, which the certificate must hold too)."""
    encrypted = this.value
    if not isinstance(encrypted, EncryptedConfig) or this.key is None:
        return encrypted
    if not encrypted.dot_listen and not encrypted.doh_listen:
        where = this.entries.get("dot_listen") or this.entries.get("doh_listen")
        reader.add(
            this.key if where is None else where[1],
            "encrypted: dot_listen and doh_listen are both empty; list an address in one",
        )
    if encrypted.ddr and not encrypted.ddr_addresses:
        where = this.entries.get("ddr_addresses") or this.entries["ddr"]
        reader.add(
            where[1],
            "encrypted.ddr_addresses: ddr is true, so list this node's public addresses "
            "(the DDR answer's ipv4hint and ipv6hint)",
        )
    return encrypted


def _certificate_pair(
    reader: Reader, this: Read, sections: Mapping[str, Read], root: Node
) -> object:
    """The pair must load and fit (config.certificates.inspect_pair), reported on cert_file's
    line; fills in the certificate's notAfter for the expiry warning and /metrics."""
    encrypted = this.value
    cert, key = this.entries.get("cert_file"), this.entries.get("key_file")
    if (
        not isinstance(encrypted, EncryptedConfig)
        or not reader.certificates
        or cert is None
        or key is None
        or "server_name" not in this.entries
        or any(reader.has_problem(node) for _, node in (cert, key, this.entries["server_name"]))
    ):
        return encrypted  # nothing to inspect, or a problem reported already
    where = f"encrypted.cert_file: {encrypted.cert_file}"
    try:
        cert_pem = encrypted.cert_file.read_bytes()
        key_pem = encrypted.key_file.read_bytes()
    except OSError as error:
        reader.add(cert[1], f"{where}: cannot read the pair: {error.strerror or error}")
        return encrypted
    addresses = encrypted.ddr_addresses if encrypted.ddr else ()
    inspection = inspect_pair(cert_pem, key_pem, encrypted.server_name, addresses)
    for problem in inspection.problems:
        reader.add(cert[1], f"{where}: {problem}")
    return replace(encrypted, not_after=inspection.not_after)


SECTIONS: Final = (
    Section(
        "server",
        _table(
            ServerConfig,
            {
                "listen": host_ports_field(None),
                "workers": workers,
                "edns_udp_size": int_field(512, 4096),  # RFC 6891 §6.2.5: below 512 means 512
                "tcp_idle_timeout": seconds_field(),
                "tcp_max_connections": int_field(1),
            },
        ),
    ),
    Section("database", _table(DatabaseConfig, {"path": file_path})),
    Section(
        "registrations",
        _table(
            RegistrationsConfig,
            {
                "min_prefix_v4": int_field(0, 32),
                "min_prefix_v6": int_field(0, 128),
                "max_per_account": int_field(1),
                "max_hostnames_per_account": int_field(0),
                "max_device_ids_per_account": int_field(0),
                "public_only": boolean,
            },
        ),
    ),
    Section("unregistered", _scalar(unregistered)),
    Section("unblock", read_unblock),
    Section(
        "upstream",
        _table(
            UpstreamConfig,
            {
                "servers": host_ports_field(53),
                "timeout": seconds_field(_MAX_UPSTREAM_TIMEOUT_S),
                "attempts": int_field(1, 10),
                "max_qps": int_field(1),
            },
        ),
        required=(("servers", "a list of resolver addresses to forward to"),),
    ),
    Section(
        "cache",
        _table(
            CacheConfig,
            {
                "max_entries": int_field(1),
                "min_ttl": int_field(0),
                "max_ttl": int_field(0),
                "negative_ttl": int_field(0),
                "serve_stale": int_field(0),
            },
        ),
        checks=(_ttl_order,),
    ),
    Section(
        "rate_limit",
        _table(RateLimitConfig, {"client_qps": int_field(1), "refused_qps": int_field(1)}),
    ),
    Section(
        "sync",
        _table(
            SyncConfig,
            {
                "listen": host_port_field(None),
                "token_file": file_path,
                "max_body": int_field(1),
            },
        ),
        checks=(_sync_token,),
    ),
    Section(
        "ddns",
        _table(
            DdnsConfig,
            {
                "resolvers": host_ports_field(53),
                "min_ttl": int_field(1),
                "max_ttl": int_field(1),
                "grace": int_field(0),
                "max_concurrent": int_field(1),
            },
        ),
        checks=(_ttl_order, _resolvers_default_to_upstream),
    ),
    Section(
        "feed",
        _optional(
            _table(
                FeedConfig,
                {
                    "servers": feed_servers,
                    "bucket": bucket_name,
                    "replicas": int_field(1, _MAX_JETSTREAM_REPLICAS),
                    "credentials_file": existing_file_field(owner_only=True),
                    "tls_ca_file": existing_file_field(owner_only=False),
                    "refresher": boolean,
                },
            )
        ),
        required=(("servers", "a list of nats:// or tls:// server URLs"),),
    ),
    Section(
        "encrypted",
        _optional(
            _table(
                EncryptedConfig,
                {
                    "server_name": server_name,
                    "cert_file": existing_file_field(owner_only=False),
                    "key_file": existing_file_field(owner_only=True),
                    "dot_listen": host_ports_field(853, may_be_empty=True),
                    "doh_listen": host_ports_field(443, may_be_empty=True),
                    "max_connections": int_field(1),
                    "handshake_timeout": seconds_field(_MAX_HANDSHAKE_TIMEOUT_S),
                    "ddr": boolean,
                    "ddr_addresses": unique_list_field(ip_address, "address", may_be_empty=True),
                },
            )
        ),
        required=(
            ("server_name", "the name clients connect to, e.g. dns.example.net"),
            ("cert_file", "the PEM certificate chain covering server_name and *.server_name"),
            ("key_file", "the PEM private key of that certificate"),
        ),
        checks=(_encrypted_serves_something, _certificate_pair),
    ),
    Section("logging", _table(LoggingConfig, {"level": log_level})),
)


def read_config(reader: Reader, root: MappingNode) -> Config:
    """Every section read, then every section's checks, in one pass over the document."""
    entries = mapping(reader, root, "", [section.name for section in SECTIONS]) or {}
    sections: dict[str, Read] = {}
    for section in SECTIONS:
        key, node = entries.get(section.name, (None, None))
        value, found = section.read(reader, node, section.name)
        sections[section.name] = Read(section.name, value, key, found)
    for section in SECTIONS:
        this = sections[section.name]
        _check_required(reader, section, this, root)
        for check in section.checks:
            this = replace(this, value=check(reader, this, sections, root))
        sections[section.name] = this  # later checks see this section completed
    values = {name: this.value for name, this in sections.items() if this.value is not None}
    return build(Config, {"path": reader.path, **values})


def _check_required(reader: Reader, section: Section, this: Read, root: Node) -> None:
    if this.value is None:  # an optional section that is off requires nothing
        return
    for key, what in section.required:
        if key not in this.entries:
            reader.add(
                root if this.key is None else this.key, f"{section.name}.{key} is required: {what}"
            )
