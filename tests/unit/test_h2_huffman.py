"""h2_huffman: RFC 7541's examples, and agreement with the `hpack` library's decoder (output
or error) on valid strings of every octet, on URL-like strings with bits flipped and padding
added, and on random octets."""

from __future__ import annotations

import random

import pytest
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from smartdns.serve import h2_huffman

ENCODER = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
URL = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_/?=&.%"


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [  # RFC 7541 C.4.1-C.4.3
        ("f1e3c2e5f23a6ba0ab90f4ff", b"www.example.com"),
        ("a8eb10649cbf", b"no-cache"),
        ("25a849e95ba97d7f", b"custom-key"),
        ("25a849e95bb8e8b4bf", b"custom-value"),
        ("", b""),
    ],
)
def test_the_rfc_examples_decode(encoded: str, decoded: bytes) -> None:
    assert h2_huffman.decode(bytes.fromhex(encoded)) == decoded


@pytest.mark.parametrize(
    "encoded",
    [
        "ffffffff",  # EOS inside the string (30 one bits, then padding)
        "f1e3c2e5f23a6ba0ab90f4ffff",  # 8 or more bits of padding
        "f1e3c2e5f23a6ba0ab90f4fe",  # padding that is not all ones
        "fe",  # a code cut off
    ],
)
def test_what_is_not_a_huffman_string_raises(encoded: str) -> None:
    with pytest.raises(h2_huffman.HuffmanError):
        h2_huffman.decode(bytes.fromhex(encoded))


def _reference(encoded: bytes) -> bytes | None:
    try:
        return decode_huffman(encoded)
    except HPACKDecodingError:
        return None


def _ours(encoded: bytes) -> bytes | None:
    try:
        return h2_huffman.decode(encoded)
    except h2_huffman.HuffmanError:
        return None


def _samples(chance: random.Random) -> list[bytes]:
    samples = []
    for _ in range(3000):
        octets = bytes(chance.randrange(256) for _ in range(chance.randrange(40)))
        samples.append(ENCODER.encode(octets))
        samples.append(bytes(chance.randrange(256) for _ in range(chance.randrange(12))))
        url = bytearray(ENCODER.encode(bytes(chance.choices(URL, k=chance.randrange(70)))))
        if url and chance.random() < 0.5:
            url[chance.randrange(len(url))] ^= 1 << chance.randrange(8)
        samples.append(bytes(url) + b"\xff" * chance.choice([0, 0, 1, 2]))
    return samples


def test_it_agrees_with_the_hpack_decoder() -> None:
    samples = _samples(random.Random(16))
    assert [_ours(sample) for sample in samples] == [_reference(sample) for sample in samples]
    assert sum(_ours(sample) is None for sample in samples) > 1000  # errors were tried too


def test_no_code_but_eos_is_all_ones() -> None:
    """What the tail rule relies on: padding (one bits) never reads as a code."""
    all_ones = [
        symbol
        for symbol, (code, length) in enumerate(
            zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)
        )
        if code == (1 << length) - 1
    ]
    assert all_ones == [256]
