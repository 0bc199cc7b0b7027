"""The servers under test, each configured for the same job on loopback:

- 127.0.0.1 (registered) gets the region proxies for names in the unblock zones (A, TTL 60)
  and forwarded, cached answers for every other name;
- 127.0.0.2 (unregistered) gets REFUSED.

smartdns, Unbound and dnsdist do the whole job; dnsmasq has no per-source ACL, so it runs
cases (a) and (b) only. Every server listens on 127.0.0.1 only, on its own free port, with
one thread or worker unless `workers` says otherwise.

Given `tls` (one throwaway certificate for all), smartdns, Unbound and dnsdist also serve DNS
over TLS and DNS over HTTPS (`/dns-query`) on two more free ports; dnsmasq has neither.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final

from bench.tools import (
    DOH_PATH,
    READY_TIMEOUT_S,
    REGIONS,
    REGISTERED,
    REPO,
    SERVER_NAME,
    TRANSPORTS,
    UNBLOCK_TTL,
    UNREGISTERED,
    UPSTREAM_TTL,
    ZONES,
    Children,
    TlsFiles,
    descendants,
    log,
    pinned,
    python_env,
    upstream_address,
    upstream_names,
    wait_accepting,
    wait_answering,
)
from tests.ports import free_port

PROBE_NAME: Final = "probe.netflix.com"  # answered locally by every server
UNBOUND_OUTGOING_RANGE: Final = 512
PROBE_UPSTREAM: Final = upstream_names(1)[0] + "."  # dnsdist's backend health check


@dataclass
class Upstream:
    """The upstream for the case (b) names: bench/upstream.py (the project's FakeUpstream,
    dnslib, a few thousand answers a second) in its own process."""

    names: int
    cpus: str | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    kind: ClassVar[str] = "fake"

    def start(self, workdir: Path, children: Children) -> Upstream:
        port_file = workdir / "upstream.port"
        command = [sys.executable, str(Path(__file__).with_name("upstream.py"))]
        command += ["--names", str(self.names), "--port-file", str(port_file)]
        self.process = children.start(
            pinned(self.cpus, command), workdir / "upstream.log", env=python_env()
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "upstream.log").read_text(errors="replace")
                raise RuntimeError(f"fake upstream did not start:\n{log}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self


@dataclass
class UnboundUpstream(Upstream):
    """A second Unbound serving the case (b) names as authoritative local data: fast enough
    that a server without a cache is measured forwarding, not waiting for dnslib."""

    kind: ClassVar[str] = "unbound"

    def start(self, workdir: Path, children: Children) -> Upstream:
        self.port = free_port()
        config = workdir / "upstream-unbound.conf"
        names = upstream_names(self.names)
        zone = names[0].split(".", 1)[1]
        lines = [
            "server:",
            "  interface: 127.0.0.1",
            f"  port: {self.port}",
            "  num-threads: 1",
            "  do-ip6: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{workdir}"',
            '  pidfile: ""',
            "  use-syslog: no",
            '  logfile: ""',
            "  verbosity: 0",
            '  module-config: "iterator"',
            "  access-control: 127.0.0.0/8 allow",
            "  so-rcvbuf: 4m",
            "  so-sndbuf: 4m",
            '  local-zone: "." static',  # nothing leaves the machine: other names NXDOMAIN
            f'  local-zone: "{zone}." static',
        ]
        lines += [
            f'  local-data: "{name}. {UPSTREAM_TTL} IN A {upstream_address(index)}"'
            for index, name in enumerate(names)
        ]
        config.write_text("\n".join(lines) + "\n")
        log_path = workdir / "upstream.log"
        self.process = children.start(
            pinned(self.cpus, ["unbound", "-d", "-c", str(config)]), log_path
        )
        try:
            wait_answering(self.port, self.process, names[0])
        except RuntimeError as error:
            raise RuntimeError(f"upstream unbound: {error}\n{log_path.read_text()}") from None
        return self


UPSTREAMS: Final[dict[str, type[Upstream]]] = {cls.kind: cls for cls in (Upstream, UnboundUpstream)}


@dataclass
class Target:
    """One server under test. Subclasses write the config and the command line."""

    workdir: Path
    workers: int = 1
    cpus: str | None = "0"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls: TlsFiles | None = None  # serve DoT and DoH too, with this certificate
    dot_port: int = field(default_factory=free_port)
    doh_port: int = field(default_factory=free_port)
    # TCP, DoT and DoH connections the server must hold open at once, and how long an idle one
    # may stay (the idle-connection benchmark raises both; the defaults are smartdns').
    connections: int = 1024
    idle_timeout_s: float = 10.0
    # What to listen on. Plain DNS stays on where the server needs it anyway (keeps_udp).
    serve: tuple[str, ...] = TRANSPORTS

    name: ClassVar[str] = ""
    refuses_unregistered: ClassVar[bool] = True  # can be configured for case (c)
    encrypted: ClassVar[bool] = True  # can serve DoT and DoH
    keeps_udp: ClassVar[bool] = True  # listens on UDP and TCP whatever `serve` says

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def transports(self) -> tuple[str, ...]:
        """The transports this server answers on in this run."""
        served = {*self.serve, *(("udp",) if self.keeps_udp else ())}
        encrypted = self.encrypted and self.tls is not None
        return tuple(t for t in TRANSPORTS if t in served and (t == "udp" or encrypted))

    def port_for(self, transport: str) -> int:
        return {"udp": self.port, "dot": self.dot_port, "doh": self.doh_port}[transport]

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self, upstream_port: int) -> list[str]:
        raise NotImplementedError

    def start(self, children: Children, upstream_port: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = children.start(pinned(self.cpus, self.command(upstream_port)), self.log_path)
        self.wait_ready()

    def wait_ready(self) -> None:
        assert self.process is not None
        try:
            for transport in self.transports:
                if transport == "udp":
                    wait_answering(self.port, self.process, PROBE_NAME)
                else:
                    wait_accepting(self.port_for(transport), self.process)
        except RuntimeError as error:
            raise RuntimeError(f"{self.name}: {error}\n{self.output()}") from None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@dataclass
class Smartdns(Target):
    """`python -m smartdns serve` with a temporary config and database, as tests/e2e does.

    Rate limits are raised out of the way: one benchmark source address would otherwise be
    capped at `client_qps`, and the peers are not rate-limited either.
    """

    name: ClassVar[str] = "smartdns"
    database: Path | None = None  # a prepared database; None: a new one with 127.0.0.1
    source: Path = REPO  # the tree whose smartdns package runs
    registered: tuple[str, ...] = (REGISTERED,)  # the entries of the account `bench`
    start_seconds: float = 0.0  # process start to READY=1

    def config(self, upstream_port: int) -> dict[str, object]:
        token = self.workdir / "sync.token"
        token.write_text(secrets.token_hex(16) + "\n")
        token.chmod(0o600)
        config: dict[str, object] = {
            "server": {
                "listen": [f"127.0.0.1:{self.port}"],
                "workers": self.workers,
                "tcp_idle_timeout": self.idle_timeout_s,
                "tcp_max_connections": self.connections,
            },
            "database": {"path": str(self.database or self.workdir / "registrations.db")},
            "registrations": {"public_only": False},
            "unregistered": "refuse",
            "unblock": {
                "ttl": UNBLOCK_TTL,
                "regions": {
                    region: {"ipv4": list(addresses), "ipv6": []}
                    for region, addresses in REGIONS.items()
                },
                "zones": {
                    region: [zone for zone, owner in ZONES.items() if owner == region]
                    for region in REGIONS
                },
            },
            "upstream": {
                "servers": [f"127.0.0.1:{upstream_port}"],
                "timeout": 1.0,
                "attempts": 2,
                "max_qps": 1_000_000,
            },
            "cache": {"max_entries": 100_000},
            "rate_limit": {"client_qps": 100_000_000, "refused_qps": 100_000_000},
            "sync": {"listen": f"127.0.0.1:{free_port()}", "token_file": str(token)},
            "logging": {"level": "warning"},
        }
        if self.tls and set(self.transports) - {"udp"}:
            config["encrypted"] = {
                "server_name": SERVER_NAME,
                "cert_file": str(self.tls.cert),
                "key_file": str(self.tls.key),
                "dot_listen": [f"127.0.0.1:{self.dot_port}"] if "dot" in self.transports else [],
                "doh_listen": [f"127.0.0.1:{self.doh_port}"] if "doh" in self.transports else [],
                "max_connections": self.connections,
            }
        return config

    @property
    def transports(self) -> tuple[str, ...]:
        """UDP only when the measured tree predates the `encrypted` section (an older --ref)."""
        model = self.source / "smartdns" / "config" / "model.py"
        if "class EncryptedConfig" not in model.read_text():
            return ("udp",)
        return super().transports

    def command(self, upstream_port: int) -> list[str]:
        return [sys.executable, "-m", "smartdns", "serve", "--config", str(self.config_path)]

    @property
    def config_path(self) -> Path:
        return self.workdir / "smartdns.yaml"

    def start(self, children: Children, upstream_port: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no yaml import needed here.
        self.config_path.write_text(json.dumps(self.config(upstream_port), indent=2))
        if self.database is None:
            result = subprocess.run(
                [
                    *(sys.executable, "-m", "smartdns", "registrations", "add", "bench"),
                    *(*self.registered, "--config", str(self.config_path)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env=python_env(self.source),
                cwd=str(self.workdir),  # `-m` looks in the working directory first
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"smartdns registrations add failed: {result.stderr}")
        notify_path = self.workdir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            started = time.monotonic()
            self.process = children.start(
                pinned(self.cpus, self.command(upstream_port)),
                self.log_path,
                env=python_env(self.source) | {"NOTIFY_SOCKET": str(notify_path)},
                cwd=str(self.workdir),
            )
            self._wait_notification(notify, "READY=1")
            self.start_seconds = time.monotonic() - started
        self.wait_ready()

    def _wait_notification(self, notify: socket.socket, state: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S * 3  # a million entries take a while
        seen: list[str] = []
        while state not in seen:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smartdns: no {state}\n{self.output()}")
            notify.settimeout(0.5)
            try:
                seen.extend(notify.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue

    def serving_processes(self) -> int:
        """How many smartdns processes hold the listening port (workers actually running)."""
        count = 0
        for pid in descendants(self.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"smartdns" in cmdline or b"python" in cmdline:
                count += 1
        return count


@dataclass
class Unbound(Target):
    """Unbound: access-control, local-zone redirect per unblock zone, forward-zone "."."""

    name: ClassVar[str] = "unbound"
    # Unbound wants file descriptors for incoming-num-tcp on every interface: the
    # idle-connection benchmark listens on DoT alone.
    keeps_udp: ClassVar[bool] = False

    def command(self, upstream_port: int) -> list[str]:
        config = self.workdir / "unbound.conf"
        lines = [
            "server:",
            *(["  interface: 127.0.0.1"] if "udp" in self.transports else []),
            f"  port: {self.port}",
            *self.tls_lines(),
            f"  num-threads: {self.workers}",
            f"  so-reuseport: {'yes' if self.workers > 1 else 'no'}",
            "  do-ip6: no",
            "  do-tcp: yes",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.workdir}"',
            '  pidfile: ""',
            "  use-syslog: no",
            '  logfile: ""',
            "  verbosity: 0",
            '  module-config: "iterator"',  # no DNSSEC validation: the fake upstream is unsigned
            "  do-not-query-localhost: no",  # the upstream is on loopback
            "  msg-cache-size: 64m",
            "  rrset-cache-size: 128m",
            "  num-queries-per-thread: 4096",
            "  so-rcvbuf: 4m",
            "  so-sndbuf: 4m",
            "  prefetch: no",
            "  minimal-responses: yes",
            "  access-control: 127.0.0.1/32 allow",
            "  access-control: 127.0.0.2/32 refuse",
            # Per interface. A connection accepted while more than half of these are in use
            # gets 1/100 of the idle timeout (1/500 above 65%, 200 ms above 80%): twice the
            # connections it must hold.
            f"  incoming-num-tcp: {2 * self.connections + 10}",
            f"  tcp-idle-timeout: {int(self.idle_timeout_s * 1000)}",
            f"  outgoing-range: {UNBOUND_OUTGOING_RANGE}",  # file descriptors: one upstream
        ]
        for zone, region in ZONES.items():
            lines.append(f'  local-zone: "{zone}." redirect')
            lines += [
                f'  local-data: "{zone}. {UNBLOCK_TTL} IN A {address}"'
                for address in REGIONS[region]
            ]
        lines += ["forward-zone:", '  name: "."', f"  forward-addr: 127.0.0.1@{upstream_port}"]
        config.write_text("\n".join(lines) + "\n")
        return ["unbound", "-d", "-c", str(config)]

    def tls_lines(self) -> list[str]:
        """DoT on `tls-port`, DoH (HTTP/2 only in Unbound) on `https-port`, each its own
        interface line; Debian's Unbound is built with nghttp2."""
        if not self.tls:
            return []
        lines = [
            f"  tls-port: {self.dot_port}",
            f"  https-port: {self.doh_port}",
            f'  tls-service-key: "{self.tls.key}"',
            f'  tls-service-pem: "{self.tls.cert}"',
            f'  http-endpoint: "{DOH_PATH}"',
        ]
        return lines + [
            f"  interface: 127.0.0.1@{self.port_for(transport)}"
            for transport in self.transports
            if transport != "udp"
        ]


