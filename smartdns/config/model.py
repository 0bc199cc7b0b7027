"""The configuration model: one frozen dataclass per YAML section, defaults only here.

Pure values; no I/O. `loader` builds these from the YAML file.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType


class Unregistered(enum.Enum):
    """What a query from an unregistered source gets (SPEC 2)."""

    REFUSE = "refuse"
    DROP = "drop"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address and port; `host` is the normalized address text, without brackets."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[HostPort, ...] = (HostPort("0.0.0.0", 53), HostPort("::", 53))
    workers: int = 1  # processes sharing the ports; YAML "auto" = os.cpu_count()
    edns_udp_size: int = 1232  # bytes we advertise and the cap on UDP replies (512..4096)
    tcp_idle_timeout: float = 10.0  # seconds
    tcp_max_connections: int = 1024  # concurrent TCP connections per worker


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    # Relative paths are taken relative to the config file's directory.
    path: Path = Path("/var/lib/smartdns/registrations.db")


@dataclass(frozen=True, slots=True)
class RegistrationsConfig:
    min_prefix_v4: int = 24  # widest IPv4 prefix accepted (0..32)
    min_prefix_v6: int = 48  # widest IPv6 prefix accepted (0..128)
    max_per_account: int = 16  # entries per account
    max_hostnames_per_account: int = 4  # hostname entries per account (SPEC 3)
    max_device_ids_per_account: int = 8  # device IDs per account (SPEC 2a, 3)
    public_only: bool = True  # reject loopback, private, link-local and other non-global ranges


@dataclass(frozen=True, slots=True)
class Region:
    ipv4: tuple[ipaddress.IPv4Address, ...] = ()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()


@dataclass(frozen=True, slots=True)
class UnblockConfig:
    ttl: int = 60  # seconds, for proxy answers and the synthesized SOA
    # use-application-dns.net gets NXDOMAIN for authorized clients (Firefox stays on us)
    canary_nxdomain: bool = True
    regions: Mapping[str, Region] = field(default_factory=lambda: MappingProxyType({}))
    # zone (lower-case, no trailing dot) → region name; flattened from `zones: {region: [...]}`
    zones: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: tuple[HostPort, ...] = ()  # required, non-empty; port defaults to 53
    timeout: float = 1.5  # seconds per attempt
    attempts: int = 2  # tries per upstream
    max_qps: int = 5000  # forwarding rate bound (queries per second, whole worker)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000
    min_ttl: int = 0  # seconds
    max_ttl: int = 86_400  # seconds
    negative_ttl: int = 300  # seconds, cap for NXDOMAIN/NODATA (RFC 2308)
    serve_stale: int = 86_400  # seconds past expiry an entry may still be served (RFC 8767)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    client_qps: int = 200  # per authorized source bucket
    refused_qps: int = 5  # REFUSED replies per source bucket


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A credential; `repr` and `str` never show it, so it cannot leak into a log line."""

    value: bytes = b""

    def __repr__(self) -> str:
        return "Secret(<redacted>)" if self.value else "Secret(<empty>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class SyncConfig:
    listen: HostPort = HostPort("127.0.0.1", 8053)
    token_file: Path = Path("/etc/smartdns/sync.token")  # relative to the config file's directory
    max_body: int = 33_554_432  # bytes
    # The bearer token, read from token_file by load_config (not a YAML key); empty = none.
    token: Secret = Secret()


@dataclass(frozen=True, slots=True)
class DdnsConfig:
    """Resolving registered hostnames (SPEC 3)."""

    # Who resolves registered hostnames; port defaults to 53. The loader fills in
    # upstream.servers when the key is left out, so a loaded Config never has this empty.
    resolvers: tuple[HostPort, ...] = ()
    min_ttl: int = 30  # seconds; re-resolve no sooner than this (at least 1)
    max_ttl: int = 300  # seconds; and no later than this (at least min_ttl)
    grace: int = 86_400  # seconds the last good addresses are kept while lookups fail
    max_concurrent: int = 64  # lookups in flight


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """Following a NATS JetStream key-value bucket of registrations (SPEC 4); optional."""

    # nats:// or tls:// URLs, as written (port defaults to 4222); required in the section.
    servers: tuple[str, ...] = ()
    bucket: str = "smartdns-registrations"  # KV bucket, [A-Za-z0-9_-]+; created when missing
    # JetStream replicas when the bucket is created (1..5). 1 so a one-server dev or test
    # setup works; a three-server cluster sets 3 as the SPEC example does.
    replicas: int = 1
    credentials_file: Path | None = None  # NATS credentials (owner-only); relative to the config
    tls_ca_file: Path | None = None  # CA for TLS to the servers; relative to the config
    refresher: bool = False  # true on the one node that resolves hostnames for the fleet


@dataclass(frozen=True, slots=True)
class EncryptedConfig:
    """DNS over TLS and DNS over HTTPS (SPEC 2a); optional."""

    # Lower-case, no trailing dot; required. A device ID is the one label in front of it.
    server_name: str = ""
    cert_file: Path = Path()  # PEM, leaf first, then the chain; required; relative to the config
    key_file: Path = Path()  # PEM private key, owner-only; required; relative to the config
    # Where DoT and DoH listen; an empty list serves nothing of that kind (not both empty).
    dot_listen: tuple[HostPort, ...] = (HostPort("0.0.0.0", 853), HostPort("::", 853))
    doh_listen: tuple[HostPort, ...] = (HostPort("0.0.0.0", 443), HostPort("::", 443))
    max_connections: int = 10_000  # per worker, DoT and DoH together
    handshake_timeout: float = 5.0  # seconds a TLS handshake may take
    ddr: bool = False  # designate this node in _dns.resolver.arpa (RFC 9462)
    # This node's public addresses for DDR's ipv4hint/ipv6hint; required non-empty with ddr.
    ddr_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    # The certificate's notAfter in seconds since the epoch, read by load_config (not a YAML
    # key); None when the pair was not inspected (the registrations CLI does not need it).
    not_after: float | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    registrations: RegistrationsConfig = RegistrationsConfig()
    unregistered: Unregistered = Unregistered.REFUSE
    unblock: UnblockConfig = UnblockConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    cache: CacheConfig = CacheConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    sync: SyncConfig = SyncConfig()
    ddns: DdnsConfig = DdnsConfig()
    feed: FeedConfig | None = None  # None when the YAML has no feed section
    encrypted: EncryptedConfig | None = None  # None when the YAML has no encrypted section
    logging: LoggingConfig = LoggingConfig()
