"""Tests for smartdns.config: the example files, defaults, and every check with its PATH:LINE."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from smartdns.config.loader import describe, load_config, warnings
from smartdns.config.model import (
    CacheConfig,
    Config,
    DatabaseConfig,
    DdnsConfig,
    EncryptedConfig,
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
from smartdns.config.sections import SECTIONS
from smartdns.errors import ConfigError
from tests.certificates import write_pair

REPO = Path(__file__).resolve().parents[2]
MINIMAL = 'upstream: {servers: ["1.1.1.1"]}\n'
TOKEN = "0123456789abcdef0123456789abcdef"
TOKEN_LINE = "sync: {token_file: sync.token}\n"


def write_token(path: Path, content: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    return path


def write(tmp_path: Path, text: str, name: str = "smartdns.yaml", *, token: bool = True) -> Path:
    """Write the config; with `token`, also a valid `sync.token` beside it and, unless the text
    has its own `sync:` section, a last line pointing at it (a last line shifts no line)."""
    text = textwrap.dedent(text)
    if token:
        write_token(tmp_path / "sync.token")
        if not re.search(r"^sync:", text, re.MULTILINE):
            text += ("" if text.endswith("\n") else "\n") + TOKEN_LINE
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems, "ConfigError without problems"
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- the example files ---------------------------------------------------------------------


def production_example(tmp_path: Path, *, feed: bool = False) -> Path:
    """A copy of config/smartdns.yaml whose /etc files are files the test owns; with `feed`,
    its commented-out feed block is turned on (the "# " removed from each of its lines)."""
    token_file = write_token(tmp_path / "sync.token")
    text = (REPO / "config" / "smartdns.yaml").read_text(encoding="utf-8")
    text = text.replace("/etc/smartdns/sync.token", str(token_file))
    if feed:
        start = text.index("# feed:\n")
        end = text.index("\n\n", start)
        block = "\n".join(line.removeprefix("# ") for line in text[start:end].split("\n"))
        text = text[:start] + block + text[end:]
        for name in ("nats.creds", "nats-ca.pem"):
            text = text.replace(f"/etc/smartdns/{name}", str(write_token(tmp_path / name)))
    path = tmp_path / "smartdns.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_production_example_loads_with_spec_values(tmp_path: Path) -> None:
    token_file = tmp_path / "sync.token"
    config = load_config(production_example(tmp_path))
    assert config.server == ServerConfig(
        listen=(HostPort("0.0.0.0", 53), HostPort("::", 53)),
        workers=1,
        edns_udp_size=1232,
        tcp_idle_timeout=10.0,
        tcp_max_connections=1024,
    )
    assert config.database == DatabaseConfig(Path("/var/lib/smartdns/registrations.db"))
    assert config.registrations == RegistrationsConfig(24, 48, 16, 4, 8, True)
    assert config.unregistered is Unregistered.REFUSE
    assert config.unblock.ttl == 60
    assert config.unblock.canary_nxdomain is True
    assert dict(config.unblock.regions) == {
        "us": Region(
            ipv4=(ipaddress.IPv4Address("198.51.100.10"), ipaddress.IPv4Address("198.51.100.11"))
        ),
        "uk": Region(
            ipv4=(ipaddress.IPv4Address("198.51.100.20"),),
            ipv6=(ipaddress.IPv6Address("2001:db8:20::1"),),
        ),
    }
    assert dict(config.unblock.zones) == {
        "netflix.com": "us",
        "nflxvideo.net": "us",
        "hulu.com": "us",
        "disneyplus.com": "us",
        "bbc.co.uk": "uk",
        "bbci.co.uk": "uk",
    }
    assert config.upstream == UpstreamConfig(
        servers=(
            HostPort("1.1.1.1", 53),
            HostPort("9.9.9.9", 53),
            HostPort("2606:4700:4700::1111", 53),
        ),
        timeout=1.5,
        attempts=2,
        max_qps=5000,
    )
    assert config.cache == CacheConfig(100_000, 0, 86_400, 300, 86_400)
    assert config.rate_limit == RateLimitConfig(client_qps=200, refused_qps=5)
    assert config.sync == SyncConfig(
        HostPort("127.0.0.1", 8053), token_file, 33_554_432, Secret(TOKEN.encode())
    )
    assert config.ddns == DdnsConfig((HostPort("9.9.9.9", 53),), 30, 300, 86_400, 64)
    assert config.feed is None  # commented out in the example
    assert config.logging == LoggingConfig("info")
    assert describe(config) == (
        "config OK: 2 listen addresses, 1 worker, 2 regions, 6 zones, 3 upstreams, "
        "unregistered=refuse, encrypted=off, feed=off"
    )


def test_production_example_feed_block_loads_when_turned_on(tmp_path: Path) -> None:
    config = load_config(production_example(tmp_path, feed=True))
    assert config.feed == FeedConfig(
        servers=("nats://10.0.0.5:4222", "nats://10.0.0.6:4222", "nats://10.0.0.7:4222"),
        bucket="smartdns-registrations",
        replicas=3,
        credentials_file=tmp_path / "nats.creds",
        tls_ca_file=tmp_path / "nats-ca.pem",
        refresher=False,
    )
    assert describe(config).endswith(", feed=on")


def test_dev_example_loads_with_paths_under_repo_var(tmp_path: Path) -> None:
    # A copy in the same layout (config/ next to var/), so the test owns var/sync.token.
    path = tmp_path / "config" / "dev.yaml"
    path.parent.mkdir()
    path.write_bytes((REPO / "config" / "dev.yaml").read_bytes())
    write_token(tmp_path / "var" / "sync.token")
    config = load_config(path)
    assert config.server.listen == (HostPort("127.0.0.1", 5353), HostPort("::1", 5353))
    assert config.database.path == tmp_path / "var" / "registrations.db"
    assert config.sync.token_file == tmp_path / "var" / "sync.token"
    assert config.sync.token == Secret(TOKEN.encode())
    assert config.sync.listen == HostPort("127.0.0.1", 8053)
    assert config.registrations.public_only is False
    assert config.unregistered is Unregistered.REFUSE
    assert config.upstream.servers == (HostPort("1.1.1.1", 53), HostPort("9.9.9.9", 53))
    assert set(config.unblock.regions) == {"us", "uk"}
    assert len(config.unblock.zones) == 6
    assert config.logging.level == "info"


# --- defaults and accepted forms -------------------------------------------------------------


def test_absent_sections_take_the_dataclass_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(path)
    sync = SyncConfig(token_file=tmp_path / "sync.token", token=Secret(TOKEN.encode()))
    servers = (HostPort("1.1.1.1", 53),)
    assert config == Config(
        path=path,
        upstream=UpstreamConfig(servers=servers),
        sync=sync,
        ddns=DdnsConfig(resolvers=servers),  # ddns.resolvers defaults to upstream.servers
    )
    assert config.server == ServerConfig()
    assert config.unblock == UnblockConfig()
    assert config.feed is None
    assert describe(config) == (
        "config OK: 2 listen addresses, 1 worker, 0 regions, 0 zones, 1 upstream, "
        "unregistered=refuse, encrypted=off, feed=off"
    )


def test_empty_sections_are_the_same_as_absent_ones(tmp_path: Path) -> None:
    text = MINIMAL + "server:\ndatabase:\nunblock:\ncache:\nddns:\nfeed:\nlogging:\n"
    config = load_config(write(tmp_path, text))
    assert config.feed is None
    assert config.ddns.resolvers == (HostPort("1.1.1.1", 53),)
    assert config.server == ServerConfig()
    assert config.database == DatabaseConfig()
    assert config.unblock == UnblockConfig()
    assert config.cache == CacheConfig()
    assert config.logging == LoggingConfig()


def test_keys_left_out_keep_their_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "server: {workers: 3}\ncache: {min_ttl: 5}\n"))
    assert config.server == ServerConfig(workers=3)
    assert config.cache == CacheConfig(min_ttl=5)


def test_accepted_forms_are_normalized(tmp_path: Path) -> None:
    text = """\
        server:
          listen: ["[0:0::0:1]:53", "127.0.0.1:053"]
          workers: auto
          tcp_idle_timeout: 5
        unregistered: DROP
        unblock:
          regions:
            "no": {ipv4: ["198.51.100.1"]}
          zones:
            "no": [NetFlix.COM., _dmarc.example.org]
        upstream:
          servers: ["2606:4700:4700::1111", "[2001:DB8::53]:5353", 9.9.9.9]
          timeout: 2
        logging: {level: WARNING}
        database: {path: data/x.db}
        sync: {token_file: TOKEN_PATH}
    """
    token_file = write_token(tmp_path / "absolute.token")
    path = write(tmp_path, textwrap.dedent(text).replace("TOKEN_PATH", str(token_file)))
    config = load_config(path)
    assert config.server.listen == (HostPort("::1", 53), HostPort("127.0.0.1", 53))
    assert config.server.workers == (os.cpu_count() or 1)
    assert config.server.tcp_idle_timeout == 5.0
    assert isinstance(config.server.tcp_idle_timeout, float)
    assert config.unregistered is Unregistered.DROP
    assert dict(config.unblock.zones) == {"netflix.com": "no", "_dmarc.example.org": "no"}
    assert isinstance(config.unblock.zones, MappingProxyType)
    assert isinstance(config.unblock.regions, MappingProxyType)
    assert config.upstream.servers == (
        HostPort("2606:4700:4700::1111", 53),
        HostPort("2001:db8::53", 5353),
        HostPort("9.9.9.9", 53),
    )
    assert config.upstream.timeout == 2.0
    assert config.logging.level == "warning"
    assert config.database.path == (tmp_path / "data" / "x.db").resolve()
    assert config.sync.token_file == token_file
    assert str(config.upstream.servers[1]) == "[2001:db8::53]:5353"


def test_feed_and_ddns_forms(tmp_path: Path) -> None:
    creds = write_token(tmp_path / "creds" / "nats.creds")
    text = """\
        feed:
          servers: ["tls://nats.example.net", "nats://[::1]:4223", "NATS://127.0.0.1:4222/"]
          bucket: Fleet_1-a
          credentials_file: creds/nats.creds
          refresher: true
        ddns: {resolvers: ["[::1]:5300", 127.0.0.1], min_ttl: 1, max_ttl: 1, grace: 0}
        unblock: {canary_nxdomain: false}
    """
    config = load_config(write(tmp_path, MINIMAL + textwrap.dedent(text)))
    assert config.feed == FeedConfig(
        servers=("tls://nats.example.net", "nats://[::1]:4223", "NATS://127.0.0.1:4222/"),
        bucket="Fleet_1-a",
        replicas=1,
        credentials_file=creds,
        refresher=True,
    )
    assert config.ddns == DdnsConfig(
        (HostPort("::1", 5300), HostPort("127.0.0.1", 53)), 1, 1, 0, 64
    )
    assert config.unblock.canary_nxdomain is False


def test_describe_uses_singular_for_one() -> None:
    config = Config(
        path=Path("x.yaml"),
        server=ServerConfig(listen=(HostPort("::1", 53),), workers=1),
        unblock=UnblockConfig(
            regions=MappingProxyType({"us": Region(ipv4=(ipaddress.IPv4Address("192.0.2.1"),))}),
            zones=MappingProxyType({"netflix.com": "us"}),
        ),
        upstream=UpstreamConfig(servers=(HostPort("1.1.1.1", 53),)),
        unregistered=Unregistered.RESOLVE,
    )
    assert describe(config) == (
        "config OK: 1 listen address, 1 worker, 1 region, 1 zone, 1 upstream, "
        "unregistered=resolve, encrypted=off, feed=off"
    )


# --- one problem per case: (YAML, line, fragment) --------------------------------------------

REGIONS = """\
unblock:
  regions:
    us: {ipv4: [198.51.100.10]}
  zones:
    us: [netflix.com]
