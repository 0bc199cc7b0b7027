"""A real Prometheus (Debian's `prometheus`) for the monitoring tests: on a free loopback port,
with its own storage directory, scraping the given targets every second in the job `smartdns`
and evaluating a rule file every second. Readiness is its own /-/ready, polled with a bounded
wait; the process is killed when the context ends. Skips when prometheus is missing
(scripts/run-tests installs it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.ports import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0


def require_prometheus() -> None:
    if not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()):
        import pytest

        pytest.skip("prometheus is not installed (scripts/run-tests installs it)")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """The decoded JSON of a GET on the HTTP API; an error status comes back as its body
        (`{"status": "error", "error": ...}`), so a test can show what Prometheus said."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:
                body = reply.read()
        except urllib.error.HTTPError as error:
            body = error.read()
        decoded: dict[str, Any] = json.loads(body)
        return decoded

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)

    def firing(self) -> set[str]:
        """Names of the alerts firing now (pending ones excluded)."""
        alerts = self.api("/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@contextlib.contextmanager
def running_prometheus(
    directory: Path, targets: Sequence[str], rules: Path
) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port, path /metrics) as job `smartdns`, with `rules`."""
    require_prometheus()
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "smartdns", "static_configs": [{"targets": list(targets)}]},
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = directory / "prometheus.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not prometheus.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)  # polling a readiness endpoint, not synchronising a test
        yield prometheus
    finally:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
