"""Benchmark plumbing with the standard library only: installing what is missing, owned child
processes, RSS, readiness probes, the query lists and running/parsing dnsperf.

Imported before the Python environment is known to have smartdns' dependencies, so nothing
here imports smartdns, dnslib or yaml.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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
    "openssl": "openssl",
    "h2load": "nghttp2-client",
    "cc": "gcc",
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

# Encrypted DNS (issue 16): the transports dnsperf drives, and the name the throwaway
# certificate covers (smartdns' encrypted.server_name; no device ID is ever named, so every
# server authorizes by source address as over UDP).
TRANSPORTS: Final = ("udp", "dot", "doh")
SERVER_NAME: Final = "dns.bench.test"
DOH_PATH: Final = "/dns-query"


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


def ensure_for(servers: Sequence[str], commands: Sequence[str], no_install: bool) -> None:
    """Unless `no_install`: the Python environment, then `commands` and each server's own
    command (smartdns runs from the Python environment)."""
    if no_install:
        return
    ensure_python_env()
    ensure_commands([*commands, *(server for server in servers if server != "smartdns")])


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


def describe_worktree() -> str:
    """HEAD's commit id, plus the files outside bench/ that differ from it."""
    commit = head_commit()
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    dirty = [line[3:] for line in changed if not line[3:].startswith("bench/")]
    where = f"the working tree at {commit}"
    return where + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "")


def head_commit() -> str:
    """The commit id of the checkout's HEAD ("an unknown commit" outside git)."""
    return (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "an unknown commit"
    )


