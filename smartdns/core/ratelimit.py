"""RateLimiter: per-source rate limits that remember no one (SPEC 6 `rate_limit`, SPEC 7).

Pure; no I/O, no clock (callers pass monotonic `now`). A fixed table of GCRA buckets indexed by
a keyed hash of the source's IPv4 /32 or IPv6 /56; the key is random per process and rotates.
No address is stored: it exists only for the duration of a call.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sys
from array import array
from collections.abc import Callable
from typing import Final

from smartdns.config.model import RateLimitConfig

DEFAULT_SLOTS: Final = 65_536
DEFAULT_ROTATE_AFTER_S: Final = 600.0
KEY_BYTES: Final = 16
IPV6_PREFIX_BYTES: Final = 7  # /56: what one subscriber line usually gets (RFC 6177)
# Python's bytes hash is SipHash (keyed per process) on every CPython build we support; a build
# compiled with FNV would make `hash()` unkeyed, so fall back to keyed BLAKE2b there.
_HASH_IS_SIPHASH: Final = sys.hash_info.algorithm.startswith("siphash")


class Admission(enum.Enum):
    """What `check` says about one query from an authorized source."""

    ALLOW = "allow"
    TRUNCATE = "truncate"  # over the rate: answer with TC set, so a real client retries over TCP
    DROP = "drop"  # over the rate: send nothing
    REFUSE = "refuse"  # over a device ID's rate: REFUSED (an encrypted client has no use for TC)


class RateLimiter:
    """Token buckets for sources, `rate_per_s` on average with bursts up to `burst` queries.

    Each of `slots` buckets is one float, the GCRA "theoretical arrival time" (ITU-T I.371;
    a token bucket kept as one number): a query conforms when, advanced by `1 / rate`, the
    bucket's time stays within `burst` intervals of `now`, and then it is advanced. Sources
    are mapped to buckets by a keyed hash, so memory is the same for ten sources or ten
    million; sources that collide share a bucket, which with 65,536 slots hurts only under
    a flood that exceeds the table anyway. Every `rotate_after_s` the key is replaced and the table
    cleared, so bucket positions cannot be correlated over time (everyone gets a fresh burst).

    Sources are packed addresses from `clients.source_address` (IPv4-mapped IPv6 is already
    the IPv4 address there). IPv6 sources are counted per /56 so a single line cannot escape
    the limit by rotating through its addresses. Text that was no address at all (b"")
    shares one bucket.
    """

    __slots__ = (
        "_arrivals",
        "_excess_parity",
        "_interval_s",
        "_key",
        "_key_source",
        "_mask",
        "_rotate_after_s",
        "_rotates_at",
        "_tolerance_s",
    )

    def __init__(
        self,
        rate_per_s: float,
        burst: int | None = None,
        slots: int = DEFAULT_SLOTS,
        rotate_after_s: float = DEFAULT_ROTATE_AFTER_S,
        key_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """`burst` defaults to one second's worth (`rate_per_s`, at least 1); `slots` must be
        a power of two; `key_source(n)` returns n random bytes (tests make it deterministic)."""
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if slots <= 0 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        if rotate_after_s <= 0:
            raise ValueError("rotate_after_s must be positive")
        burst = max(1, round(rate_per_s)) if burst is None else burst
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._interval_s = 1.0 / rate_per_s
        # A bucket may run this far ahead of `now`: `burst` queries back to back, then one per
        # interval. The extra half interval absorbs float rounding in the running sum, which
        # would otherwise refuse the burst's last query for some rates.
        self._tolerance_s = (burst + 0.5) * self._interval_s
        self._mask = slots - 1
        self._rotate_after_s = rotate_after_s
        self._key_source = key_source
        self._key = b""
        self._rotates_at = float("-inf")  # the first call picks the key and starts the table
        self._arrivals = array("d", bytes(8 * slots))
        self._excess_parity = bytearray(slots)

    @property
    def slots(self) -> int:
        return self._mask + 1

    def allow(self, address: bytes, now: float) -> bool:
        """True when a query from `address` (clients.source_address) at monotonic time
        `now` is within the rate; a conforming query is counted, a refused one is not (so a
        flood cannot starve the source's own later queries beyond the rate)."""
        return self._take(self._slot(address, now), now)

    def check(self, address: bytes, now: float) -> Admission:
        """ALLOW within the rate; over it TRUNCATE and DROP alternate per bucket, starting
        with TRUNCATE, so half the excess gets a small TC reply (SPEC 6 `client_qps`)."""
        slot = self._slot(address, now)
        if self._take(slot, now):
            return Admission.ALLOW
        parity = self._excess_parity[slot] ^ 1
        self._excess_parity[slot] = parity
        return Admission.TRUNCATE if parity else Admission.DROP

    def _take(self, slot: int, now: float) -> bool:
        arrivals = self._arrivals
        arrival = arrivals[slot]
        if arrival < now:
            arrival = now
        arrival += self._interval_s
        if arrival - now > self._tolerance_s:
            return False
        arrivals[slot] = arrival
        return True

    def _slot(self, address: bytes, now: float) -> int:
        if now >= self._rotates_at:
            self._rotate(now)
        return _keyed_hash(self._key, _source_key(address)) & self._mask

    def _rotate(self, now: float) -> None:
        key = self._key_source(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise ValueError("key_source returned the wrong number of bytes")
        self._key = key
        self._rotates_at = now + self._rotate_after_s
        slots = len(self._excess_parity)
        self._arrivals = array("d", bytes(8 * slots))
        self._excess_parity = bytearray(slots)


def _source_key(address: bytes) -> bytes:
    """The part of a packed address that names the source: all 4 octets of IPv4, the /56
    of IPv6 (7 octets: the lengths keep the two apart); b"" (unparseable) stays b"". A
    device ID digest (32 octets) is its own key: one bucket per ID (SPEC 2a)."""
    return address[:IPV6_PREFIX_BYTES] if len(address) == 16 else address


def _keyed_hash(key: bytes, data: bytes) -> int:
    """A 64-bit keyed hash of `data`. `hash(key + data)` is CPython's SipHash-1-3 under the
    per-process secret (PYTHONHASHSEED), with our own random key as a secret prefix so the
    result stays unpredictable even when PYTHONHASHSEED is fixed; about 60 ns where keyed
    BLAKE2b costs 600 ns. (A tuple of ints would be cheaper still but is not keyed: int hashes
    are the values themselves and the tuple mix is public, so collisions could be chosen.)"""
    if _HASH_IS_SIPHASH:
        return hash(key + data)
    return int.from_bytes(hashlib.blake2b(data, key=key, digest_size=8).digest())


class RateLimits:
    """The two limiters of SPEC 6 `rate_limit` for one process; kept across a reload that
    does not change the rates, so a reload is no way to reset a flooder's budget."""

    __slots__ = ("client", "config", "device", "refused")

    def __init__(self, config: RateLimitConfig) -> None:
        self.config = config
        self.client = RateLimiter(config.client_qps)  # authorized sources, UDP
        self.device = RateLimiter(config.client_qps)  # queries naming a device ID (SPEC 2a)
        self.refused = RateLimiter(config.refused_qps)  # REFUSED and error replies, UDP
