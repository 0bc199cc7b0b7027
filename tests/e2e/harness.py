"""End-to-end harness: the real `python -m smartdns serve` in a subprocess, a temporary config
and database, a FakeUpstream on loopback, and real clients bound to chosen source addresses.

Registered vs not: 127.0.0.2 and ::1 are registered; 127.0.0.3 is not (`public_only: false`).
Readiness comes from sd_notify (READY=1 on a socket the test owns), never from sleeping.
The sync API listens on a free loopback port (`server.sync_url`) with a random bearer token
(`server.token`) kept in `state/sync.token`, mode 600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import yaml

from tests.ports import free_port

REGISTERED = "127.0.0.2"
UNREGISTERED = "127.0.0.3"
REGISTERED_V6 = "::1"
START_TIMEOUT_S = 30.0  # READY=1 comes in about 1 s; a one-server setup took 10 s on a busy machine
STOP_TIMEOUT_S = 15.0
QUERY_TIMEOUT_S = 3.0
REPO = Path(__file__).resolve().parents[2]


def write_token(state: Path) -> str:
    """A fresh random sync token in `state/sync.token` (mode 600, as the config check wants)."""
    token = secrets.token_hex(32)
    path = state / "sync.token"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def base_config(port: int, state: Path, upstream_address: str) -> dict[str, Any]:
    """The test configuration; also writes the token file it names (`state/sync.token`)."""
    write_token(state)
    return {
        "server": {"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"], "tcp_idle_timeout": 2},
        "database": {"path": str(state / "registrations.db")},
        "registrations": {"public_only": False},
        "unregistered": "refuse",
        "unblock": {
            "ttl": 60,
            "regions": {
                "us": {"ipv4": ["198.51.100.10", "198.51.100.11"], "ipv6": []},
                "uk": {"ipv4": ["198.51.100.20"], "ipv6": ["2001:db8:20::1"]},
            },
            "zones": {"us": ["netflix.com", "nflxvideo.net"], "uk": ["bbc.co.uk"]},
        },
        "upstream": {"servers": [upstream_address], "timeout": 0.5, "attempts": 1},
        # Out of the way of behaviour tests that send bursts; tests/e2e/test_abuse.py sets its own.
        "rate_limit": {"client_qps": 100_000, "refused_qps": 100_000},
        "sync": {"listen": f"127.0.0.1:{free_port()}", "token_file": str(state / "sync.token")},
        "logging": {"level": "debug"},
    }


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_cli(
    config_path: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartdns", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or config_path.parent,
        env=_env(),
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "SMARTDNS_CONFIG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@dataclass
class Server:
    """A running smartdns; `state` holds its config, database and captured output."""

    state: Path
    port: int
    config_path: Path
    process: subprocess.Popen[bytes] | None = None
    notifications: list[str] = field(default_factory=list)
    _notify: socket.socket | None = None
    _terminating: bool = False

    @property
    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        return loaded

    @property
    def sync_url(self) -> str:
        """`http://127.0.0.1:PORT`, the sync API's base URL."""
        return f"http://{self.config['sync']['listen']}"

    @property
    def token(self) -> str:
        return (self.state / "sync.token").read_text().strip()

    @property
    def database_path(self) -> Path:
        return Path(self.config["database"]["path"])

    @property
    def stdout_path(self) -> Path:
        return self.state / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.state / "stderr.log"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config_path, *args)

    def start(self) -> Server:
        self.notifications = []
        self._terminating = False
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.state / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        self._notify.bind(str(notify_path))
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "smartdns", "serve", "--config", str(self.config_path)],
                stdout=stdout,
                stderr=stderr,
                cwd=self.state,
                env=_env(NOTIFY_SOCKET=str(notify_path)),
            )
        self.wait_notification("READY=1", START_TIMEOUT_S)
        return self

    def wait_notification(self, state: str, timeout_s: float) -> None:
        """Block until the server sends `state` over NOTIFY_SOCKET (or fail on exit/timeout)."""
        assert self._notify is not None and self.process is not None
        deadline = time.monotonic() + timeout_s
        while state not in self.notifications:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(f"no {state} from smartdns; output:\n{self.output()}")
            self._notify.settimeout(min(remaining, 0.5))
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            self.notifications.extend(data.decode().split("\n"))

    def signal(self, signum: int) -> None:
        assert self.process is not None
        # A second SIGTERM could land after the server restored the default handler on its
        # way out, turning a clean exit into death by signal; stop() sends at most one.
        self._terminating = self._terminating or signum == signal.SIGTERM
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (no chance to clean up) and reap; the state directory stays for a restart."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None and not self._terminating:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._notify is not None:
            self._notify.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # what the server sent on its way out (STOPPING=1)
                    self.notifications.extend(self._notify.recv(4096).decode().split("\n"))
            self._notify.close()
            self._notify = None
        return code

    # clients ---------------------------------------------------------------------------

    def query(
        self,
        name: str,
        qtype: str = "A",
        *,
        source: str = REGISTERED,
        tcp: bool = False,
        **make_query: Any,
    ) -> dns.message.Message:
        message = dns.message.make_query(name, qtype, **make_query)
        return self.send(message, source=source, tcp=tcp)

    def send(
        self, message: dns.message.Message, *, source: str = REGISTERED, tcp: bool = False
    ) -> dns.message.Message:
        where = "::1" if ":" in source else "127.0.0.1"
        if tcp:
            return dns.query.tcp(
                message, where, port=self.port, source=source, timeout=QUERY_TIMEOUT_S
            )
        return dns.query.udp(
            message,
            where,
            port=self.port,
            source=source,
            timeout=QUERY_TIMEOUT_S,
            ignore_trailing=False,
        )

    def raw_udp(
        self, packet: bytes, *, source: str = REGISTERED, timeout_s: float = QUERY_TIMEOUT_S
    ) -> bytes | None:
        """Send raw bytes; the reply, or None when nothing came back within `timeout_s`."""
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        where = "::1" if ":" in source else "127.0.0.1"
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(timeout_s)
            sock.sendto(packet, (where, self.port))
            try:
                return sock.recv(65535)
            except TimeoutError:
                return None


POLL_INTERVAL_S = 0.02


def rcode_within(server: Server, source: str, wanted: int, deadline_s: float) -> float:
    """Seconds until a query from `source` that gets `wanted` was sent; fails when a query sent
    past the deadline still gets another rcode. Counted to the send, not to the reply: a query
    the server answered the old way was sent before its answer was made, while the reply's
    arrival adds this client's own round trip (and its wait for a core on a busy machine)."""
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start
        reply = server.query("www.netflix.com", "A", source=source)
        if reply.rcode() == wanted:
            return sent
        assert sent < deadline_s, (
            f"still {dns.rcode.to_text(reply.rcode())} for a query sent after {sent:.2f}s"
        )
        time.sleep(POLL_INTERVAL_S)


@contextlib.contextmanager
def running_server(
    state: Path,
    upstream_address: str,
    override: dict[str, Any] | None = None,
    registrations: tuple[str, ...] = (REGISTERED, REGISTERED_V6),
) -> Iterator[Server]:
    """Write config, register `registrations` for account `demo` through the CLI, start."""
    port = free_port()
    config = merge(base_config(port, state, upstream_address), override or {})
    config_path = state / "smartdns.yaml"
    config_path.write_text(yaml.safe_dump(config))
    server = Server(state=state, port=port, config_path=config_path)
    if registrations:
        result = server.cli("registrations", "add", "demo", *registrations)
        assert result.returncode == 0, result.stderr
    server.start()
    try:
        yield server
    finally:
        server.stop()
