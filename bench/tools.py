"""Benchmark plumbing with the standard library only: installing what is missing, owned child
processes, RSS, readiness probes, the query lists and running/parsing dnsperf.

Imported before the Python environment is known to have smartdns' dependencies, so nothing
here imports smartdns, dnslib or yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
VENV: Final = REPO / ".venv"
STOP_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 20.0

# Debian packages providing each command the harness runs.
APT_PACKAGES: Final = {
    "dnsperf": "dnsperf",
    "unbound": "unbound",
    "dnsdist": "dnsdist",
    "dnsmasq": "dnsmasq-base",
    "taskset": "util-linux",
}
# Modules smartdns needs at run time (pyproject dependencies) plus what the harness uses
# (dnslib, from the test extra).
PYTHON_MODULES: Final = ("dnslib", "aiosqlite", "yaml", "asyncio_throttle", "aiohttp", "uvloop")

# The job. Zones and regions match config/dev.yaml; every peer is configured the same way.
REGIONS: Final = {
    "us": ("198.51.100.10", "198.51.100.11"),
    "uk": ("198.51.100.20",),
}
ZONES: Final = {
    "netflix.com": "us",
    "nflxvideo.net": "us",
    "hulu.com": "us",
    "disneyplus.com": "us",
    "bbc.co.uk": "uk",
    "bbci.co.uk": "uk",
}
UNBLOCK_TTL: Final = 60
UPSTREAM_TTL: Final = 86_400  # long enough that nothing expires during a run
REGISTERED: Final = "127.0.0.1"
UNREGISTERED: Final = "127.0.0.2"


# ---- environment -----------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def missing_modules() -> list[str]:
    missing = []
    for name in PYTHON_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def ensure_python_env() -> None:
    """Re-exec under a Python that has smartdns' dependencies, making `.venv` if needed.

    Uses the current interpreter when it already has them (a developer's environment);
    otherwise the repository's `.venv` (the one README.md's quick start creates).
    """
    if not missing_modules():
        return
    python = VENV / "bin" / "python"
    if Path(sys.executable).resolve() == python.resolve() and python.exists():
        raise SystemExit(f"bench: {VENV} lacks {', '.join(missing_modules())}; delete it")
    if not python.exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log(f"installing smartdns and its test extra into {VENV}")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[test]"], check=True)
    os.execv(str(python), [str(python), *sys.argv])


def ensure_commands(commands: Sequence[str]) -> None:
    """apt-get install the Debian packages for any missing command (sudo unless root)."""
    missing = [command for command in commands if shutil.which(command) is None]
    if not missing:
        return
    packages = sorted({APT_PACKAGES[command] for command in missing})
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench: missing {', '.join(missing)} and no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(packages)}")
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    still = [command for command in commands if shutil.which(command) is None]
    if still:
        raise SystemExit(f"bench: still missing after install: {', '.join(still)}")


def ensure_py_spy() -> str | None:
    """The py-spy executable, pip-installing it into this environment if missing."""
    found = shutil.which("py-spy") or _beside_python("py-spy")
    if found:
        return found
    log("installing py-spy")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False, timeout=300
    )
    if result.returncode != 0:
        return None
    return shutil.which("py-spy") or _beside_python("py-spy")


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def python_env(source: Path = REPO) -> dict[str, str]:
    """Environment for Python children: `source` (a tree holding the smartdns package) first
    on the path, no inherited NOTIFY_SOCKET or SMARTDNS_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "SMARTDNS_CONFIG")}
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def export_revision(revision: str, destination: Path) -> tuple[Path, str]:
    """`git archive` the smartdns package of `revision` into `destination`; returns the tree
    and the full commit id. Measures exactly a commit, whatever the working tree holds."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    destination.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "smartdns"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
    return destination, commit


def pinned(cpus: str | None, command: Sequence[str]) -> list[str]:
    """`command` under `taskset -c cpus` (taskset execs, so the PID stays the server's)."""
    return ["taskset", "-c", cpus, *command] if cpus else list(command)


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 at the time of asking."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


# ---- child processes -------------------------------------------------------------------------


@dataclass
class Children:
    """Owner of every process the harness starts: each is stopped by its PID on exit,
    failure or Ctrl-C (SIGTERM, then SIGKILL after a deadline)."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, command: Sequence[str], log_path: Path, **popen: object
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as output:
            # A new session: Ctrl-C reaches only the harness, which stops children in order.
            process = subprocess.Popen(  # type: ignore[call-overload]
                list(command),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **popen,
            )
        self.processes.append(process)
        return process  # type: ignore[no-any-return]

    def stop(self, process: subprocess.Popen[bytes]) -> int | None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        with contextlib.suppress(ValueError):
            self.processes.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks clean up."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (multi-worker servers fork their workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, ()))
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` and its descendants, in KiB (0 for processes that are gone)."""
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants so far (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all CPUs, from /proc/stat.

    Busy is user + system time at normal priority: niced background jobs only fill gaps and
    interrupt/softirq time (loopback delivery of our own packets) is nobody's in particular.
    Steal is time the hypervisor gave to other machines."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, _nice, system, _idle, _iowait, _irq, _softirq, steal = fields[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + system) / ticks, steal / ticks


def rss_kib_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---- DNS probes ------------------------------------------------------------------------------


def encode_query(name: str, qtype: int = 1, query_id: int = 0x5EB1) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(label)]) + label.encode() for label in name.strip(".").split(".") if label
    )
    return header + labels + b"\0" + struct.pack("!HH", qtype, 1)


