"""YAML nodes to values: the `Reader` that records every problem at its line, and the
converters for plain kinds of value (integers in a range, seconds, true/false, text, paths,
one of a few words, lists without repeats).

The YAML is composed into nodes, not loaded, so every value keeps its line; scalars are
converted where they are checked and nothing untyped leaves this package. No I/O.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

TAG_NULL: Final = "tag:yaml.org,2002:null"
TAG_BOOL: Final = "tag:yaml.org,2002:bool"
TAG_INT: Final = "tag:yaml.org,2002:int"
TAG_FLOAT: Final = "tag:yaml.org,2002:float"
TAG_STR: Final = "tag:yaml.org,2002:str"
# Plain scalars YAML 1.1 reads as numbers (`1.5`, sexagesimal `1:2:3`) are still the text the
# operator wrote; where a name or an address is expected that text is what counts.
TEXT_TAGS: Final = frozenset({TAG_STR, TAG_INT, TAG_FLOAT})

_T = TypeVar("_T")


class Reader:
    """One pass over the composed document: converts what is valid, records every problem."""

    def __init__(self, path: Path, *, certificates: bool = True) -> None:
        self.path = path
        # Inspect encrypted's certificate pair (reads both files); the registrations CLI
        # does not serve TLS and skips it.
        self.certificates = certificates
        # Relative file paths in the config are relative to the config file, not the cwd.
        self.base_dir = path.parent
        self._problems: list[tuple[int, int, str]] = []
        self._bad_nodes: set[int] = set()
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, node: Node, message: str) -> None:
        self._problems.append((line_of(node), len(self._problems), message))
        self._bad_nodes.add(id(node))

    def has_problem(self, node: Node) -> bool:
        """True when a problem was recorded on `node` (its value was not converted)."""
        return id(node) in self._bad_nodes

    def problems(self) -> list[str]:
        # Sorted by line so the operator can work down the file; ties keep discovery order.
        return [f"{self.path}:{line}: {message}" for line, _, message in sorted(self._problems)]

    def scalar(self, node: ScalarNode) -> object:
        value: object = self._constructor.construct_object(node)
        return value


Converter = Callable[[Reader, Node, str], object]
"""Checks one value node; returns the converted value, or None after recording a problem."""


def line_of(node: Node) -> int:
    mark = node.start_mark
    return mark.line + 1 if mark is not None else 1


def shown(node: Node) -> str:
    """How a wrong value is named in a message: the text as written, or its kind."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == TAG_NULL:
        return "an empty value"
    if node.tag == TAG_STR:
        return f'"{node.value}"'
    return str(node.value)


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == TAG_NULL


def mapping(
    reader: Reader, node: Node, where: str, allowed: Collection[str] | None
) -> dict[str, tuple[Node, Node]] | None:
    """Key name → (key node, value node); unknown and duplicate keys are problems.

    PyYAML's loader silently keeps the last of two equal keys; composing lets us see both.
    `where` is the dotted path of the mapping ("" for the top level).
    """
    if not isinstance(node, MappingNode):
        reader.add(node, f"{where}: expected a mapping, got {shown(node)}")
        return None
    inside = f"in {where}" if where else "at top level"
    entries: dict[str, tuple[Node, Node]] = {}
    pairs: list[tuple[Node, Node]] = list(node.value)
    for key, value in pairs:
        if not isinstance(key, ScalarNode) or key.tag == TAG_NULL:
            reader.add(key, f"{where or 'top level'}: keys must be plain names, got {shown(key)}")
            continue
        name = str(key.value)
        if name in entries:
            first = line_of(entries[name][0])
            reader.add(key, f'duplicate key "{name}" {inside} (first on line {first})')
            continue
        if allowed is not None and name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = (
                f'did you mean "{close[0]}"?' if close else "expected one of: " + ", ".join(allowed)
            )
            reader.add(key, f'unknown key "{name}" {inside} ({hint})')
            continue
        entries[name] = (key, value)
    return entries


def sequence(reader: Reader, node: Node, where: str) -> list[Node] | None:
    if not isinstance(node, SequenceNode):
        reader.add(node, f"{where}: expected a list, got {shown(node)}")
        return None
    items: list[Node] = list(node.value)
    return items


def string(reader: Reader, node: Node, where: str) -> str | None:
    if isinstance(node, ScalarNode) and node.tag in TEXT_TAGS:
        return str(node.value)
    reader.add(node, f"{where}: expected a string, got {shown(node)}")
    return None


def integer(reader: Reader, node: Node, where: str) -> int | None:
    # The int tag never matches true/false, so a bool is not mistaken for 1 or 0.
    if isinstance(node, ScalarNode) and node.tag == TAG_INT:
        value = reader.scalar(node)
        if isinstance(value, int):
            return value
    reader.add(node, f"{where}: expected an integer, got {shown(node)}")
    return None


