"""Real `nats-server` processes for the feed tests: one server, or a three-server JetStream
cluster, on free loopback ports with their own store directories under the test's tmp path.

Readiness is the server's own /healthz (JetStream up and, in a cluster, a meta leader), polled
with a bounded wait; every process is killed at teardown. Skips when nats-server is missing
(scripts/run-tests installs it).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def require_nats_server() -> None:
    if not Path(NATS_SERVER).exists():
        import pytest  # only here: bench/fleet.py uses this module without pytest

        pytest.skip("nats-server is not installed (scripts/run-tests installs it)")


@dataclass
class NatsServer:
    """One nats-server; `start` and `kill` may be called repeatedly (same ports, same store)."""

    name: str
    directory: Path
    client_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    routes: list[int] = field(default_factory=list)  # other servers' cluster ports
    tls: tuple[Path, Path] | None = None  # certificate and key: clients must use TLS
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        command = [
            NATS_SERVER,
            "-n",
            self.name,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.client_port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.directory / "store"),
        ]
        if self.tls:
            command += ["--tls", "--tlscert", str(self.tls[0]), "--tlskey", str(self.tls[1])]
        if self.routes:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
            command += [
                "--cluster_name",
                "smartdns-test",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                routes,
            ]
        return command

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "server.log").open("ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no lame-duck mode, no goodbye to the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class NatsCluster:
    servers: list[NatsServer]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self, *indexes: int) -> None:
        """Start the given servers (all by default) and wait until each reports healthy."""
        chosen = [self.servers[i] for i in indexes] if indexes else self.servers
        for server in chosen:
            server.start()
        wait_healthy(chosen)

    def kill(self, *indexes: int) -> None:
        for i in indexes or range(len(self.servers)):
            self.servers[i].kill()


def wait_healthy(servers: list[NatsServer]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in servers:
        while not server.healthy():
            assert server.process is not None
            if server.process.poll() is not None:
                log = (server.directory / "server.log").read_text(errors="replace")
                raise RuntimeError(f"nats-server {server.name} exited:\n{log[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {server.name} not healthy in time")
            time.sleep(0.05)  # polling a readiness endpoint, not synchronising a test


@contextlib.contextmanager
def nats_cluster(
    tmp_path: Path, size: int = 3, tls: tuple[Path, Path] | None = None
) -> Iterator[NatsCluster]:
    """`size` servers (1: a plain JetStream server; more: a cluster with routes), started;
    with `tls` (certificate, key) clients connect with TLS only."""
    require_nats_server()
    servers = [NatsServer(f"n{i}", tmp_path / f"nats-{i}", tls=tls) for i in range(size)]
    if size > 1:
        for server in servers:
            server.routes = [other.cluster_port for other in servers if other is not server]
    cluster = NatsCluster(servers)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl):
    (CA file, certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=test"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True, timeout=30)
    return ca, cert, key