@dataclass
class Dnsdist(Target):
    """dnsdist: REFUSED for 127.0.0.2, SpoofAction per region's zones, packet cache, the
    upstream as the only backend."""

    name: ClassVar[str] = "dnsdist"

    def command(self, upstream_port: int) -> list[str]:
        config = self.workdir / "dnsdist.conf"
        lines = [
            f'setLocal("127.0.0.1:{self.port}", {{reusePort={str(self.workers > 1).lower()}}})',
            *(
                f'addLocal("127.0.0.1:{self.port}", {{reusePort=true}})'
                for _ in range(self.workers - 1)
            ),
            *self.tls_lines(),
            'setACL({"127.0.0.0/8"})',  # let 127.0.0.2 in, so the rule below can refuse it
            # An idle TCP or DoT connection is closed after this (dnsdist's default: 2 s).
            f"setTCPRecvTimeout({max(1, round(self.idle_timeout_s))})",
            "setSecurityPollSuffix('')",
            f'newServer({{address="127.0.0.1:{upstream_port}", checkName="{PROBE_UPSTREAM}",'
            " checkInterval=60})",
            "pc = newPacketCache(200000, {maxTTL=86400, minTTL=0})",
            'getPool(""):setCache(pc)',
            f'addAction(makeRule("{UNREGISTERED}/32"), RCodeAction(DNSRCode.REFUSED))',
        ]
        for region, addresses in REGIONS.items():
            zones = ", ".join(f'"{zone}."' for zone, owner in ZONES.items() if owner == region)
            targets = ", ".join(f'"{address}"' for address in addresses)
            lines.append(
                f"smn_{region} = newSuffixMatchNode(); smn_{region}:add({{{zones}}})\n"
                f"addAction(AndRule({{QTypeRule(DNSQType.A), SuffixMatchNodeRule(smn_{region})}}),"
                f" SpoofAction({{{targets}}}, {{ttl={UNBLOCK_TTL}}}))"
            )
        config.write_text("\n".join(lines) + "\n")
        return ["dnsdist", "--supervised", "--disable-syslog", "-C", str(config)]

    def tls_lines(self) -> list[str]:
        """`addTLSLocal` (OpenSSL) and `addDOHLocal` (HTTP/1.1 and HTTP/2), one of each per
        worker like the UDP listener."""
        if not self.tls:
            return []
        files = f'"{self.tls.cert}", "{self.tls.key}"'
        reuse = f"reusePort={str(self.workers > 1).lower()}"
        dot = f'addTLSLocal("127.0.0.1:{self.dot_port}", {files}, {{{reuse}}})'
        doh = f'addDOHLocal("127.0.0.1:{self.doh_port}", {files}, "{DOH_PATH}", {{{reuse}}})'
        chosen = [line for t, line in (("dot", dot), ("doh", doh)) if t in self.transports]
        return chosen * self.workers


