"""Strict JSON for sync API bodies, decoded so that a large body never holds the GIL for long.

json.loads decodes a 20 MB snapshot in one C call of about 0.2 s, and the DNS loop waits that
long for the GIL even when the decoding runs in a worker thread. Here objects are walked
member by member in Python and only keys and member values other than objects (an account's
address list, a version) go to json's C scanner, so the interpreter hands the GIL over
between members. The grammar is json's, with two more rules: no duplicate keys (json keeps
the last, which would silently drop an account) and no NaN or Infinity. Every error is a
ShapeError whose message quotes nothing of the body.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NoReturn

from smartdns.config.model import RegistrationsConfig
from smartdns.registrations.entries import (
    AccountDocument,
    ShapeError,
    Snapshot,
    parse_account_document,
    parse_snapshot_document,
)

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's four (RFC 8259 §2)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def _no_constant(_name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


_SCANNER: Final = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def decode_account(body: bytes, rules: RegistrationsConfig) -> AccountDocument:
    """A `PUT /v1/accounts/{account}` body, decoded strictly and validated."""
    return parse_account_document(decode_body(body), rules)


def decode_snapshot(body: bytes, rules: RegistrationsConfig) -> Snapshot:
    """A snapshot document (`PUT /v1/snapshot`, `registrations import`), decoded strictly and
    validated; the decoded document is freed gradually (see free_gradually)."""
    document = decode_body(body)
    try:
        return parse_snapshot_document(document, rules)
    finally:
        if isinstance(document, dict):
            free_gradually(document)


def release_snapshot(holder: list[Snapshot]) -> None:
    """Drop the last reference to a stored snapshot, a little at a time (worker thread)."""
    # The copy takes the accounts over, so the snapshot's own dict goes without freeing them.
    free_gradually(dict(holder.pop().accounts))


def free_gradually(mapping: dict[str, Any]) -> None:
    """Empty `mapping` one item per step, and so each dict among its values (a decoded
    snapshot's `accounts`). Freeing a million objects in one C-level deallocation holds the
    GIL for a fifth of a second or more, stalling the DNS loop thread; between Python-level
    steps the interpreter hands the GIL over every switch interval."""
    while mapping:
        _, value = mapping.popitem()
        if isinstance(value, dict):
            free_gradually(value)


def decode_body(body: bytes) -> object:
    """The JSON value of `body` (UTF-8, or UTF-16/32 as json.loads detects them)."""
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        value, end = _value(text, _skip(text, 0))
        end = _skip(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as error:
        raise ShapeError(
            "", f"body is not valid JSON (line {error.lineno}, column {error.colno})"
        ) from None
    except UnicodeDecodeError:
        raise ShapeError("", "body is not UTF-8 JSON") from None
    except RecursionError:
        raise ShapeError("", "body is nested too deeply") from None
    except ValueError as error:
        # Our hooks and int() digit limits; their messages name no input.
        reason = str(error) if "JSON" in str(error) else "body has a number out of range"
        raise ShapeError("", reason) from None
    return value


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _value(text: str, index: int) -> tuple[object, int]:
    """The value starting at `index` and the index after it."""
    if text.startswith("{", index):
        return _object(text, index + 1)
    return _SCANNER.raw_decode(text, index)


def _object(text: str, index: int) -> tuple[dict[str, Any], int]:
    """The members of an object whose `{` ends before `index`, one at a time."""
    pairs: list[tuple[str, Any]] = []
    index = _skip(text, index)
    if text.startswith("}", index):
        return {}, index + 1
    while True:
        if not text.startswith('"', index):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, index
            )
        key, index = _SCANNER.raw_decode(text, index)
        index = _skip(text, index)
        if not text.startswith(":", index):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
        value, index = _value(text, _skip(text, index + 1))
        pairs.append((key, value))
        index = _skip(text, index)
        if text.startswith("}", index):
            return _unique_keys(pairs), index + 1
        if not text.startswith(",", index):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _skip(text, index + 1)