def wait_answering(
    port: int, process: subprocess.Popen[bytes], name: str, timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Block until something answers a UDP query on 127.0.0.1:`port` (any rcode)."""
    deadline = time.monotonic() + timeout_s
    query = encode_query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((REGISTERED, 0))
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"exited with status {process.returncode} during start-up")
            with contextlib.suppress(OSError):
                sock.sendto(query, ("127.0.0.1", port))
                if sock.recv(4096)[:2] == query[:2]:
                    return
    raise RuntimeError(f"no answer on port {port} within {timeout_s:.0f} s")


# ---- query lists -----------------------------------------------------------------------------


def unblock_names(count: int) -> list[str]:
    """`count` distinct names spread over the unblock zones (case a)."""
    zones = list(ZONES)
    return [f"w{i}.{zones[i % len(zones)]}" for i in range(count)]


def upstream_names(count: int) -> list[str]:
    """`count` distinct names the fake upstream answers (case b)."""
    return [f"n{i}.bench-upstream.example.org" for i in range(count)]


def upstream_address(index: int) -> str:
    """The A record the fake upstream serves for upstream_names()[index]."""
    return f"10.77.{index >> 8 & 255}.{index & 255}"


def write_query_file(path: Path, names: Sequence[str]) -> Path:
    path.write_text("".join(f"{name} A\n" for name in names))
    return path


def interleave(first: Sequence[str], second: Sequence[str]) -> list[str]:
    mixed: list[str] = []
    for a, b in zip(first, second, strict=True):
        mixed.extend((a, b))
    return mixed


# ---- dnsperf ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PerfResult:
    """The figures of one dnsperf run (latencies in seconds)."""

    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    qps: float
    avg_latency_s: float
    max_latency_s: float
    output: str
    client_cpu_s: float = 0.0  # CPU time dnsperf used (user + system)

    def only_rcode(self, expected: str) -> bool:
        """True when every answer had rcode `expected` and there were answers."""
        return self.completed > 0 and set(self.rcodes) == {expected}


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"dnsperf output lacks {pattern!r}:\n{text}")
    return float(match.group(1))


def parse_dnsperf(text: str) -> PerfResult:
    rcodes: dict[str, int] = {}
    match = re.search(r"Response codes:\s*(.*)", text)
    if match:
        for name, count in re.findall(r"([A-Z]+) (\d+) \(", match.group(1)):
            rcodes[name] = int(count)
    return PerfResult(
        sent=int(_number(r"Queries sent:\s+(\d+)", text)),
        completed=int(_number(r"Queries completed:\s+(\d+)", text)),
        lost=int(_number(r"Queries lost:\s+(\d+)", text)),
        rcodes=rcodes,
        qps=_number(r"Queries per second:\s+([\d.]+)", text),
        avg_latency_s=_number(r"Average Latency \(s\):\s+([\d.]+)", text),
        max_latency_s=_number(r"Average Latency \(s\):.*max ([\d.]+)", text),
        output=text,
    )


@dataclass(frozen=True, slots=True)
class PerfOptions:
    """How dnsperf drives a server: closed loop, `outstanding` queries in flight."""

    seconds: float = 10.0
    clients: int = 4  # dnsperf -c: sockets (source ports)
    outstanding: int = 500  # dnsperf -q: closed-loop window
    timeout_s: float = 2.0  # dnsperf -t: an answer later than this counts as lost
    cpus: str | None = "1"


def run_dnsperf(
    port: int,
    source: str,
    query_file: Path,
    options: PerfOptions,
    *,
    passes: int | None = None,
    max_qps: int | None = None,
) -> PerfResult:
    """One dnsperf run bounded by `-l seconds`, and by `-n passes` over the file when given."""
    command = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-a",
        source,
        "-d",
        str(query_file),
        "-c",
        str(options.clients),
        "-q",
        str(options.outstanding),
        "-t",
        str(options.timeout_s),
    ]
    command += ["-l", str(options.seconds)]
    if passes:
        command += ["-n", str(passes)]
    if max_qps:
        command += ["-Q", str(max_qps)]
    limit_s = options.seconds + options.timeout_s + 30
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        pinned(options.cpus, command),
        capture_output=True,
        text=True,
        timeout=limit_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({result.returncode}): {result.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dataclasses.replace(parse_dnsperf(result.stdout), client_cpu_s=used)
