"""ZoneMatcher: which unblock zone, if any, a query name falls in. Pure; no I/O.

Names are compared in lower-cased wire form, so matching happens on label boundaries by
construction: `notnetflix.com` never matches `netflix.com`, and a label that contains a dot
cannot fake a boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class ZoneMatcher(Generic[T]):
    """Maps zone → value; `match` returns the value of the most specific zone containing a name."""

    __slots__ = ("_zones",)

    def __init__(self, zones: Mapping[bytes, T]) -> None:
        """`zones` keys are lower-cased wire-format names (see wire.encode_name)."""
        self._zones = dict(zones)

    def __len__(self) -> int:
        return len(self._zones)

    def match(self, qname: bytes) -> T | None:
        """Value of the longest zone that equals `qname` or is a suffix of it on a label
        boundary. `qname` is lower-cased wire format, as in `Query.qname`."""
        zones = self._zones
        if not zones:
            return None
        offset = 0
        end = len(qname) - 1  # the root label: an unblock zone is never the root
        while offset < end:
            value = zones.get(qname[offset:] if offset else qname)
            if value is not None:
                return value
            offset += qname[offset] + 1
        return None
