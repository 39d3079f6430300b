"""The incremental netstring parser, replayed at read sizes 4096, 128, 16 and 1."""

from __future__ import annotations

import pytest

from mtls_milter.outbound.netstring import NetstringError, NetstringReader, encode

READ_SIZES = (4096, 128, 16, 1)


def replay(stream: bytes, size: int, max_length: int = 1000) -> tuple[list[bytes], str, bool]:
    """Feed ``stream`` in ``size`` chunks: (payloads, error text or "", pending at the end)."""
    reader = NetstringReader(max_length)
    payloads: list[bytes] = []
    for i in range(0, len(stream), size):
        reader.feed(stream[i : i + size])
        while True:
            try:
                payload = reader.next_payload()
            except NetstringError as exc:
                return payloads, str(exc), reader.pending
            if payload is None:
                break
            payloads.append(payload)
    return payloads, "", reader.pending


# (stream, payloads, error substring or "", pending at end)
CASES: list[tuple[str, bytes, list[bytes], str, bool]] = [
    ("one", b"16:mtls example.com,", [b"mtls example.com"], "", False),
    ("empty payload", b"0:,", [b""], "", False),
    ("pipelined", b"6:mtls a,6:mtls b,6:mtls c,", [b"mtls a", b"mtls b", b"mtls c"], "", False),
    ("binary payload", b"3:\x00,:,", [b"\x00,:"], "", False),
    ("max length", b"1000:" + b"x" * 1000 + b",", [b"x" * 1000], "", False),
    ("oversized", b"1001:" + b"x" * 1001 + b",", [], "longer than 1000", False),
    ("oversized digits", b"99999999999999999999:", [], "longer than 1000", False),
    ("non-numeric", b"abc:mtls,", [], "not a number", False),
    ("sign", b"+6:mtls a,", [], "not a number", False),
    ("empty length", b":mtls,", [], "not a number", False),
    ("missing comma", b"6:mtls ab", [], "not terminated", False),
    ("missing comma later", b"6:mtls a,6:mtls b;", [b"mtls a"], "not terminated", False),
    ("truncated payload", b"16:mtls exam", [], "", True),
    ("truncated length", b"16", [], "", True),
    ("after good, garbage", b"6:mtls a,GET / HTTP/1.0\r\n", [b"mtls a"], "not a number", False),
]


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(
    ("stream", "payloads", "error", "pending"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_replay(stream: bytes, payloads: list[bytes], error: str, pending: bool, size: int) -> None:
    got, got_error, got_pending = replay(stream, size)
    assert got == payloads
    if error:
        assert error in got_error
    else:
        assert got_error == ""
        assert got_pending is pending


def test_error_is_sticky() -> None:
    reader = NetstringReader(100)
    reader.feed(b"x:")
    with pytest.raises(NetstringError):
        reader.next_payload()
    reader.feed(b"1:a,")
    with pytest.raises(NetstringError):
        reader.next_payload()


def test_encode_round_trip() -> None:
    data = b"OK secure match=mx1.example:mx2.example servername=hostname"
    assert encode(data) == b"%d:%s," % (len(data), data)
    assert replay(encode(data) + encode(b""), 1) == ([data, b""], "", False)
