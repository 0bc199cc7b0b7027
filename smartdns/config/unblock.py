"""The unblock section: regions (proxy addresses) and zones (names answered with them), with
the zone ↔ region cross-checks done in the same pass. No I/O.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Final

from yaml.nodes import Node, SequenceNode

from smartdns.config.model import Region, UnblockConfig
from smartdns.config.reader import (
    Entries,
    Reader,
    boolean,
    build,
    convert_fields,
    int_field,
    line_of,
    mapping,
    section_entries,
    sequence,
)
from smartdns.config.values import address_list, zone_name

_REGION_NAME: Final = re.compile(r"[a-z0-9_-]+")
_FIELDS: Final = {"ttl": int_field(0, 86_400), "canary_nxdomain": boolean}
_KEYS: Final = (*_FIELDS, "regions", "zones")
_REGION_KEYS: Final = ("ipv4", "ipv6")


def read_unblock(reader: Reader, node: Node | None, where: str) -> tuple[UnblockConfig, Entries]:
    """The section and its keys; every region must be used by a zone and every zone's
    region defined."""
    entries = section_entries(reader, node, where, _KEYS)
    values = convert_fields(reader, entries, where, _FIELDS)
    region_keys, regions = _regions(reader, entries)
    zones, used = _zones(reader, entries, region_keys)
    for name, key in region_keys.items():
        if name not in used:
            reader.add(
                key,
                f'unblock.regions.{name}: region "{name}" is not used by any zone in unblock.zones',
            )
    if "regions" in entries:
        values["regions"] = MappingProxyType(regions)
    if "zones" in entries:
        values["zones"] = MappingProxyType(zones)
    return build(UnblockConfig, values), entries


def _regions(reader: Reader, entries: Entries) -> tuple[dict[str, Node], dict[str, Region]]:
    """Each region's key node, and the regions that are valid.

    Every region named in the file counts as defined, even a broken one, so a zone list
    pointing at it does not get a second, misleading problem."""
    region_keys: dict[str, Node] = {}
    regions: dict[str, Region] = {}
    for name, (key, value) in _submapping(reader, entries, "regions").items():
        where = f"unblock.regions.{name}"
        region_keys[name] = key
        if not _REGION_NAME.fullmatch(name):
            reader.add(key, f'{where}: region name "{name}" may contain only a-z, 0-9, "-" and "_"')
        region = _region(reader, key, value, where)
        if region is not None:
            regions[name] = region
    return region_keys, regions


def _region(reader: Reader, key: Node, node: Node, where: str) -> Region | None:
    entries = mapping(reader, node, where, _REGION_KEYS)
    if entries is None:
        return None
    values: dict[str, object] = {}
    for name, version in (("ipv4", 4), ("ipv6", 6)):
        if name in entries:
            found = address_list(reader, entries[name][1], f"{where}.{name}", version)
            if found is not None:
                values[name] = tuple(found)
    ipv4 = entries.get("ipv4")
    # A wrong or invalid ipv4 value is reported where it is; this is for a region without any.
    if ipv4 is None or (isinstance(ipv4[1], SequenceNode) and not ipv4[1].value):
        reader.add(key, f"{where}: no ipv4 address; A answers for the region's zones need one")
    return build(Region, values)


def _zones(
    reader: Reader, entries: Entries, region_keys: dict[str, Node]
) -> tuple[dict[str, str], set[str]]:
    """Zone → region name, and the regions some zone list uses."""
    zones: dict[str, str] = {}
    first_listed: dict[str, str] = {}  # zone → where it was first listed, for the message
    used: set[str] = set()
    for region_name, (key, value) in _submapping(reader, entries, "zones").items():
        where = f"unblock.zones.{region_name}"
        if region_name not in region_keys:
            reader.add(key, f'{where}: region "{region_name}" is not defined in unblock.regions')
        items = sequence(reader, value, where)
        # A broken zone list is reported where it is; only an empty one leaves a region unused.
        if items is None or items:
            used.add(region_name)
        for index, item in enumerate(items or ()):
            item_where = f"{where}[{index}]"
            zone = zone_name(reader, item, item_where)
            if zone is None:
                continue
            if zone in first_listed:
                # One name, one answer: a zone in two regions would make the answer arbitrary.
                reader.add(
                    item, f'{item_where}: zone "{zone}" is already listed at {first_listed[zone]}'
                )
                continue
            first_listed[zone] = f"{item_where} (line {line_of(item)})"
            zones[zone] = region_name
    return zones, used


def _submapping(reader: Reader, entries: Entries, name: str) -> Entries:
    if name not in entries:
        return {}
    return mapping(reader, entries[name][1], f"unblock.{name}", None) or {}