@dataclass
class Dnsmasq(Target):
    """dnsmasq: address=/zone/proxy per unblock zone, the upstream as server, a cache.
    No per-source ACL that answers REFUSED, so no case (c)."""

    name: ClassVar[str] = "dnsmasq"
    refuses_unregistered: ClassVar[bool] = False
    encrypted: ClassVar[bool] = False

    def command(self, upstream_port: int) -> list[str]:
        config = self.workdir / "dnsmasq.conf"
        lines = [
            f"port={self.port}",
            "listen-address=127.0.0.1",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "no-negcache",
            f"server=127.0.0.1#{upstream_port}",
            "cache-size=10000",
            "dns-forward-max=4096",
            "local-ttl=60",
            "user=root",
            "pid-file=",
        ]
        for zone, region in ZONES.items():
            lines += [f"address=/{zone}/{address}" for address in REGIONS[region]]
        config.write_text("\n".join(lines) + "\n")
        return ["dnsmasq", "--keep-in-foreground", f"--conf-file={config}", "--log-facility=-"]


TARGETS: Final[dict[str, type[Target]]] = {
    cls.name: cls for cls in (Smartdns, Unbound, Dnsdist, Dnsmasq)
}


def start_targets(
    names: Sequence[str],
    workdir: Path,
    children: Children,
    upstream_port: int,
    *,
    source: Path = REPO,
    workers: int = 1,
    cpus: str | None = "0",
    tls: TlsFiles | None = None,
    connections: int = 1024,
    idle_timeout_s: float = 10.0,
    serve: tuple[str, ...] = TRANSPORTS,
    registered: tuple[str, ...] = (REGISTERED,),
) -> list[Target]:
    """Start each named server in its own subdirectory of `workdir` (smartdns from the tree
    `source`, with `registered` as its registrations), each answering before the next."""
    targets: list[Target] = []
    for name in names:
        target = TARGETS[name](
            workdir / name,
            workers=workers,
            cpus=cpus,
            tls=tls,
            connections=connections,
            idle_timeout_s=idle_timeout_s,
            serve=serve,
        )
        if isinstance(target, Smartdns):
            target.source = source
            target.registered = registered
        target.start(children, upstream_port)
        ports = ", ".join(f"{t} {target.port_for(t)}" for t in target.transports)
        log(f"{name} on 127.0.0.1: {ports} (pid {target.pid}, cpus {target.cpus})")
        targets.append(target)
    return targets
