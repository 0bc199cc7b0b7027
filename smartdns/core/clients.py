"""AuthorizedClients: an immutable snapshot of registered prefixes, longest-prefix match.

Pure; no I/O. A registry change builds a new snapshot and the daemon swaps one reference, so a
query sees either the old set or the new one, never a mix.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

_MAPPED_PREFIX = "::ffff:"


class AuthorizedClients:
    """Answers `is_authorized(source address text)` from sets of prefixes keyed by length."""

    __slots__ = ("_v4", "_v6", "entries")

    def __init__(self, v4: dict[int, set[int]], v6: dict[int, set[int]], entries: int) -> None:
        self._v4 = _by_length(v4, 32)
        self._v6 = _by_length(v6, 128)
        self.entries = entries

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[tuple[int, int, int]]) -> AuthorizedClients:
        """Build from (family 4|6, network as int, prefix length) rows, as the registry stores
        them. Runs off the event loop for large sets (a million rows take about a second)."""
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        count = 0
        for family, network, length in prefixes:
            if family == 4:
                v4.setdefault(length, set()).add(network >> (32 - length))
            else:
                v6.setdefault(length, set()).add(network >> (128 - length))
            count += 1
        return cls(v4, v6, count)

    def is_authorized(self, host: str) -> bool:
        """True when `host` (address text as the socket layer reports it) lies in a registered
        prefix. IPv4-mapped IPv6 counts as the IPv4 address; a zone index (`%eth0`) is ignored.
        Anything unparseable is unauthorized."""
        try:
            if ":" not in host:
                return _contains(self._v4, int.from_bytes(socket.inet_pton(socket.AF_INET, host)))
            if "%" in host:
                host = host.partition("%")[0]
            if host.startswith(_MAPPED_PREFIX) and "." in host:
                address = socket.inet_pton(socket.AF_INET, host[len(_MAPPED_PREFIX) :])
                return _contains(self._v4, int.from_bytes(address))
            return _contains(self._v6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host)))
        except OSError:
            return False


_Table = tuple[tuple[int, frozenset[int]], ...]


def _by_length(networks: dict[int, set[int]], bits: int) -> _Table:
    """(shift, frozenset of network >> shift) per prefix length, longest first."""
    return tuple((bits - length, frozenset(networks[length])) for length in sorted(networks)[::-1])


def _contains(table: _Table, address: int) -> bool:
    # A plain loop: any() with a generator costs a frame per query on the hot path.
    for shift, networks in table:  # noqa: SIM110
        if address >> shift in networks:
            return True
    return False
