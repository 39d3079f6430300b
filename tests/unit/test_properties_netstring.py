"""Properties of the socketmap netstring reader: any split of the stream, any garbage.

Postfix's socketmap requests arrive in whatever pieces TCP delivers, and a hostile local client
may send anything: the reader must give back exactly the payloads that were sent, whatever the
read sizes, and otherwise fail with NetstringError only, for good, without buffering more than
one maximal request.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.outbound.netstring import NetstringError, NetstringReader, encode

SETTINGS = settings(max_examples=200, deadline=None)
MAX = 1000
READ_SIZES = (1, 16, 128, 4096)

payloads = st.lists(
    st.one_of(st.binary(max_size=80), st.sampled_from([b"", b"mtls example.com", b"1:,", b":,"])),
    max_size=8,
)


def feed_in_chunks(reader: NetstringReader, stream: bytes, size: int) -> list[bytes]:
    """Feed ``stream`` ``size`` bytes at a time, collecting payloads as a server would."""
    out: list[bytes] = []
    for start in range(0, len(stream), size):
        reader.feed(stream[start : start + size])
        while (payload := reader.next_payload()) is not None:
            out.append(payload)
    return out


@SETTINGS
@given(payloads)
def test_encode_then_decode_at_every_read_size(messages: list[bytes]) -> None:
    stream = b"".join(encode(m) for m in messages)
    for size in READ_SIZES:
        reader = NetstringReader(MAX)
        assert feed_in_chunks(reader, stream, size) == messages
        assert not reader.pending


@settings(max_examples=60, deadline=None)
@given(payloads.filter(lambda m: sum(len(p) for p in m) < 200))
def test_encode_then_decode_at_every_split_point(messages: list[bytes]) -> None:
    stream = b"".join(encode(m) for m in messages)
    for cut in range(len(stream) + 1):
        reader = NetstringReader(MAX)
        got = feed_in_chunks(reader, stream[:cut], max(cut, 1))
        got += feed_in_chunks(reader, stream[cut:], max(len(stream) - cut, 1))
        assert got == messages
        assert not reader.pending


@SETTINGS
@given(payloads, st.integers(1, 8))
def test_a_truncated_stream_is_pending_not_an_error(messages: list[bytes], cut: int) -> None:
    stream = b"".join(encode(m) for m in messages) + encode(b"last request")
    reader = NetstringReader(MAX)
    got = feed_in_chunks(reader, stream[:-cut], 7)
    assert got == messages
    assert reader.pending  # EOF now means truncation


garbage = st.one_of(
    st.binary(max_size=200),
    st.from_regex(rb"[0-9]{0,6}[:,]?.{0,20}", fullmatch=True),
    st.sampled_from(
        [b"+5:hello,", b" 5:hello,", b"5:hello;", b"\xd9\xa1:x,", b"99999999999:", b"-1:,"]
    ),
)


@SETTINGS
@given(st.lists(garbage, min_size=1, max_size=4), st.sampled_from(READ_SIZES))
@example([b"\xef\xbc\x95:hello,"], 1)  # a full-width digit five is not a length
def test_garbage_gives_payloads_or_netstring_error_only(chunks: list[bytes], size: int) -> None:
    reader = NetstringReader(MAX)
    stream = b"".join(chunks)
    try:
        for payload in feed_in_chunks(reader, stream, size):
            assert len(payload) <= MAX
    except NetstringError as exc:
        assert len(str(exc)) < 100 and str(exc).isprintable()
        # The failure is final: the stream has no boundaries left to trust.
        reader.feed(encode(b"mtls example.com"))
        try:
            reader.next_payload()
        except NetstringError:
            pass
        else:
            raise AssertionError("reader recovered after a framing error") from None


@SETTINGS
@given(st.binary(min_size=1, max_size=3000), st.sampled_from(READ_SIZES))
def test_the_buffer_never_holds_more_than_one_maximal_request(stream: bytes, size: int) -> None:
    reader = NetstringReader(MAX)
    try:
        for start in range(0, len(stream), size):
            reader.feed(stream[start : start + size])
            while reader.next_payload() is not None:
                pass
            assert len(reader._buffer) <= MAX + len(str(MAX)) + 2 + size
    except NetstringError:
        pass


@SETTINGS
@given(st.integers(MAX + 1, 10**12), st.sampled_from(READ_SIZES))
def test_an_oversized_length_fails_before_the_payload_arrives(length: int, size: int) -> None:
    reader = NetstringReader(MAX)
    header = b"%d:" % length
    try:
        feed_in_chunks(reader, header, size)
    except NetstringError:
        return
    raise AssertionError(f"{header!r} accepted")
