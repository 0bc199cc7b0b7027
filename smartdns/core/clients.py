"""AuthorizedClients: the registered prefixes the query path matches, longest prefix first,
and the device IDs (as SHA-256 digests, SPEC 2a and 3) that authorize whatever the address.

Pure; no I/O. A full load builds a new instance (off the event loop) and the node swaps one
reference; a change of a few accounts is applied in place by `apply`, which runs on the
event loop thread and never awaits, so a query sees all of one change or none of it.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable

_MAPPED_PREFIX = "::ffff:"
Prefix = tuple[int, int, int]  # family 4|6, network as int, prefix length


class AuthorizedClients:
    """Answers `contains(packed source address)` from sets of prefixes keyed by length, and
    `holds_device(digest)` from the set of device ID digests that authorize.

    `entries` counts distinct prefixes (two accounts registering the same one count once).
    `devices` holds the digests of IDs held by exactly one account: the store decides that
    (SPEC 3: an ID two accounts of a fleet hold authorizes neither) and hands over only
    those, so this set never counts holders.
    """

    __slots__ = ("_v4", "_v4_sets", "_v6", "_v6_sets", "devices", "entries")

    def __init__(
        self, v4: dict[int, set[int]], v6: dict[int, set[int]], devices: set[bytes] | None = None
    ) -> None:
        self._v4_sets = v4
        self._v6_sets = v6
        self._v4 = _by_length(v4, 32)
        self._v6 = _by_length(v6, 128)
        self.entries = sum(map(len, v4.values())) + sum(map(len, v6.values()))
        self.devices: set[bytes] = set() if devices is None else devices

    @classmethod
    def from_prefixes(
        cls, prefixes: Iterable[Prefix], devices: Iterable[bytes] = ()
    ) -> AuthorizedClients:
        """Build from (family 4|6, network as int, prefix length) rows, as the registry stores
        them, and the digests of the device IDs that authorize. Runs off the event loop for
        large sets (a million rows take about a second)."""
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        for family, network, length in prefixes:
            if family == 4:
                v4.setdefault(length, set()).add(network >> (32 - length))
            else:
                v6.setdefault(length, set()).add(network >> (128 - length))
        return cls(v4, v6, set(devices))

    def apply(
        self,
        present: Iterable[Prefix],
        gone: Iterable[Prefix],
        devices_present: Iterable[bytes] = (),
        devices_gone: Iterable[bytes] = (),
    ) -> None:
        """Make `gone` unregistered, then `present` registered (a prefix in both stays); the
        same for device ID digests.

        Costs what it is given, never what is held: each prefix is one set operation; only
        a prefix length appearing or emptying rebuilds the (at most 33 + 129) length table.
        Call it on the event loop thread: queries read these sets there, between awaits.
        """
        lengths = (len(self._v4_sets), len(self._v6_sets))
        emptied = False
        for family, network, length in gone:
            sets, bits = (self._v4_sets, 32) if family == 4 else (self._v6_sets, 128)
            networks = sets.get(length)
            if networks is not None and network >> (bits - length) in networks:
                networks.discard(network >> (bits - length))
                self.entries -= 1
                if not networks:
                    del sets[length]
                    emptied = True
        for family, network, length in present:
            sets, bits = (self._v4_sets, 32) if family == 4 else (self._v6_sets, 128)
            networks = sets.setdefault(length, set())
            if network >> (bits - length) not in networks:
                networks.add(network >> (bits - length))
                self.entries += 1
        if emptied or lengths != (len(self._v4_sets), len(self._v6_sets)):
            self._v4 = _by_length(self._v4_sets, 32)
            self._v6 = _by_length(self._v6_sets, 128)
        self.devices.difference_update(devices_gone)
        self.devices.update(devices_present)

    def holds_device(self, digest: bytes) -> bool:
        """True when `digest` (device_digest of the ID a client named) authorizes."""
        return digest in self.devices

    def is_authorized(self, host: str) -> bool:
        """True when `host` (address text as the socket layer reports it) lies in a
        registered prefix; see `source_address`."""
        return self.contains(source_address(host))

    def contains(self, address: bytes) -> bool:
        """True when `address` (from `source_address`) lies in a registered prefix."""
        if len(address) == 4:
            return _contains(self._v4, int.from_bytes(address))
        return len(address) == 16 and _contains(self._v6, int.from_bytes(address))


def device_digest(device_id: str) -> bytes:
    """The SHA-256 digest of a device ID (SPEC 3: the store and the feed hold only this;
    the query path looks up the digest of the ID a client named). IDs are lower-case ASCII
    by the rules; a client's label is lower-cased by the transport before this."""
    return hashlib.sha256(device_id.encode("ascii", "replace")).digest()


def source_address(host: str) -> bytes:
    """The packed address of a source as the socket layer reports it (the one parser of
    source text): 4 octets for IPv4 and for IPv4-mapped IPv6 (the IPv4 address, SPEC 2),
    16 for IPv6 (a zone index such as `%eth0` ignored); b"" for anything unparseable, which
    is never authorized."""
    try:
        if ":" not in host:
            return socket.inet_pton(socket.AF_INET, host)
        if "%" in host:
            host = host.partition("%")[0]
        if host.startswith(_MAPPED_PREFIX) and "." in host:
            return socket.inet_pton(socket.AF_INET, host[len(_MAPPED_PREFIX) :])
        return socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return b""


_Table = tuple[tuple[int, set[int]], ...]


def _by_length(networks: dict[int, set[int]], bits: int) -> _Table:
    """(shift, set of network >> shift) per prefix length, longest first; the sets are the
    ones `apply` changes, shared, not copies."""
    return tuple((bits - length, networks[length]) for length in sorted(networks)[::-1])


def _contains(table: _Table, address: int) -> bool:
    # A plain loop: any() with a generator costs a frame per query on the hot path.
    for shift, networks in table:  # noqa: SIM110
        if address >> shift in networks:
            return True
    return False
