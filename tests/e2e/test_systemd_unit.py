"""The shipped systemd unit passes `systemd-analyze verify` and rates "OK" or better."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "smartdns.service"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed; the README's test command installs it")
    return path


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's `smartdns` script, which verify
    requires to exist and be executable."""
    beside_python = Path(sys.executable).parent / "smartdns"
    smartdns = str(beside_python) if beside_python.exists() else shutil.which("smartdns")
    assert smartdns is not None, "smartdns is not installed in this environment"
    unit = tmp_path / "smartdns.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/smartdns", smartdns))
    return unit


def test_unit_verifies(installed_unit: Path) -> None:
    result = subprocess.run(
        [_analyze(), "verify", str(installed_unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "smartdns.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_security_exposure_is_ok(installed_unit: Path) -> None:
    result = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_unit_has_the_directives_operators_rely_on() -> None:
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=smartdns",
        "ConfigurationDirectory=smartdns",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
    ):
        assert directive in text, directive