"""

CASES: list[tuple[str, str, int, str]] = [
    # unknown and duplicate keys
    ("unknown_top_level", MINIMAL + "foo: 1\n", 2, 'unknown key "foo" at top level'),
    (
        "unknown_in_section",
        "upstream:\n  servers: [1.1.1.1]\n  timout: 2\n",
        3,
        'unknown key "timout" in upstream (did you mean "timeout"?)',
    ),
    (
        "unknown_in_region",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1], ip6: []}\n"
        "  zones: {us: [a.com]}\n",
        4,
        'unknown key "ip6" in unblock.regions.us',
    ),
    (
        "duplicate_key",
        "upstream:\n  servers: [1.1.1.1]\n  servers: [9.9.9.9]\n",
        3,
        'duplicate key "servers" in upstream (first on line 2)',
    ),
    (
        "duplicate_section",
        MINIMAL + "server: {workers: 1}\nserver: {workers: 2}\n",
        3,
        'duplicate key "server" at top level (first on line 2)',
    ),
    # wrong types
    ("section_not_mapping", MINIMAL + "server: [1]\n", 2, "server: expected a mapping, got a list"),
    (
        "workers_bool",
        MINIMAL + "server: {workers: true}\n",
        2,
        'server.workers: expected a positive integer or "auto", got true',
    ),
    (
        "workers_zero",
        MINIMAL + "server: {workers: 0}\n",
        2,
        'server.workers: expected a positive integer or "auto", got 0',
    ),
    (
        "workers_word",
        MINIMAL + "server: {workers: many}\n",
        2,
        'server.workers: expected a positive integer or "auto", got "many"',
    ),
    (
        "int_as_string",
        MINIMAL + 'server: {edns_udp_size: "1232"}\n',
        2,
        'server.edns_udp_size: expected an integer, got "1232"',
    ),
    (
        "int_as_float",
        MINIMAL + "server: {tcp_max_connections: 1.5}\n",
        2,
        "server.tcp_max_connections: expected an integer, got 1.5",
    ),
    (
        "bool_not_int",
        MINIMAL + "cache: {max_entries: true}\n",
        2,
        "cache.max_entries: expected an integer, got true",
    ),
    (
        "float_as_bool",
        MINIMAL + "server: {tcp_idle_timeout: true}\n",
        2,
        "server.tcp_idle_timeout: expected a number of seconds, got true",
    ),
    (
        "bool_as_string",
        MINIMAL + 'registrations: {public_only: "yes"}\n',
        2,
        'registrations.public_only: expected true or false, got "yes"',
    ),
    (
        "listen_not_list",
        MINIMAL + 'server: {listen: "0.0.0.0:53"}\n',
        2,
        'server.listen: expected a list, got "0.0.0.0:53"',
    ),
    (
        "empty_value",
        MINIMAL + "server:\n  workers:\n",
        3,
        'server.workers: expected a positive integer or "auto", got an empty value',
    ),
    (
        "path_not_string",
        MINIMAL + "database: {path: [a]}\n",
        2,
        "database.path: expected a string, got a list",
    ),
    # required upstream.servers
    ("no_upstream", "server: {workers: 1}\n", 1, "upstream.servers is required"),
    (
        "upstream_without_servers",
        "server: {}\nupstream:\n  timeout: 1\n",
        2,
        "upstream.servers is required",
    ),
    ("upstream_empty", "upstream:\n", 1, "upstream.servers is required"),
    (
        "servers_empty",
        "upstream:\n  servers: []\n",
        2,
        "upstream.servers: must list at least one address",
    ),
    # listen addresses
    (
        "listen_port_too_big",
        MINIMAL + 'server:\n  listen: ["0.0.0.0:53",\n           "[::]:99999"]\n',
        4,
        'server.listen[1]: "[::]:99999": port must be 1..65535',
    ),
    (
        "listen_port_zero",
        MINIMAL + 'server: {listen: ["0.0.0.0:0"]}\n',
        2,
        'server.listen[0]: "0.0.0.0:0": port must be 1..65535',
    ),
    (
        "listen_ipv6_unbracketed",
        MINIMAL + 'server: {listen: ["::1:53"]}\n',
        2,
        'server.listen[0]: "::1:53": an IPv6 address with a port must be bracketed',
    ),
    (
        "listen_without_port",
        MINIMAL + 'server: {listen: ["0.0.0.0"]}\n',
        2,
        'server.listen[0]: "0.0.0.0": missing port',
    ),
    (
        "listen_bracketed_without_port",
        MINIMAL + 'server: {listen: ["[::]"]}\n',
        2,
        'server.listen[0]: "[::]": missing port',
    ),
    (
        "listen_hostname",
        MINIMAL + 'server: {listen: ["localhost:53"]}\n',
        2,
        '"localhost" is not an IP address (hostnames are not accepted)',
    ),
    (
        "listen_bracketed_ipv4",
        MINIMAL + 'server: {listen: ["[127.0.0.1]:53"]}\n',
        2,
        "brackets are only for IPv6 addresses",
    ),
    (
        "listen_bad_address",
        MINIMAL + 'server: {listen: ["300.1.1.1:53"]}\n',
        2,
        '"300.1.1.1" is not an IP address',
    ),
    (
        "listen_duplicate",
        MINIMAL + 'server:\n  listen:\n    - "[::]:53"\n    - "[0::0]:053"\n',
        5,
        'server.listen[1]: "[::]:53" is listed twice (also server.listen[0])',
    ),
    (
        "listen_empty",
        MINIMAL + "server: {listen: []}\n",
        2,
        "server.listen: must list at least one address",
    ),
    # upstream servers
    (
        "upstream_hostname",
        'upstream: {servers: ["dns.google"]}\n',
        1,
        'upstream.servers[0]: "dns.google": "dns.google" is not an IP address',
    ),
    (
        "upstream_port_too_big",
        'upstream: {servers: ["[2606:4700::1111]:70000"]}\n',
        1,
        'upstream.servers[0]: "[2606:4700::1111]:70000": port must be 1..65535',
    ),
    (
        "upstream_port_not_number",
        'upstream: {servers: ["1.1.1.1:dns"]}\n',
        1,
        'port "dns" is not a number',
    ),
    (
        "upstream_duplicate",
        'upstream:\n  servers:\n    - "9.9.9.9"\n    - "9.9.9.9:53"\n',
        4,
        'upstream.servers[1]: "9.9.9.9:53" is listed twice',
    ),
    (
        "sync_listen_without_port",
        MINIMAL + 'sync: {listen: "127.0.0.1", token_file: sync.token}\n',
        2,
        'sync.listen: "127.0.0.1": missing port',
    ),
    # ranges
    (
        "edns_too_small",
        MINIMAL + "server: {edns_udp_size: 511}\n",
        2,
        "server.edns_udp_size: must be 512..4096, got 511",
    ),
    (
        "edns_too_big",
        MINIMAL + "server: {edns_udp_size: 4097}\n",
        2,
        "server.edns_udp_size: must be 512..4096, got 4097",
    ),
    (
        "tcp_idle_timeout_zero",
        MINIMAL + "server: {tcp_idle_timeout: 0}\n",
        2,
        "server.tcp_idle_timeout: must be more than 0 seconds",
    ),
    (
        "tcp_idle_timeout_nan",
        MINIMAL + "server: {tcp_idle_timeout: .nan}\n",
        2,
        "server.tcp_idle_timeout: must be more than 0 seconds",
    ),
    (
        "tcp_max_connections_zero",
        MINIMAL + "server: {tcp_max_connections: 0}\n",
        2,
        "server.tcp_max_connections: must be at least 1, got 0",
    ),
    (
        "min_prefix_v4",
        MINIMAL + "registrations: {min_prefix_v4: 33}\n",
        2,
        "registrations.min_prefix_v4: must be 0..32, got 33",
    ),
    (
        "min_prefix_v6",
        MINIMAL + "registrations: {min_prefix_v6: 129}\n",
        2,
        "registrations.min_prefix_v6: must be 0..128, got 129",
    ),
    (
        "min_prefix_negative",
        MINIMAL + "registrations: {min_prefix_v4: -1}\n",
        2,
        "registrations.min_prefix_v4: must be 0..32, got -1",
    ),
    (
        "max_per_account",
        MINIMAL + "registrations: {max_per_account: 0}\n",
        2,
        "registrations.max_per_account: must be at least 1, got 0",
    ),
    (
        "unregistered_choice",
        MINIMAL + "unregistered: ignore\n",
        2,
        'unregistered: "ignore" must be one of refuse | drop | resolve',
    ),
    ("unblock_ttl_big", MINIMAL + "unblock: {ttl: 86401}\n", 2, "unblock.ttl: must be 0..86400"),
    ("unblock_ttl_negative", MINIMAL + "unblock: {ttl: -1}\n", 2, "unblock.ttl: must be 0..86400"),
    (
        "unblock_ttl_float",
        MINIMAL + "unblock: {ttl: 1.5}\n",
        2,
        "unblock.ttl: expected an integer, got 1.5",
    ),
    (
        "upstream_timeout_zero",
        'upstream: {servers: ["1.1.1.1"], timeout: 0}\n',
        1,
        "upstream.timeout: must be more than 0 and at most 10 seconds, got 0",
    ),
    (
        "upstream_timeout_big",
        'upstream:\n  servers: ["1.1.1.1"]\n  timeout: 10.5\n',
        3,
        "upstream.timeout: must be more than 0 and at most 10 seconds, got 10.5",
    ),
    (
        "upstream_attempts_zero",
        'upstream:\n  servers: ["1.1.1.1"]\n  attempts: 0\n',
        3,
        "upstream.attempts: must be 1..10, got 0",
    ),
    (
        "upstream_attempts_big",
        'upstream:\n  servers: ["1.1.1.1"]\n  attempts: 11\n',
        3,
        "upstream.attempts: must be 1..10, got 11",
    ),
    (
        "upstream_max_qps",
        'upstream:\n  servers: ["1.1.1.1"]\n  max_qps: 0\n',
        3,
        "upstream.max_qps: must be at least 1, got 0",
    ),
    (
        "cache_max_entries",
        MINIMAL + "cache: {max_entries: 0}\n",
        2,
        "cache.max_entries: must be at least 1, got 0",
    ),
    (
        "cache_negative_ttl",
        MINIMAL + "cache: {negative_ttl: -5}\n",
        2,
        "cache.negative_ttl: must be at least 0, got -5",
    ),
    (
        "cache_min_over_max",
        MINIMAL + "cache:\n  max_ttl: 60\n  min_ttl: 61\n",
        4,
        "cache.min_ttl (61) must not be more than cache.max_ttl (60)",
    ),
    (
        "cache_min_over_default_max",
        MINIMAL + "cache:\n  min_ttl: 90000\n",
        3,
        "cache.min_ttl (90000) must not be more than cache.max_ttl (86400)",
    ),
    (
        "rate_limit_client",
        MINIMAL + "rate_limit: {client_qps: 0}\n",
        2,
        "rate_limit.client_qps: must be at least 1, got 0",
    ),
    (
        "rate_limit_refused",
        MINIMAL + "rate_limit: {refused_qps: -1}\n",
        2,
        "rate_limit.refused_qps: must be at least 1, got -1",
    ),
    (
        "sync_max_body",
        MINIMAL + "sync: {max_body: 0, token_file: sync.token}\n",
        2,
        "sync.max_body: must be at least 1",
    ),
    (
        "sync_token_empty",
        MINIMAL + 'sync: {token_file: ""}\n',
        2,
        "sync.token_file: must not be empty",
    ),
    (
        "database_path_empty",
        MINIMAL + 'database: {path: " "}\n',
        2,
        "database.path: must not be empty",
    ),
    (
        "logging_level",
        MINIMAL + "logging: {level: verbose}\n",
        2,
        'logging.level: "verbose" must be one of debug | info | warning | error',
    ),
    # regions
    (
        "region_name",
        MINIMAL + "unblock:\n  regions:\n    US: {ipv4: [192.0.2.1]}\n  zones: {US: [a.com]}\n",
        4,
        'unblock.regions.US: region name "US" may contain only a-z, 0-9',
    ),
    (
        "region_ipv4_is_ipv6",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1, '2001:db8::1']}\n"
        "  zones: {us: [a.com]}\n",
        4,
        'unblock.regions.us.ipv4[1]: "2001:db8::1" is not an IPv4 address (put it under ipv6)',
    ),
    (
        "region_ipv6_is_ipv4",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1], ipv6: [192.0.2.2]}\n"
        "  zones: {us: [a.com]}\n",
        4,
        'unblock.regions.us.ipv6[0]: "192.0.2.2" is not an IPv6 address (put it under ipv4)',
    ),
    (
        "region_prefix",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.0/24]}\n  zones: {us: [a.com]}\n",
        4,
        'unblock.regions.us.ipv4[0]: "192.0.2.0/24": must be a single address, not a prefix',
    ),
    (
        "region_bad_address",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [proxy.example]}\n  zones: {us: [a.com]}\n",
        4,
        'unblock.regions.us.ipv4[0]: "proxy.example" is not an IPv4 address',
    ),
    (
        "region_address_twice",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1, 192.0.2.1]}\n"
        "  zones: {us: [a.com]}\n",
        4,
        'unblock.regions.us.ipv4[1]: "192.0.2.1" is listed twice',
    ),
    (
        "region_without_ipv4",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv6: ['2001:db8::1']}\n  zones: {us: [a.com]}\n",
        4,
        "unblock.regions.us: no ipv4 address",
    ),
    (
        "region_empty_ipv4",
        MINIMAL + "unblock:\n  regions:\n    us:\n      ipv4: []\n  zones: {us: [a.com]}\n",
        4,
        "unblock.regions.us: no ipv4 address",
    ),
    (
        "region_not_mapping",
        MINIMAL + "unblock:\n  regions:\n    us: [192.0.2.1]\n  zones: {us: [a.com]}\n",
        4,
        "unblock.regions.us: expected a mapping, got a list",
    ),
    (
        "region_unused",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1]}\n    eu: {ipv4: [192.0.2.2]}\n"
        "  zones: {us: [a.com]}\n",
        5,
        'unblock.regions.eu: region "eu" is not used by any zone in unblock.zones',
    ),
    (
        "region_with_empty_zone_list",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1]}\n  zones: {us: []}\n",
        4,
        'unblock.regions.us: region "us" is not used by any zone',
    ),
    # zones
    (
        "zone_region_undefined",
        MINIMAL + REGIONS + "    uk: [bbc.co.uk]\n",
        7,
        'unblock.zones.uk: region "uk" is not defined in unblock.regions',
    ),
    (
        "zone_twice_in_one_region",
        MINIMAL + REGIONS.replace("[netflix.com]", "[netflix.com, NETFLIX.com.]"),
        6,
        'unblock.zones.us[1]: zone "netflix.com" is already listed at unblock.zones.us[0] (line 6)',
    ),
    (
        "zone_in_two_regions",
        MINIMAL + "unblock:\n  regions:\n    us: {ipv4: [192.0.2.1]}\n    uk: {ipv4: [192.0.2.2]}\n"
        "  zones:\n    us: [netflix.com]\n    uk:\n      - bbc.co.uk\n      - netflix.com\n",
        10,
        'unblock.zones.uk[1]: zone "netflix.com" is already listed at unblock.zones.us[0] (line 7)',
    ),
    (
        "zones_not_mapping",
        MINIMAL + "unblock:\n  zones: [netflix.com]\n",
        3,
        "unblock.zones: expected a mapping, got a list",
    ),
    (
        "zone_list_not_list",
        MINIMAL + REGIONS.replace("[netflix.com]", "netflix.com"),
        6,
        'unblock.zones.us: expected a list, got "netflix.com"',
    ),
    (
        "zone_root",
        MINIMAL + REGIONS.replace("[netflix.com]", '[a.com, "."]'),
        6,
        'unblock.zones.us[1]: ".": the root zone "." cannot be an unblock zone',
    ),
    (
        "zone_empty",
        MINIMAL + REGIONS.replace("[netflix.com]", '[a.com, ""]'),
        6,
        'unblock.zones.us[1]: "": a zone name must not be empty',
    ),
    (
        "zone_empty_label",
        MINIMAL + REGIONS.replace("netflix.com", "netflix..com"),
        6,
        'unblock.zones.us[0]: "netflix..com": empty label',
    ),
    (
        "zone_bad_character",
        MINIMAL + REGIONS.replace("[netflix.com]", '["net flix.com"]'),
        6,
        'label "net flix" may contain only letters, digits, "-" and "_"',
    ),
    (
        "zone_wildcard",
        MINIMAL + REGIONS.replace("[netflix.com]", '["*.netflix.com"]'),
        6,
        'no wildcards: a zone already covers every name under it, list "netflix.com"',
    ),
    (
        "zone_not_ascii",
        MINIMAL + REGIONS.replace("netflix.com", "bücher.de"),
        6,
        'must be ASCII; write internationalized names in their "xn--" form',
    ),
    (
        "zone_label_too_long",
        MINIMAL + REGIONS.replace("netflix.com", "a" * 64 + ".com"),
        6,
        "label of 64 characters; the limit is 63",
    ),
    (
        "zone_name_too_long",
        MINIMAL + REGIONS.replace("netflix.com", ".".join(["a" * 63] * 4)),
        6,
        "name is 255 characters long; the limit is 253",
    ),
    (
        "zone_not_string",
        MINIMAL + REGIONS.replace("[netflix.com]", "[{a: b}]"),
        6,
        "unblock.zones.us[0]: expected a string, got a mapping",
    ),
    # unblock.canary_nxdomain and registrations.max_hostnames_per_account
    (
        "canary_not_bool",
        MINIMAL + "unblock: {canary_nxdomain: 1}\n",
        2,
        "unblock.canary_nxdomain: expected true or false, got 1",
    ),
    (
        "max_hostnames_negative",
        MINIMAL + "registrations: {max_hostnames_per_account: -1}\n",
        2,
        "registrations.max_hostnames_per_account: must be at least 0, got -1",
    ),
    # ddns
    (
        "ddns_resolver_hostname",
        MINIMAL + "ddns:\n  resolvers: [dns.quad9.net]\n",
        3,
        'ddns.resolvers[0]: "dns.quad9.net": "dns.quad9.net" is not an IP address',
    ),
    (
        "ddns_resolvers_empty",
        MINIMAL + "ddns: {resolvers: []}\n",
        2,
        "ddns.resolvers: must list at least one address",
    ),
    ("ddns_min_ttl_zero", MINIMAL + "ddns: {min_ttl: 0}\n", 2, "ddns.min_ttl: must be at least 1"),
    (
        "ddns_min_above_max",
        MINIMAL + "ddns:\n  max_ttl: 20\n",
        3,
        "ddns.min_ttl (30) must not be more than ddns.max_ttl (20)",
    ),
    (
        "ddns_min_above_default_max",
        MINIMAL + "ddns:\n  min_ttl: 600\n",
        3,
        "ddns.min_ttl (600) must not be more than ddns.max_ttl (300)",
    ),
    ("ddns_grace_negative", MINIMAL + "ddns: {grace: -1}\n", 2, "ddns.grace: must be at least 0"),
    (
        "ddns_concurrency_zero",
        MINIMAL + "ddns: {max_concurrent: 0}\n",
        2,
        "ddns.max_concurrent: must be at least 1",
    ),
    # feed
    (
        "feed_without_servers",
        MINIMAL + "feed:\n  bucket: b\n",
        2,
        "feed.servers is required: a list of nats:// or tls:// server URLs",
    ),
    ("feed_servers_empty", MINIMAL + "feed: {servers: []}\n", 2, "must list at least one server"),
    (
        "feed_server_scheme",
        MINIMAL + 'feed:\n  servers: ["http://127.0.0.1:4222"]\n',
        3,
        'feed.servers[0]: "http://127.0.0.1:4222": must start with nats:// or tls://',
    ),
    (
        "feed_server_bare",
        MINIMAL + "feed: {servers: [127.0.0.1]}\n",
        2,
        '"127.0.0.1": must start with nats:// or tls://',
    ),
    (
        "feed_server_password",
        MINIMAL + 'feed: {servers: ["nats://me:s3cret@127.0.0.1"]}\n',
        2,
        "no user or password in the URL; put them in feed.credentials_file",
    ),
    (
        "feed_server_bad_port",
        MINIMAL + 'feed: {servers: ["nats://127.0.0.1:99999"]}\n',
        2,
        'feed.servers[0]: "nats://127.0.0.1:99999": port must be a number 1..65535',
    ),
    (
        "feed_server_port_zero",
        MINIMAL + 'feed: {servers: ["nats://127.0.0.1:0"]}\n',
        2,
        "port must be a number 1..65535",
    ),
    (
        "feed_server_unclosed_bracket",
        MINIMAL + 'feed: {servers: ["nats://[::1:4222"]}\n',
        2,
        "expected nats://HOST:PORT (IPv6 in brackets)",
    ),
    (
        "feed_server_bad_host",
        MINIMAL + 'feed: {servers: ["nats://bad_host:4222"]}\n',
        2,
        "expected nats://HOST:PORT (IPv6 in brackets)",
    ),
    (
        "feed_server_path",
        MINIMAL + 'feed: {servers: ["nats://127.0.0.1:4222/x?y"]}\n',
        2,
        "nothing may follow HOST:PORT",
    ),
    (
        "feed_server_twice",
        MINIMAL + 'feed:\n  servers: ["nats://a:1",\n    "nats://a:1"]\n',
        4,
        'feed.servers[1]: "nats://a:1" is listed twice (also feed.servers[0])',
    ),
    (
        "feed_bucket_dot",
        MINIMAL + 'feed: {servers: ["nats://a"], bucket: a.b}\n',
        2,
        'feed.bucket: "a.b": a bucket name may contain only A-Z, a-z, 0-9, "-" and "_"',
    ),
    (
        "feed_replicas_six",
        MINIMAL + 'feed: {servers: ["nats://a"], replicas: 6}\n',
        2,
        "feed.replicas: must be 1..5, got 6",
    ),
    (
        "feed_refresher_word",
        MINIMAL + 'feed: {servers: ["nats://a"], refresher: on_}\n',
        2,
        "feed.refresher: expected true or false",
    ),
    (
        "feed_ca_missing",
        MINIMAL + 'feed: {servers: ["nats://a"], tls_ca_file: no-such-ca.pem}\n',
        2,
        "no-such-ca.pem: file does not exist",
    ),
    (
        "feed_unknown_key",
        MINIMAL + 'feed: {servers: ["nats://a"], replica: 3}\n',
        2,
        'unknown key "replica" in feed (did you mean "replicas"?)',
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_problem_is_reported_with_path_and_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    prefix = f"{path}:{line}: "
    assert problems[0].startswith(prefix), problems
    assert fragment in problems[0].removeprefix(prefix), problems


def test_case_ids_are_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


def test_every_problem_in_a_file_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = """\
        server:
          listen: ["0.0.0.0:53", "[::]:99999"]
          workers: 0
          colour: blue
        unblock:
          regions:
            us: {ipv4: [198.51.100.10]}
            eu: {ipv4: [198.51.100.20]}
          zones:
            us: [netflix.com]
            uk: [bbc.co.uk, netflix.com]
        upstream:
          servers: ["dns.google"]
          attempts: 0
        logging: {level: loud}
    """
    path = write(tmp_path, text)
    problems = problems_of(path)
    expected = [
        (2, 'server.listen[1]: "[::]:99999": port must be 1..65535'),
        (3, "server.workers: expected a positive integer"),
        (4, 'unknown key "colour" in server'),
        (8, 'region "eu" is not used by any zone'),
        (11, 'region "uk" is not defined in unblock.regions'),
        (11, 'unblock.zones.uk[1]: zone "netflix.com" is already listed'),
        (13, "hostnames are not accepted"),
        (14, "upstream.attempts: must be 1..10"),
        (15, 'logging.level: "loud" must be one of'),
    ]
    assert len(problems) == len(expected), problems
    for problem, (line, fragment) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}:{line}: "), problem
        assert fragment in problem, problem


# --- files that cannot be read or parsed: one "PATH: message" without a line ------------------


def assert_single_unlined_problem(path: Path, fragment: str) -> None:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems
    assert fragment in problems[0], problems


def test_missing_file(tmp_path: Path) -> None:
    assert_single_unlined_problem(tmp_path / "nope.yaml", "cannot read the file")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert_single_unlined_problem(tmp_path, "cannot read the file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0)
    try:
        assert_single_unlined_problem(path, "Permission denied")
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("upstream: {servers: [1.1.1.1]\n", "invalid YAML at line 2"),
        ("upstream:\n  servers: [1.1.1.1]\n bad: indent\n", "invalid YAML at line 3"),
        ("upstream: *nowhere\n", "invalid YAML at line 1"),
        (MINIMAL + "---\n" + MINIMAL, "invalid YAML at line 2"),
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- 1.1.1.1\n", "the top level must be a mapping of sections, got a list"),
        ("just text\n", 'the top level must be a mapping of sections, got "just text"'),
    ],
    ids=[
        "unclosed_flow",
        "bad_indent",
        "undefined_alias",
        "two_documents",
        "empty",
        "only_comment",
        "top_level_list",
        "top_level_scalar",
    ],
)
def test_unparseable_file(tmp_path: Path, text: str, fragment: str) -> None:
    assert_single_unlined_problem(write(tmp_path, text, token=False), fragment)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"upstream: {servers: [1.1.1.1]}\n# caf\xe9\n")
    assert_single_unlined_problem(path, "not UTF-8")


# --- the sync token file: read at load, a problem like any other -------------------------------


def test_token_is_read_stripped_and_redacted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.sync.token == Secret(TOKEN.encode())
    for shown in (repr(config), str(config.sync), repr(config.sync.token), str(config.sync.token)):
        assert TOKEN not in shown and TOKEN[:8] not in shown
    assert repr(config.sync.token) == "Secret(<redacted>)"


@pytest.mark.parametrize(
    ("content", "mode", "fragment"),
    [
        (None, 0o600, "file does not exist; create it"),
        ("", 0o600, "file is empty"),
        ("\n  \n", 0o600, "file is empty"),
        (TOKEN + "\n", 0o644, "file is readable by other users (chmod 600)"),
        (TOKEN + "\n", 0o640, "file is readable by other users (chmod 600)"),
        (TOKEN + "\n", 0o604, "file is readable by other users (chmod 600)"),
        (TOKEN + "\n", 0o620, "file is accessible by other users (chmod 600)"),
        ("secret words that are long\n", 0o600, "one line of printable ASCII without spaces"),
        (TOKEN + "\n" + TOKEN + "\n", 0o600, "one line of printable ASCII without spaces"),
        ("x" * 5000, 0o600, "one line of printable ASCII without spaces"),
        ("short\n", 0o600, "the token is too short"),
    ],
    ids=[
        "missing",
        "empty",
        "blank",
        "world_readable",
        "group_readable",
        "other_readable",
        "group_writable",
        "spaces",
        "two_lines",
        "huge",
        "too_short",
    ],
)
def test_bad_token_file_is_a_problem_on_its_line(
    tmp_path: Path, content: str | None, mode: int, fragment: str
) -> None:
    path = write(tmp_path, MINIMAL + "server: {workers: 1}\nsync:\n  token_file: secret/token\n")
    token_file = (tmp_path / "secret" / "token").resolve()
    if content is not None:
        write_token(token_file, content, mode)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:4: sync.token_file: {token_file}: "), problems
    assert fragment in problems[0]
    assert "secret words" not in problems[0] and TOKEN not in problems[0]


def test_token_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.token").mkdir(mode=0o700)
    path = write(tmp_path, MINIMAL + "sync: {token_file: dir.token}\n")
    assert problems_of(path) == [
        f"{path}:2: sync.token_file: {tmp_path}/dir.token: not a regular file"
    ]


def test_default_token_file_is_checked_when_sync_is_left_out(tmp_path: Path) -> None:
    if Path("/etc/smartdns/sync.token").exists():
        pytest.skip("this machine has a real /etc/smartdns/sync.token")
    path = write(tmp_path, MINIMAL, token=False)
    assert problems_of(path) == [
        f"{path}:1: sync.token_file: /etc/smartdns/sync.token: file does not exist; create it: "
        "one line holding the bearer token, mode 600, e.g. (umask 077 && python3 -c "
        "'import secrets; print(secrets.token_hex(32))' > FILE)"
    ]


def test_token_problem_is_reported_with_the_others(tmp_path: Path) -> None:
    if Path("/etc/smartdns/sync.token").exists():
        pytest.skip("this machine has a real /etc/smartdns/sync.token")
    path = write(tmp_path, MINIMAL + "server: {workers: 0}\nsync: {max_body: 1}\n", token=False)
    problems = problems_of(path)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:2: server.workers")
    assert problems[1].startswith(f"{path}:3: sync.token_file: /etc/smartdns/sync.token: ")


# --- the feed's files: checked at load like the token file --------------------------------------


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        (None, "file does not exist"),
        (0o644, "file is readable by other users (chmod 600)"),
        (0o620, "file is accessible by other users (chmod 600)"),
    ],
    ids=["missing", "world_readable", "group_writable"],
)
def test_bad_credentials_file_is_a_problem_on_its_line(
    tmp_path: Path, mode: int | None, fragment: str
) -> None:
    creds = tmp_path / "nats.creds"
    if mode is not None:
        write_token(creds, mode=mode)
    text = MINIMAL + 'feed:\n  servers: ["nats://127.0.0.1"]\n  credentials_file: nats.creds\n'
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}:4: feed.credentials_file: {creds}: {fragment}"]


def test_ca_file_may_be_world_readable_but_must_be_a_file(tmp_path: Path) -> None:
    write_token(tmp_path / "ca.pem", mode=0o644)
    (tmp_path / "ca.dir").mkdir()
    text = MINIMAL + 'feed: {servers: ["tls://127.0.0.1"], tls_ca_file: CA}\n'
    config = load_config(write(tmp_path, text.replace("CA", "ca.pem")))
    assert config.feed is not None and config.feed.tls_ca_file == tmp_path / "ca.pem"
    path = write(tmp_path, text.replace("CA", "ca.dir"))
    assert problems_of(path) == [
        f"{path}:2: feed.tls_ca_file: {tmp_path}/ca.dir: not a regular file"
    ]


# --- encrypted ---------------------------------------------------------------------------------


TLS_NAMES = ("dns.example.net", "*.dns.example.net", "203.0.113.53", "2001:db8::53")


def tls_files(tmp_path: Path, key_mode: int = 0o600, names: tuple[str, ...] = TLS_NAMES) -> None:
    """cert.pem and key.pem beside the config: a pair for `names` from a throwaway CA."""
    write_pair(tmp_path, names)
    (tmp_path / "key.pem").chmod(key_mode)


ENCRYPTED = (
    "encrypted:\n  server_name: Dns.Example.NET.\n  cert_file: cert.pem\n  key_file: key.pem\n"
)


def test_encrypted_defaults_and_forms(tmp_path: Path) -> None:
    tls_files(tmp_path)
    config = load_config(write(tmp_path, MINIMAL + ENCRYPTED))
    assert ", encrypted=dot+doh, feed=off" in describe(config)
    assert config.encrypted == EncryptedConfig(
        server_name="dns.example.net",
        cert_file=tmp_path / "cert.pem",
        key_file=tmp_path / "key.pem",
        dot_listen=(HostPort("0.0.0.0", 853), HostPort("::", 853)),
        doh_listen=(HostPort("0.0.0.0", 443), HostPort("::", 443)),
        max_connections=10_000,
        handshake_timeout=5.0,
        ddr=False,
        ddr_addresses=(),
        not_after=config.encrypted.not_after if config.encrypted else None,
    )
    assert config.encrypted is not None and config.encrypted.not_after is not None
    text = ENCRYPTED + (
        '  dot_listen: ["127.0.0.1", "[::1]:8853"]\n  doh_listen: []\n  max_connections: 3\n'
        '  handshake_timeout: 0.5\n  ddr: true\n  ddr_addresses: ["203.0.113.53", "2001:db8::53"]\n'
    )
    config = load_config(write(tmp_path, MINIMAL + text))
    assert config.encrypted is not None
    assert config.encrypted.dot_listen == (HostPort("127.0.0.1", 853), HostPort("::1", 8853))
    assert config.encrypted.doh_listen == ()
    assert (config.encrypted.max_connections, config.encrypted.handshake_timeout) == (3, 0.5)
    assert config.encrypted.ddr is True
    assert ", encrypted=dot, feed=off" in describe(config)
    assert config.encrypted.ddr_addresses == (
        ipaddress.ip_address("203.0.113.53"),
        ipaddress.ip_address("2001:db8::53"),
    )


def test_encrypted_is_off_when_absent_or_empty(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).encrypted is None
    assert load_config(write(tmp_path, MINIMAL + "encrypted:\n")).encrypted is None


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        ("encrypted: {ddr: true}\n", 2, "encrypted.server_name is required"),
        ("encrypted: {ddr: true}\n", 2, "encrypted.cert_file is required"),
        ("encrypted: {ddr: true}\n", 2, "encrypted.key_file is required"),
        ("encrypted: {ddr: true}\n", 2, "encrypted.ddr_addresses: ddr is true, so list"),
        (ENCRYPTED + "  dot_listen: []\n  doh_listen: []\n", 6, "both empty"),
        (ENCRYPTED.replace("Dns.Example.NET.", "localhost"), 3, "expected a host name"),
        (ENCRYPTED.replace("Dns.Example.NET.", "192.0.2.1"), 3, "an IP address is no server"),
        (ENCRYPTED.replace("Dns.Example.NET.", "a_b.example"), 3, "expected a host name"),
        (
            ENCRYPTED.replace("Dns.Example.NET.", "a" * 63 + "." + "b" * 63 + "." + "c" * 63),
            3,
            "leaves room for a device ID label",
        ),
        (ENCRYPTED.replace("cert.pem", "none.pem"), 4, "none.pem: file does not exist"),
        (ENCRYPTED + "  dot_listen: [127.0.0.1:99999]\n", 6, "port must be 1..65535"),
        (ENCRYPTED + "  max_connections: 0\n", 6, "encrypted.max_connections: must be at"),
        (ENCRYPTED + "  handshake_timeout: 61\n", 6, "and at most 60 seconds"),
        (ENCRYPTED + "  ddr_addresses: [203.0.113.0/24]\n", 6, "is not an IP address"),
        (ENCRYPTED + '  ddr_addresses: ["::1", "0::1"]\n', 6, "is listed twice"),
        (ENCRYPTED + "  dot: []\n", 6, 'unknown key "dot" in encrypted'),
    ],
)
def test_encrypted_problems(tmp_path: Path, extra: str, line: int, message: str) -> None:
    tls_files(tmp_path)
    path = write(tmp_path, MINIMAL + extra)
    found = [problem for problem in problems_of(path) if message in problem]
    assert found, problems_of(path)
    assert found[0].startswith(f"{path}:{line}: "), found


def test_encrypted_key_must_be_owner_only(tmp_path: Path) -> None:
    tls_files(tmp_path, key_mode=0o640)
    path = write(tmp_path, MINIMAL + ENCRYPTED)
    assert problems_of(path) == [
        f"{path}:5: encrypted.key_file: {tmp_path}/key.pem: file is readable by other users "
        "(chmod 600)"
    ]


@pytest.mark.parametrize(
    ("names", "extra", "message"),
    [
        (("dns.example.net",), "", "does not cover *.dns.example.net"),
        (("*.dns.example.net",), "", "does not cover dns.example.net"),
        (("*.example.net", "dns.example.net"), "", "does not cover *.dns.example.net"),
        (("*.example.net",), "", "does not cover *.dns.example.net"),
        (
            ("dns.example.net", "*.dns.example.net"),
            '  ddr: true\n  ddr_addresses: ["203.0.113.53"]\n',
            "does not cover 203.0.113.53",
        ),
    ],
)
def test_certificate_must_cover_the_names(
    tmp_path: Path, names: tuple[str, ...], extra: str, message: str
) -> None:
    tls_files(tmp_path, names=names)
    path = write(tmp_path, MINIMAL + ENCRYPTED + extra)
    assert problems_of(path) == [
        f"{path}:4: encrypted.cert_file: {tmp_path}/cert.pem: the certificate {message}"
    ]


def test_a_wildcard_one_label_up_covers_the_server_name(tmp_path: Path) -> None:
    tls_files(tmp_path, names=("*.example.net", "*.dns.example.net"))
    assert load_config(write(tmp_path, MINIMAL + ENCRYPTED)).encrypted is not None


def test_key_of_another_certificate_and_garbage(tmp_path: Path) -> None:
    tls_files(tmp_path)
    write_pair(tmp_path, TLS_NAMES, stem="other-")
    path = write(tmp_path, MINIMAL + ENCRYPTED.replace("key.pem", "other-key.pem"))
    assert problems_of(path) == [
        f"{path}:4: encrypted.cert_file: {tmp_path}/cert.pem: key_file is not the key of the "
        "certificate (the first one in cert_file: the leaf comes first, then the chain)"
    ]
    (tmp_path / "other-key.pem").write_text("not a key\n")
    assert problems_of(path)[0].endswith("key_file holds no PEM private key smartdns can use")
    path = write(tmp_path, MINIMAL + ENCRYPTED.replace("cert.pem", "other-key.pem"))
    assert problems_of(path)[0].endswith("cert_file holds no PEM certificate")


def test_the_registrations_cli_skips_the_certificate(tmp_path: Path) -> None:
    tls_files(tmp_path, names=("other.test",))
    path = write(tmp_path, MINIMAL + ENCRYPTED)
    assert problems_of(path)
    config = load_config(path, certificates=False)
    assert config.encrypted is not None and config.encrypted.not_after is None


def test_expiry_warning_within_14_days(tmp_path: Path) -> None:
    tls_files(tmp_path)
    config = load_config(write(tmp_path, MINIMAL + ENCRYPTED))
    assert config.encrypted is not None and config.encrypted.not_after is not None
    not_after = config.encrypted.not_after
    assert warnings(config, not_after - 15 * 86_400) == []
    [warning] = warnings(config, not_after - 13.5 * 86_400)
    assert warning.startswith(f"{config.path}: warning: encrypted.cert_file: {tmp_path}/cert.pem:")
    assert "expires in 13.5 days" in warning
    assert "expired on" in warnings(config, not_after + 1)[0]
    assert warnings(load_config(write(tmp_path, MINIMAL)), not_after) == []


def test_production_example_encrypted_block_loads_when_turned_on(tmp_path: Path) -> None:
    tls_files(tmp_path)
    text = production_example(tmp_path).read_text(encoding="utf-8")
    start = text.index("# encrypted:\n")
    end = text.index("\n\n", start)
    block = "\n".join(line.removeprefix("# ") for line in text[start:end].split("\n"))
    text = text[:start] + block + text[end:]
    text = text.replace("/etc/smartdns/tls/fullchain.pem", str(tmp_path / "cert.pem"))
    text = text.replace("/etc/smartdns/tls/privkey.pem", str(tmp_path / "key.pem"))
    path = tmp_path / "smartdns.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    assert config.encrypted is not None
    assert config.encrypted == dataclasses.replace(
        EncryptedConfig(),
        server_name="dns.example.net",
        cert_file=tmp_path / "cert.pem",
        key_file=tmp_path / "key.pem",
        not_after=config.encrypted.not_after,
    )


# --- the section registry ------------------------------------------------------------------------


def test_every_config_field_is_one_registered_section() -> None:
    # A section is added in one place: a Config field without its SECTIONS entry (or the
    # reverse) would be silently ignored or rejected as an unknown key.
    names = [section.name for section in SECTIONS]
    assert len(names) == len(set(names))
    assert set(names) == {field.name for field in dataclasses.fields(Config)} - {"path"}
