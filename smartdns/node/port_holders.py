"""Which processes already hold sockets on our listen ports, read from /proc (Linux).

SO_REUSEPORT lets any process of the same user bind a port that is in use, so a worker left
over from an earlier instance would silently share the port with a new node (and answer from
registrations it no longer follows). Start-up looks first: /proc/net/{udp,udp6,tcp,tcp6}
give the sockets bound to a port, /proc/<pid>/fd the processes holding them.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from smartdns.config.model import HostPort
from smartdns.errors import SmartDNSError

_TCP_LISTEN: Final = "0A"  # include/net/tcp_states.h; other TCP states are connections
_TABLES: Final = (("udp", False), ("udp6", False), ("tcp", True), ("tcp6", True))


def check_ports_free(
    addresses: Iterable[HostPort], tcp_only: Iterable[HostPort] = (), proc: Path = Path("/proc")
) -> None:
    """Raise SmartDNSError naming the processes that hold a socket on one of `addresses`
    (UDP, or TCP listening) or of `tcp_only` (TCP listening: DoT and DoH): the same address,
    or the wildcard of its family on its port, or any address of the family when it is
    itself the wildcard. Without /proc, no check."""
    if not (proc / "net").is_dir():
        return
    udp = list(addresses)
    tcp = [*udp, *tcp_only]
    inodes: dict[int, HostPort] = {}
    for name, is_tcp in _TABLES:
        wanted = tcp if is_tcp else udp
        for address, inode in _bound_sockets(proc / "net" / name, listening_only=is_tcp):
            taken = next((w for w in wanted if _overlaps(w, address)), None)
            if taken is not None:
                inodes[inode] = taken
    if not inodes:
        return
    holders: dict[HostPort, set[int]] = {address: set() for address in inodes.values()}
    for pid, inode in _socket_fds(proc):
        if inode in inodes:
            holders[inodes[inode]].add(pid)
    problems = []
    for address, pids in holders.items():
        who = ", ".join(map(str, sorted(pids))) or "not visible to this user"
        problems.append(f"{address} is held by process {who}")
    raise SmartDNSError(
        "cannot listen: " + "; ".join(problems) + " (an earlier instance still running?)"
    )


def _bound_sockets(table: Path, listening_only: bool) -> Iterator[tuple[HostPort, int]]:
    """(local address, inode) of each socket in one /proc/net table."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or (listening_only and fields[3] != _TCP_LISTEN):
            continue
        host_hex, _, port_hex = fields[1].partition(":")
        yield HostPort(_address(host_hex), int(port_hex, 16)), int(fields[9])


def _address(host_hex: str) -> str:
    """/proc/net prints an address as 32-bit words in the kernel's byte order."""
    raw = bytes.fromhex(host_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def _overlaps(wanted: HostPort, bound: HostPort) -> bool:
    if wanted.port != bound.port or wanted.family != bound.family:
        return False
    wanted_ip, bound_ip = ipaddress.ip_address(wanted.host), ipaddress.ip_address(bound.host)
    return wanted_ip == bound_ip or wanted_ip.is_unspecified or bound_ip.is_unspecified


def _socket_fds(proc: Path) -> Iterator[tuple[int, int]]:
    """(pid, socket inode) for every open socket of every process this user may inspect."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or gone meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                yield int(entry.name), int(target[len("socket:[") : -1])
