"""A private network namespace for end-to-end tests that need source addresses loopback alone
does not give (IPv6 other than ::1): `Namespace` creates it with extra addresses on its `lo`
and deletes it again; `running_server_in` runs the real `python -m smartdns serve` inside it
(a harness `Server` whose process is started through `ip netns exec`); `upstream_in` runs a
FakeUpstream inside it. Clients run inside it too, as `namespace.python(...)` subprocesses.

Needs root and iproute2; without `ip netns` the test fails with a clear message (no skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.e2e.harness import (
    REPO,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Server,
    _env,
    base_config,
    merge,
)
from tests.ports import free_port

IP_TIMEOUT_S = 10.0


class NamespaceUnavailable(AssertionError):
    """`ip netns` cannot be used here (no iproute2, not root, no CAP_SYS_ADMIN)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )


class Namespace:
    """`ip netns add` a uniquely named namespace, `lo` up, `addresses` added to `lo`
    (IPv4 /32, IPv6 /128 without DAD); on exit, every process left in it is killed (they are
    ours: only this test starts processes there) and the namespace is deleted."""

    def __init__(self, addresses: Sequence[str] = ()) -> None:
        self.name = f"smartdns-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.addresses = tuple(addresses)
        self._created = False

    def __enter__(self) -> Namespace:
        if shutil.which("ip") is None:
            raise NamespaceUnavailable("the `ip` command (iproute2) is not installed")
        created = _ip("netns", "add", self.name)
        if created.returncode != 0:
            raise NamespaceUnavailable(
                f"`ip netns add` failed (root and iproute2 needed): {created.stderr.strip()}"
            )
        self._created = True
        try:
            self._check(_ip("-n", self.name, "link", "set", "lo", "up"))
            for address in self.addresses:
                if ":" in address:
                    args = ["-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"]
                else:
                    args = ["addr", "add", f"{address}/32", "dev", "lo"]
                self._check(_ip("-n", self.name, *args))
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    @staticmethod
    def _check(result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise NamespaceUnavailable(f"{' '.join(result.args)}: {result.stderr.strip()}")

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def python(self, code: str, *args: str) -> list[str]:
        return self.command(sys.executable, "-c", code, *args)

    def pids(self) -> list[int]:
        result = _ip("netns", "pids", self.name)
        return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []

    def delete(self) -> None:
        if not self._created:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling with a deadline: the kernel reaps asynchronously
        self._check(_ip("netns", "delete", self.name))
        self._created = False


@dataclass
class NamespacedServer(Server):
    """A harness Server whose process runs inside `namespace`, with TMPDIR=`tmpdir`. Only the
    process start differs; readiness, signals and stop are the harness's own. Its client
    methods only work from inside the namespace."""

    namespace: Namespace | None = None
    tmpdir: Path | None = None

    def start(self) -> NamespacedServer:
        assert self.namespace is not None and self.tmpdir is not None
        self.notifications = []
        self._terminating = False
        notify_path = self.state / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))  # a path socket: reachable across namespaces
        command = self.namespace.command(
            sys.executable, "-m", "smartdns", "serve", "--config", str(self.config_path)
        )
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(  # `ip netns exec` execs: this pid is the server
                command,
                stdout=stdout,
                stderr=stderr,
                cwd=self.state,
                env=_env(NOTIFY_SOCKET=str(notify_path), TMPDIR=str(self.tmpdir)),
            )
        self.wait_notification("READY=1", START_TIMEOUT_S)
        return self


@contextlib.contextmanager
def running_server_in(
    namespace: Namespace,
    state: Path,
    tmpdir: Path,
    upstream_address: str,
    override: dict[str, Any] | None = None,
    registrations: tuple[str, ...] = (),
) -> Iterator[NamespacedServer]:
    """The harness configuration (plus `override`), `registrations` for account `demo` added
    through the CLI, the server started inside `namespace`; stopped (or killed) on exit."""
    port = free_port()  # any port is free in a fresh namespace; this one also in the host's
    config = merge(base_config(port, state, upstream_address), override or {})
    config_path = state / "smartdns.yaml"
    config_path.write_text(yaml.safe_dump(config))
    server = NamespacedServer(
        state=state, port=port, config_path=config_path, namespace=namespace, tmpdir=tmpdir
    )
    if registrations:
        result = server.cli("registrations", "add", "demo", *registrations)
        assert result.returncode == 0, result.stderr
    try:
        server.start()
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@contextlib.contextmanager
def upstream_in(
    namespace: Namespace, records: Sequence[tuple[str, str, list[str]]]
) -> Iterator[str]:
    """A FakeUpstream answering `records` ((name, qtype, zone lines)) inside `namespace`;
    yields its address. It runs until its stdin closes; killed if it does not stop in time."""
    code = "from tests.e2e.netns import serve_upstream; serve_upstream()"
    process = subprocess.Popen(
        namespace.python(code, json.dumps(list(records))),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=_env(),
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline().decode().strip() if ready else ""
        if not line:
            process.kill()
            _, err = process.communicate(timeout=STOP_TIMEOUT_S)
            raise AssertionError(f"fake upstream did not start in the namespace: {err.decode()}")
        yield line
    finally:
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_upstream() -> None:
    """Entry point of `upstream_in`'s process: serve `sys.argv[1]`'s records until stdin closes."""
    from tests.fake_upstream import FakeUpstream

    with FakeUpstream() as fake:
        for name, qtype, lines in json.loads(sys.argv[1]):
            fake.add(name, qtype, lines)
        print(fake.address, flush=True)
        sys.stdin.read()
