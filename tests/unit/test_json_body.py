"""json_body: the member-by-member decoder accepts exactly what json.loads accepts, gives the
same value and the same error position, and adds the duplicate-key and NaN rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartdns.registrations.entries import ShapeError
from smartdns.registrations.json_body import decode_body
from tests.unit.test_fuzz_wire import CI

VALID = [
    b'{"version": 1, "accounts": {"a": ["192.0.2.1", "2001:db8::/48"], "b": []}}',
    b' \t\r\n{ "version" :1 ,"accounts":{ } } \n',
    b"{}",
    b'{"a": {"b": {"c": {}}}, "d": [{"e": {"f": null}}, true, false, -1.5e3]}',
    b'{"\\u00e9t\\u00e9": "\\ud83d\\ude00", "": ""}',
    b"[1, 2, {}]",
    b'"text"',
    b"12",
    '{"ä": "ö"}'.encode(),
    b"\xef\xbb\xbf" + b'{"bom": 1}',  # a UTF-8 byte order mark, as json.loads takes bytes
    '{"utf16": [1]}'.encode("utf-16"),
]


@pytest.mark.parametrize("raw", VALID, ids=[str(i) for i in range(len(VALID))])
def test_valid_documents_decode_as_json_loads_does(raw: bytes) -> None:
    assert decode_body(raw) == json.loads(raw)


MALFORMED = [
    b"",
    b"   ",
    b"{",
    b'{"a"',
    b'{"a" 1}',
    b'{"a": 1 "b": 2}',
    b'{"a": 1,}',
    b"{,}",
    b"{'a': 1}",
    b'{"a": }',
    b'{"a": 1} x',
    b'{"a": 1}}',
    b'{"version": 1,\n "accounts": {"x": ["192.0.2.1",]}}',
    b'{"version": 1,\n  "accounts": {"x": ["192.0.2.1"]\n  "y": []}}',
    b'{"a": "unterminated}',
    b'{"a": "control \x01 char"}',
    b"not json",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_documents_fail_at_the_position_json_loads_reports(raw: bytes) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(raw)
    with pytest.raises(ShapeError) as error:
        decode_body(raw)
    position = f"line {expected.value.lineno}, column {expected.value.colno}"
    assert str(error.value) == f"body is not valid JSON ({position})"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"version": 1, "version": 2}',
        b'{"accounts": {"a": [], "b": [], "a": []}}',
        b'{"x": [{"k": 1, "k": 1}]}',
        b'{"x": {"y": {"z": 1, "z": 2}}}',
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(raw: bytes) -> None:
    with pytest.raises(ShapeError, match="duplicate key"):
        decode_body(raw)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("template", [b'{"v": %s}', b'{"a": {"b": [1, %s]}}', b"%s"])
def test_nan_and_infinity_are_refused(template: bytes, constant: bytes) -> None:
    with pytest.raises(ShapeError, match="NaN and Infinity are not JSON"):
        decode_body(template % constant)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "body is nested too deeply"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body is nested too deeply"),
        (b'{"v": 1' + b"0" * 5000 + b"}", "body has a number out of range"),
        (b'{"v": "\xff"}', "body is not UTF-8 JSON"),
    ],
    ids=["objects", "arrays", "digits", "utf8"],
)
def test_other_failures_name_no_input(raw: bytes, reason: str) -> None:
    with pytest.raises(ShapeError) as error:
        decode_body(raw)
    assert str(error.value) == reason


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@CI
@given(json_values, st.sampled_from([None, 0, 2]), st.sampled_from([(",", ":"), (" ,", " : ")]))
def test_any_json_round_trips(
    value: object, indent: int | None, separators: tuple[str, str]
) -> None:
    raw = json.dumps(value, indent=indent, separators=separators).encode()
    assert decode_body(raw) == json.loads(raw)


def _reference(raw: bytes) -> str:
    """What json.loads with the same two extra rules makes of `raw`, as decode_body words it."""

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        if len(dict(pairs)) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def constant(_name: str) -> None:
        raise ValueError("NaN and Infinity are not JSON")

    try:
        return repr(json.loads(raw, object_pairs_hook=unique, parse_constant=constant))
    except json.JSONDecodeError as error:
        return f"body is not valid JSON (line {error.lineno}, column {error.colno})"
    except UnicodeDecodeError:
        return "body is not UTF-8 JSON"
    except ValueError as error:
        return str(error)


@CI
@given(json_values, st.data())
def test_mutated_json_fails_or_decodes_as_json_loads_does(
    value: object, data: st.DataObject
) -> None:
    raw = bytearray(json.dumps(value, separators=(", ", ": ")).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        byte = data.draw(st.sampled_from(b'{}[]:,"\\ 0aeEnN-.\x01\xff'))
        if data.draw(st.booleans()) or at == len(raw):
            raw.insert(at, byte)
        else:
            del raw[at]
    try:
        outcome = repr(decode_body(bytes(raw)))
    except ShapeError as error:
        outcome = str(error)
    assert outcome.replace("duplicate key in a JSON object", "duplicate key") == _reference(
        bytes(raw)
    )