def load_average(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def pinned(cpus: str | None, command: Sequence[str]) -> list[str]:
    """`command` under `taskset -c cpus` (taskset execs, so the PID stays the server's)."""
    return ["taskset", "-c", cpus, *command] if cpus else list(command)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every server-comparing script shares: what to measure and what to keep."""
    parser.add_argument(
        "--ref",
        help="measure this git revision (exported with git archive) instead of the working tree",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get or pip")


def publish(lines: Sequence[str], json_path: Path | None, document: object) -> None:
    """Print the report; write `document` as JSON to `json_path` when one was given."""
    print("\n".join(lines), flush=True)
    if json_path:
        json_path.write_text(json.dumps(document, indent=2))


# ---- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """One throwaway CA and the leaf every server presents (PEM files in the run's temp dir)."""

    ca: Path
    cert: Path  # leaf, then the CA: the chain as servers load it
    key: Path  # owner-only, as smartdns' check of key_file wants


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and an ECDSA P-256 leaf for SERVER_NAME, *.SERVER_NAME and 127.0.0.1, valid for a
    day, made with the openssl command (no Python dependency before the environment check).

    P-256 is what public DoT/DoH services mostly present (Let's Encrypt ECDSA), and it keeps
    the handshake's signature cheap for every server alike."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, request, leaf = directory / "leaf.key", directory / "leaf.csr", directory / "leaf.pem"
    chain, extensions = directory / "chain.pem", directory / "leaf.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert,
        "-days", "1", "-subj", "/CN=smartdns bench CA",
    )  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", key, "-out", request, "-subj", f"/CN={SERVER_NAME}")
    extensions.write_text(
        f"subjectAltName = DNS:{SERVER_NAME}, DNS:*.{SERVER_NAME}, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", leaf, "-days", "1", "-extfile", extensions,
    )  # fmt: skip
    chain.write_text(leaf.read_text() + ca_cert.read_text())
    key.chmod(0o600)
    return TlsFiles(ca=ca_cert, cert=chain, key=key)


def _openssl(*arguments: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, arguments)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {arguments[0]} failed: {result.stderr.strip()}")


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


@contextlib.contextmanager
def session(keep: bool) -> Iterator[tuple[Path, Children]]:
    """A run's temporary directory and the owner of its processes: on the way out (also on
    Ctrl-C or SIGTERM, raised as KeyboardInterrupt) every process started is stopped and the
    directory removed, unless `keep`."""
    workdir = Path(tempfile.mkdtemp(prefix="smartdns-bench-"))
    children = Children()
    try:
        with terminate_as_interrupt():
            yield workdir, children
    finally:
        children.stop_all()
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def smartdns_source(revision: str | None, workdir: Path) -> tuple[Path, str]:
    """The tree whose smartdns package runs, and how the report names it: `revision`
    exported into `workdir`, or this working tree."""
    if revision:
        return export_revision(revision, workdir / "source")
    return REPO, describe_worktree()


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


@dataclass(frozen=True, slots=True)
class Usage:
    """What one load generator run cost, as fractions of one core over its wall time."""

    result: PerfResult
    wall_s: float
    server_s: float  # CPU time of the server (all its processes and threads)
    server: float
    client: float  # the load generator
    other: float  # other normal-priority work on the machine, plus steal


def measure_usage(server_pid: int, helper_pid: int, run: Callable[[], PerfResult]) -> Usage:
    """Run `run` (a load generator) and account the CPU time of the server, of the load
    generator, and of everything else but `helper_pid` (the upstream) meanwhile."""
    ours_before = cpu_seconds(server_pid) + cpu_seconds(helper_pid)
    busy_before, steal_before = machine_cpu_seconds()
    server_before, started = cpu_seconds(server_pid), time.monotonic()
    result = run()
    wall_s = time.monotonic() - started
    server_s = cpu_seconds(server_pid) - server_before
    busy_after, steal_after = machine_cpu_seconds()
    ours = cpu_seconds(server_pid) + cpu_seconds(helper_pid) + result.client_cpu_s - ours_before
    others = busy_after - busy_before - ours + steal_after - steal_before
    return Usage(
        result=result,
        wall_s=wall_s,
        server_s=server_s,
        server=server_s / wall_s,
        client=result.client_cpu_s / wall_s,
        other=max(0.0, others / wall_s),
    )


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


def wait_accepting(
    port: int, process: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Block until 127.0.0.1:`port` accepts a TCP connection (a DoT or DoH listener is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on TCP port {port} within {timeout_s:.0f} s")


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


@dataclass(frozen=True, slots=True)
class QuerySet:
    """One case's queries in each load generator's format: dnsperf's names for UDP and DoT,
    h2load's `GET /dns-query?dns=` URIs for DoH."""

    names: Path
    uris: Path
    query_bytes: float  # mean DNS message size (a REFUSED reply is exactly as long)


def write_query_set(directory: Path, case: str, names: Sequence[str]) -> QuerySet:
    """`A` queries without EDNS for `names`; in the URIs with ID 0 (RFC 8484 §4.1)."""
    messages = [encode_query(name, query_id=0) for name in names]
    uris = "".join(
        f"https://{SERVER_NAME}{DOH_PATH}?dns="
        + base64.urlsafe_b64encode(message).rstrip(b"=").decode()
        + "\n"
        for message in messages
    )
    (directory / f"case-{case}.uris").write_text(uris)
    return QuerySet(
        names=write_query_file(directory / f"case-{case}.txt", names),
        uris=directory / f"case-{case}.uris",
        query_bytes=sum(map(len, messages)) / len(messages),
    )


def interleave(first: Sequence[str], second: Sequence[str]) -> list[str]:
    mixed: list[str] = []
    for a, b in zip(first, second, strict=True):
        mixed.extend((a, b))
    return mixed


# ---- dnsperf ---------------------------------------------------------------------------------


EMPTY_OPT_BYTES: Final = 11  # root name, type, class, TTL, RDLENGTH 0
A_RECORD_BYTES: Final = 16  # compressed name, type, class, TTL, RDLENGTH, address


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
    client_cpu_s: float = 0.0  # CPU time the load generator used (user + system)
    reply_bytes: float = 0.0  # h2load only: mean DNS reply size (it cannot see the rcode)

    def only_rcode(self, expected: str) -> bool:
        """True when every answer had rcode `expected` and there were answers."""
        return self.completed > 0 and set(self.rcodes) == {expected}

    def as_expected(self, rcode: str, query_bytes: float) -> bool:
        """Every answer had `rcode`. For h2load (DoH), whose counts are HTTP statuses: every
        status was 2xx, and the replies' mean size fits the rcode. A REFUSED reply to these
        queries (no EDNS) is the header and the question, or the header alone (Unbound), plus
        at most an empty OPT (dnsdist adds one over DoH); an answer holds at least one A
        record, which is longer than that OPT. The mean is compared with the midpoint: h2load
        counts the DATA bytes of a few requests cut off at the end of the run too."""
        if not self.reply_bytes:
            return self.only_rcode(rcode)
        if not self.only_rcode("2xx"):
            return False
        midpoint = query_bytes + (EMPTY_OPT_BYTES + A_RECORD_BYTES) / 2
        return (self.reply_bytes < midpoint) == (rcode == "REFUSED")


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
    transport: str = "udp"  # dnsperf -m: udp, dot or doh (one of TRANSPORTS)
    doh_method: str = "GET"  # dnsperf -O doh-method: GET or POST
    queries_per_connection: int = 0  # dnsperf -O num-queries-per-conn; 0: no limit
    # The LD_PRELOAD library (bench/bind_source.c) that gives h2load (DoH) a source address,
    # and dnsperf `source_count` of them, one connection after the other.
    source_binding: Path | None = None
    source_count: int = 1


def transport_options(options: PerfOptions) -> list[str]:
    """dnsperf's arguments for the transport: `-m`, and for DoH the URI (the host is
    SERVER_NAME, so the TLS server name names no device ID) and the method."""
    arguments = ["-m", options.transport]
    if options.transport == "doh":
        arguments += ["-O", f"doh-uri=https://{SERVER_NAME}{DOH_PATH}"]
        arguments += ["-O", f"doh-method={options.doh_method}"]
    if options.queries_per_connection:
        arguments += ["-O", f"num-queries-per-conn={options.queries_per_connection}"]
    return arguments


def run_load(
    port: int,
    source: str,
    queries: QuerySet,
    options: PerfOptions,
    *,
    max_qps: int | None = None,
) -> PerfResult:
    """The transport's load generator: dnsperf for UDP and DoT, h2load for DoH (dnsperf
    2.10's DoH client keeps one reply per TLS read, so a server that writes several replies
    in one TLS record, as dnsdist does, loses all but the first: DNS-OARC/dnsperf#240)."""
    if options.transport == "doh":
        return run_h2load(port, source, queries.uris, options, max_qps=max_qps)
    return run_dnsperf(port, source, queries.names, options, max_qps=max_qps)


def build_source_binding(directory: Path) -> Path:
    """Compile bench/bind_source.c into `directory` (a C compiler is needed for DoH runs)."""
    library = directory / "bind_source.so"
    source = Path(__file__).with_name("bind_source.c")
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        check=True,
        timeout=120,
    )
    return library


def run_h2load(
    port: int,
    source: str,
    uri_file: Path,
    options: PerfOptions,
    *,
    max_qps: int | None = None,
) -> PerfResult:
    """h2load over HTTP/2 for `options.seconds`: `clients` connections, the closed-loop
    window of `outstanding` spread over them as concurrent streams, cycling through the URIs
    of `uri_file`; from `source` through the LD_PRELOAD library."""
    streams = max(1, options.outstanding // options.clients)
    command = [
        *("h2load", "-c", str(options.clients), "-m", str(streams), "-t", "1"),
        *("-i", str(uri_file), f"--connect-to=127.0.0.1:{port}"),
        *("-D", f"{round(options.seconds * 1000)}ms", "-N", f"{round(options.timeout_s * 1000)}ms"),
    ]
    if max_qps:
        command += ["--rps", str(max(1, max_qps // options.clients))]
    result = _run_measured(pinned(options.cpus, command), options, _source_env(source, options))
    return dataclasses.replace(parse_h2load(result.stdout), client_cpu_s=result.client_cpu_s)


def _source_env(source: str, options: PerfOptions) -> dict[str, str]:
    """The environment that makes bench/bind_source.c bind a load generator's sockets to
    `source` and the `source_count` - 1 addresses after it."""
    if options.source_binding is None:
        raise RuntimeError("choosing the source needs PerfOptions.source_binding")
    env = dict(os.environ)
    env["LD_PRELOAD"] = str(options.source_binding)
    env["BENCH_SOURCE_ADDRESS"] = source
    env["BENCH_SOURCE_COUNT"] = str(options.source_count)
    return env


_TIME_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_h2load(text: str) -> PerfResult:
    """h2load's summary: statuses as rcodes `2xx`, `4xx`...; mean reply size from the DATA
    bytes; `lost` what failed, errored or timed out."""
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                        r"([\d.]+)(us|ms|s)", text)  # fmt: skip
    if requests is None or statuses is None or latency is None:
        raise ValueError(f"h2load output lacks its summary:\n{text}")
    _, started, _, succeeded, failed, errored, timeouts = map(int, requests.groups())
    rcodes = {
        f"{klass}xx": int(count)
        for klass, count in zip("2345", statuses.groups(), strict=True)
        if int(count)
    }
    data_bytes = _number(r"traffic:.*\((\d+)\) data", text)
    values = latency.groups()
    return PerfResult(
        sent=started,
        completed=succeeded,
        lost=failed + errored + timeouts,
        rcodes=rcodes,
        qps=_number(r"finished in [\d.]+\w*, ([\d.]+) req/s", text),
        avg_latency_s=float(values[4]) * _TIME_UNITS[values[5]],
        max_latency_s=float(values[2]) * _TIME_UNITS[values[3]],
        output=text,
        reply_bytes=data_bytes / succeeded if succeeded else 0.0,
    )


@dataclass(frozen=True, slots=True)
class _Measured:
    stdout: str
    client_cpu_s: float


def _run_measured(
    command: list[str], options: PerfOptions, env: dict[str, str] | None = None
) -> _Measured:
    """Run a load generator (pinned, so its name comes after taskset's arguments) bounded in
    time; its output and the CPU time it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=options.seconds + options.timeout_s + 30,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        name = command[3] if command[0] == "taskset" else command[0]
        raise RuntimeError(f"{name} failed ({result.returncode}): {result.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return _Measured(result.stdout, used)


def run_dnsperf(
    port: int,
    source: str,
    query_file: Path,
    options: PerfOptions,
    *,
    passes: int | None = None,
    max_qps: int | None = None,
) -> PerfResult:
    """One dnsperf run bounded by `-l seconds`, and by `-n passes` over the file when given;
    from `source` (`-a`), or from `options.source_count` addresses starting there."""
    command = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        *(("-a", source) if options.source_count == 1 else ()),
        "-d",
        str(query_file),
        "-c",
        str(options.clients),
        "-q",
        str(options.outstanding),
        "-t",
        str(options.timeout_s),
        *transport_options(options),
    ]
    command += ["-l", str(options.seconds)]
    if passes:
        command += ["-n", str(passes)]
    if max_qps:
        command += ["-Q", str(max_qps)]
    env = _source_env(source, options) if options.source_count > 1 else None
    result = _run_measured(pinned(options.cpus, command), options, env)
    return dataclasses.replace(parse_dnsperf(result.stdout), client_cpu_s=result.client_cpu_s)
