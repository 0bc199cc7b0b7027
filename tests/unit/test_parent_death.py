"""parent_death: a real process tree; the worker side is armed as `python -m smartdns` arms it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from smartdns.node.parent_death import PARENT_PID_ENV

REPO = Path(__file__).resolve().parents[2]
ARMED = "from smartdns.node.parent_death import die_with_parent; die_with_parent(); "
DEADLINE_S = 5.0


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_without_the_variable_nothing_happens() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ARMED + "print('running')"],
        env={k: v for k, v in _env().items() if k != PARENT_PID_ENV},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert (result.returncode, result.stdout) == (0, "running\n")


def test_a_parent_already_gone_means_exit_at_once() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ARMED + "print('running')"],
        env=_env(**{PARENT_PID_ENV: str(os.getpid() + 1_000_000)}),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert (result.returncode, result.stdout) == (1, "")


def test_the_kernel_kills_the_child_when_its_parent_dies() -> None:
    # The middle process starts a child, waits until it is armed (so this is the signal, not
    # the parent pid check), prints its pid and dies without a word to it.
    child_code = ARMED + "import time; print('armed', flush=True); time.sleep(60)"
    middle = (
        "import os, subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], "
        f"env={{**os.environ, {PARENT_PID_ENV!r}: str(os.getpid())}}, stdout=subprocess.PIPE); "
        "assert child.stdout.readline() == b'armed\\n'; "
        "print(child.pid, flush=True); os._exit(0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", middle], env=_env(), capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, result.stderr
    child = int(result.stdout)
    deadline = time.monotonic() + DEADLINE_S
    while _alive(child):
        if time.monotonic() >= deadline:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the child outlived its parent")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