def _range_text(low: int, high: int | None) -> str:
    return f"at least {low}" if high is None else f"{low}..{high}"


def int_field(low: int, high: int | None = None) -> Converter:
    def convert(reader: Reader, node: Node, where: str) -> int | None:
        value = integer(reader, node, where)
        if value is None:
            return None
        if value < low or (high is not None and value > high):
            reader.add(node, f"{where}: must be {_range_text(low, high)}, got {value}")
            return None
        return value

    return convert


def seconds_field(maximum_s: float | None = None) -> Converter:
    def convert(reader: Reader, node: Node, where: str) -> float | None:
        value: object = None
        if isinstance(node, ScalarNode) and node.tag in (TAG_INT, TAG_FLOAT):
            value = reader.scalar(node)
        if not isinstance(value, int | float):
            reader.add(node, f"{where}: expected a number of seconds, got {shown(node)}")
            return None
        seconds = float(value)
        too_long = maximum_s is not None and seconds > maximum_s
        if not math.isfinite(seconds) or seconds <= 0 or too_long:
            limit = "" if maximum_s is None else f" and at most {maximum_s:g}"
            reader.add(node, f"{where}: must be more than 0{limit} seconds, got {node.value}")
            return None
        return seconds

    return convert


def boolean(reader: Reader, node: Node, where: str) -> bool | None:
    if isinstance(node, ScalarNode) and node.tag == TAG_BOOL:
        return reader.scalar(node) is True
    reader.add(node, f"{where}: expected true or false, got {shown(node)}")
    return None


def file_path(reader: Reader, node: Node, where: str) -> Path | None:
    text = string(reader, node, where)
    if text is None:
        return None
    if not text.strip():
        reader.add(node, f"{where}: must not be empty")
        return None
    path = Path(text)
    return path if path.is_absolute() else (reader.base_dir / path).resolve()


def choice_field(choices: Sequence[str], make: Callable[[str], _T]) -> Converter:
    """One of a few words (any case), returned as `make(word)` of its lower-case form."""

    def convert(reader: Reader, node: Node, where: str) -> _T | None:
        word = string(reader, node, where)
        if word is None:
            return None
        if word.lower() not in choices:
            reader.add(node, f'{where}: "{word}" must be one of {" | ".join(choices)}')
            return None
        return make(word.lower())

    return convert


def unique_list_field(
    convert_one: Converter, what: str, *, may_be_empty: bool = False
) -> Converter:
    """A list (non-empty unless `may_be_empty`) converted item by item into a tuple; a value
    listed twice (after conversion: `[::1]:53` and `[0::1]:53` are the same) is a problem at
    the second one."""

    def convert(reader: Reader, node: Node, where: str) -> tuple[object, ...] | None:
        items = sequence(reader, node, where)
        if items is None:
            return None
        if not items and not may_be_empty:
            reader.add(node, f"{where}: must list at least one {what}")
            return None
        found: dict[object, str] = {}
        valid = True
        for index, item in enumerate(items):
            item_where = f"{where}[{index}]"
            value = convert_one(reader, item, item_where)
            if value is None:
                valid = False
            elif value in found:
                reader.add(item, f'{item_where}: "{value}" is listed twice (also {found[value]})')
                valid = False
            else:
                found[value] = item_where
        return tuple(found) if valid else None

    return convert


Entries = dict[str, tuple[Node, Node]]
"""A mapping as read: key name → (key node, value node)."""


def section_entries(
    reader: Reader, node: Node | None, where: str, allowed: Collection[str]
) -> Entries:
    """The keys of a section; an absent section, or an empty one (`server:` with every key
    commented out), has none."""
    if node is None or is_null(node):
        return {}
    return mapping(reader, node, where, allowed) or {}


def convert_fields(
    reader: Reader, entries: Entries, where: str, fields: Mapping[str, Converter]
) -> dict[str, object]:
    """The keys of `entries` that `fields` knows, each converted; keys whose value has a
    problem are left out, so they keep their default."""
    values: dict[str, object] = {}
    for name, (_, node) in entries.items():
        if name in fields:
            value = fields[name](reader, node, f"{where}.{name}")
            if value is not None:
                values[name] = value
    return values


def build(make: Callable[..., _T], values: Mapping[str, object]) -> _T:
    """Build a config dataclass from the keys present, so defaults live only in the dataclass.

    `values` is typed `object` because it is keyed by YAML names; each value was converted
    to its field's type by that field's converter, which is what mypy cannot see here.
    """
    return make(**values)
