"""atheris (libFuzzer) harness over the sync API's body parsers: json_body.decode_account and
decode_snapshot (the strict JSON walk, then SPEC 3's rules).

    pip install atheris
    python fuzz/fuzz_registrations.py --make-corpus fuzz/corpus_registrations
    python fuzz/fuzz_registrations.py /tmp/fuzz-work fuzz/corpus_registrations -max_total_time=1800

Input: one selector byte, then the body. Bit 0 picks the document (account or snapshot);
bit 1 `public_only` (true or false). Checked on every input:
- each parser returns its document or raises ShapeError/RegistrationError, nothing else;
- the strict walk agrees with json.loads wherever json.loads accepts the body without
  duplicate keys or NaN/Infinity (a body the walk accepts must be one json.loads accepts);
- an error's reason (the text after the entry's position) never quotes a string value of
  the body that looks like data (an address, hostname or device ID: six or more characters
  with a digit, dot or colon; SPEC 4 names entries by position only). The position may name
  an account id and field names: those are keys, not values.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    from smartdns.config.model import RegistrationsConfig
    from smartdns.errors import RegistrationError
    from smartdns.registrations.json_body import decode_account, decode_body, decode_snapshot

RULES = (RegistrationsConfig(public_only=True), RegistrationsConfig(public_only=False))
QUOTABLE = 6  # data-like string values this long must never appear in an error's reason
SEEDS: tuple[tuple[int, object], ...] = (
    (0, {"version": 7, "addresses": ["203.0.113.7", "2001:db8:7::/64"]}),
    (
        2,
        {
            "version": 7,
            "addresses": ["127.0.0.1", "10.1.0.0/16"],
            "hostnames": ["home.example.net"],
        },
    ),
    (0, {"version": 1, "addresses": [], "device_ids": ["k3v9q2m8x4t6w1z5y7r0a2b4"]}),
    (0, {"version": 1, "addresses": ["198.51.100.0/23"], "hostnames": ["a..b", "1.2.3.4"]}),
    (1, {"version": 9, "accounts": {"acct": ["203.0.113.9"], "acct2": {"addresses": []}}}),
    (
        3,
        {
            "version": 9,
            "accounts": {
                "a.b:c-d_e": {
                    "addresses": ["::ffff:203.0.113.1", "fe80::/64"],
                    "hostnames": ["dyn.example.org"],
                    "device_ids": ["abcdefghijklmnopqrstuvwxyz0123"],
                }
            },
        },
    ),
)


def strings_in(value: object) -> Iterator[str]:
    """Every string value (not key) in a decoded document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


def _plain_json(body: bytes) -> object | None:
    """json.loads' value when it accepts the body with no duplicate key and no NaN/Infinity
    literal, else None. (A number whose exponent overflows is json's float infinity on both
    sides: the rules reject it where a number is allowed at all.)"""
    rejected = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal rejected
        result = dict(items)
        rejected |= len(result) != len(items)
        return result

    def constant(_name: str) -> float:
        nonlocal rejected
        rejected = True
        return 0.0

    try:
        value = json.loads(body, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    return None if rejected else value


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    expected = _plain_json(body)
    try:
        walked = decode_body(body)
    except RegistrationError:
        walked = None
    if walked is not None:
        assert expected is not None and walked == expected, "the strict walk accepts more"
    rules = RULES[selector >> 1 & 1]
    parse = decode_snapshot if selector & 1 else decode_account
    try:
        parse(body, rules)
    except RegistrationError as error:
        reason = str(error).partition(": ")[2]
        for text in strings_in(expected):
            if len(text) >= QUOTABLE and any(c.isdigit() or c in ".:" for c in text):
                assert text not in reason, "an error quotes the body"


def write_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for index, (selector, document) in enumerate(SEEDS):
        body = json.dumps(document).encode()
        (directory / f"seed-{index}").write_bytes(bytes([selector]) + body)
    return len(SEEDS)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--make-corpus":
        print(f"{write_corpus(Path(argv[2]))} seeds written")
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
